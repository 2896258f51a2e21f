"""The per-worker train loop: batch → loss → backward → step → maybe checkpoint.

It runs the same under Ray Train, torchrun or srun: the process group comes from the launcher
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), progress and checkpoints go through a WorkerSession.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards import ShardStream
from difftrain_dist.distrib.checkpoint import (
    apply_retention,
    checkpoint_name,
    deepspeed_tag,
    find_resume_checkpoint,
    write_rank_manifest,
)
from difftrain_dist.distrib.engine import DTYPES, build_engine
from difftrain_dist.distrib.export import write_checkpoint_lora
from difftrain_dist.distrib.session import WorkerSession
from difftrain_dist.distrib.state import TrainState, capture_rng, restore_rng
from difftrain_dist.models import get_adapter, inject_lora, lora_config_dict

log = logging.getLogger("difftrain_dist")


@dataclass
class Trainee:
    """Everything a rank trains with."""

    adapter: Any
    engine: Any
    lora_config: Any
    device: torch.device
    noise_generator: torch.Generator


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the same on every rank so LoRA initialisation matches)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_trainee(recipe: Recipe, global_rank: int) -> Trainee:
    """Load the model through its adapter, inject LoRA and wrap the denoiser in DeepSpeed."""
    use_gpu = recipe.distributed.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    seed_everything(recipe.run.seed)
    adapter = get_adapter(recipe.model.arch).from_pretrained(
        recipe.model.path,
        dtype=DTYPES[recipe.model.dtype],
        device=device,
        prediction_type=recipe.model.prediction_type,
    )
    targets = recipe.lora.target_modules or list(adapter.default_lora_targets)
    lora_config = inject_lora(
        adapter.denoiser,
        rank=recipe.lora.rank,
        alpha=recipe.lora.alpha,
        target_modules=targets,
        dropout=recipe.lora.dropout,
    )
    adapter.denoiser.train()
    engine, _, _ = build_engine(adapter.denoiser, recipe)
    noise_generator = torch.Generator(device).manual_seed(recipe.run.seed * 1_000_003 + global_rank)
    return Trainee(adapter, engine, lora_config, device, noise_generator)


def resume_if_possible(trainee: Trainee, recipe: Recipe, global_rank: int) -> TrainState:
    """Load the newest valid checkpoint of the run (if any) and return the state to continue from."""
    info, skipped = find_resume_checkpoint(recipe.run_dir, recipe.recipe_hash())
    if global_rank == 0:
        for bad in skipped:
            log.warning("skipping %s: %s", bad.path.name, bad.reason)
    if info is None:
        return TrainState()
    if info.world_size != dist.get_world_size():
        raise ValueError(
            f"{info.path} was written by {info.world_size} workers; this run has {dist.get_world_size()}"
        )
    trainee.engine.load_checkpoint(
        str(info.path), tag=deepspeed_tag(info.step), load_module_strict=False
    )
    manifest = info.manifests[global_rank]
    restore_rng(manifest["rng"], trainee.noise_generator)
    if global_rank == 0:
        log.warning("resumed from %s (step %d)", info.path.name, info.step)
    return TrainState(**manifest["state"])


def train_micro_batch(trainee: Trainee, batch: dict[str, Any]) -> float:
    """One forward/backward on one micro-batch; returns its loss (the engine steps at boundaries)."""
    pixels = batch["pixel_values"].to(trainee.device, non_blocking=True)
    with torch.no_grad():
        latents = trainee.adapter.encode_images(pixels, generator=trainee.noise_generator)
        conditioning = trainee.adapter.encode_prompts(batch["captions"])
    loss = trainee.adapter.training_loss(trainee.engine, latents, conditioning, trainee.noise_generator)
    trainee.engine.backward(loss)
    trainee.engine.step()
    return float(loss.detach())


def mean_over_ranks(value: float) -> float:
    """All-reduce mean of a scalar over the process group."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def save_checkpoint(trainee: Trainee, recipe: Recipe, state: TrainState, loss: float, session) -> None:
    """All ranks: DeepSpeed save into a local folder, manifest, then hand it to the session."""
    global_rank = dist.get_rank()
    local_dir = Path(tempfile.mkdtemp(prefix=f"ckpt-r{global_rank}-"))
    trainee.engine.save_checkpoint(
        str(local_dir),
        tag=deepspeed_tag(state.step),
        client_state={"step": state.step},
        exclude_frozen_parameters=True,
    )
    write_checkpoint_lora(trainee, recipe, state.step, local_dir, write=global_rank == 0)
    manifest = {
        "step": state.step,
        "world_size": dist.get_world_size(),
        "zero_stage": recipe.distributed.zero_stage,
        "recipe_hash": recipe.recipe_hash(),
        "recipe": recipe.model_dump(mode="json"),
        "lora_config": lora_config_dict(trainee.lora_config),
        "loss": loss,
        "state": state.to_dict(),
        "rng": capture_rng(trainee.noise_generator),
    }
    write_rank_manifest(local_dir, global_rank, manifest)
    session.persist_checkpoint(local_dir, recipe.run_dir, checkpoint_name(state.step), {"step": state.step})
    if global_rank == 0:
        apply_retention(recipe.run_dir, recipe.checkpoint.keep_last, recipe.recipe_hash())


