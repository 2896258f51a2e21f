"""The embedded default against the plain script users leave: `difftrain-dist train` on the
embedded local Ray cluster (1 and 2 workers) and benchmarks/plain_lora.py (the shape of
diffusers' train_text_to_image_lora.py) run as that example's README runs it, under `accelerate
launch`, and as a bare `python -m`, on the same job: the tiny SD1.5, the scikit-image
photographs at 64 px, batch 4 (split over the workers), LoRA rank 4, 60 steps, a checkpoint
every 20 steps, no sampling. Rounds alternate the four commands, each in a fresh folder.

Timed rounds give per run: time until step 1 is done (from the command's start to the wall
time its step log gives step 1), end-to-end wall and steady samples/s (steps 20 -> 60, the same
checkpoints included in both). Memory rounds, apart because reading smaps costs CPU, give the
peak PSS of the whole process tree (the command and every process it started, Ray's included;
summed from /proc every 0.2 s via psutil). Every run records its largest process count and
whether a compiler ran (DeepSpeed building an op at run time). Ratios are ours / plain, round by
round: the median and the spread (min-max) over rounds.

Targets, ours with 1 worker against the example under accelerate launch: time to step 1 <= 2x,
end-to-end wall <= 1.5x, steady samples/s >= 1.5x, peak PSS <= 2x. The bare `python -m`
figures are printed beside them.

    python -m benchmarks.embedded_start [--rounds 3] [--memory-rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.common import machine, tiny_assets, write_result

STEPS, BATCH, RANK, RESOLUTION, EVERY = 60, 4, 4, 64, 20
COMPILERS = {"cc1plus", "c++", "g++", "gcc", "ninja", "nvcc"}
TARGETS = {"time_to_step_1": ("<=", 2.0), "wall": ("<=", 1.5), "steady_samples_per_s": (">=", 1.5),
           "peak_pss": ("<=", 2.0)}


class TreeSampler:
    """Polls a process and all its descendants every 0.2 s: the names of every process seen, the
    peak process count and, with `memory`, the peak summed PSS (bytes; reading a process's
    smaps costs a few ms of CPU, so timed runs leave it out)."""

    def __init__(self, pid: int, *, memory: bool, every_s: float = 0.2):
        self.root, self.memory, self.every_s = psutil.Process(pid), memory, every_s
        self.peak_pss, self.peak_processes, self.names = 0, 0, set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for proc in tree:
                try:
                    self.names.add(proc.name())
                    total += proc.memory_full_info().pss if self.memory else 0
                except psutil.Error:  # ended meanwhile
                    continue
            self.peak_pss = max(self.peak_pss, total)
            self.peak_processes = max(self.peak_processes, len(tree))
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def timed_run(cmd: list[str], cwd: Path, steps_of, memory: bool) -> dict:
    """Run `cmd`; `steps_of()` then gives {step: Unix wall time}. Returns the run's figures: the
    times, or with `memory` the peak PSS instead."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid, memory=memory)
    out, err = proc.communicate(timeout=900)
    wall = time.time() - start
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{err[-3000:]}")
    seen = {"peak_processes": sampler.peak_processes, "compilers_seen": sorted(sampler.names & COMPILERS),
            "output_lines": len((out + err).splitlines())}
    if memory:  # its times are those of a run that shares the CPU with the sampler
        return {"peak_pss_mib": sampler.peak_pss / 2**20, **seen}
    steps = steps_of()
    return {"time_to_step_1_s": steps[1] - start, "wall_s": wall,
            "steady_samples_per_s": (STEPS - EVERY) * BATCH / (steps[STEPS] - steps[EVERY]), **seen}


ACCELERATE_LAUNCH = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]
"""`accelerate launch` as the diffusers example's README runs it, options given (no config file)."""


def plain_run(root: Path, model: Path, photos: Path, *, launcher: bool, memory: bool = False) -> dict:
    """benchmarks/plain_lora.py under `accelerate launch` (`launcher`) or as a bare `python -m`."""
    out = Path(tempfile.mkdtemp(prefix="plain-", dir=root))
    cmd = [sys.executable, *(ACCELERATE_LAUNCH if launcher else []), "-m", "benchmarks.plain_lora", str(model),
           str(photos), str(out), "--steps", str(STEPS), "--batch", str(BATCH), "--rank", str(RANK),
           "--resolution", str(RESOLUTION), "--checkpoint-every", str(EVERY)]

    def steps():
        lines = (out / "steps.jsonl").read_text().splitlines()
        return {e["step"]: e["wall_time"] for e in map(json.loads, lines)}

    return timed_run(cmd, Path.cwd(), steps, memory)


