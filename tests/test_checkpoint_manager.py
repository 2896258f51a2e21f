"""Checkpoint validation, resume selection and retention on hand-made checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftrain_dist.distrib.checkpoint import (
    apply_retention,
    checkpoint_name,
    find_resume_checkpoint,
    inspect_checkpoint,
    list_checkpoints,
    write_rank_manifest,
)


def manifest_fields(step: int, world_size: int, recipe_hash: str) -> dict:
    """A rank manifest's fields as a rank of a `world_size` run writes them at `step`."""
    return {"step": step, "world_size": world_size, "zero_stage": 2, "recipe_hash": recipe_hash,
            "resume_identity": {}, "recipe": {}, "lora_configs": {"unet": {"r": 4}}, "loss": 0.5,
            "state": {"step": step, "samples_seen": 2 * step, "epoch": 0, "batch_in_epoch": step},
            "rng": {}, "host": "node", "node_id": "n", "pid": 1, "saved_at": 0.0, "peak_rss_mib": 1.0}


def make_checkpoint(run_dir: Path, step: int, world_size: int = 2, recipe_hash: str = "h") -> Path:
    """A checkpoint folder as the workers leave it: per-rank files, then per-rank manifests."""
    path = run_dir / checkpoint_name(step)
    for rank in range(world_size):
        local = run_dir / f".local-{step}-{rank}"
        (local / f"step_{step:09d}").mkdir(parents=True)
        (local / f"step_{step:09d}" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank]) * 100)
        if rank == 0:
            (local / "lora.safetensors").write_bytes(b"lora" * 10)
        write_rank_manifest(local, rank, manifest_fields(step, world_size, recipe_hash))
        for file in local.rglob("*"):
            if file.is_file():
                target = path / file.relative_to(local)
                target.parent.mkdir(parents=True, exist_ok=True)
                file.replace(target)
    return path


def test_complete_checkpoint_is_valid(tmp_path):
    info = inspect_checkpoint(make_checkpoint(tmp_path, 10), recipe_hash="h")
    assert info.valid, info.reason
    assert info.step == 10 and info.world_size == 2 and info.loss == 0.5 and info.size_bytes > 0


def test_missing_rank_manifest_is_invalid(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    (path / "rank_1.json").unlink()
    info = inspect_checkpoint(path)
    assert not info.valid and "rank_1.json" in info.reason


def test_truncated_shard_is_invalid(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    shard = path / "step_000000010" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:10])
    info = inspect_checkpoint(path)
    assert not info.valid and "zero_pp_rank_1_optim_states.pt is corrupt" in info.reason


def test_missing_listed_file_is_invalid(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    (path / "lora.safetensors").unlink()
    assert "lora.safetensors" in inspect_checkpoint(path).reason


def test_recipe_hash_mismatch_is_invalid(tmp_path):
    info = inspect_checkpoint(make_checkpoint(tmp_path, 10), recipe_hash="other")
    assert not info.valid and "recipe hash" in info.reason


def test_unreadable_manifest_is_invalid(tmp_path):
    path = make_checkpoint(tmp_path, 10)
    (path / "rank_0.json").write_text("{not json")
    assert "unreadable" in inspect_checkpoint(path).reason


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        inspect_checkpoint(tmp_path)


def test_resume_takes_newest_valid_and_reports_skipped(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    (tmp_path / checkpoint_name(30) / "rank_0.json").unlink()
    (tmp_path / checkpoint_name(40)).mkdir()  # a save that never wrote anything
    info, skipped = find_resume_checkpoint(tmp_path, "h")
    assert info is not None and info.step == 20
    assert [s.step for s in skipped] == [40, 30]
    assert all(s.reason for s in skipped)


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert find_resume_checkpoint(tmp_path / "absent") == (None, [])


def test_retention_keeps_last_n_valid_and_never_the_newest_valid(tmp_path):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step)
    (tmp_path / checkpoint_name(40) / "rank_1.json").unlink()  # newest is invalid
    removed = apply_retention(tmp_path, keep_last=1)
    assert [p.name for p in removed] == [checkpoint_name(10), checkpoint_name(20)]
    remaining = {c.step: c.valid for c in list_checkpoints(tmp_path)}
    assert remaining == {30: True, 40: False}


def test_manifest_lists_sha256_of_every_file(tmp_path):
    path = make_checkpoint(tmp_path, 5, world_size=1)
    manifest = json.loads((path / "rank_0.json").read_text())
    assert set(manifest["files"]) == {"lora.safetensors", "step_000000005/zero_pp_rank_0_optim_states.pt"}


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda p: (p / "rank_1.json").write_text("null"), "rank_1.json is not a JSON object"),
        (lambda p: (p / "rank_2.json").write_text((p / "rank_1.json").read_text()), "beyond world size 2"),
        (lambda p: _rewrite(p / "rank_0.json", files={}), "rank_0.json: files: "),
        (lambda p: _rewrite(p / "rank_0.json", world_size=True), "rank_0.json: world_size: "),
        (lambda p: _rewrite(p / "rank_1.json", state={"step": 10}), "rank_1.json: state.samples_seen: "),
        (lambda p: _rewrite(p / "rank_0.json", lr=1.0), "rank_0.json: lr: "),
    ],
)
def test_malformed_manifests_make_the_checkpoint_invalid(tmp_path, edit, reason):
    path = make_checkpoint(tmp_path, 10)
    edit(path)
    info = inspect_checkpoint(path)
    assert not info.valid and reason in info.reason


def _rewrite(manifest: Path, **fields) -> None:
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **fields}))
