"""The optimizers a recipe names (`train.optimizer`) and the learning-rate schedules
(`train.lr_scheduler`), built from maintained packages.

Importing this module imports no torch: the recipe reads `OPTIMIZERS` while it validates.

Which ZeRO stage an optimizer can run under depends on what its statistics span. ZeRO stages
1-3 flatten every LoRA tensor into one buffer and give each rank a slice of it, and DeepSpeed
calls the optimizer on that slice:

- "element": every statistic is per element (AdamW's moments, Lion's momentum): a slice is
  updated exactly as its elements would be in the whole. Any stage.
- "block": per-element moments stored 8-bit in blocks of 256 values, each with its own scale,
  float32 for tensors under 4,096 values (bitsandbytes' `min_8bit_size`): a slice is quantized
  in other blocks than the whole tensors, so the result is not bit-equal to one process (the
  weights differ by about a tenth of an update after a few steps), but every rank updates the
  same flat buffer and ends with the same LoRA. Any stage.
- "tensor": statistics per tensor (Adafactor's and CAME's factored second moments, their
  update clipping by the tensor's RMS): a slice that cuts across tensors changes them. Stage 0.
- "global": statistics summed over all parameters (Prodigy's step-size estimate d): a slice
  gives each rank its own d, and ranks drift apart. Stage 0.

Stage 0 keeps every tensor whole on every rank, so these optimizers see what they would see
in a single process (their state is replicated: for a LoRA it is a few hundred MB at most).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Statistics = Literal["element", "block", "tensor", "global"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: where its class lives, the package that provides it, what its statistics
    span (see the module docstring) and the keyword arguments it gets unless the recipe's
    `train.optimizer_args` says otherwise."""

    path: str
    """"module:Class"."""
    package: str
    """The PyPI distribution to install when the import fails."""
    statistics: Statistics
    defaults: dict[str, Any] = field(default_factory=dict)

    def check_installed(self) -> None:
        """Find the class's top-level package without importing it (no torch on the driver for
        a recipe that sets no optimizer argument).

        Raises:
            ValueError: the package is not installed (naming it and how to install it).
        """
        module = self.path.partition(":")[0].partition(".")[0]  # a submodule's spec imports its parents
        if importlib.util.find_spec(module) is None:
            raise ValueError(self.missing(f"no module named {module!r}"))

    def load(self) -> type:
        """The optimizer class.

        Raises:
            ValueError: the package is not installed (naming it and how to install it).
        """
        module, _, name = self.path.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as err:
            raise ValueError(self.missing(str(err))) from None

    def missing(self, why: str) -> str:
        """What to say when the package is not there (`why`: what the import found)."""
        return (f"needs the {self.package} package ({why}); pip install {self.package}, "
                "or install difftrain-dist[optimizers]")


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim:AdamW", "torch", "element"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim:AdamW8bit", "bitsandbytes", "block"),
    "lion": OptimizerSpec("lion_pytorch:Lion", "lion-pytorch", "element"),
    "prodigy": OptimizerSpec("prodigyopt:Prodigy", "prodigyopt", "global"),
    # A fixed lr that the schedule drives (transformers' own defaults pick a relative step).
    "adafactor": OptimizerSpec("transformers.optimization:Adafactor", "transformers", "tensor",
                               {"relative_step": False, "scale_parameter": False, "warmup_init": False}),
    "came": OptimizerSpec("came_pytorch:CAME", "came-pytorch", "tensor"),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
"""diffusers' `get_scheduler` names (diffusers.optimization.SchedulerType) a recipe may use."""

_SET_ELSEWHERE = {"params": "the LoRA parameters", "lr": "train.lr", "weight_decay": "train.weight_decay",
                  "betas": "train.betas"}


def stages_for(name: str) -> tuple[int, ...]:
    """The ZeRO stages optimizer `name` runs under (the same LoRA on every rank)."""
    return (0, 1, 2, 3) if OPTIMIZERS[name].statistics in ("element", "block") else (0,)


