"""One optimizer step: its micro-batches forward and backward, the step, and the per-step checks
every rank agrees on."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from difftrain_dist.distrib.trainee import Trainee


def train_step(trainee: Trainee, micro_batches: Iterator[dict[str, Any]], gradient_accumulation_steps: int) -> float:
    """One optimizer step: draw `gradient_accumulation_steps` micro-batches, forward and backward
    each; returns this rank's mean loss over them.

    DeepSpeed's `engine.step()` is called after every micro-batch's backward, as DeepSpeed asks:
    the engine counts micro-batches and updates the weights (and the lr schedule) only at the
    accumulation boundary, i.e. once per call of this function. The EMA of the weights, when the
    recipe keeps one, moves after that update.

    Raises:
        StopIteration: the stream ran dry (it never does: ShardStream repeats epochs).
    """
    losses = []
    for _ in range(gradient_accumulation_steps):
        losses.append(forward_backward(trainee, next(micro_batches)))
        trainee.engine.step()
    if trainee.ema is not None:
        trainee.ema.update()
    return sum(losses) / len(losses)


def forward_backward(trainee: Trainee, batch: dict[str, Any]) -> float:
    """Forward and backward of one micro-batch; returns its loss.

    Latents come from the batch's precomputed "latent_parameters" when present (the same draw from
    the noise generator as encoding the pixels), else from encoding "pixel_values" (B, 3, H, W)
    in [-1, 1]; conditioning from the batch's precomputed "conditioning" when
    `trainee.precomputed_conditioning`, else from encoding "captions".
    """
    with torch.no_grad():
        latents = batch_latents(trainee, batch)
    with torch.set_grad_enabled(trainee.trains_text_encoder):
        conditioning = trainee.adapter.batch_conditioning(batch, precomputed=trainee.precomputed_conditioning)
    loss = trainee.adapter.training_loss(trainee.engine, latents, conditioning, trainee.noise_generator)
    trainee.engine.backward(loss)
    return float(loss.detach())


def batch_latents(trainee: Trainee, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's VAE latents (B, C, h, w), sampled with the trainee's noise generator."""
    if "latent_parameters" in batch:
        parameters = batch["latent_parameters"].to(trainee.device, non_blocking=True)
        return trainee.adapter.latents_from_parameters(parameters, generator=trainee.noise_generator)
    pixels = batch["pixel_values"].to(trainee.device, non_blocking=True)
    return trainee.adapter.encode_images(pixels, generator=trainee.noise_generator)


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
