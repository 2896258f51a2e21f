"""Scaling and memory: the full `difftrain-dist train` command (embedded Ray cluster, rank actors,
DeepSpeed ZeRO-2 over gloo, streaming reader) on the tiny SD1.5 model at 1 and 2 workers, one CPU
each, measured in one run: samples/s in the steady state (median over steps after warm-up, from
the run's own progress lines), scaling efficiency = samples/s(2) / (2 x samples/s(1)), and each
worker's peak RSS (recorded in its checkpoint manifest).

    python -m benchmarks.scaling
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import machine, tiny_assets, write_result

STEPS = 16
WARMUP = 4
BATCH = 2
RATE = re.compile(r"step (\d+)/\d+ +loss \S+ +([\d.]+) samples/s")


def run(root: Path, model: Path, shards: Path, workers: int) -> dict:
    """One training run; returns samples/s (median of steps after WARMUP) and peak RSS per rank."""
    name = f"scale-{workers}"
    recipe = {
        "run": {"name": name, "storage_path": str(root / "runs"), "output_dir": str(root / "out")},
        "model": {"path": str(model)},
        "lora": {"rank": 16, "alpha": 16},
        "data": {"shards": str(shards), "micro_batch_size": BATCH},
        "train": {"max_steps": STEPS, "lr": 1e-4},
        "distributed": {"num_workers": workers, "zero_stage": 2, "cpus_per_worker": 1},
        "checkpoint": {"every_n_steps": STEPS},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "difftrain_dist", "train", str(path)],  # not a terminal: lines
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"training with {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
    rates = [float(rate) for step, rate in RATE.findall(proc.stderr) if int(step) > WARMUP]
    checkpoint = root / "runs" / name / f"checkpoint_{STEPS:09d}"
    rss = [json.loads((checkpoint / f"rank_{r}.json").read_text())["peak_rss_mib"] for r in range(workers)]
    return {"samples_per_s": statistics.median(rates), "steps_measured": len(rates), "peak_rss_mib": rss}


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="scale-", dir="/tmp") as tmp:
        root = Path(tmp)
        model, shards = tiny_assets(root)
        one, two = run(root, model, shards, 1), run(root, model, shards, 2)
    efficiency = two["samples_per_s"] / (2 * one["samples_per_s"])
    result = {"batch_per_worker": BATCH, "one_worker": one, "two_workers": two, "efficiency": efficiency}
    print(f"scaling (tiny SD1.5, batch {BATCH} per worker, 1 CPU each, {machine()}): "
          f"1 worker {one['samples_per_s']:.2f} samples/s, 2 workers {two['samples_per_s']:.2f} samples/s, "
          f"efficiency {efficiency:.2f}")
    print(f"memory: peak RSS per worker {', '.join(f'{m:.0f}' for m in one['peak_rss_mib'])} MiB (1 worker), "
          f"{', '.join(f'{m:.0f}' for m in two['peak_rss_mib'])} MiB (2 workers)")
    write_result("scaling", result)
    return result


if __name__ == "__main__":
    main()
