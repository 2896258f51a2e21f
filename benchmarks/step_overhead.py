"""Step overhead: our worker loop's step (the recipe defaults: DeepSpeed engine, ZeRO-1, streaming
shard reader, per-step all-reduce) against a bare eager PyTorch loop doing the same
forward/backward/AdamW step on the same model and batch size, one rank, one CPU thread,
interleaved in one run.

Layouts (benchmarks/layouts.py): "sd15", the tiny SD1.5 (target: ours/bare <= 1.10); "sdxl",
SDXL's block structure at full depth with tiny widths, where per-tensor and kernel-launch work
dominate as SDXL's does on a modern GPU (target: bare/ours, `speedup_vs_bare_eager`, >= 1.05).
Ray's share (driver, progress board) is outside the step and not included here.

    python -m benchmarks.step_overhead [--layout sd15|sdxl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import single_rank_group, write_result
from benchmarks.layouts import LAYOUTS, RESOLUTION, layout_assets
from difftrain_dist.config import recipe_from_dict
from difftrain_dist.data_shards import ShardStream
from difftrain_dist.distrib.data import make_loader
from difftrain_dist.distrib.loop import frozen_setup_objects
from difftrain_dist.distrib.step import reduce_step_stats, train_step
from difftrain_dist.distrib.trainee import setup_trainee
from difftrain_dist.models import get_adapter, inject_lora

WARMUP = 5
STEPS = {"sd15": 60, "sdxl": 40}
BATCH = 2


def bare_step(arch: str, model: Path, batch: dict):
    """A plain loop's step on one fixed batch: no DeepSpeed, no data loading, no collectives."""
    torch.manual_seed(0)
    adapter = get_adapter(arch).from_pretrained(str(model), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(adapter.denoiser, rank=16, alpha=16, target_modules=adapter.default_lora_targets)
    adapter.denoiser.train()
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step():
        with torch.no_grad():
            latents = adapter.encode_images(batch["pixel_values"], generator=generator)
            conditioning = adapter.batch_conditioning(batch)
        loss = adapter.training_loss(adapter.denoiser, latents, conditioning, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def our_step(root: Path, arch: str, model: Path, shards: Path, resolution: int):
    """The worker loop's step (recipe defaults: DeepSpeed ZeRO-1) on streamed batches.

    Returns (step function, ZeRO stage, seconds each step waited for its batch)."""
    recipe = recipe_from_dict({
        "run": {"name": "bench", "storage_path": str(root / "runs"), "output_dir": str(root / "out")},
        "model": {"arch": arch, "path": str(model)},
        "lora": {"rank": 16, "alpha": 16},
        "data": {"shards": str(shards), "resolution": resolution, "micro_batch_size": BATCH},
        "train": {"max_steps": 1000},
    })
    trainee = setup_trainee(recipe, 0)
    stream = ShardStream(shards, micro_batch_size=BATCH, global_rank=0, world_size=1, seed=0)
    batches = iter(make_loader(stream, recipe))
    data_waits: list[float] = []

    def step():
        start = time.perf_counter()
        batch = next(batches)
        data_waits.append(time.perf_counter() - start)
        return reduce_step_stats(train_step(trainee, iter([batch]), 1), False)

    return step, recipe.distributed.zero_stage, data_waits


def interleaved(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of each step function, called in turn round after round (so that
    machine load drifts hit them alike), in reverse order every other round (so that neither
    always follows the other, e.g. into a garbage collection the other's allocations started)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        for name, step in (steps.items() if i % 2 == 0 else reversed(steps.items())):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratios(ours: list[float], bare: list[float]) -> list[float]:
    """ours[i] / bare[i]: each round's two steps ran back to back, under the same machine load."""
    return [a / b for a, b in zip(ours, bare, strict=True)]


def measure(layout: str) -> dict:
    """Both loops on `layout`, interleaved; the per-step figures (seconds, ratios)."""
    torch.set_num_threads(1)
    steps = STEPS[layout]
    with tempfile.TemporaryDirectory() as tmp, single_rank_group():
        root = Path(tmp)
        model, shards = layout_assets(root, layout)
        batch = next(iter(ShardStream(shards, micro_batch_size=BATCH, global_rank=0, world_size=1, seed=0)))
        ours, stage, data_waits = our_step(root, layout, model, shards, RESOLUTION[layout])
        bare = bare_step(layout, model, batch)
        with frozen_setup_objects():  # as the worker's step loop runs (for both loops: one process)
            interleaved({"ours": ours, "bare": bare}, rounds=WARMUP)
            times = interleaved({"ours": ours, "bare": bare}, rounds=steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    mean = {name: statistics.fmean(values) for name, values in times.items()}
    q1, median_ratio, q3 = statistics.quantiles(paired_ratios(times["ours"], times["bare"]), n=4)
    return {"layout": layout, "ours_step_s": mean["ours"], "bare_step_s": mean["bare"],
            "ours_median_step_s": median["ours"], "bare_median_step_s": median["bare"],
            "ours_data_wait_s": statistics.fmean(data_waits[-steps:]), "ratio": mean["ours"] / mean["bare"],
            "speedup_vs_bare_eager": median["bare"] / median["ours"],
            "paired_ratio_median": median_ratio, "paired_ratio_quartiles": [q1, q3],
            "steps": steps, "batch": BATCH, "zero_stage": stage, "threads": 1}


def main(layout: str = "sd15") -> dict:
    r = measure(layout)
    target = ("ours/bare <= 1.10", r["ratio"] <= 1.10) if layout == "sd15" else (
        "bare/ours >= 1.05", r["speedup_vs_bare_eager"] >= 1.05)
    print(f"step overhead ({layout} layout, batch {BATCH}, 1 rank, 1 thread, {r['steps']} steps each, "
          f"interleaved): worker loop (ZeRO-{r['zero_stage']}) {r['ours_median_step_s'] * 1e3:.1f} ms "
          f"(of which {r['ours_data_wait_s'] * 1e3:.1f} ms reading shards), bare eager PyTorch "
          f"{r['bare_median_step_s'] * 1e3:.1f} ms a step (medians); ours/bare {r['ratio']:.2f} (means), "
          f"speedup vs bare {r['speedup_vs_bare_eager']:.2f} (target {target[0]}: {'met' if target[1] else 'missed'}); "
          f"step by step ours/bare: median {r['paired_ratio_median']:.2f}, quartiles "
          f"{r['paired_ratio_quartiles'][0]:.2f}-{r['paired_ratio_quartiles'][1]:.2f}")
    write_result("step_overhead" if layout == "sd15" else f"step_overhead_{layout}", r)
    return r


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, default="sd15")
    main(parser.parse_args().layout)