def why_not_stage(name: str, stage: int) -> str | None:
    """Why optimizer `name` cannot run under ZeRO `stage`, or None when it can."""
    statistics = OPTIMIZERS[name].statistics
    if stage in stages_for(name):
        return None
    what = (f"{name}'s step-size estimate sums over all parameters" if statistics == "global"
            else f"{name}'s statistics are per tensor (factored second moments, RMS clipping)")
    return (f"{what}, and ZeRO-{stage} gives each rank a flat slice that cuts across "
            "tensors, so ranks would compute different ones; use distributed.zero_stage: 0 (the default for "
            f"{name})")


def optimizer_kwargs(name: str, lr: float, weight_decay: float, betas: tuple[float, float] | None,
                     args: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments optimizer `name` is built with: its defaults, the recipe's lr,
    weight_decay and betas (when set), then `args` (`train.optimizer_args`).

    Raises:
        ValueError: naming the key, for an argument the optimizer's constructor does not take,
            one set elsewhere in the recipe, `betas` for an optimizer without a pair of betas, or a
            missing package.
    """
    spec = OPTIMIZERS[name]
    accepted = inspect.signature(spec.load()).parameters
    pair = accepted.get("betas") is not None and _is_pair(accepted["betas"].default)
    for key in args:
        if key in _SET_ELSEWHERE and not (key == "betas" and not pair):
            raise ValueError(f"train.optimizer_args.{key}: set {_SET_ELSEWHERE[key]} instead")
        if key not in accepted:
            known = sorted(k for k in accepted if k not in ("self", *_SET_ELSEWHERE))
            raise ValueError(f"train.optimizer_args.{key}: {name} takes no such argument; it takes {known}")
    kwargs: dict[str, Any] = {**spec.defaults, "lr": lr, "weight_decay": weight_decay}
    if betas is not None:
        if not pair:
            raise ValueError(f"train.betas: {name} takes no pair of betas; give its own in "
                             "train.optimizer_args.betas")
        kwargs["betas"] = tuple(betas)
    kwargs.update(args)
    if name == "adafactor" and kwargs.get("relative_step"):
        raise ValueError("train.optimizer_args.relative_step: Adafactor would then choose its own lr, which "
                         "train.lr and train.lr_scheduler could not drive; leave it false")
    return kwargs


def _is_pair(default: Any) -> bool:
    return isinstance(default, tuple) and len(default) == 2


def check_optimizer(name: str, kwargs: dict[str, Any]) -> None:
    """Build optimizer `name` with `kwargs` over one small tensor and take a step, so that a value
    of the wrong type or range fails when the recipe loads, not inside the workers.

    Raises:
        ValueError: what the optimizer's constructor or first step raised, naming `train.optimizer_args`.
    """
    import torch

    param = torch.nn.Parameter(torch.full((2, 2), 0.5))
    param.grad = torch.full((2, 2), 0.1)
    try:
        build_optimizer([param], name, kwargs).step()
    except Exception as err:  # the optimizer's own check, whatever it raises
        raise ValueError(f"train.optimizer_args: {name} refuses {kwargs}: {type(err).__name__}: {err}") from None


def build_optimizer(params: Iterable[Any], name: str, kwargs: dict[str, Any]):
    """Optimizer `name` over `params` with `kwargs` (from `optimizer_kwargs`)."""
    return OPTIMIZERS[name].load()(list(params), **kwargs)


def build_lr_scheduler(optimizer, name: str, *, warmup_steps: int, max_steps: int, num_cycles: int,
                       power: float):
    """diffusers' `get_scheduler(name, ...)`, a `LambdaLR` stepped once per optimizer step: the
    factor of `train.lr` rises linearly from 0 over `warmup_steps`, then follows `name` to
    `max_steps` (cosine: half a wave down to 0; cosine_with_restarts: `num_cycles` hard
    restarts; polynomial: exponent `power`, down to an lr of 1e-7)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
                         num_cycles=num_cycles, power=power)
