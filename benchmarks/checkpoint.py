"""Checkpoint cost: save time against step time (tiny SD1.5, one rank, ZeRO-2), and consolidation
time of an SDXL-sized LoRA (rank 16 on every attention projection: ~23M parameters) on CPU.

    python -m benchmarks.checkpoint
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import single_rank_group, timed, tiny_assets, write_result
from difftrain_dist.config import CheckpointSection, recipe_from_dict
from difftrain_dist.data_shards import ShardStream
from difftrain_dist.distrib.checkpoint import checkpoint_name, deepspeed_tag, write_rank_manifest
from difftrain_dist.distrib.checkpointer import Checkpointer
from difftrain_dist.distrib.export import export_checkpoint
from difftrain_dist.distrib.session import LocalSession
from difftrain_dist.distrib.state import TrainState
from difftrain_dist.distrib.step import train_step
from difftrain_dist.distrib.trainee import setup_trainee
from difftrain_dist.models import save_lora_file, strip_adapter_name

SDXL_ATTENTION = {640: 10, 1280: 60}
"""SDXL UNet transformer blocks per width: 2x2 (640) and 2x10 + 10 + 3x10 (1280) + 3x2 (640)."""
SDXL_CROSS_DIM = 2048
DEFAULT_EVERY = CheckpointSection().every_n_steps


def step_and_save_times(root: Path, steps: int = 20) -> dict:
    model, shards = tiny_assets(root)
    recipe = recipe_from_dict({
        "run": {"name": "bench", "storage_path": str(root / "runs"), "output_dir": str(root / "out")},
        "model": {"path": str(model)},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 2},
        "train": {"max_steps": 1000},
        "checkpoint": {"keep_last": 2},
    })
    trainee = setup_trainee(recipe, 0)
    stream = ShardStream(shards, micro_batch_size=2, global_rank=0, world_size=1, seed=0)
    batches = iter(DataLoader(stream, batch_size=None))
    for _ in range(3):
        train_step(trainee, batches, 1)
    step_s = timed(lambda: train_step(trainee, batches, 1), repeats=steps)
    checkpointer, state = Checkpointer(recipe, LocalSession()), TrainState()

    def save():
        state.step += 1
        checkpointer.save(trainee, state, 0.0)

    save_s = timed(save, repeats=5)
    return {"step_s": step_s, "save_s": save_s, "save_over_step": save_s / step_s,
            "save_fraction_at_default_interval": save_s / (save_s + DEFAULT_EVERY * step_s),
            "default_every_n_steps": DEFAULT_EVERY}


class SdxlSizedLora(nn.Module):
    """LoRA A/B matrices shaped like rank-r LoRA on SDXL's attention projections (peft names)."""

    def __init__(self, rank: int = 16):
        super().__init__()
        blocks = nn.ModuleList()
        for width, count in SDXL_ATTENTION.items():
            for _ in range(count):
                block = nn.Module()
                for attn in ("attn1", "attn2"):
                    proj = nn.Module()
                    for name in ("to_q", "to_k", "to_v", "to_out"):
                        fan_in = SDXL_CROSS_DIM if attn == "attn2" and name in ("to_k", "to_v") else width
                        layer = nn.Module()
                        layer.lora_A = nn.ModuleDict({"default": nn.Linear(fan_in, rank, bias=False)})
                        layer.lora_B = nn.ModuleDict({"default": nn.Linear(rank, width, bias=False)})
                        setattr(proj, name, layer)
                    setattr(block, attn, proj)
                blocks.append(block)
        self.blocks = blocks


def consolidation_time(root: Path) -> dict:
    import deepspeed

    module = nn.ModuleDict({"unet": SdxlSizedLora()})  # parameter names as the trainer's: "unet.…"
    params = sum(p.numel() for p in module.parameters())
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters()), config=config)
    engine.backward(sum(p.float().pow(2).sum() for p in module.parameters()))
    engine.step()
    ckpt = root / "sdxl" / checkpoint_name(1)
    engine.save_checkpoint(str(ckpt), tag=deepspeed_tag(1), exclude_frozen_parameters=True)
    lora_config = {"r": 16, "lora_alpha": 16, "target_modules": ["to_k", "to_out", "to_q", "to_v"]}
    weights = strip_adapter_name({k: v.detach() for k, v in module.named_parameters()})
    save_lora_file(ckpt / "lora.safetensors", weights, lora_configs={"unet": lora_config})
    recipe = {"model": {"arch": "sdxl", "path": "sdxl-sized"}, "data": {"resolution": 1024},
              "run": {"seed": 0, "name": "sdxl-sized"}}
    write_rank_manifest(ckpt, 0, {"step": 1, "world_size": 1, "zero_stage": 2, "recipe_hash": "x",
                                  "resume_identity": {}, "recipe": recipe, "lora_configs": {"unet": lora_config},
                                  "loss": 0.0, "state": {"step": 1, "samples_seen": 1, "epoch": 0, "batch_in_epoch": 1},
                                  "rng": {}, "host": "bench", "node_id": "bench", "pid": 0, "saved_at": 0.0,
                                  "peak_rss_mib": 0.0})
    seconds = timed(lambda: export_checkpoint(ckpt, root / "sdxl.safetensors"), repeats=3)
    size = (root / "sdxl.safetensors").stat().st_size
    return {"lora_params": params, "consolidate_s": seconds, "lora_file_mib": size / 2**20}


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp, single_rank_group():
        root = Path(tmp)
        result = {**step_and_save_times(root), **consolidation_time(root)}
    print(f"checkpoint: step {result['step_s'] * 1e3:.1f} ms, save {result['save_s'] * 1e3:.1f} ms "
          f"= {result['save_over_step']:.2f} steps; at every_n_steps={DEFAULT_EVERY}: "
          f"{100 * result['save_fraction_at_default_interval']:.2f}% of run time")
    print(f"consolidation: {result['lora_params'] / 1e6:.1f}M-parameter LoRA (SDXL-sized, rank 16) "
          f"in {result['consolidate_s']:.2f} s, file {result['lora_file_mib']:.1f} MiB")
    write_result("checkpoint", result)
    return result


if __name__ == "__main__":
    main()
