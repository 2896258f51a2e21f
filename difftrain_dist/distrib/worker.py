"""The per-worker train loop: batch → loss → backward → step → maybe checkpoint.

It runs the same under Ray Train, torchrun or srun: the process group comes from the launcher
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), progress, stop requests and checkpoint persistence go
through a WorkerSession.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from difftrain_dist.config import Recipe
from difftrain_dist.data_shards import ShardIndex, ShardStream
from difftrain_dist.distrib.checkpoint import apply_retention, checkpoint_name, deepspeed_tag, write_rank_manifest
from difftrain_dist.distrib.engine import DTYPES, apply_recipe_lr, build_engine
from difftrain_dist.distrib.export import write_checkpoint_lora
from difftrain_dist.distrib.resume import ResumePlan, plan_resume, restore_rank_rng, resumed_state
from difftrain_dist.distrib.session import WorkerSession
from difftrain_dist.distrib.state import TrainState, capture_rng
from difftrain_dist.models import get_adapter, inject_lora, lora_config_dict
from difftrain_dist.models.base import TEXT_ENCODER_LORA_TARGETS, DiffusionAdapter
from difftrain_dist.models.lora import LoraComponents
from difftrain_dist.models.objectives import TimestepOptions

log = logging.getLogger("difftrain_dist")


@dataclass
class Trainee:
    """Everything a rank trains with."""

    adapter: Any
    engine: Any
    lora_configs: dict[str, Any]
    """Pipeline component ("unet", "transformer", "text_encoder", …) → its peft LoraConfig."""
    device: torch.device
    noise_generator: torch.Generator
    precomputed_conditioning: bool = False
    """Use a batch's "conditioning" (precomputed from the stored captions) instead of encoding its
    captions: only valid when the recipe's caption transforms leave captions as stored and the
    text encoders are frozen."""

    @property
    def trains_text_encoder(self) -> bool:
        return len(self.lora_configs) > 1

    def lora_config_dicts(self) -> dict[str, dict[str, Any]]:
        """`lora_config_dict` of each component's config (what LoRA file headers hold)."""
        return {name: lora_config_dict(config) for name, config in self.lora_configs.items()}


