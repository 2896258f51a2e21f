"""`difftrain-dist submit`, `jobs status|logs|stop` and `cluster slurm|k8s`: runs on clusters."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.cluster.secrets import DEFAULT_ENV_FILE, describe, read_env_file, redact
from difftrain_dist.config import load_recipe
from difftrain_dist.launcher.common import console, user_errors
from difftrain_dist.launcher.train import SetOption

jobs_app = typer.Typer(help="Ray jobs submitted with `difftrain-dist submit`.", no_args_is_help=True)
cluster_app = typer.Typer(help="Launch files for Slurm and Kubernetes (KubeRay).", no_args_is_help=True)

JobsAddress = Annotated[
    str | None, typer.Option(help="Ray dashboard / Jobs API address, e.g. http://head:8265 (default: RAY_ADDRESS).")
]
EnvFileOption = Annotated[
    Path | None, typer.Option(help="Secrets file (KEY=value lines); default: ./.env when present.")
]
PathCheckOption = Annotated[
    bool, typer.Option(help="Check here that the recipe's model and shard paths exist and its run folders can be "
                            "written (off: they live on the cluster).")
]
EXIT_CODES = {"SUCCEEDED": 0, "STOPPED": 75}


def _secrets(env_file: Path | None) -> dict[str, str]:
    if env_file is not None:
        return read_env_file(env_file)
    return read_env_file(DEFAULT_ENV_FILE) if DEFAULT_ENV_FILE.is_file() else {}


def submit(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe; its paths must be valid on the cluster.")],
    address: JobsAddress = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends; exit with its status.")] = False,
    set_: SetOption = None,
    env_file: EnvFileOption = None,
    job_id: Annotated[str | None, typer.Option(help="Submission id (default: `<run name>-<unix time>`).")] = None,
    python: Annotated[str, typer.Option(help="Python interpreter on the cluster's head node.")] = "python",
    check_paths: PathCheckOption = True,
) -> None:
    """Submit RECIPE to a running Ray cluster through the Ray Jobs API.

    The job runs `difftrain-dist train` on the cluster (same resume, checkpoints and LoRA file as
    a local run); secrets from `.env` reach it as environment variables and are never printed.
    """
    from difftrain_dist.cluster import jobs

    with user_errors():
        cfg = load_recipe(recipe, list(set_ or []), check_paths=check_paths)
        secrets = _secrets(env_file)
        submission = jobs.submit(cfg, address=address, secrets=secrets, python=python, job_id=job_id)
    console.print(f"submitted job [bold]{submission.job_id}[/bold] (run {cfg.run.name}) to {submission.address}; "
                  f"secrets passed: {describe(secrets)}")
    if follow:
        _follow(submission.job_id, address, secrets)


def _follow(job_id: str, address: str | None, secrets: dict[str, str]) -> None:
    from difftrain_dist.cluster import jobs

    with user_errors():
        final = jobs.follow(job_id, address, lambda text: sys.stdout.write(redact(text, secrets.values())))
    sys.stdout.flush()
    console.print(f"job {job_id}: {final}")
    raise typer.Exit(EXIT_CODES.get(final, 1))


@jobs_app.command("status")
def job_status(job_id: Annotated[str, typer.Argument(help="Submission id.")], address: JobsAddress = None) -> None:
    """Status, message and times of a job."""
    from difftrain_dist.cluster import jobs

    with user_errors():
        info = jobs.status(job_id, address)
    console.print(f"job {job_id}: [bold]{info['status']}[/bold]  run {info['metadata'].get('run_name', '?')}")
    for key in ("start_time", "end_time"):
        if info[key]:
            when = datetime.datetime.fromtimestamp(info[key]).isoformat(timespec="seconds")
            console.print(f"  {key.replace('_', ' ')}: {when}")
    if info["message"]:
        console.print(f"  {info['message']}")


@jobs_app.command("logs")
def job_logs(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    address: JobsAddress = None,
    follow: Annotated[bool, typer.Option(help="Keep streaming until the job ends.")] = False,
    env_file: EnvFileOption = None,
) -> None:
    """Print a job's logs (values of the local `.env` secrets are masked)."""
    from difftrain_dist.cluster import jobs

    with user_errors():
        secrets = _secrets(env_file)
        if follow:
            _follow(job_id, address, secrets)
        text = jobs.logs(job_id, address)
    sys.stdout.write(redact(text, secrets.values()))