class Throughput:
    """Samples/s and ETA over the steps since the last report."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.last_time, self.last_step = time.perf_counter(), 0

    def measure(self, step: int, max_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        rate = steps * self.samples_per_step / max(now - self.last_time, 1e-9)
        eta = (max_steps - step) * self.samples_per_step / max(rate, 1e-9)
        self.last_time, self.last_step = now, step
        return rate, eta


def train_worker(recipe: Recipe, session: WorkerSession) -> TrainState:
    """Train until `train.max_steps`, checkpointing every `checkpoint.every_n_steps` (and at the end).

    Must run inside an initialised torch process group (gloo on CPU, NCCL on GPU).
    """
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed still calls the deprecated all_gather_into_tensor / reduce_scatter_tensor names.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    global_rank, world_size = dist.get_rank(), dist.get_world_size()
    trainee = setup_trainee(recipe, global_rank)
    state = resume_if_possible(trainee, recipe, global_rank)
    stream = ShardStream(
        recipe.data.shards,
        micro_batch_size=recipe.data.micro_batch_size,
        global_rank=global_rank,
        world_size=world_size,
        seed=recipe.run.seed,
        start_epoch=state.epoch,
        start_batch=state.batch_in_epoch,
        num_workers=recipe.data.loader_workers,
    )
    train, ckpt = recipe.train, recipe.checkpoint
    gas = train.gradient_accumulation_steps
    meter = Throughput(recipe.data.micro_batch_size * gas * world_size)
    loader = DataLoader(stream, batch_size=None, num_workers=recipe.data.loader_workers)
    losses: list[float] = []
    for batch in _batches(loader, state.step, train.max_steps, gas):
        losses.append(train_micro_batch(trainee, batch))
        state.advance(batch["epoch"], batch["batch_in_epoch"], len(batch["captions"]), stream.batches_per_epoch)
        if len(losses) < gas:
            continue
        state.step += 1
        loss = mean_over_ranks(sum(losses) / len(losses))
        losses.clear()
        if global_rank == 0 and (state.step % train.log_every_n_steps == 0 or state.step == train.max_steps):
            rate, eta = meter.measure(state.step, train.max_steps)
            session.log({"step": state.step, "max_steps": train.max_steps, "loss": loss,
                         "samples_per_s": rate, "eta_s": eta, "lr": trainee.engine.get_lr()[0]})
        if state.step % ckpt.every_n_steps == 0 or state.step == train.max_steps:
            save_checkpoint(trainee, recipe, state, loss, session)
    return state


def _batches(loader: DataLoader, start_step: int, max_steps: int, gas: int):
    """The loader's batches, just enough for the remaining optimizer steps."""
    remaining = (max_steps - start_step) * gas
    if remaining <= 0:
        return
    for i, batch in enumerate(loader):
        yield batch
        if i + 1 >= remaining:
            return
