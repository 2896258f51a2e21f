"""`python -m benchmarks` (make bench): run every benchmark; JSON results land in build/bench/.

The GPU check (SDXL and FLUX layouts at 1024 px against a plain eager loop) runs too when a CUDA
GPU is present.
"""

import torch

from benchmarks import checkpoint, communication, data_loader, scaling, step_overhead

for bench in (data_loader, checkpoint, step_overhead, communication, scaling):
    bench.main()
if torch.cuda.is_available():
    from benchmarks import gpu_check

    gpu_check.main([])
