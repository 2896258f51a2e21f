"""The in-process tier: the step, the checkpointer's save / restore / retention decisions and the
resume plan on a real gloo process group (world size 1 in this process, 2 in spawned ones), with
the tiny SD1.5 and real DeepSpeed, without Ray or a launcher. Whole runs (tests marked slow) prove
the same end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from difftrain_dist.config import Recipe, recipe_from_dict
from difftrain_dist.distrib import checkpoint as checkpoint_files
from difftrain_dist.distrib.checkpoint import checkpoint_name, list_checkpoints
from difftrain_dist.distrib.checkpointer import Checkpointer
from difftrain_dist.distrib.loop import train_worker
from difftrain_dist.distrib.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsFile, read_metrics
from difftrain_dist.distrib.session import LocalSession
from difftrain_dist.distrib.step import reduce_step_stats
from difftrain_dist.models import read_lora_file

from .gloo import process_group, run_ranks

EVERY = 2


def make_recipe(model: Path, shards: Path, storage: Path, max_steps: int, num_workers: int = 1, wandb: bool = False,
                **checkpoint) -> Recipe:
    return recipe_from_dict({
        "logging": {"wandb": wandb, "wandb_project": "tests"},
        "run": {"name": "g", "seed": 11, "output_dir": str(storage / "out"), "storage_path": str(storage)},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 2},
        "train": {"max_steps": max_steps, "lr": 1e-2, "gradient_accumulation_steps": 2},
        "distributed": {"num_workers": num_workers, "zero_stage": 2},
        "checkpoint": {"every_n_steps": EVERY, "keep_last": None, **checkpoint},
    })


def lora_of(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return read_lora_file(run_dir / checkpoint_name(step) / "lora.safetensors")[0]


class InspectCounter:
    """Counts `inspect_checkpoint` calls per folder (each one hashes every file of the checkpoint)."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        real = checkpoint_files.inspect_checkpoint

        def counted(path, recipe_hash=None):
            self.calls[Path(path).name] = self.calls.get(Path(path).name, 0) + 1
            return real(path, recipe_hash)

        monkeypatch.setattr(checkpoint_files, "inspect_checkpoint", counted)


def test_the_checkpointer_saves_every_n_steps_at_the_end_and_on_a_stop(tmp_path, tiny_sd15_model, photo_shards):
    checkpointer = Checkpointer(make_recipe(tiny_sd15_model, photo_shards, tmp_path, max_steps=5), LocalSession())
    assert [s for s in range(1, 6) if checkpointer.should_save(s, stop=False)] == [2, 4, 5]
    assert checkpointer.should_save(3, stop=True)


@pytest.fixture(scope="module")
def world_1():
    """This process as rank 0 of a gloo group of world size 1, for the whole module: DeepSpeed
    keeps the first group it sees, so a group is made once, not per test."""
    with process_group():
        yield


@pytest.fixture(scope="module")
def world_1_runs(world_1, tmp_path_factory, tiny_sd15_model, photo_shards):
    """At world size 1: run "straight" trains 4 steps; run "split" trains 2, then is run again to 4,
    logging to W&B in offline mode as well."""
    straight, split = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("split")
    done = train_worker(make_recipe(tiny_sd15_model, photo_shards, straight, 4), LocalSession())
    saved = {name: os.environ.get(name) for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    os.environ.pop("WANDB_API_KEY", None)
    try:
        first = train_worker(make_recipe(tiny_sd15_model, photo_shards, split, 2, wandb=True), LocalSession())
        second = train_worker(make_recipe(tiny_sd15_model, photo_shards, split, 4, wandb=True), LocalSession())
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    return {"straight": (straight / "g", done), "split": (split / "g", first, second)}


def test_stop_and_resume_at_world_size_1_is_exact(world_1_runs):
    straight, done = world_1_runs["straight"]
    split, first, second = world_1_runs["split"]
    assert (done.state.step, first.state.step, second.state.step) == (4, 2, 4)
    assert done.checkpoint == straight / checkpoint_name(4) and second.checkpoint == split / checkpoint_name(4)
    assert done.state == second.state  # data cursor and samples seen carried over
    want, got = lora_of(straight, 4), lora_of(split, 4)
    assert want.keys() == got.keys() and want
    assert max(float((want[k] - got[k]).abs().max()) for k in want) == 0.0
    # metrics.jsonl goes on across the stop: every step once, in order, the same losses
    straight_metrics, split_metrics = read_metrics(straight), read_metrics(split)
    assert [m["step"] for m in split_metrics] == [m["step"] for m in straight_metrics] == [1, 2, 3, 4]
    assert [m["loss"] for m in split_metrics] == [m["loss"] for m in straight_metrics]
    assert all(m["world_size"] == 1 and m["lr"] > 0 and m["step_time_s"] > 0 for m in split_metrics)
    # and TensorBoard shows the same series once: the resumed session purges from its first step on
    series = tensorboard_series(split, "train/loss")
    assert [step for step, _ in series] == [1, 2, 3, 4]
    assert [value for _, value in series] == pytest.approx([m["loss"] for m in split_metrics], rel=1e-6)  # float32
    # W&B (offline): one run id across both sessions, each step once with its loss
    history = wandb_history(split)
    assert [step for step, _ in history] == [1, 2, 3, 4]
    assert [values["train/loss"] for _, values in history] == [m["loss"] for m in split_metrics]
    assert not (straight / "wandb").exists()


def wandb_history(run_dir: Path) -> list[tuple[int, dict]]:
    """The history rows of the run's offline W&B sessions, in session order: each `run-<id>.wandb`
    is read as W&B's transaction log (a 7-byte header, then LevelDB-log records in 32 KiB blocks:
    CRC, length, type, data) of `wandb_internal_pb2.Record` protos."""
    import struct

    from wandb.proto import wandb_internal_pb2

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns)
    assert len({f.name for f in files}) == 1, files  # one W&B run id for every session
    rows = []
    for path in files:
        data, offset, records, partial = path.read_bytes(), 7, [], b""
        assert data[:4] == b":W&B"
        while offset + 7 <= len(data):
            if 32768 - offset % 32768 < 7:
                offset += 32768 - offset % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
            chunk, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
            if kind == 0:
                break
            partial = chunk if kind in (1, 2) else partial + chunk
            if kind in (1, 4):
                records.append(partial)
        for raw in records:
            record = wandb_internal_pb2.Record.FromString(raw)
            if record.WhichOneof("record_type") == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
                rows.append((record.history.step.num, values))
    return rows


