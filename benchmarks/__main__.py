"""`python -m benchmarks` (make bench): run every benchmark; JSON results land in build/bench/."""

from benchmarks import checkpoint, data_loader, step_overhead

for bench in (data_loader, checkpoint, step_overhead):
    bench.main()
