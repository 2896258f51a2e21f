"""Exact resume with real processes: SIGTERM, SIGKILL, corrupted checkpoints, fewer workers.

Every interrupted run must end with the same LoRA as the uninterrupted reference run with the same
seed and world size (max abs diff ≤ 1e-6, fp32, CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from difftrain_dist.distrib.checkpoint import checkpoint_name, inspect_checkpoint, list_checkpoints
from difftrain_dist.distrib.driver.record import lock_holder, read_driver_record
from difftrain_dist.distrib.metrics import read_metrics
from difftrain_dist.models import read_lora_file

from .procs import assert_no_processes_left, cli, marked_env, torchrun, wait_for_checkpoint
from .test_gloo import tensorboard_series

pytestmark = pytest.mark.slow
EXACT = 1e-6
MAX_STEPS, EVERY = 24, 6  # a stop after the first checkpoint comes long before the last step


def recipe_dict(model: Path, shards: Path, storage: Path, **train) -> dict:
    return {
        "run": {"name": "rs", "seed": 11, "output_dir": str(storage / "out"), "storage_path": str(storage)},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 2},
        "train": {"max_steps": MAX_STEPS, "lr": 1e-2, **train},
        "distributed": {"num_workers": 2, "zero_stage": 2, "max_failures": 1},
        "checkpoint": {"every_n_steps": EVERY, "keep_last": None},
    }


def run(cmd: list[str], cwd: Path, ok: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    if ok:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def driver_lines(stderr: str) -> list[str]:
    """The lines the driver printed itself (Ray prefixes the lines of its worker processes)."""
    return [line for line in stderr.splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", line)]


def assert_same_lora(a: Path, b: Path) -> None:
    ta, _ = read_lora_file(a)
    tb, _ = read_lora_file(b)
    assert ta.keys() == tb.keys() and ta
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst <= EXACT, f"max abs diff {worst}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd15_model, photo_shards) -> Path:
    """The uninterrupted run; returns its storage folder (run folder `rs`, LoRA in out/)."""
    storage = tmp_path_factory.mktemp("reference")
    (storage / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_sd15_model, photo_shards, storage)))
    env, mark = marked_env()
    run(cli("train", "r.yaml", "--no-progress"), storage, env=env)
    assert_no_processes_left(mark)  # the embedded Ray cluster ends with the run
    assert [c.step for c in list_checkpoints(storage / "rs") if c.valid] == list(range(EVERY, MAX_STEPS + 1, EVERY))
    return storage


def test_sigterm_to_driver_stops_with_checkpoint_then_resume_is_exact(reference, tmp_path, tiny_sd15_model,
                                                                     photo_shards):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_sd15_model, photo_shards, tmp_path)))
    env, mark = marked_env()
    proc = subprocess.Popen(cli("train", "r.yaml", "--no-progress"), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path / "rs", EVERY, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-4000:]
    assert "stopping after the current step" in err
    assert_no_processes_left(mark)
    assert not (tmp_path / "out" / "rs.safetensors").exists(), "a stopped run wrote the final LoRA name"
    stopped = [c for c in list_checkpoints(tmp_path / "rs") if c.valid][-1]
    assert EVERY < stopped.step < MAX_STEPS, "the stop did not save the step it reached"
    record = read_driver_record(tmp_path / "rs")
    assert (record.outcome, record.step, record.pid) == ("stopped", stopped.step, proc.pid)
    assert lock_holder(tmp_path / "rs") is None
    resumed = run(cli("resume", str(tmp_path / "rs"), "--no-progress"), tmp_path)
    assert (read_driver_record(tmp_path / "rs").outcome, read_driver_record(tmp_path / "rs").step) == (
        "finished", MAX_STEPS)
    assert f"resumed from {stopped.path.name}" in resumed.stderr
    assert_same_lora(tmp_path / "out" / "rs.safetensors", reference / "out" / "rs.safetensors")
    assert [m["step"] for m in read_metrics(tmp_path / "rs")] == list(range(1, MAX_STEPS + 1))


def test_killed_worker_group_restarts_from_a_checkpoint_the_driver_names_and_resume_is_exact(
        reference, tmp_path, tiny_sd15_model, photo_shards):
    """Both workers are SIGKILLed and the newest checkpoint is then corrupted: the driver says that
    Ray restarted the worker group, which checkpoint rank 0 set aside and why, and which one the
    group resumed from; the run still ends with the reference LoRA."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_sd15_model, photo_shards, tmp_path)))
    proc = subprocess.Popen(cli("train", "r.yaml", "--no-progress"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = wait_for_checkpoint(tmp_path / "rs", 2 * EVERY, proc)
    rank0 = json.loads((tmp_path / "rs" / checkpoint_name(2 * EVERY) / "rank_0.json").read_text())
    for pid in (rank0["pid"], rank1["pid"]):  # both: no rank can complete another checkpoint
        os.kill(pid, signal.SIGKILL)
    *older, newest = [c for c in list_checkpoints(tmp_path / "rs") if c.valid]
    shard = next(newest.path.rglob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-6000:]
    lines = driver_lines(err)
    restart = (f"worker group restarted after a failure (attempt 2): resumed from {older[-1].path.name} "
               f"(step {older[-1].step})")
    assert restart in lines, err[-6000:]
    assert any(re.fullmatch(rf"skipping {newest.path.name}: .*optim_states\.pt is corrupt .*\(kept as "
                            rf"{newest.path.name}\.invalid-\d+\)", line) for line in lines), err[-6000:]
    assert_same_lora(tmp_path / "out" / "rs.safetensors", reference / "out" / "rs.safetensors")
    # the steps trained again after the restart are in metrics.jsonl once, with the reference's losses
    metrics = read_metrics(tmp_path / "rs")
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in read_metrics(reference / "rs")]
    assert [step for step, _ in tensorboard_series(tmp_path / "rs", "train/loss")] == list(range(1, MAX_STEPS + 1))


def test_corrupt_checkpoints_are_skipped_and_kept_and_resume_is_exact(reference, tmp_path):
    run_dir = tmp_path / "rs"
    shutil.copytree(reference / "rs", run_dir)
    last, before, second = (checkpoint_name(n * EVERY) for n in (4, 3, 2))
    shard = next((run_dir / last).rglob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated shard
    (run_dir / before / "rank_1.json").unlink()  # a rank never finished saving
    for manifest in (run_dir / second).glob("rank_*.json"):  # written under another recipe
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "recipe_hash": "0" * 64}))
    proc = run(cli("resume", str(run_dir), "--no-progress", "--set", f"run.output_dir={tmp_path / 'out'}"),
               tmp_path)
    lines = driver_lines(proc.stderr)  # said by the driver, once, not only in a worker's log line
    for name, reason in [(last, f"step_{4 * EVERY:09d}/zero_pp_rank_1_mp_rank_00_optim_states.pt is corrupt"),
                         (before, "missing rank_1.json"), (second, "recipe hash differs")]:
        said = [line for line in lines if line.startswith(f"skipping {name}: ")]
        assert len(said) == 1 and said[0].startswith(f"skipping {name}: {reason}"), proc.stderr[-6000:]
    assert "skipping" not in "".join(set(proc.stderr.splitlines()) - set(lines))
    assert f"resumed from {checkpoint_name(EVERY)} (step {EVERY})" in lines, proc.stderr[-6000:]
    set_aside = sorted(p.name.split(".")[0] for p in run_dir.glob("checkpoint_*.invalid-*"))
    assert set_aside == [second, before, last]
    assert_same_lora(tmp_path / "out" / "rs.safetensors", reference / "out" / "rs.safetensors")


