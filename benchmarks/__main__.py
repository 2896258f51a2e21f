"""`python -m benchmarks` (make bench): run every benchmark; JSON results land in build/bench/."""

from benchmarks import checkpoint

for bench in (checkpoint,):
    bench.main()