def tensorboard_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """What TensorBoard plots for `tag`: the run's event files in the order they were closed, each
    session's SessionLog START at step s dropping the events logged before it at steps >= s.
    Records are read as TFRecords (length, CRC, Event proto, CRC) with tensorboardX's own proto."""
    import struct

    from tensorboardX.proto import event_pb2

    points: dict[int, float] = {}
    for path in sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                points = {step: value for step, value in points.items() if step < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    points[event.step] = value.simple_value
    return sorted(points.items())


def test_a_resumed_run_drops_the_metrics_past_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    first = MetricsFile(run_dir, start_step=0)
    for step in range(1, 6):
        first.write({"step": step, "loss": float(step)})
    first.close()
    with open(run_dir / METRICS_FILE, "a") as torn:
        torn.write('{"step": 6, "lo')  # a crash in the middle of a line
    again = MetricsFile(run_dir, start_step=3)  # resumed from the checkpoint of step 3
    again.write({"step": 4, "loss": 40.0})
    again.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(run_dir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsFile(run_dir, start_step=0).close()  # started over: nothing kept
    assert read_metrics(run_dir) == []


def test_the_resume_plan_sets_aside_a_corrupt_newest_checkpoint_and_hashes_each_once(
        world_1_runs, tmp_path, tiny_sd15_model, photo_shards, monkeypatch):
    import shutil

    split, _, _ = world_1_runs["split"]
    run_dir = tmp_path / "g"
    shutil.copytree(split, run_dir)
    shard = next((run_dir / checkpoint_name(4)).rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    counter = InspectCounter(monkeypatch)
    plan = Checkpointer(make_recipe(tiny_sd15_model, photo_shards, tmp_path, 6), LocalSession()).plan()
    assert plan.checkpoint.path == run_dir / checkpoint_name(2) and not plan.reshard
    assert counter.calls == {checkpoint_name(4): 1, checkpoint_name(2): 1}
    assert [p.name.split(".")[0] for p in run_dir.glob("*.invalid-*")] == [checkpoint_name(4)]


def test_retention_reads_no_checkpoint_twice(world_1, tmp_path, tiny_sd15_model, photo_shards, monkeypatch):
    counter = InspectCounter(monkeypatch)
    train_worker(make_recipe(tiny_sd15_model, photo_shards, tmp_path, 8, keep_last=2), LocalSession())
    assert counter.calls == {}, "the checkpointer re-read checkpoints it had written itself"
    assert [c.step for c in list_checkpoints(tmp_path / "g")] == [6, 8]


def _stats_on_two_ranks() -> None:
    rank = dist.get_rank()
    loss, stop = reduce_step_stats(1.0 + rank, stop=rank == 1)
    assert (loss, stop) == (1.5, True)
    assert reduce_step_stats(2.0, stop=False) == (2.0, False)


def test_step_stats_are_the_mean_loss_and_any_rank_stop_at_world_size_2():
    run_ranks(_stats_on_two_ranks, 2)


def _train_on_two_ranks(model: Path, shards: Path, storage: Path, steps: tuple[int, ...]) -> None:
    for max_steps in steps:
        result = train_worker(make_recipe(model, shards, storage, max_steps, num_workers=2), LocalSession())
        assert result.state.step == max_steps


def test_stop_and_resume_at_world_size_2_is_exact(tmp_path, tiny_sd15_model, photo_shards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ranks(_train_on_two_ranks, 2, tiny_sd15_model, photo_shards, straight, (4,))
    run_ranks(_train_on_two_ranks, 2, tiny_sd15_model, photo_shards, split, (2, 4))
    want, got = lora_of(straight / "g", 4), lora_of(split / "g", 4)
    assert want.keys() == got.keys() and want
    assert max(float((want[k] - got[k]).abs().max()) for k in want) == 0.0
