"""The in-process tier's harness: a gloo process group of world size 1 in the test's own process,
or of world size 2 in two spawned processes (as torchtitan's distributed unit tests do), with no
Ray and no launcher in between."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from difftrain_dist.config import recipe_from_dict
from difftrain_dist.distrib.loop import train_worker
from difftrain_dist.distrib.session import LocalSession

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


def raw_recipe(model: Path, shards: Path, storage: Path, **sections) -> dict:
    """A small SD1.5 recipe as a dict (run "o", 4 steps, checkpoints every 2); `sections` update
    its sections field by field."""
    raw = {
        "run": {"name": "o", "seed": 5, "output_dir": str(storage / "out"), "storage_path": str(storage)},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": 4, "alpha": 4},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 1},
        "train": {"max_steps": 4},
        "distributed": {"num_workers": 1},
        "checkpoint": {"every_n_steps": 2, "keep_last": None},
    }
    for section, fields in sections.items():
        raw[section] = {**raw[section], **fields}
    return raw


def straight_and_split(raw: dict, storage: Path) -> None:
    """On each rank: "straight" trains 4 steps, "split" 2 and then on to 4 (a stop and a resume).
    Every save compares the ranks' weights (`check_ranks_agree`), so equal ranks are checked too."""
    for name, steps in (("straight", (4,)), ("split", (2, 4))):
        for max_steps in steps:
            run = copy.deepcopy(raw)
            run["run"].update(storage_path=str(storage / name), output_dir=str(storage / name / "out"))
            run["train"]["max_steps"] = max_steps
            assert train_worker(recipe_from_dict(run), LocalSession()).state.step == max_steps
