"""Per-rank training state that a checkpoint must carry for an exact resume."""

from __future__ import annotations

import base64
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Where one rank stands: optimizer steps done and the data cursor of its next batch."""

    step: int = 0
    """Optimizer steps completed."""
    samples_seen: int = 0
    """Samples this rank has consumed (all micro-batches)."""
    epoch: int = 0
    """Epoch of the next batch to read."""
    batch_in_epoch: int = 0
    """Rank-level index, within `epoch`, of the next batch to read."""

    def advance(self, epoch: int, batch_in_epoch: int, batch_size: int, batches_per_epoch: int) -> None:
        """Record that the batch (`epoch`, `batch_in_epoch`) of `batch_size` samples was consumed."""
        self.samples_seen += batch_size
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch + 1
        if self.batch_in_epoch >= batches_per_epoch:
            self.epoch, self.batch_in_epoch = epoch + 1, 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng(noise_generator: torch.Generator) -> dict[str, Any]:
    """JSON-able RNG states: python, numpy, torch CPU, CUDA (if used) and the noise generator."""
    np_state = np.random.get_state()
    states = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "noise_generator": _b64(noise_generator.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = _b64(torch.cuda.get_rng_state())
    return states


def restore_rng(states: dict[str, Any], noise_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(states["torch"]))
    noise_generator.set_state(_unb64(states["noise_generator"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(states["cuda"]))
