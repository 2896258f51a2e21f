"""The checkpoint contract on disk: per-rank manifests, validation, choosing the checkpoint to
resume from, setting invalid ones aside, and retention.

Layout (see DESIGN.md)::

    {storage_path}/{run_name}/checkpoint_{step:09d}/
        latest, step_{step:09d}/...      DeepSpeed files, frozen base weights excluded
        rank_{r}.json                    one per rank: step, cursor, RNG states, sha256 of its files
        lora.safetensors                 the adapter at that step (written by rank 0)

A checkpoint is valid only if rank_0.json .. rank_{W-1}.json are all present, agree with each other
and with the run's recipe hash, and every file they list has the recorded sha256.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difftrain_dist.config import Recipe, changed_fields
from difftrain_dist.data_shards.files import sha256_file
from difftrain_dist.distrib.manifest import RankManifest, read_manifest, write_manifest

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{9})$")
RANK_FILE = re.compile(r"^rank_(\d+)\.json$")
LORA_FILE = "lora.safetensors"
RECIPE_MISMATCH = "recipe hash differs from this run's recipe (model, LoRA, seed or data changed)"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at optimizer step `step`."""
    return f"checkpoint_{step:09d}"


def deepspeed_tag(step: int) -> str:
    """The DeepSpeed tag (sub-folder) used for the checkpoint at `step`."""
    return f"step_{step:09d}"


def write_rank_manifest(local_dir: Path, global_rank: int, fields: dict[str, Any]) -> Path:
    """Write `rank_{global_rank}.json` into `local_dir`: the RankManifest of `fields` (every field
    but `global_rank` and `files`), listing the sha256 of every other file there.

    Call it last, after this rank has written all its files into `local_dir`.

    Raises:
        pydantic.ValidationError: `fields` do not make a RankManifest.
    """
    files = {
        p.relative_to(local_dir).as_posix(): sha256_file(p)
        for p in sorted(local_dir.rglob("*"))
        if p.is_file() and not RANK_FILE.match(p.name)
    }
    path = local_dir / f"rank_{global_rank}.json"
    write_manifest(path, RankManifest(global_rank=global_rank, files=files, **fields))
    return path


