"""An exponential moving average of the trained LoRA weights (ai-toolkit's `ema_config`).

After every optimizer step each shadow tensor moves towards its live weight,
``shadow ← decay · shadow + (1 − decay) · weight`` (a constant decay, no warm-up, as ai-toolkit's
`ExponentialMovingAverage`), computed by PyTorch's own `torch.optim.swa_utils.get_ema_multi_avg_fn`.
Shadows start equal to the weights LoRA was initialised with and are kept in float32.

Every rank keeps the same shadows (ZeRO 0-2 leave every rank the whole LoRA after each step);
checkpoints hold them in `ema.safetensors`, and what the LoRA files and the sample grids show
are the averaged weights (`swapped_in`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

EMA_FILE = "ema.safetensors"


class LoraEMA:
    """Shadows of `module`'s trainable parameters, by parameter name.

    Args:
        module: the trained module (the engine's `module`); its parameters that require grad
            are averaged.
        decay: in (0, 1); larger averages over more steps (about 1 / (1 − decay)).
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a value in (0, 1), got {decay!r}")
        self.decay = decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadows = {name: p.detach().float().clone() for name, p in self.params.items()}
        self._average = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow towards its weight (after an optimizer step)."""
        names = list(self.params)
        self._average([self.shadows[n] for n in names], [self.params[n].detach().float() for n in names], None)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside, the module's trained parameters hold the averaged weights (in their own
        dtype); the live weights are put back on exit."""
        live = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadows[name])
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(live[name])

    def save(self, path: Path) -> None:
        """Write the shadows (float32, by parameter name) and the decay to `path`."""
        safetensors.torch.save_file({n: t.contiguous() for n, t in self.shadows.items()}, str(path),
                                    metadata={"decay": repr(self.decay)})

    def load(self, path: Path) -> None:
        """Read shadows saved by `save`.

        Raises:
            ValueError: naming the file, when its parameter names or shapes are not this module's.
        """
        loaded = safetensors.torch.load_file(str(path))
        if loaded.keys() != self.shadows.keys():
            missing, extra = sorted(self.shadows.keys() - loaded.keys()), sorted(loaded.keys() - self.shadows.keys())
            raise ValueError(f"{path}: EMA weights of other parameters (missing {missing[:3]}, extra {extra[:3]}); "
                             "the LoRA shape changed since this checkpoint")
        for name, tensor in loaded.items():
            if tensor.shape != self.shadows[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(self.shadows[name].shape)}")
            self.shadows[name].copy_(tensor)
