"""Ctrl+C and failures as a terminal sees them: SIGINT to the whole foreground process group of
`difftrain-dist train` (what a terminal sends), a second Ctrl+C, a run that fails; after each, no
process of the run's embedded Ray cluster is left. And the embedded cluster is always a new one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from difftrain_dist.distrib.checkpoint import list_checkpoints
from difftrain_dist.distrib.driver.ray_cluster import init_ray
from difftrain_dist.distrib.driver.record import read_driver_record
from difftrain_dist.distrib.session import LocalSession

from .procs import (
    Output,
    assert_no_processes_left,
    cli,
    kept_signal_handlers,
    marked_env,
    marked_processes,
    wait_for_checkpoint,
)

MAX_STEPS, EVERY = 60, 3  # a stop comes long before the last step


def _recipe(tmp_path: Path, model: Path, shards: Path, **distributed) -> Path:
    recipe = {
        "run": {"name": "sg", "seed": 5, "output_dir": str(tmp_path / "out"), "storage_path": str(tmp_path)},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 2},
        "train": {"max_steps": MAX_STEPS, "lr": 1e-2},
        # one worker: what is checked is the driver and its cluster (two ranks stopping together
        # is test_resume.py's SIGTERM run)
        "distributed": {"num_workers": 1, "zero_stage": 2, **distributed},
        "checkpoint": {"every_n_steps": EVERY, "keep_last": None},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "r.yaml"


@contextlib.contextmanager
def running_train(tmp_path: Path, recipe: Path) -> Iterator[tuple[subprocess.Popen, Output, str]]:
    """`train` as a shell starts a job: leader of its own process group (os.killpg reaches the
    group as a terminal's Ctrl+C does). Yields (process, its stderr, its process mark); a driver
    still running at the end is SIGKILLed."""
    env, mark = marked_env()
    proc = subprocess.Popen(cli("train", str(recipe), "--no-progress"), cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc, Output(proc.stderr), mark
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_exits_75(tmp_path, tiny_sd15_model, photo_shards):
    with running_train(tmp_path, _recipe(tmp_path, tiny_sd15_model, photo_shards)) as (proc, err, mark):
        wait_for_checkpoint(tmp_path / "sg", EVERY, proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    out = err.text()
    assert proc.returncode == 75, out[-6000:]
    assert "received SIGINT: stopping after the current step with a checkpoint" in out
    assert f"difftrain-dist resume {tmp_path / 'sg'}" in " ".join(out.split())  # however rich wrapped it
    stopped = [c for c in list_checkpoints(tmp_path / "sg") if c.valid][-1]
    assert EVERY < stopped.step < MAX_STEPS, "the stop did not save the step it reached"
    assert not (tmp_path / "out" / "sg.safetensors").exists()
    assert_no_processes_left(mark)


@pytest.mark.slow
def test_ctrl_c_while_the_cluster_starts_stops_after_the_first_step(tmp_path, tiny_sd15_model, photo_shards):
    """A stop before the ranks exist reaches them when they start: one step, a checkpoint, 75."""
    with running_train(tmp_path, _recipe(tmp_path, tiny_sd15_model, photo_shards)) as (proc, err, mark):
        err.wait_for("run sg: ", proc)
        time.sleep(0.5)  # Ray is starting (it takes seconds); no rank has started
        assert not (tmp_path / "sg" / "recipe.yaml").exists(), "the ranks were already on their way"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    out = err.text()
    assert proc.returncode == 75, out[-6000:]
    assert out.count("received SIGINT") == 1 and "interrupted" not in out, out[-6000:]
    assert [c.step for c in list_checkpoints(tmp_path / "sg") if c.valid] == [1]
    assert read_driver_record(tmp_path / "sg").outcome == "stopped"
    assert_no_processes_left(mark)


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_with_a_message(tmp_path, tiny_sd15_model, photo_shards):
    with running_train(tmp_path, _recipe(tmp_path, tiny_sd15_model, photo_shards)) as (proc, err, mark):
        wait_for_checkpoint(tmp_path / "sg", EVERY, proc)
        os.killpg(proc.pid, signal.SIGINT)
        err.wait_for("received SIGINT: stopping", proc)
        os.killpg(proc.pid, signal.SIGINT)
        second = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - second
    out = err.text()
    assert proc.returncode == 130, out[-6000:]
    assert "received SIGINT again: aborting at once" in out
    assert f"difftrain-dist resume {tmp_path / 'sg'}" in " ".join(out.split()[out.split().index("interrupted:"):])
    assert "Traceback" not in out, out[-6000:]
    assert took < 60, f"the abort took {took:.0f} s"
    assert_no_processes_left(mark)


@pytest.mark.slow
def test_a_killed_driver_takes_its_embedded_cluster_with_it(tmp_path, tiny_sd15_model, photo_shards):
    """SIGKILL leaves the driver no time to shut anything down: the cluster's processes, in a
    session of their own, must still end with it."""
    with running_train(tmp_path, _recipe(tmp_path, tiny_sd15_model, photo_shards)) as (proc, _, mark):
        wait_for_checkpoint(tmp_path / "sg", EVERY, proc)
        assert len(marked_processes(mark)) > 3, "the run's Ray processes are not found"
    assert proc.returncode == -signal.SIGKILL
    assert_no_processes_left(mark, within_s=60)


@pytest.mark.slow
def test_failed_run_exits_1_with_one_line_and_leaves_no_ray_processes(tmp_path, tiny_sd15_model, photo_shards):
    """A worker that cannot load the model (truncated UNet weights) fails the run."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd15_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with running_train(tmp_path, _recipe(tmp_path, model, photo_shards, max_failures=0)) as (proc, err, mark):
        proc.wait(timeout=300)
    out = err.text()
    assert proc.returncode == 1, out[-6000:]
    assert re.search(r"^error: training failed: rank \d+: .+", out, re.MULTILINE), out[-6000:]  # names the rank
    assert "Ray's worker logs: " in out and "Unhandled error" not in out, out[-6000:]
    assert read_driver_record(tmp_path / "sg").reason.startswith("rank ")
    assert_no_processes_left(mark)


def test_sigint_to_a_torchrun_worker_asks_for_a_stop_like_sigterm():
    """The worker loop under torchrun/srun: Ctrl+C (SIGINT) sets the stop flag, as SIGTERM does,
    instead of raising KeyboardInterrupt in the middle of a step."""
    with kept_signal_handlers():
        session = LocalSession()
        assert not session.stop_requested()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs in the main thread, between two bytecodes
        except KeyboardInterrupt:
            pytest.fail("SIGINT raised KeyboardInterrupt in the worker instead of asking for a stop")
        assert session.stop_requested()


def test_the_embedded_cluster_is_a_new_one_whatever_address_file_is_left(monkeypatch):
    """`ray start` and `ray.cluster_utils` leave the address of their cluster in Ray's temp folder;
    an embedded cluster must not join it (Ray would: 'When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided')."""
    ray = pytest.importorskip("ray")
    short = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))  # Ray's socket paths must stay short
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (short / "ray").mkdir()
    (short / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
    try:
        init_ray(None, 1)
        assert ray.get_runtime_context().gcs_address != "127.0.0.1:9"
        assert ray.cluster_resources()["CPU"] >= 1
    finally:
        ray.shutdown()
        shutil.rmtree(short, ignore_errors=True)
