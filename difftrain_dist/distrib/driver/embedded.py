"""A run on the embedded local Ray cluster: one Ray actor per rank, supervised by the driver.

On one machine Ray Train's controller, its helper actors and Ray's dashboard cost more than the
job they serve (seconds before the first step, hundreds of MB each). Here each rank is a plain
Ray actor that runs the same loop as a torchrun rank (`train_rank`: its own gloo/NCCL process
group, files copied into the run folder by the rank itself); its mailbox (metrics, log lines,
the stop flag) lives in the actor and the driver polls it. The driver restarts the whole group
after a failure, up to `distributed.max_failures` times, as Ray Train does, and the new group
resumes from the newest valid checkpoint. Cluster runs (`--address`, RAY_ADDRESS, `submit`,
Slurm, KubeRay) keep Ray Train (`ray_job.py`).
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import asdict
from typing import Any

import ray

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.driver.finish import TrainingResult
from difftrain_dist.distrib.driver.progress import Mailbox, ProgressDisplay, logs_to_board, say, stop_on_signals
from difftrain_dist.distrib.driver.ray_cluster import init_ray, ray_log_dir, worker_env_vars
from difftrain_dist.distrib.driver.record import failure_line
from difftrain_dist.distrib.session import LocalSession


class WorkerGroupError(RuntimeError):
    """A rank failed (an error in the loop, or its process died) more often than
    `distributed.max_failures` allows; the rank's own error is the cause."""


class RankFailed(Exception):
    """Raised inside RankGroup: rank `rank` ended with `error` (its own, or its process's death)."""

    def __init__(self, rank: int, error: BaseException) -> None:
        super().__init__(rank, error)
        self.rank, self.error = rank, error


