"""Joining a Ray cluster, or starting the embedded local one a run (or a precompute job) uses."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator

import ray

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.metrics import WANDB_ENV
from difftrain_dist.quiet import library_env, quiet_env

QUIET_RAY_LOGGERS = {
    # "Token authentication is enabled for this Ray cluster…": the embedded cluster keeps Ray's
    # token authentication; nothing for the user to do about it.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}
"""Ray's driver-side loggers that speak at the start of an embedded cluster (unless verbose)."""


def starts_embedded_cluster(address: str | None) -> bool:
    """True when `init_ray(address, …)` would start an embedded local cluster (no `address`, no
    RAY_ADDRESS, Ray not initialised yet): whoever calls it then ends the cluster."""
    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None, num_cpus_needed: float, *, whole_machine: bool = True,
             verbose: bool = True) -> None:
    """Join `address` (or RAY_ADDRESS), else start an embedded local cluster for the job.

    The embedded cluster is always a new one (Ray's `address="local"`): without it Ray would join
    whatever cluster it finds on the machine (the address file in its temp folder, written by
    `ray start` and by `ray.cluster_utils`), another user's run or one a killed process left.
    It has no dashboard (a cluster run keeps Ray's) and `num_cpus_needed` CPUs (rounded up), or
    as many as the machine has if more and `whole_machine`: Ray starts one worker process ahead
    of time per CPU, each ready for a task or actor, each idle otherwise. Unless `verbose`, the
    workers' output stays in Ray's log files (`ray_log_dir()`) instead of the driver's terminal.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **common)
        return
    machine = (os.cpu_count() or 1) if whole_machine else 1
    num_cpus = max(machine, math.ceil(num_cpus_needed))
    with ray_processes_in_own_session(), quiet_ray_loggers(enabled=not verbose):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose,
                 _temp_dir=tempfile.gettempdir() + "/ray", **common)


def worker_env_vars(recipe: Recipe, *, verbose: bool = False) -> dict[str, str]:
    """Environment of the training workers: quiet library chatter unless the user set it (or, with
    `verbose`, the libraries' own defaults), and the driver's W&B settings when the recipe logs
    there."""
    env = library_env() if verbose else quiet_env()
    if recipe.logging.wandb:
        env.update({name: os.environ[name] for name in WANDB_ENV if name in os.environ})
    if not recipe.distributed.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def ray_log_dir() -> str:
    """The log folder of the cluster this process joined or started (workers' stdout/stderr)."""
    return ray._private.worker.global_worker.node.get_logs_dir_path()


@contextlib.contextmanager
def quiet_ray_loggers(*, enabled: bool) -> Iterator[None]:
    """While inside, QUIET_RAY_LOGGERS speak only at their level (when `enabled`)."""
    loggers = {logging.getLogger(name): level for name, level in QUIET_RAY_LOGGERS.items()} if enabled else {}
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


@contextlib.contextmanager
def ray_processes_in_own_session() -> Iterator[None]:
    """While inside, the processes Ray starts for an embedded cluster (GCS, raylet, agents and,
    through the raylet, the workers) start in a session of their own.

    Ray starts them in the driver's process group, so a terminal's Ctrl+C, which goes to the whole
    foreground group, reached them too: Ray blocks SIGINT in some of them, not in all (the
    dashboard's module processes died of it and took Ray's State API with them). In their own
    session only the driver hears the terminal. They still end with the driver: on Linux Ray
    ties them to it with PR_SET_PDEATHSIG, which does not depend on sessions (without that
    kernel support Ray kills its process group instead, so nothing is changed there). Ray
    (2.5x-2.6x) has no option for this; it starts these processes through
    `ray._private.services.ConsolePopen`.
    """
    from ray._private import services, utils

    popen = getattr(services, "ConsolePopen", None)
    if popen is None or not utils.detect_fate_sharing_support():
        yield
        return

    class NewSessionPopen(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "start_new_session": True})

    services.ConsolePopen = NewSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen
