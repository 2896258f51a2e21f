"""Real clusters on this machine: a Ray head started with `ray start --head` and a job submitted
through the Jobs API; a three-node `ray.cluster_utils.Cluster` that loses a worker node mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from difftrain_dist.distrib.checkpoint import list_checkpoints
from difftrain_dist.distrib.driver.record import read_driver_record
from difftrain_dist.models import read_lora_file

from .procs import free_port
from .test_train_run import run_cli

pytestmark = pytest.mark.slow
SECRET = "hf_cluster-s3cr3t-9876543210"
RAY_TOKEN = secrets.token_hex(16)
"""The head runs with Ray's token authentication on; clients get the token from .env."""


def _recipe(tmp_path: Path, model: Path, shards: Path, name: str, **train) -> dict:
    return {
        "run": {"name": name, "seed": 1, "output_dir": str(tmp_path / "out"), "storage_path": str(tmp_path / "runs")},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 1},
        "train": {"max_steps": 4, "lr": 1e-3, **train},
        "distributed": {"num_workers": 2, "zero_stage": 2, "max_failures": 2},
        "checkpoint": {"every_n_steps": 2},
    }


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 in its own process group, one for the module's
    tests (each submits jobs of its own names); yields the Jobs API URL. (Its temp dir is short:
    Ray's unix socket paths must fit in 107 bytes.)"""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
         # every port of its own, so that another Ray on this machine cannot hold one of them
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            probe = subprocess.run(
                [sys.executable, "-c",
                 f"from ray.job_submission import JobSubmissionClient as C; C({url!r}).list_jobs()"],
                env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline and head.poll() is None, f"the Ray head did not come up: {probe.stderr}"
            time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_to_a_real_ray_head_trains_and_reports(tmp_path, ray_head, tiny_sd15_model, photo_shards):
    recipe = _recipe(tmp_path, tiny_sd15_model, photo_shards, "job", max_steps=2)
    recipe["distributed"]["num_workers"] = 1  # what is checked here is the Jobs API, not training
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / ".env").write_text(f"HF_TOKEN={SECRET}\nRAY_AUTH_MODE=token\nRAY_AUTH_TOKEN={RAY_TOKEN}\n")
    without_token = run_cli("jobs", "status", "x", "--address", ray_head, cwd=tmp_path.parent)
    assert without_token.returncode == 2 and "RAY_AUTH_TOKEN" in without_token.stderr
    submit = run_cli("submit", "recipe.yaml", "--address", ray_head, "--follow", "--job-id", "lora-job-1",
                     "--python", sys.executable, cwd=tmp_path)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    said = " ".join(submit.stderr.split())  # the console wraps long lines
    assert "submitted job lora-job-1" in said and "secrets passed: HF_TOKEN, RAY_AUTH_MODE, RAY_AUTH_TOKEN" in said
    assert "job lora-job-1: SUCCEEDED" in said
    assert "LoRA written" in submit.stdout  # the job's own output, streamed back
    tensors, _ = read_lora_file(tmp_path / "out" / "job.safetensors")
    assert tensors
    record = read_driver_record(tmp_path / "runs" / "job")  # the job's entrypoint was the run's driver
    assert (record.ray_job_id, record.outcome, record.ray_address) == ("lora-job-1", "finished", None)

    status = run_cli("jobs", "status", "lora-job-1", "--address", ray_head, cwd=tmp_path)
    assert status.returncode == 0 and "SUCCEEDED" in status.stderr and "run job" in status.stderr, status.stderr
    logs = run_cli("jobs", "logs", "lora-job-1", "--address", ray_head, cwd=tmp_path)
    assert logs.returncode == 0 and "LoRA written" in logs.stdout
    for proc in (submit, status, logs):
        assert SECRET not in proc.stdout + proc.stderr and RAY_TOKEN not in proc.stdout + proc.stderr

    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
         f"print(C({ray_head!r}).get_job_info('lora-job-1').runtime_env['env_vars']['HF_TOKEN'] == {SECRET!r})"],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}, capture_output=True, text=True)
    assert probe.stdout.strip() == "True", probe.stderr  # the secret reached the job's environment
    unknown = run_cli("jobs", "status", "no-such-job", "--address", ray_head, cwd=tmp_path)
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr


def test_the_dashboard_submits_to_a_ray_head_and_follows_the_job(tmp_path, ray_head, tiny_sd15_model, photo_shards):
    """`difftrain-dist ui` as a user starts it, with the cluster's token in its environment."""
    recipe = _recipe(tmp_path, tiny_sd15_model, photo_shards, "from-ui", max_steps=2)
    recipe["distributed"]["num_workers"] = 1
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "runs").mkdir()
    ui = subprocess.Popen([sys.executable, "-m", "difftrain_dist", "ui", "--runs", str(tmp_path / "runs"),
                           "--port", str(port)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert "dashboard over" in ui.stderr.readline()
        for _ in range(200):
            with contextlib.suppress(httpx.ConnectError):
                httpx.get(f"{url}/api/runs")
                break
            time.sleep(0.1)
        started = httpx.post(f"{url}/api/runs", timeout=120,
                             json={"recipe": yaml.safe_dump(recipe), "address": ray_head, "python": sys.executable})
        assert started.status_code == 200, started.text
        job_id = started.json()["job_id"]
        deadline = time.monotonic() + 300
        while (row := httpx.get(f"{url}/api/runs/from-ui", timeout=60).json())["status"] != "finished":
            assert row["status"] in ("starting", "running") and time.monotonic() < deadline, row
            time.sleep(0.5)
        assert row["where"] == f"Ray job {job_id} at {ray_head}"
        assert "LoRA written" in httpx.get(f"{url}/api/runs/from-ui/log", timeout=60).json()["text"]  # Jobs API
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=30)
    assert read_driver_record(tmp_path / "runs" / "from-ui").ray_job_id == job_id
    assert read_lora_file(tmp_path / "out" / "from-ui.safetensors")[0]


def test_multi_node_run_survives_a_lost_node(tmp_path, tiny_sd15_model, photo_shards):
    """Head without CPUs plus two 1-CPU nodes: the two workers must land on different nodes. After
    the first checkpoint one worker node is removed and a new one added; Ray restarts the worker
    group, which resumes from the newest checkpoint and finishes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        recipe = _recipe(tmp_path, tiny_sd15_model, photo_shards, "multi", max_steps=8)
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        driver = subprocess.Popen(
            [sys.executable, "-m", "difftrain_dist", "train", "recipe.yaml", "--no-progress",
             "--address", cluster.address], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        run_dir = tmp_path / "runs" / "multi"
        deadline = time.time() + 300
        while not any(c.valid and c.step >= 2 for c in list_checkpoints(run_dir)):
            assert driver.poll() is None and time.time() < deadline, "no checkpoint before the node loss"
            time.sleep(0.5)
        first = next(c for c in list_checkpoints(run_dir) if c.valid)
        node_ids = {json.loads((first.path / f"rank_{r}.json").read_text())["node_id"] for r in (0, 1)}
        assert len(node_ids) == 2, "the two workers ran on the same node"
        cluster.remove_node(nodes[1])
        cluster.add_node(num_cpus=1)
        out, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, out[-5000:]
        assert "resumed from checkpoint_" in out
        assert max(c.step for c in list_checkpoints(run_dir) if c.valid) == 8
        assert (tmp_path / "out" / "multi.safetensors").is_file()
    finally:
        cluster.shutdown()