@dataclass
class WorkerResult:
    """How a rank's loop ended."""

    state: TrainState
    stopped_early: bool
    """True when a stop was requested (preemption): the last checkpoint is at `state.step`."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the same on every rank so LoRA initialisation matches)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_trainee(
    recipe: Recipe, global_rank: int, *, load_universal: bool = False, adapter: DiffusionAdapter | None = None
) -> Trainee:
    """Load the model through its adapter, inject LoRA and wrap the trained components in DeepSpeed.

    `adapter`: an adapter already built in memory (the GPU benchmark's full-size random models);
    None loads `recipe.model.path` with `from_pretrained`.
    """
    use_gpu = recipe.distributed.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    if use_gpu:
        # FLUX's transformer backward hit illegal memory accesses in cuDNN's SDPA kernel at 1024 px
        # (see DESIGN.md); the flash and memory-efficient kernels are used instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    seed_everything(recipe.run.seed)
    train, lora = recipe.train, recipe.lora
    if adapter is None:
        adapter = get_adapter(recipe.model.arch).from_pretrained(
            recipe.model.path,
            dtype=DTYPES[recipe.model.dtype],
            device=device,
            prediction_type=recipe.model.prediction_type,
            timesteps=TimestepOptions(train.timestep_sampling, train.logit_mean, train.logit_std, train.flow_shift),
            load_optional=recipe.model.use_t5,
            guidance_scale=train.guidance_scale,
        )
    shape = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout}
    targets = lora.target_modules or list(adapter.default_lora_targets)
    lora_configs = {adapter.lora_prefix: inject_lora(adapter.denoiser, target_modules=targets, **shape)}
    if lora.train_text_encoder:
        text_targets = lora.text_encoder_target_modules or list(TEXT_ENCODER_LORA_TARGETS)
        for name, encoder in adapter.text_encoders.items():
            lora_configs[name] = inject_lora(encoder, target_modules=text_targets, **shape)
    if train.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(text_encoders=lora.train_text_encoder)
    trained = LoraComponents(adapter.lora_prefix, {name: adapter.components[name] for name in lora_configs})
    trained.train()
    engine, _, _ = build_engine(trained, recipe, load_universal=load_universal)
    noise_generator = torch.Generator(device).manual_seed(recipe.run.seed * 1_000_003 + global_rank)
    return Trainee(adapter, engine, lora_configs, device, noise_generator,
                   precomputed_conditioning=precomputed_text_unusable(recipe) is None)


def precomputed_text_unusable(recipe: Recipe) -> str | None:
    """Why precomputed text embeddings (of the captions as stored, with every text encoder of the
    model) cannot stand in for encoding this recipe's captions; None when they can."""
    data = recipe.data
    if data.caption_dropout or data.shuffle_captions or data.trigger_word is not None:
        return "data.caption_dropout, shuffle_captions or trigger_word change the captions"
    if recipe.lora.train_text_encoder:
        return "lora.train_text_encoder trains the text encoders"
    if not recipe.model.use_t5:
        return "model.use_t5 is false, and they hold T5's states"
    return None


def train_micro_batch(trainee: Trainee, batch: dict[str, Any]) -> float:
    """One forward/backward on one micro-batch; returns its loss (the engine steps at boundaries).

    Latents come from the batch's precomputed "latent_parameters" when present (the same draw from
    the noise generator as encoding the pixels), else from encoding "pixel_values"; conditioning
    from the batch's precomputed "conditioning" when `trainee.precomputed_conditioning`, else from
    encoding "captions".
    """
    with torch.no_grad():
        latents = _latents(trainee, batch)
    with torch.set_grad_enabled(trainee.trains_text_encoder):
        conditioning = _conditioning(trainee, batch)
    loss = trainee.adapter.training_loss(
        trainee.engine, latents, conditioning, trainee.noise_generator,
        original_sizes=batch.get("original_sizes"), crops_top_left=batch.get("crops_top_left"),
    )
    trainee.engine.backward(loss)
    trainee.engine.step()
    return float(loss.detach())


def _latents(trainee: Trainee, batch: dict[str, Any]) -> torch.Tensor:
    if "latent_parameters" in batch:
        parameters = batch["latent_parameters"].to(trainee.device, non_blocking=True)
        return trainee.adapter.latents_from_parameters(parameters, generator=trainee.noise_generator)
    pixels = batch["pixel_values"].to(trainee.device, non_blocking=True)
    return trainee.adapter.encode_images(pixels, generator=trainee.noise_generator)


def _conditioning(trainee: Trainee, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    if trainee.precomputed_conditioning and "conditioning" in batch:
        return {name: value.to(trainee.device, non_blocking=True) for name, value in batch["conditioning"].items()}
    return trainee.adapter.encode_prompts(batch["captions"])


def reduce_step_stats(loss: float, stop: bool, device: torch.device | None = None) -> tuple[float, bool]:
    """One all-reduce per step: the mean loss over ranks, and whether any rank asked to stop.

    `device`: where the reduced tensor lives; NCCL process groups reduce CUDA tensors only, so
    GPU runs pass the training device (None: CPU, for gloo).
    """
    stats = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    return float(stats[0]) / dist.get_world_size(), bool(stats[1] > 0)


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite on some rank: training stops before saving it."""


def check_finite_loss(loss: float, step: int) -> None:
    """Raise NonFiniteLossError when `loss` (the mean over ranks, so every rank agrees) is NaN or
    ±inf at optimizer step `step`; nothing of that step has been saved then."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"step {step}: the loss is {loss} (not finite); stopped before saving this step, so the newest "
            "checkpoint holds the last finite weights. Lower train.lr, set train.max_grad_norm, or train in "
            "bfloat16 instead of float16, then run again to resume from that checkpoint"
        )


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
        "resume_identity": recipe.resume_identity(),
        "recipe": recipe.model_dump(mode="json"),
        "lora_configs": trainee.lora_config_dicts(),
        "loss": loss,
        "state": state.to_dict(),
        "rng": capture_rng(trainee.noise_generator),
        "host": socket.gethostname(),
        "node_id": session.node_id(),
        "pid": os.getpid(),
        "saved_at": time.time(),
        "peak_rss_mib": peak_rss_mib(),
    }
    write_rank_manifest(local_dir, global_rank, manifest)
    session.persist_checkpoint(local_dir, recipe.run_dir, checkpoint_name(state.step), {"step": state.step})
    if global_rank == 0:
        apply_retention(recipe.run_dir, recipe.checkpoint.keep_last, recipe.recipe_hash())


