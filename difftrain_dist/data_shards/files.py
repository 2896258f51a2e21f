"""Files a shard folder lists: local paths from URLs, sha256 digests, and the size and checksum
checks that refuse a truncated or corrupt shard or sidecar."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname


def local_path(path_or_url: str | os.PathLike[str]) -> Path:
    """Turn a local path or a `file://` URL into a `Path`.

    Raises:
        ValueError: for any other URL scheme (s3://, http://, ...).
    """
    text = os.fspath(path_or_url)
    if text.startswith("file:"):
        return Path(url2pathname(unquote(urlparse(text).path)))
    scheme = urlparse(text).scheme
    if len(scheme) > 1:  # one letter is a Windows drive
        raise ValueError(f"{text}: only local paths and file:// URLs are supported, not {scheme}://")
    return Path(text)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk_bytes` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


_RECOPY = "copy it again or rebuild the shards"


def check_size(path: Path, num_bytes: int | None, what: str = "shard") -> None:
    """Compare a file's size with the `num_bytes` index.json lists (None: not recorded, no check).

    Raises:
        ValueError: naming the file, "truncated" when it is shorter, "corrupt" when longer.
    """
    if num_bytes is None:
        return
    size = path.stat().st_size
    if size < num_bytes:
        raise ValueError(f"{path}: {what} is truncated: {size} of the {num_bytes} bytes index.json lists; {_RECOPY}")
    if size > num_bytes:
        raise ValueError(f"{path}: {what} is corrupt: {size} bytes, but index.json lists {num_bytes}; {_RECOPY}")


def check_file(path: Path, sha256: str, num_bytes: int | None = None, what: str = "shard") -> None:
    """Check a file against index.json: its size (when `num_bytes` is known), then its sha256
    (reads every byte, about 1.6 GB/s on one core; see README "Datasets and shards").

    Raises:
        ValueError: naming the file and saying it is truncated or corrupt (sizes / sha256 values).
    """
    check_size(path, num_bytes, what)
    actual = sha256_file(path)
    if actual != sha256:
        state = "corrupt" if num_bytes is not None else "corrupt or truncated"
        advice = _RECOPY if what == "shard" else "copy it again or run `shards precompute` again"
        raise ValueError(f"{path}: {what} is {state}: sha256 {actual} does not match index.json ({sha256}); "
                         f"{advice}")
