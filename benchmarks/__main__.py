"""`python -m benchmarks` (make bench): run every benchmark, each in a fresh process (DeepSpeed
keeps process-group state between engines), print its figures and how long it took; JSON results
land in build/bench/. The GPU check runs too when a CUDA GPU is present.
"""

import subprocess
import sys
import time

import torch

BENCHMARKS = ["data_loader", "checkpoint", "step_overhead", "communication", "scaling"]

if __name__ == "__main__":
    if torch.cuda.is_available():
        BENCHMARKS.append("gpu_check")
    failed = []
    for name in BENCHMARKS:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], capture_output=True, text=True)
        figures = [line for line in proc.stdout.splitlines() if line.strip()]
        print("\n".join(figures[-12:]))
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)", flush=True)
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-3000:], file=sys.stderr)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