def ours_run(root: Path, model: Path, shards: Path, workers: int, *, memory: bool = False) -> dict:
    """`difftrain-dist train` with the recipe defaults but for the job's shape."""
    folder = Path(tempfile.mkdtemp(prefix=f"ours{workers}-", dir=root))
    recipe = {
        "run": {"name": "bench", "storage_path": str(folder / "runs"), "output_dir": str(folder / "out")},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": RANK, "alpha": RANK},
        "data": {"shards": str(shards), "resolution": RESOLUTION, "micro_batch_size": BATCH // workers},
        "train": {"max_steps": STEPS, "lr": 1e-4},
        "distributed": {"num_workers": workers},
        "checkpoint": {"every_n_steps": EVERY, "keep_last": None},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "difftrain_dist", "train", "recipe.yaml"]

    def steps():
        from difftrain_dist.distrib.metrics import read_metrics

        return {e["step"]: e["wall_time"] for e in read_metrics(folder / "runs" / "bench")}

    return timed_run(cmd, folder, steps, memory)


FIGURES = {"time_to_step_1": "time_to_step_1_s", "wall": "wall_s", "steady_samples_per_s": "steady_samples_per_s",
           "peak_pss": "peak_pss_mib"}
"""Figure name → its key in a run's result; peak_pss comes from the memory rounds, the rest
from the timed rounds."""
RUNS = ("plain_accelerate", "plain_python", "ours_1_worker", "ours_2_workers")
LABELS = {"plain_accelerate": "plain, accelerate launch", "plain_python": "plain, python -m",
          "ours_1_worker": "ours, 1 worker", "ours_2_workers": "ours, 2 workers"}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(ours: list[dict], plain: list[dict]) -> dict:
    """Per figure: ours / plain round by round (runs of the same round paired), their median,
    min and max; a figure only where both runs of a round have it."""
    result = {}
    for name, key in FIGURES.items():
        per_round = [o[key] / p[key] for o, p in zip(ours, plain, strict=True) if key in o and key in p]
        if per_round:
            result[name] = spread(per_round)
    return result


def verdict(name: str, median: float) -> bool:
    op, bound = TARGETS[name]
    return median <= bound if op == "<=" else median >= bound


def one_round(root: Path, model: Path, shards: Path, *, memory: bool) -> dict[str, dict]:
    """Each of the four commands once, in RUNS' interleaved order."""
    return {"plain_accelerate": plain_run(root, model, root / "photos", launcher=True, memory=memory),
            "ours_1_worker": ours_run(root, model, shards, 1, memory=memory),
            "plain_python": plain_run(root, model, root / "photos", launcher=False, memory=memory),
            "ours_2_workers": ours_run(root, model, shards, 2, memory=memory)}


def report(runs: dict[str, list[dict]], compared: dict[str, dict], rounds: int, memory_rounds: int) -> None:
    print(f"embedded start vs the plain script (tiny SD1.5, {RESOLUTION} px, batch {BATCH}, rank {RANK}, "
          f"{STEPS} steps, checkpoint every {EVERY}; {rounds} timed and {memory_rounds} memory rounds, alternating; "
          f"{machine()}):")
    for name in RUNS:
        figures = runs[name]
        medians = {what: statistics.median(r[key] for r in figures if key in r) for what, key in FIGURES.items()}
        print(f"  {LABELS[name]:25s} " + ", ".join(f"{what} {value:.2f}" for what, value in medians.items())
              + f", processes {max(r['peak_processes'] for r in figures)}"
              + f", compilers {sorted({c for r in figures for c in r['compilers_seen']}) or 'none'}")
    for name, table in compared.items():
        print(f"  {name}: " + ", ".join(
            f"{what} {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" for what, r in table.items()))


def main(rounds: int, memory_rounds: int) -> dict:
    played: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="embedded-start-", dir="/tmp") as tmp:
        root = Path(tmp)
        model, shards = tiny_assets(root, resolution=RESOLUTION)
        played += [one_round(root, model, shards, memory=False) for _ in range(rounds)]
        played += [one_round(root, model, shards, memory=True) for _ in range(memory_rounds)]
    runs = {name: [r[name] for r in played] for name in RUNS}
    compared = {f"{ours}_vs_{plain}": ratios(runs[ours], runs[plain])
                for ours in ("ours_1_worker", "ours_2_workers") for plain in ("plain_accelerate", "plain_python")}
    judged = compared["ours_1_worker_vs_plain_accelerate"]
    result = {"steps": STEPS, "batch": BATCH, "rank": RANK, "resolution": RESOLUTION, "checkpoint_every": EVERY,
              "rounds": rounds, "memory_rounds": memory_rounds, "runs": runs, "ratios": compared,
              "targets": {name: f"{op} {bound}" for name, (op, bound) in TARGETS.items()},
              "met": {name: verdict(name, judged[name]["median"]) for name in TARGETS},
              "compilers_seen": sorted({c for rs in runs.values() for r in rs for c in r["compilers_seen"]})}
    report(runs, compared, rounds, memory_rounds)
    write_result("embedded_start", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="embedded default vs the plain script")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (no memory sampling)")
    parser.add_argument("--memory-rounds", type=int, default=1, help="rounds sampling PSS every 0.2 s")
    args = parser.parse_args()
    main(args.rounds, args.memory_rounds)