def test_resume_on_fewer_workers_reshards_the_checkpoint(reference, tmp_path):
    """2 → 1 worker under torchrun with lr 1e-30 (an AdamW step then moves no fp32 weight): the
    weights after one step are exactly the checkpoint's, so DeepSpeed's universal re-sharding
    restored every LoRA parameter."""
    run_dir = tmp_path / "rs"
    run_dir.mkdir()
    shutil.copytree(reference / "rs" / checkpoint_name(6), run_dir / checkpoint_name(6))
    shutil.copy(reference / "rs" / "recipe.yaml", run_dir / "recipe.yaml")
    proc = run(torchrun(1, "worker", str(run_dir / "recipe.yaml"),
                        "--set", f"run.storage_path={tmp_path}", "--set", f"run.output_dir={tmp_path / 'out'}",
                        "--set", "distributed.num_workers=1", "--set", "train.max_steps=7",
                        "--set", "train.lr=1e-30"), tmp_path)
    assert "re-sharding checkpoint_000000006 from 2 to 1 workers" in proc.stderr
    info = inspect_checkpoint(run_dir / checkpoint_name(7))
    assert info.valid and info.world_size == 1
    assert_same_lora(run_dir / checkpoint_name(7) / "lora.safetensors",
                     reference / "rs" / checkpoint_name(6) / "lora.safetensors")


def test_torchrun_sigterm_to_rank_1_then_resume_matches_the_ray_run(reference, tmp_path, tiny_sd15_model,
                                                                    photo_shards):
    """Without Ray: SIGTERM to one rank stops every rank with a checkpoint; the resumed run ends
    exactly where the Ray run did (same worker loop, same seed, same world size)."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_sd15_model, photo_shards, tmp_path)))
    proc = subprocess.Popen(torchrun(2, "worker", "r.yaml"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = wait_for_checkpoint(tmp_path / "rs", EVERY, proc)
    os.kill(rank1["pid"], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "received SIGTERM" in err, err[-4000:]
    stopped = [c for c in list_checkpoints(tmp_path / "rs") if c.valid][-1]
    assert EVERY < stopped.step < MAX_STEPS
    run(torchrun(2, "worker", "r.yaml"), tmp_path)
    assert_same_lora(tmp_path / "out" / "rs.safetensors", reference / "out" / "rs.safetensors")
