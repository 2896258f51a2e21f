"""How a worker reports progress and persists checkpoints, with or without Ray.

The train loop only talks to a :class:`WorkerSession`; Ray Train supplies one
(:class:`difftrain_dist.distrib.driver.ray_job.RaySession`), and torchrun/srun launches use
:class:`LocalSession`, which copies each rank's files into the run folder itself.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Protocol


class WorkerSession(Protocol):
    """What the train loop needs from its launcher."""

    def log(self, metrics: dict[str, Any]) -> None:
        """Forward rank 0's step metrics to whoever shows progress."""

    def stop_requested(self) -> bool:
        """True once this rank was asked to stop (preemption); must not block."""

    def persist_checkpoint(self, local_dir: Path, run_dir: Path, name: str, metrics: dict[str, Any]) -> None:
        """Move this rank's checkpoint files from `local_dir` to `run_dir/name` (all ranks call it)."""

    def node_id(self) -> str:
        """The cluster node this rank runs on (recorded in its checkpoint manifest)."""


def format_metrics(metrics: dict[str, Any]) -> str:
    """One log line: `step 10/40  loss 0.1234  3.21 samples/s  eta 0:00:12`."""
    eta = int(metrics.get("eta_s", 0))
    return (
        f"step {metrics['step']}/{metrics['max_steps']}  loss {metrics['loss']:.4f}  "
        f"{metrics['samples_per_s']:.2f} samples/s  eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    )


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM (Kubernetes, spot reclaim, scancel) and SIGUSR1 (Slurm's `--signal=USR1@seconds`)."""
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)
"""The signals that stop a run after the current step with a checkpoint: the preemption signals
and SIGINT (Ctrl+C in a terminal)."""


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT (handlers can only be installed from the main thread).

    Repeated signals change nothing: under torchrun a Ctrl+C reaches each rank twice (from the
    terminal and forwarded by torchrun, which kills the ranks itself 30 s later)."""

    def __init__(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint",
              file=sys.stderr, flush=True)


class LocalSession:
    """Session for launches without Ray (torchrun, srun): rank 0 prints, files are copied directly,
    SIGTERM/SIGUSR1/SIGINT to any rank stops the job after the current step with a checkpoint.

    `run_dir` must be on storage every rank can see (a shared filesystem on multi-node launches).
    """

    def __init__(self) -> None:
        self.stop = StopFlag()

    def stop_requested(self) -> bool:
        return self.stop.requested

    def log(self, metrics: dict[str, Any]) -> None:
        print(format_metrics(metrics), file=sys.stderr, flush=True)

    def node_id(self) -> str:
        return socket.gethostname()

    def persist_checkpoint(self, local_dir: Path, run_dir: Path, name: str, metrics: dict[str, Any]) -> None:
        import torch.distributed as dist  # only on a rank: the driver imports this module for its names

        shutil.copytree(local_dir, run_dir / name, dirs_exist_ok=True)
        shutil.rmtree(local_dir, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
