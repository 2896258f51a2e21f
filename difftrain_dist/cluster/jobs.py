"""Ray Jobs API: submit a recipe to a running Ray cluster, read its status and logs, stop it.

A submission uploads a small working directory holding the validated recipe (`recipe.yaml`) and
runs `python -m difftrain_dist train recipe.yaml --no-progress` as the job's entrypoint on the
head node, so everything the local `train` does (resume, checkpoints, the final LoRA file) happens
on the cluster. Paths in the recipe must be valid there (shared storage). Secrets from `.env`
travel as the runtime_env's `env_vars`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from difftrain_dist.config import Recipe

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60
"""How long `submit` retries while a freshly started cluster has no job agent yet (s)."""
_JOB_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def jobs_address(address: str | None) -> str:
    """The Ray Jobs API address: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS
    (e.g. http://head:8265). Raises ValueError when none is given."""
    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not found:
        raise ValueError("--address: give the Ray dashboard address (http://HEAD:8265) or set RAY_ADDRESS")
    return found


def client(address: str | None):
    """A `ray.job_submission.JobSubmissionClient` for the cluster; ValueError if unreachable or
    when the cluster wants a token this client does not have."""
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    with _cluster_errors(url):
        return JobSubmissionClient(url)


@contextlib.contextmanager
def _cluster_errors(url: str) -> Iterator[None]:
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise ValueError(
            f"{url} uses Ray token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(e.g. in .env) or put the token in ~/.ray/auth_token"
        ) from None
    except (ConnectionError, RuntimeError) as error:
        raise ValueError(f"--address {url}: no Ray Jobs API there ({str(error).splitlines()[0]})") from None


@dataclass
class Submission:
    job_id: str
    address: str
    secret_keys: list[str]


def stage_recipe(recipe: Recipe, folder: Path | None = None) -> Path:
    """Write `recipe.yaml` (the validated recipe, every default spelled out) into a new folder,
    the job's working_dir. Returns the folder."""
    folder = Path(folder or tempfile.mkdtemp(prefix="difftrain-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return folder


def submit(
    recipe: Recipe,
    *,
    address: str | None,
    secrets: dict[str, str],
    python: str = "python",
    job_id: str | None = None,
) -> Submission:
    """Submit `recipe` as a Ray job; returns its submission id (default `<run name>-<unix time>`).

    The runtime_env carries the staged working_dir and `secrets` as env_vars (values are never
    printed by this package; Ray keeps them in its job table, readable to whoever can use the
    cluster's dashboard). Raises ValueError when the cluster cannot be reached or refuses the job.
    """
    jobs = client(address)
    staged = stage_recipe(recipe)
    job_id = job_id or f"{recipe.run.name}-{int(time.time())}"
    if _JOB_ID.search(job_id):
        raise ValueError(f"--job-id: {job_id!r} may hold letters, digits, '_', '.' and '-' only")
    entrypoint = f"{shlex.quote(python)} -m difftrain_dist train recipe.yaml --no-progress"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            submitted = jobs.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env={"working_dir": str(staged), "env_vars": dict(secrets)},
                metadata={"run_name": recipe.run.name, "storage": str(recipe.run_dir)},
            )
            break
        except RuntimeError as error:
            # A cluster that has just started answers before its job agent is up.
            if "No available agent" in str(error) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise ValueError(f"the cluster refused the job: {error}") from None
    return Submission(submitted, jobs_address(address), sorted(secrets))


def status(job_id: str, address: str | None) -> dict[str, Any]:
    """`status`, `message`, `entrypoint`, `start_time`/`end_time` (unix s) and `metadata` of a job
    (the runtime_env, which holds the secrets, is left out). ValueError for an unknown job."""
    info = _info(client(address), job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": (info.start_time or 0) / 1000 or None,
        "end_time": (info.end_time or 0) / 1000 or None,
        "metadata": info.metadata or {},
    }


def logs(job_id: str, address: str | None) -> str:
    """Everything the job's entrypoint has printed so far."""
    jobs = client(address)
    _info(jobs, job_id)
    return jobs.get_job_logs(job_id)


def stop(job_id: str, address: str | None) -> bool:
    """Ask Ray to stop the job (SIGTERM to the entrypoint: the run checkpoints and exits 75).
    Returns False when it had already ended."""
    jobs = client(address)
    _info(jobs, job_id)
    return bool(jobs.stop_job(job_id))


def follow(job_id: str, address: str | None, write: Callable[[str], None]) -> str:
    """Pass the job's log lines to `write` as they come, until it ends; returns its final status."""
    jobs = client(address)
    _info(jobs, job_id)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    while (current := status(job_id, address)["status"]) not in TERMINAL:
        time.sleep(1)
    return current


def _info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as error:
        raise ValueError(f"job {job_id!r}: not found on the cluster ({error})") from None
