"""Cluster launch files and secrets, without a cluster: the sbatch script runs against stand-in
`scontrol`/`srun` commands, the RayJob manifest is parsed, `.env` values never reach the output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from difftrain_dist.cluster.k8s import K8sOptions, k8s_name, rayjob_manifest
from difftrain_dist.cluster.secrets import MASK, load_env_file, read_env_file, redact
from difftrain_dist.cluster.slurm import SlurmOptions, sbatch_script
from difftrain_dist.config import load_recipe, recipe_from_dict

SECRET = "hf_s3cr3t-Value-0123456789"


@pytest.fixture
def recipe_file(tmp_path: Path, tiny_sd15_model: Path, photo_shards: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "cluster-run", "storage_path": str(tmp_path / "runs"), "output_dir": str(tmp_path / "out")},
        "model": {"arch": "sd15", "path": str(tiny_sd15_model)},
        "data": {"shards": str(photo_shards)},
        "train": {"max_steps": 4},
    }))
    return path


# ---------------------------------------------------------------- secrets


def test_env_file_parsing_and_redaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text(f"# tokens\nexport HF_TOKEN={SECRET}\nWANDB_API_KEY='quoted value'\nEMPTY=\nSHORT=ab\n")
    values = read_env_file(env)
    assert values == {"HF_TOKEN": SECRET, "WANDB_API_KEY": "quoted value", "EMPTY": "", "SHORT": "ab"}
    assert redact(f"token={SECRET} key=quoted value ab", values.values()) == f"token={MASK} key={MASK} ab"
    monkeypatch.setenv("WANDB_API_KEY", "from-environment")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    load_env_file(env)
    assert os.environ["HF_TOKEN"] == SECRET and os.environ["WANDB_API_KEY"] == "from-environment"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no such file"):
        read_env_file(tmp_path / "missing.env")


def test_cli_never_prints_env_values(tmp_path: Path, recipe_file: Path) -> None:
    (tmp_path / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "RAY_ADDRESS")}
    runs = [
        ["cluster", "slurm", str(recipe_file), "--nodes", "2", "--gpus-per-node", "4", "-o", "a.sbatch"],
        ["cluster", "k8s", str(recipe_file), "--image", "img:1", "--workers", "2", "-o", "job.yaml"],
        ["submit", str(recipe_file), "--address", "http://127.0.0.1:9"],  # nothing listens: a clean error
        ["jobs", "status", "some-job", "--address", "http://127.0.0.1:9"],
    ]
    for args in runs:
        proc = subprocess.run([sys.executable, "-m", "difftrain_dist", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert SECRET not in proc.stdout + proc.stderr, args
        if args[0] in ("submit", "jobs"):
            assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr
        if args[:2] == ["cluster", "k8s"]:  # names the way to make a Secret from .env, not the values
            assert "kubectl create secret generic NAME --from-env-file=.env" in " ".join(proc.stderr.split())
    for written in ("a.sbatch", "job.yaml"):
        assert SECRET not in (tmp_path / written).read_text()
    assert (tmp_path / "slurm-logs").is_dir(), "sbatch would fail: Slurm does not create the --output folder"


# ---------------------------------------------------------------- Slurm

STUBS = {
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a\\ngpu-b\\ngpu-c\\n'; fi
""",
    "srun": """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
case "$*" in *hostname*) echo "10.1.2.3 fe80::1";; esac
""",
    "fake-python": """#!/bin/bash
echo "python $*" >> "$STUB_LOG"
if [ "$FAKE_TRAIN" = "preempt" ]; then
    trap 'echo "python got USR1" >> "$STUB_LOG"; exit 75' USR1
    while true; do sleep 0.1; done
fi
exit "${FAKE_TRAIN_STATUS:-0}"
""",
}


def _stub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"),
            "DIFFTRAIN_PYTHON": str(bin_dir / "fake-python"), "RAY": "ray", "RAY_START_WAIT": "0.5",
            "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "16", **extra}


def _script(tmp_path: Path, recipe_file: Path) -> Path:
    recipe = load_recipe(recipe_file)
    options = SlurmOptions(nodes=3, gpus_per_node=8, cpus_per_node=16, time="2-00:00:00", signal_seconds=180,
                           partition="gpu", account="vision")
    path = tmp_path / "train.sbatch"
    path.write_text(sbatch_script(recipe, recipe_file, options))
    return path


