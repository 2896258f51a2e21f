"""Sidecar tars of precomputed VAE latent parameters and text embeddings (`shards precompute`).

Each shard `NAME.tar` may have a sidecar `NAME.precomputed.tar`, written next to it with
`webdataset.TarWriter`, holding for every sample of the shard, in the shard's key order:

- `KEY.latent.npy`  float32 [2C, h, w]: the VAE posterior parameters (mean and log-variance
  concatenated on channels) from `DiffusionAdapter.latent_parameters`, of the pixels exactly as
  the reader decodes them;
- `KEY.<name>.npy`  float32: one row of each conditioning tensor `encode_prompts([caption])`
  returns (e.g. `encoder_hidden_states` [77, D] for SD1.5), of the caption stored in the shard.

index.json records them in a `precomputed` block (see `index.Precomputed`); the shards themselves are
never modified. Nothing here imports models or Ray: the encoding runs in `distrib/precompute.py`.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

SIDECAR_SUFFIX = ".precomputed.tar"
LATENT_MEMBER = "latent.npy"


def sidecar_name(shard_name: str) -> str:
    """`shard-000000.tar` → `shard-000000.precomputed.tar` (same folder as the shard)."""
    stem = shard_name[:-len(".tar")] if shard_name.endswith(".tar") else shard_name
    return stem + SIDECAR_SUFFIX


def tar_samples(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Samples of a tar in order, `{"__key__": KEY, EXT: bytes, ...}`: members grouped by key as
    webdataset's `base_plus_ext` splits them (`KEY.latent.npy` → key KEY, ext `latent.npy`).
    Extensions are kept as written (not lowercased). Streams: one member in memory at a time.

    Raises:
        ValueError: naming the file, when the tar cannot be parsed (cut inside a member or a
            header, or garbled) or ends after a member without an end-of-archive block (cut
            between members). Garbled member contents are not seen here: the sha256 in index.json
            catches those (see `ShardIndex.verify_shard`).
    """
    current: dict[str, Any] | None = None
    last = "no member"
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                current = current or {"__key__": key}
                current[ext] = tar.extractfile(member).read()
                last = f"member {member.name}"
            end = tar.offset  # where the end-of-archive block should be
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: truncated or corrupt tar ({type(exc).__name__}: {exc})") from None
    if os.path.getsize(path) < end + tarfile.BLOCKSIZE:
        raise ValueError(f"{path}: truncated tar: it ends after {last} with no end-of-archive block")
    if current is not None:
        yield current


def npy_bytes(array: np.ndarray) -> bytes:
    """`np.save` of `array` as float32, to bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Inverse of `npy_bytes` (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_sidecar(path: Path, records: Iterable[tuple[str, np.ndarray, Mapping[str, np.ndarray]]]) -> None:
    """Write `(key, latent_parameters, {name: conditioning row})` records to the tar at `path`.

    The tar is written to `path` + ".tmp" and renamed, so a crash never leaves a half sidecar.
    mtime is the int 0, so the same arrays give the same bytes and no member needs a pax header.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0) as writer:
        for key, latent, conditioning in records:
            sample = {"__key__": key, LATENT_MEMBER: npy_bytes(latent)}
            sample.update({f"{name}.npy": npy_bytes(value) for name, value in conditioning.items()})
            writer.write(sample)
    os.replace(tmp, path)


def with_sidecar(samples: Iterator[dict[str, Any]], sidecar: Path,
                 names: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Each shard sample with its sidecar's members added (`latent.npy`, `<name>.npy`), read in
    lockstep.

    Raises:
        ValueError: naming the sidecar, when its keys or members do not match the shard's.
    """
    extra = tar_samples(sidecar)
    wanted = (LATENT_MEMBER, *(f"{n}.npy" for n in names))
    for sample in samples:
        side = next(extra, None)
        if side is None or side["__key__"] != sample["__key__"]:
            found = "its end" if side is None else f"key {side['__key__']}"
            raise ValueError(f"{sidecar}: expected sample {sample['__key__']}, found {found}; "
                             "the sidecar does not match its shard (run `shards precompute` again)")
        missing = [m for m in wanted if m not in side]
        if missing:
            raise ValueError(f"{sidecar}: sample {side['__key__']} lacks {missing}")
        yield {**sample, **{m: side[m] for m in wanted}}
    if next(extra, None) is not None:
        raise ValueError(f"{sidecar}: holds more samples than its shard; run `shards precompute` again")


def collate_precomputed(batch: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """`latent_parameters` float32 [B, 2C, h, w] and `conditioning` {name: float32 [B, ...]} of
    samples read through `with_sidecar`."""

    def stacked(member: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([load_npy(s[member]) for s in batch]).astype(np.float32, copy=False))

    return {"latent_parameters": stacked(LATENT_MEMBER),
            "conditioning": {name: stacked(f"{name}.npy") for name in names}}