def render_training_samples(trainee: Trainee, recipe: Recipe, step: int) -> Path | None:
    """Render `sample.prompts` with the in-memory LoRA into `run_dir/samples/step_<step>.png`.

    Rank 0 renders and writes; under ZeRO-3, where every rank holds a slice of the weights,
    all ranks run the pipeline together (the forward passes gather the slices) and rank 0
    writes. Noise comes from `sample.seed`, so grids compare across steps; the training RNG
    streams are untouched. Returns the PNG path on rank 0, else None.
    """
    from difftrain_dist.models.sampling import image_grid, render

    rank = dist.get_rank()
    if rank != 0 and recipe.distributed.zero_stage != 3:
        return None
    sample, adapter = recipe.sample, trainee.adapter
    module = trainee.engine.module
    module.eval()
    try:
        images = render(
            adapter.pipeline(),
            list(sample.prompts),
            seed=sample.seed,
            steps=sample.num_inference_steps,
            resolution=sample.resolution or recipe.data.resolution // 16 * 16,
            guidance_scale=adapter.sample_guidance_scale if sample.guidance_scale is None else sample.guidance_scale,
        )
    finally:
        module.train()
    if rank != 0:
        return None
    path = recipe.run_dir / "samples" / f"step_{step:09d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (getrusage; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Samples/s and ETA over the steps since the last report."""

    def __init__(self, samples_per_step: int, start_step: int):
        self.samples_per_step = samples_per_step
        self.last_time, self.last_step = time.perf_counter(), start_step

    def measure(self, step: int, max_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        rate = steps * self.samples_per_step / max(now - self.last_time, 1e-9)
        eta = (max_steps - step) * self.samples_per_step / max(rate, 1e-9)
        self.last_time, self.last_step = now, step
        return rate, eta


def _load(trainee: Trainee, recipe: Recipe, plan: ResumePlan, stream_batches: int) -> TrainState:
    """Load the planned checkpoint into the engine and return the rank's state (fresh if none).

    Rank 0 says where it starts in a log record with `extra={"resume": {"checkpoint", "step"}}`
    (the driver of a Ray job counts these to tell a restarted worker group)."""
    if plan.checkpoint is None:
        if dist.get_rank() == 0:
            log.info("starting at step 0: no checkpoint to resume from",
                     extra={"resume": {"checkpoint": None, "step": 0}})
        return TrainState()
    global_rank, world_size = dist.get_rank(), dist.get_world_size()
    trainee.engine.load_checkpoint(
        str(plan.load_dir), tag=deepspeed_tag(plan.checkpoint.step), load_module_strict=False
    )
    apply_recipe_lr(trainee.engine.lr_scheduler, recipe.train.lr)
    restore_rank_rng(plan, global_rank, trainee.noise_generator)
    if global_rank == 0:
        name, step = plan.checkpoint.path.name, plan.checkpoint.step
        log.warning("resumed from %s (step %d)", name, step, extra={"resume": {"checkpoint": name, "step": step}})
    return resumed_state(plan, global_rank, world_size, stream_batches)


def _stream(recipe: Recipe, state: TrainState | None = None) -> ShardStream:
    state = state or TrainState()
    return ShardStream(
        recipe.data.shards,
        micro_batch_size=recipe.data.micro_batch_size,
        global_rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        seed=recipe.run.seed,
        start_epoch=state.epoch,
        start_batch=state.batch_in_epoch,
        num_workers=recipe.data.loader_workers,
        caption_dropout=recipe.data.caption_dropout,
        shuffle_captions=recipe.data.shuffle_captions,
        keep_tokens=recipe.data.keep_tokens,
        trigger_word=recipe.data.trigger_word,
    )


def check_data_fits_model(recipe: Recipe, index: ShardIndex) -> None:
    """Before anything starts: the shards suit the model. Raises ValueError when they were
    precomputed for another architecture, or hold a bucket whose sides the architecture cannot
    take (SD3 and FLUX need multiples of 16 px: 2×2 latent patches)."""
    arch = recipe.model.arch
    pre = index.precomputed
    if pre is not None and pre.arch != arch:
        raise ValueError(f"data.shards: {recipe.data.shards} was precomputed for arch {pre.arch!r}, but model.arch "
                         f"is {arch!r}; run `difftrain-dist shards precompute {recipe.data.shards} MODEL` again")
    multiple = get_adapter(arch).pixel_multiple
    bad = [name for name in index.bucket_names if any(int(side) % multiple for side in name.split("x"))]
    if bad:
        raise ValueError(f"data.shards: buckets {bad} have sides that are not multiples of {multiple} px, which "
                         f"{arch} needs; rebuild the shards with --bucket-step {max(multiple, 64)}")


def _check_precomputed(recipe: Recipe, stream: ShardStream) -> None:
    """Say what of the precomputed data this run uses; warn when it came from another model path."""
    pre = stream.index.precomputed
    if pre is None or dist.get_rank() != 0:
        return
    local = Path(recipe.model.path).expanduser()
    model = str(local.resolve()) if local.exists() else str(recipe.model.path)
    if pre.model != model:
        log.warning("data.shards was precomputed with model %s, training uses %s", pre.model, model)
    if pre.conditioning and (reason := precomputed_text_unusable(recipe)):
        log.warning("precomputed text embeddings are not used (%s): captions are encoded at each step; "
                    "the precomputed VAE latents are used", reason)


def train_worker(recipe: Recipe, session: WorkerSession) -> WorkerResult:
    """Train until `train.max_steps`, checkpointing every `checkpoint.every_n_steps`, at the end,
    and when a stop is requested (preemption). Resumes from the run's newest valid checkpoint.

    Must run inside an initialised torch process group (gloo on CPU, NCCL on GPU).
    """
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed still calls the deprecated all_gather_into_tensor / reduce_scatter_tensor names.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    plan = plan_resume(recipe)
    trainee = setup_trainee(recipe, dist.get_rank(), load_universal=plan.reshard)
    state = _load(trainee, recipe, plan, _stream(recipe).batches_per_epoch)
    stream = _stream(recipe, state)
    check_data_fits_model(recipe, stream.index)
    _check_precomputed(recipe, stream)
    if state.step >= recipe.train.max_steps and dist.get_rank() == 0:
        log.warning("already at step %d >= train.max_steps %d: nothing to train", state.step, recipe.train.max_steps)
    train, ckpt = recipe.train, recipe.checkpoint
    gas = train.gradient_accumulation_steps
    meter = Throughput(recipe.data.micro_batch_size * gas * dist.get_world_size(), state.step)
    loader = make_loader(stream, recipe)
    with frozen_setup_objects():
        losses: list[float] = []
        stop = False
        for batch in _batches(loader, state.step, train.max_steps, gas):
            losses.append(train_micro_batch(trainee, batch))
            state.advance(batch["epoch"], batch["batch_in_epoch"], len(batch["captions"]), stream.batches_per_epoch)
            if len(losses) < gas:
                continue
            state.step += 1
            loss, stop = reduce_step_stats(sum(losses) / len(losses), session.stop_requested(), trainee.device)
            losses.clear()
            check_finite_loss(loss, state.step)
            if dist.get_rank() == 0 and (state.step % train.log_every_n_steps == 0 or state.step == train.max_steps):
                rate, eta = meter.measure(state.step, train.max_steps)
                session.log({"step": state.step, "max_steps": train.max_steps, "loss": loss,
                             "samples_per_s": rate, "eta_s": eta, "lr": trainee.engine.get_lr()[0]})
            if stop or state.step % ckpt.every_n_steps == 0 or state.step == train.max_steps:
                save_checkpoint(trainee, recipe, state, loss, session)
            if not stop and recipe.sample.every_n_steps and state.step % recipe.sample.every_n_steps == 0:
                written = render_training_samples(trainee, recipe, state.step)
                if written is not None:
                    log.warning("samples at step %d: %s", state.step, written)
            if stop:
                break
    return WorkerResult(state, stopped_early=stop and state.step < train.max_steps)


@contextmanager
def frozen_setup_objects():
    """Run the block with every object alive now (model, engine, tokenizers, library state:
    about 600,000 objects tracked by the cyclic collector for the tiny SD1.5) moved into the
    collector's permanent generation (`gc.freeze`), so that full collections during training walk
    only what training allocates. Unfrozen, one full pass over them took 0.38 s on 2 CPU cores,
    and one fell within 60 steps of the tiny model (about 60 ms each; benchmarks/step_overhead);
    on several ranks such a pause also holds the others at the next collective.

    Objects freed by reference counting are still freed; reference cycles among the frozen objects
    that become garbage in the block are reclaimed after it. Everything is unfrozen on exit. Inside
    a block that already froze objects (`gc.get_freeze_count() > 0`) this does nothing, so that the
    outer block's objects stay frozen until it ends.
    """
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def make_loader(stream: ShardStream, recipe: Recipe) -> DataLoader:
    """The rank's DataLoader over its stream (batches are made by the stream: batch_size None).

    It has its own generator: starting an iterator draws a base seed, which must not come from
    the global torch RNG that LoRA dropout draws from (restored on resume just before)."""
    return DataLoader(stream, batch_size=None, num_workers=recipe.data.loader_workers,
                      generator=torch.Generator().manual_seed(recipe.run.seed))


def _batches(loader: DataLoader, start_step: int, max_steps: int, gas: int):
    """The loader's batches, just enough for the remaining optimizer steps."""
    remaining = (max_steps - start_step) * gas
    if remaining <= 0:
        return
    for i, batch in enumerate(loader):
        yield batch
        if i + 1 >= remaining:
            return