@jobs_app.command("stop")
def job_stop(job_id: Annotated[str, typer.Argument(help="Submission id.")], address: JobsAddress = None) -> None:
    """Stop a job: the run saves a checkpoint (SIGTERM) and can be resumed later."""
    from difftrain_dist.cluster import jobs

    with user_errors():
        stopped = jobs.stop(job_id, address)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'already ended'}")


@cluster_app.command("slurm")
def slurm(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, at a path the compute nodes see.")],
    nodes: Annotated[int, typer.Option(min=1, help="Nodes in the allocation.")],
    gpus_per_node: Annotated[int, typer.Option(min=0, help="GPUs per node (0: CPU only).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="sbatch script to write.")] = Path("train.sbatch"),
    cpus_per_node: Annotated[int, typer.Option(min=1, help="CPUs per node for Ray.")] = 16,
    time: Annotated[str, typer.Option(help="Slurm time limit, e.g. 24:00:00.")] = "24:00:00",
    signal_seconds: Annotated[int, typer.Option(help="USR1 this many seconds before the limit.")] = 300,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account.")] = None,
    set_: SetOption = None,
    check_paths: PathCheckOption = True,
) -> None:
    """Write an sbatch script: Ray across the allocation, the run, checkpoint-and-requeue before
    the time limit. Submit it with `sbatch`; every requeue resumes the same run."""
    from difftrain_dist.cluster.slurm import SlurmOptions, sbatch_script

    with user_errors():
        cfg = load_recipe(recipe, list(set_ or []), check_paths=check_paths)
        options = SlurmOptions(nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node, time=time,
                               signal_seconds=signal_seconds, partition=partition, account=account)
        recipe_path = recipe.resolve()
        if set_:
            from difftrain_dist.cluster.jobs import stage_recipe

            recipe_path = stage_recipe(cfg, output.resolve().parent / f"{cfg.run.name}.recipe") / "recipe.yaml"
        script = sbatch_script(cfg, recipe_path, options)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(script)
    output.chmod(0o755)
    # Slurm opens the job's --output file before the script runs and does not create its folder.
    (output.parent / options.log_dir).mkdir(parents=True, exist_ok=True)
    console.print(f"wrote {output}: {nodes} node(s) x {gpus_per_node} GPU(s), run {cfg.run.name}; "
                  f"submit it from {output.parent} with `sbatch {output.name}` (logs in {options.log_dir}/)")


@cluster_app.command("k8s")
def k8s(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe; model and shard paths as the pods see them.")],
    image: Annotated[str, typer.Option(help="Container image with difftrain-dist and CUDA.")],
    workers: Annotated[int, typer.Option(min=1, help="GPU worker pods.")],
    gpus_per_worker: Annotated[int, typer.Option(min=0, help="GPUs per worker pod.")] = 1,
    cpus_per_worker: Annotated[int, typer.Option(min=1, help="CPUs per worker pod.")] = 8,
    memory_per_worker: Annotated[str, typer.Option(help="Memory per worker pod.")] = "64Gi",
    storage_claim: Annotated[str, typer.Option(help="ReadWriteMany PVC for checkpoints.")] = "difftrain-storage",
    storage_mount: Annotated[str, typer.Option(help="Where the PVC is mounted.")] = "/storage",
    secret: Annotated[str | None, typer.Option(help="Existing Secret with HF_TOKEN etc. (envFrom).")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    retries: Annotated[int, typer.Option(min=0, help="backoffLimit: retries on a fresh cluster.")] = 3,
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest to write.")] = Path("rayjob.yaml"),
    set_: SetOption = None,
    check_paths: Annotated[bool, typer.Option(help="Check model and shard paths here too.")] = False,
) -> None:
    """Write a KubeRay RayJob manifest (plus a ConfigMap with the recipe); apply with kubectl."""
    from difftrain_dist.cluster.k8s import K8sOptions, rayjob_manifest

    with user_errors():
        cfg = load_recipe(recipe, list(set_ or []), check_paths=check_paths)
        options = K8sOptions(image=image, workers=workers, gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker, memory_per_worker=memory_per_worker,
                             storage_claim=storage_claim, storage_mount=storage_mount, secret=secret,
                             namespace=namespace, backoff_limit=retries)
        manifest = rayjob_manifest(cfg, options)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(manifest)
    console.print(f"wrote {output}: RayJob with {workers} worker pod(s) x {gpus_per_worker} GPU(s); "
                  f"`kubectl apply -f {output}`")
    if secret is None and DEFAULT_ENV_FILE.is_file():
        console.print(f"secrets: create one from .env with `kubectl create secret generic NAME "
                      f"--from-env-file=.env -n {namespace}` and pass --secret NAME")