class ActorSession(LocalSession):
    """LocalSession of a rank actor: metrics, log lines and the stop flag go through its mailbox;
    files are copied into the run folder as under torchrun (one machine, one file system)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    def log(self, metrics: dict[str, Any]) -> None:
        self.mailbox.push(metrics)

    def stop_requested(self) -> bool:
        return self.mailbox.stop_requested()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_concurrency=2)
class RankActor:
    """One rank in a Ray worker process: `train` runs the loop on one thread, the driver's `drain`
    and `request_stop` are answered on the other."""

    def __init__(self, env: dict[str, str]) -> None:
        os.environ.update(env)  # before torch and DeepSpeed are imported in this process
        self.mailbox = Mailbox()
        self.reserved: socket.socket | None = None

    def reserve_port(self) -> int:
        """Rank 0: bind a free port and hold it, so that the kernel hands it to no other process
        (Ray's own workers bind random ports) until `train` lets the rendezvous store take it."""
        self.reserved = socket.socket()
        self.reserved.bind(("", 0))
        return self.reserved.getsockname()[1]

    def train(self, recipe: dict[str, Any], master_port: int) -> dict[str, Any] | None:
        """Rank 0: the run's TrainingResult as a dict; other ranks: None."""
        import torch  # the worker's stack is imported here, never on the driver

        from difftrain_dist.distrib.driver.local_launch import train_rank

        os.environ["MASTER_PORT"] = str(master_port)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if self.reserved is not None:  # train_rank binds it at once: its first step is the process group
            self.reserved.close()
            self.reserved = None
        with logs_to_board(self.mailbox.note, int(os.environ["RANK"])):
            done, _ = train_rank(Recipe.model_validate(recipe), ActorSession(self.mailbox), build_data=False)
        return None if done is None else asdict(done)

    def drain(self) -> list[dict[str, Any]]:
        return self.mailbox.drain()

    def request_stop(self) -> None:
        self.mailbox.request_stop()


def rank_env(recipe: Recipe, rank: int, *, verbose: bool) -> dict[str, str]:
    """A rank's environment: `worker_env_vars`, torchrun's names (MASTER_PORT comes with `train`),
    its threads."""
    cfg = recipe.distributed
    return {**worker_env_vars(recipe, verbose=verbose), "RANK": str(rank), "WORLD_SIZE": str(cfg.num_workers),
            "LOCAL_RANK": "0" if cfg.use_gpu else str(rank),  # Ray shows each actor its own GPU only
            "MASTER_ADDR": "127.0.0.1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, int(cfg.cpus_per_worker))))}


class RankGroup:
    """The ranks of a run, started together and ended together, restarted after a failure.
    `drain` and `request_stop` may be called from other threads while `run` waits."""

    def __init__(self, recipe: Recipe, *, verbose: bool = False) -> None:
        self.recipe, self.verbose = recipe, verbose
        self.actors: list[Any] = []
        self.stopping = False
        self.leftovers: list[dict[str, Any]] = []

    def run(self) -> TrainingResult | None:
        """Train to the end; returns rank 0's result.

        Raises:
            WorkerGroupError: a rank failed after `distributed.max_failures` restarts.
        """
        for attempt in range(self.recipe.distributed.max_failures + 1):
            try:
                results = self._wait(self._start())
            except RankFailed as failed:
                self._end()
                line = failure_line(failed.error)
                if attempt == self.recipe.distributed.max_failures:
                    say(str(failed.error).strip())  # the rank's traceback: its stderr stays in Ray's logs
                    say(f"Ray's worker logs: {ray_log_dir()}")
                    # not chained: the CLI's and the run record's line is this one, naming the rank
                    raise WorkerGroupError(f"rank {failed.rank}: {line}") from None
                say(f"rank {failed.rank} failed: {line}; restarting the worker group")
                continue
            return None if results[0] is None else TrainingResult(**results[0])
        raise AssertionError("unreachable")

    def _start(self) -> list[Any]:
        cfg = self.recipe.distributed
        options = {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.use_gpu else 0}
        self.actors = [RankActor.options(**options).remote(rank_env(self.recipe, rank, verbose=self.verbose))
                       for rank in range(cfg.num_workers)]
        if self.stopping:
            self.request_stop()
        port = self._wait([self.actors[0].reserve_port.remote()])[0]
        payload = self.recipe.model_dump(mode="json")
        return [actor.train.remote(payload, port) for actor in self.actors]

    @staticmethod
    def _wait(refs: list[Any]) -> list[Any]:
        """Every rank's result; raises RankFailed at the first failure. Wakes five times a second, for
        the signal handlers of the main thread."""
        pending, done = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            for ref in ready:
                try:
                    done[ref] = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
                    raise RankFailed(refs.index(ref), err) from err
        return [done[ref] for ref in refs]

    def _end(self) -> None:
        """Keep what the survivors still had to say, then end every rank of this group."""
        self.leftovers.extend(self.drain())
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def drain(self) -> list[dict[str, Any]]:
        items, self.leftovers = self.leftovers, []
        for actor in list(self.actors):
            try:
                items.extend(ray.get(actor.drain.remote(), timeout=10))
            except (ray.exceptions.RayError, TimeoutError):
                continue  # a rank that died has nothing more to say
        return items

    def request_stop(self) -> None:
        self.stopping = True
        if not ray.is_initialized():  # before the cluster started, or after it ended
            return
        for actor in list(self.actors):
            actor.request_stop.remote()


def run_embedded(recipe: Recipe, *, show_progress: bool, verbose: bool) -> tuple[TrainingResult | None, bool]:
    """Start the embedded cluster, train the recipe's ranks on it, end the cluster whatever
    happens. Returns (rank 0's result, whether a stop signal arrived); `verbose` shows Ray's and
    the workers' own output in this terminal (else it stays in Ray's log files)."""
    from difftrain_dist.distrib.driver.launch import save_run_recipe

    cfg = recipe.distributed
    if not verbose:  # a failed rank's traceback is ours to print once, not Ray's for each survivor
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    group = RankGroup(recipe, verbose=verbose)
    with stop_on_signals(group.request_stop) as signals:  # a stop before the ranks start reaches them
        try:
            init_ray(None, cfg.num_workers * cfg.cpus_per_worker, whole_machine=False, verbose=verbose)
            # ray.init puts its own SIGTERM handler (sys.exit) in place: ours again, as SIGINT's
            signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
            save_run_recipe(recipe)
            with ProgressDisplay(group.drain, recipe.train.max_steps, enabled=show_progress):
                result = group.run()
        finally:  # also when ray.init itself was interrupted half way
            ray.shutdown()
    return result, bool(signals)