@dataclass
class CheckpointInfo:
    """What `inspect_checkpoint` found: validity (with the reason when invalid) and a summary."""

    path: Path
    step: int
    valid: bool
    reason: str = ""
    world_size: int | None = None
    size_bytes: int = 0
    loss: float | None = None
    recipe_mismatch: bool = False
    """Complete and intact, but written under another recipe (model, LoRA shape, seed or data)."""
    manifests: list[RankManifest] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary without the manifests."""
        out = asdict(self)
        out.pop("manifests")
        out["path"] = str(self.path)
        return out


def _read_manifests(path: Path) -> tuple[list[RankManifest], str]:
    manifests: dict[int, RankManifest] = {}
    for p in path.iterdir():
        if m := RANK_FILE.match(p.name):
            manifest, reason = read_manifest(p)
            if manifest is None:
                return [], reason
            manifests[int(m.group(1))] = manifest
    if not manifests:
        return [], "no rank_*.json manifest (save did not finish)"
    world_size = manifests[min(manifests)].world_size
    missing = [r for r in range(world_size) if r not in manifests]
    if missing:
        return [], f"missing rank_{missing[0]}.json of world size {world_size} (save did not finish)"
    extra = [r for r in manifests if r >= world_size]
    if extra:
        return [], f"rank_{extra[0]}.json is beyond world size {world_size}"
    return [manifests[r] for r in range(world_size)], ""


def _check_files(path: Path, rank: int, files: dict[str, str]) -> str:
    for rel, digest in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} listed by rank {rank} is missing"
        if sha256_file(file) != digest:
            return f"{rel} is corrupt (sha256 mismatch)"
    return ""


def _check_manifests(path: Path, step: int, manifests: list[RankManifest]) -> str:
    for rank, manifest in enumerate(manifests):
        if manifest.global_rank != rank:
            return f"rank_{rank}.json records global_rank {manifest.global_rank}"
        if manifest.step != step:
            return f"rank_{rank}.json records step {manifest.step}, folder says {step}"
        if manifest.world_size != len(manifests):
            return f"rank_{rank}.json disagrees on world size"
        if len({m.recipe_hash for m in manifests}) != 1:
            return f"rank_{rank}.json disagrees on the recipe hash"
        if reason := _check_files(path, rank, manifest.files):
            return reason
    if not (path / LORA_FILE).is_file():
        return f"{LORA_FILE} is missing"
    return ""


def inspect_checkpoint(path: Path, recipe_hash: str | None = None) -> CheckpointInfo:
    """Validate one checkpoint folder.

    Args:
        path: a `checkpoint_{step:09d}` folder.
        recipe_hash: when given, manifests must carry this recipe hash.

    Raises:
        ValueError: `path` is not named like a checkpoint folder.
    """
    path = Path(path)
    match = CHECKPOINT_DIR.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected checkpoint_<9-digit step>)")
    step = int(match.group(1))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if not path.is_dir():
        raise ValueError(f"no checkpoint folder at {path}")
    manifests, reason = _read_manifests(path)
    if not reason:
        reason = _check_manifests(path, step, manifests)
    mismatch = not reason and recipe_hash is not None and manifests[0].recipe_hash != recipe_hash
    if mismatch:
        reason = RECIPE_MISMATCH
    info = CheckpointInfo(path=path, step=step, valid=not reason, reason=reason, size_bytes=size,
                          recipe_mismatch=mismatch)
    if manifests:
        info.world_size = len(manifests)
        info.loss = manifests[0].loss
        info.manifests = manifests if (info.valid or mismatch) else []
    return info


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's `checkpoint_<step>` folders, oldest first (not validated)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name))


def list_checkpoints(run_dir: Path, recipe_hash: str | None = None) -> list[CheckpointInfo]:
    """Every checkpoint folder of a run, oldest first, each validated."""
    return [inspect_checkpoint(p, recipe_hash) for p in checkpoint_folders(run_dir)]


def find_resume_checkpoint(
    run_dir: Path, recipe_hash: str | None = None
) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """The newest valid checkpoint of a run and the newer ones skipped (each with its reason).

    Older checkpoints are not read (validation hashes every file)."""
    skipped = []
    for folder in reversed(checkpoint_folders(run_dir)):
        info = inspect_checkpoint(folder, recipe_hash)
        if info.valid:
            return info, skipped
        skipped.append(info)
    return None, skipped


def apply_retention(run_dir: Path, keep_last: int | None, recipe_hash: str | None = None,
                    known: dict[Path, CheckpointInfo] | None = None) -> list[Path]:
    """Delete valid checkpoints older than the `keep_last` newest valid ones; returns what was removed.

    Invalid folders are left for inspection; the newest valid checkpoint is never removed.
    `known`: checkpoints the caller has validated already, by path; they are not read again, and
    the folders validated here are added to it.
    """
    if keep_last is None:
        return []
    known = {} if known is None else known
    for folder in checkpoint_folders(run_dir):
        if folder not in known:
            known[folder] = inspect_checkpoint(folder, recipe_hash)
    valid = [known[folder] for folder in checkpoint_folders(run_dir) if known[folder].valid]
    doomed = valid[: max(0, len(valid) - max(1, keep_last))]
    for info in doomed:
        shutil.rmtree(info.path, ignore_errors=True)
        known.pop(info.path, None)
    return [c.path for c in doomed]


def set_aside(info: CheckpointInfo) -> Path:
    """Rename an invalid checkpoint folder out of the way (never delete it): `<name>.invalid-<time>`."""
    target = info.path.with_name(f"{info.path.name}.invalid-{int(time.time())}")
    info.path.rename(target)
    return target


def set_aside_skipped(skipped: list[CheckpointInfo]) -> list[str]:
    """Set aside each checkpoint `choose_checkpoint` skipped; returns one line per checkpoint
    saying why: `skipping checkpoint_000000012: <reason> (kept as checkpoint_000000012.invalid-<time>)`."""
    return [f"skipping {bad.path.name}: {bad.reason} (kept as {set_aside(bad).name})" for bad in skipped]


def choose_checkpoint(recipe: Recipe) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """The newest valid checkpoint of the run and the newer ones skipped; changes nothing.

    Raises:
        ValueError: the run folder holds intact checkpoints, but all of another recipe (the
            message names the changed fields), or the recipe cannot continue from the newest one.
    """
    info, skipped = find_resume_checkpoint(recipe.run_dir, recipe.recipe_hash())
    if info is None and (other := next((s for s in skipped if s.recipe_mismatch), None)):
        changed = changed_fields(other.manifests[0].resume_identity, recipe.resume_identity())
        raise ValueError(
            f"{recipe.run_dir} holds checkpoints of another recipe (changed: {', '.join(changed) or 'unknown'}); "
            "put those settings back to continue it, or choose another run.name"
        )
    if info is not None:
        check_compatible(info, recipe)
    return info, skipped


OPTIMIZER_SETTINGS = ("optimizer", "optimizer_args", "betas", "weight_decay")
"""train fields a checkpoint's optimizer state was made with (lr and its schedule may change)."""


def check_compatible(info: CheckpointInfo, recipe: Recipe, world_size: int | None = None) -> None:
    """Raise ValueError when the run cannot continue from `info` with this recipe's settings, at
    `world_size` ranks (None: `distributed.num_workers`)."""
    saved = info.manifests[0].recipe.get("train", {})
    now = recipe.train.model_dump(mode="json")
    changed = [key for key in OPTIMIZER_SETTINGS if key in saved and saved[key] != now[key]]
    if changed:
        was = ", ".join(f"train.{key}={saved[key]!r}" for key in changed)
        raise ValueError(f"{', '.join('train.' + key for key in changed)}: {info.path.name} holds the optimizer "
                         f"state of {was}; set them back to continue it, or choose another run.name")
    stage = info.manifests[0].zero_stage
    if stage != recipe.distributed.zero_stage:
        raise ValueError(
            f"distributed.zero_stage: {info.path.name} was written with ZeRO-{stage}, this run asks for "
            f"ZeRO-{recipe.distributed.zero_stage}; changing the ZeRO stage on resume is not supported "
            f"(set distributed.zero_stage={stage})"
        )
    world_size = world_size or recipe.distributed.num_workers
    if info.world_size != world_size and stage > 0 and recipe.train.optimizer != "adamw":
        raise ValueError(
            f"distributed.num_workers: {info.path.name} was written by {info.world_size} workers; re-sharding it "
            f"for {world_size} goes through DeepSpeed's universal checkpoint, which carries AdamW's state only, "
            f"not {recipe.train.optimizer}'s; continue with {info.world_size} workers"
        )
