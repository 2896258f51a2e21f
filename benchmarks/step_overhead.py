"""Step overhead: our worker loop's step (DeepSpeed ZeRO-2 engine + streaming shard reader +
per-step all-reduce) against a bare PyTorch loop doing the same forward/backward/AdamW step on the
same tiny SD1.5 model and batch size, one rank, measured in one run (target ratio <= 1.10).

Ray's share (driver, progress board) is outside the step and not included here.

    python -m benchmarks.step_overhead
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import single_rank_group, timed, tiny_assets, write_result
from difftrain_dist.config import recipe_from_dict
from difftrain_dist.data_shards import ShardStream
from difftrain_dist.distrib.worker import reduce_step_stats, setup_trainee, train_micro_batch
from difftrain_dist.models import get_adapter, inject_lora

STEPS = 30
BATCH = 2


def bare_step_time(model: Path, batch: dict) -> float:
    """Median seconds per step of a plain loop: no DeepSpeed, no data loading (one fixed batch)."""
    torch.manual_seed(0)
    adapter = get_adapter("sd15").from_pretrained(str(model), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(adapter.denoiser, rank=16, alpha=16, target_modules=adapter.default_lora_targets)
    adapter.denoiser.train()
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step():
        with torch.no_grad():
            latents = adapter.encode_images(batch["pixel_values"], generator=generator)
            conditioning = adapter.encode_prompts(batch["captions"])
        loss = adapter.training_loss(adapter.denoiser, latents, conditioning, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    return timed(step, repeats=STEPS)


def our_step_time(root: Path, model: Path, shards: Path) -> float:
    """Median seconds per step of the worker loop's step on streamed batches."""
    recipe = recipe_from_dict({
        "run": {"name": "bench", "storage_path": str(root / "runs"), "output_dir": str(root / "out")},
        "model": {"path": str(model)},
        "data": {"shards": str(shards), "micro_batch_size": BATCH},
        "train": {"max_steps": 1000},
    })
    trainee = setup_trainee(recipe, 0)
    stream = ShardStream(shards, micro_batch_size=BATCH, global_rank=0, world_size=1, seed=0)
    batches = iter(DataLoader(stream, batch_size=None))

    def step():
        reduce_step_stats(train_micro_batch(trainee, next(batches)), False)

    for _ in range(3):
        step()
    return timed(step, repeats=STEPS)


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp, single_rank_group():
        root = Path(tmp)
        model, shards = tiny_assets(root)
        batch = next(iter(ShardStream(shards, micro_batch_size=BATCH, global_rank=0, world_size=1, seed=0)))
        ours = our_step_time(root, model, shards)
        bare = bare_step_time(model, batch)
    result = {"ours_step_s": ours, "bare_step_s": bare, "ratio": ours / bare, "batch": BATCH}
    print(f"step overhead (tiny SD1.5, batch {BATCH}, 1 rank): worker loop {ours * 1e3:.1f} ms, "
          f"bare PyTorch {bare * 1e3:.1f} ms, ratio {ours / bare:.2f} (target <= 1.10)")
    write_result("step_overhead", result)
    return result


if __name__ == "__main__":
    main()
