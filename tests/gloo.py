"""The in-process tier's harness: a gloo process group of world size 1 in the test's own process,
or of world size 2 in two spawned processes (as torchtitan's distributed unit tests do), with no
Ray and no launcher in between."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch.distributed as dist
import torch.multiprocessing as mp

from .procs import free_port, kept_signal_handlers

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
"""DeepSpeed on the CPU; one thread per rank (two ranks share the machine's cores)."""


@contextlib.contextmanager
def process_group(global_rank: int = 0, world_size: int = 1, port: int | None = None) -> Iterator[None]:
    """A gloo process group over 127.0.0.1 while inside; the signal handlers a LocalSession
    installs (SIGINT, SIGTERM, SIGUSR1) are put back on exit."""
    os.environ.update(CPU_ENV, RANK=str(global_rank), LOCAL_RANK=str(global_rank), WORLD_SIZE=str(world_size))
    with kept_signal_handlers():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port or free_port()}",
                                rank=global_rank, world_size=world_size)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _rank_main(global_rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    with process_group(global_rank, world_size, port):
        fn(*args)


def run_ranks(fn: Callable, world_size: int, *args) -> None:
    """Run `fn(*args)` on `world_size` spawned ranks inside one gloo group; raises when any rank
    raised (torch.multiprocessing reports the rank and its traceback). `fn` must be importable
    (a module-level function) and assert what each rank should see."""
    os.environ.update(CPU_ENV)
    mp.start_processes(_rank_main, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       start_method="spawn", join=True)
