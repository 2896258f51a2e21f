"""DeepSpeed engine setup for a LoRA-injected denoiser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.optimizers import build_lr_scheduler, build_optimizer, optimizer_kwargs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed config dict for a recipe.

    On GPU with a half-precision base model the frozen weights stay in that dtype, the LoRA weights
    in fp32, and DeepSpeed's own ``torch_autocast`` runs the forward pass in half precision: an
    outer ``torch.autocast`` would be switched off inside the engine's ``forward``.
    """
    train, dist = recipe.train, recipe.distributed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": recipe.data.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        # Below stage 2 nothing is partitioned during backward, and copying each LoRA gradient
        # into a contiguous buffer as it arrives only adds per-tensor work (benchmarks/step_overhead).
        "zero_optimization": {"stage": dist.zero_stage, "contiguous_gradients": dist.zero_stage >= 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train.max_grad_norm is not None:
        config["gradient_clipping"] = train.max_grad_norm
    if dist.use_gpu and recipe.model.dtype != "float32":
        config["torch_autocast"] = {"enabled": True, "dtype": recipe.model.dtype}
    return config


UNUSED_OPS = ("deepspeed_shm_comm",)
"""DeepSpeed ops that its communication backend builds when it starts, though training never
calls them: on the CPU accelerator `TorchBackend` compiles `deepspeed_shm_comm` (C++, tens of
seconds and two compiler processes of 1.5 GB, into the torch extensions cache that every
installation shares, so that another installation's build makes it compile again) for
`inference_all_reduce` only, the all-reduce of tensor-parallel inference (deepspeed/comm/torch.py,
`build_shm_op`). Marked incompatible, they are not built; every collective of training goes
through torch.distributed as before."""


def skip_unused_ops() -> None:
    """Mark UNUSED_OPS incompatible in DeepSpeed's op table (before `deepspeed.init_distributed`).

    The table (`deepspeed.ops.__compatible_ops__`) is probed on first access, and probing runs
    compilers (the async_io op's check compiles and links a test program with gcc); its only
    reader, `build_shm_op` in deepspeed/comm/torch.py, takes a missing op as incompatible
    (`.get(name, False)`). So an unprobed table is seeded with UNUSED_OPS alone, and a probed one
    keeps its entries."""
    import deepspeed.ops

    compatible = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    for name in UNUSED_OPS:
        compatible[name] = False


def build_engine(denoiser: torch.nn.Module, recipe: Recipe):
    """Wrap the LoRA-injected denoiser in a DeepSpeed engine with the recipe's optimizer and lr
    schedule (optimizers.py) on its trainable parameters.

    The torch process group must already exist (Ray Train or torchrun/srun set it up).

    Returns:
        (engine, optimizer, lr_scheduler) as returned by ``deepspeed.initialize``.
    """
    import deepspeed

    skip_unused_ops()
    deepspeed.init_distributed(dist_backend="nccl" if recipe.distributed.use_gpu else "gloo")
    train = recipe.train
    params = [p for p in denoiser.parameters() if p.requires_grad]
    kwargs = optimizer_kwargs(train.optimizer, train.lr, train.weight_decay, train.betas, train.optimizer_args)
    optimizer = build_optimizer(params, train.optimizer, kwargs)
    scheduler = build_lr_scheduler(optimizer, train.lr_scheduler, warmup_steps=train.lr_warmup_steps,
                                   max_steps=train.max_steps, num_cycles=train.lr_num_cycles, power=train.lr_power)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=denoiser,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(recipe),
    )
    return engine, optimizer, scheduler


def load_engine_checkpoint(engine, folder: Path, tag: str, *, universal: bool) -> None:
    """Load DeepSpeed checkpoint `tag` of `folder` into `engine` (frozen weights are not in it).

    `universal`: `folder` is a universal conversion (`deepspeed.checkpoint.ds_to_universal`),
    for a checkpoint of another world size. DeepSpeed reads its `checkpoint.load_universal`
    setting only while loading (`DeepSpeedEngine.load_universal_checkpoint()`, DeepSpeed 0.1x),
    so it is set here rather than when the engine is built.
    """
    engine._config.load_universal_checkpoint = universal
    engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False)


def apply_recipe_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make a scheduler restored from a checkpoint follow the recipe's (possibly changed) peak lr.

    Loading a checkpoint restores `base_lrs` and the param groups' lr of the run that saved it;
    the recipe's `train.lr` wins, at the schedule position the checkpoint reached.
    """
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)