def test_sbatch_script_header_and_syntax(tmp_path: Path, recipe_file: Path) -> None:
    script = _script(tmp_path, recipe_file)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for line in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=8", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --signal=B:USR1@180", "#SBATCH --requeue", "#SBATCH --job-name=cluster-run",
                 "#SBATCH --partition=gpu", "#SBATCH --account=vision"):
        assert line in text


def test_sbatch_script_starts_ray_runs_and_stops(tmp_path: Path, recipe_file: Path) -> None:
    script = _script(tmp_path, recipe_file)
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=_stub_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0] == "scontrol show hostnames gpu-[a-c]"
    assert calls[1].startswith("srun --overlap --nodes=1 --ntasks=1 -w gpu-a hostname")
    # The head and worker starts run in the background (the script then waits RAY_START_WAIT
    # seconds, 0.5 here), so their lines may still land in the log in either order.
    starts = [c for c in calls if " start " in c]
    heads = [c for c in starts if "--head" in c]
    workers = [c for c in starts if "--head" not in c]
    assert len(heads) == 1 and heads[0].startswith("srun --overlap --nodes=1 --ntasks=1 -w gpu-a ray start --head")
    assert "--node-ip-address=10.1.2.3 --port=6379" in heads[0] and "--num-gpus=8" in heads[0]
    assert sorted(c.split(" -w ")[1].split()[0] for c in workers) == ["gpu-b", "gpu-c"]  # started in parallel
    assert all("--address=10.1.2.3:6379" in c for c in workers)
    train = next(c for c in calls if c.startswith("python "))
    assert f"-m difftrain_dist train {recipe_file} --address 10.1.2.3:6379" in train
    for override in ("run.name=cluster-run", "distributed.num_workers=24", "distributed.use_gpu=true"):
        assert f"--set {override}" in train
    assert calls[-1] == "srun --overlap --nodes=3 --ntasks=3 ray stop --force"
    assert not any("requeue" in c for c in calls)


def test_sbatch_time_limit_signal_checkpoints_and_requeues(tmp_path: Path, recipe_file: Path) -> None:
    script = _script(tmp_path, recipe_file)
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=_stub_env(tmp_path, FAKE_TRAIN="preempt"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "calls.log"
    deadline = time.time() + 30
    while not (log.is_file() and "python " in log.read_text()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)  # what Slurm sends signal_seconds before the limit
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    calls = log.read_text().splitlines()
    assert "python got USR1" in calls
    assert calls[-2] == "srun --overlap --nodes=3 --ntasks=3 ray stop --force"
    assert calls[-1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in out


def test_slurm_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--time"):
        SlurmOptions(nodes=1, gpus_per_node=1, time="tomorrow")
    with pytest.raises(ValueError, match="--partition"):
        SlurmOptions(nodes=1, gpus_per_node=1, partition="gpu; rm -rf /")


# ---------------------------------------------------------------- Kubernetes


def test_rayjob_manifest_has_what_kuberay_needs(recipe_file: Path) -> None:
    recipe = load_recipe(recipe_file)
    options = K8sOptions(image="registry.example/difftrain:0.1", workers=4, gpus_per_worker=8, secret="hf-token",
                         storage_claim="lora-runs", namespace="ml", backoff_limit=5)
    config_map, rayjob = yaml.safe_load_all(rayjob_manifest(recipe, options))
    assert config_map["kind"] == "ConfigMap" and rayjob["kind"] == "RayJob"
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["metadata"] == {
        "name": "cluster-run", "namespace": "ml", "labels": {"app": "difftrain-dist"}}
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python -m difftrain_dist train /etc/difftrain/recipe.yaml --no-progress"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 5
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    worker = workers["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for pod in (head, worker):
        container = pod["containers"][0]
        assert container["image"] == "registry.example/difftrain:0.1"
        assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/storage", "/etc/difftrain"}
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["lora-runs"]
    staged = recipe_from_dict(yaml.safe_load(config_map["data"]["recipe.yaml"]), check_paths=False)
    assert staged.run.name == "cluster-run" and staged.run_dir == Path("/storage/runs/cluster-run")
    assert staged.distributed.num_workers == 32 and staged.distributed.use_gpu


def test_k8s_names_and_options() -> None:
    assert k8s_name("My_Run.v2") == "my-run-v2"
    with pytest.raises(ValueError, match="--secret"):
        K8sOptions(image="x", workers=1, secret="Bad_Name")
