"""Where `build_shards` inputs come from: ai-toolkit folders and existing WebDataset / img2dataset tars.

A source is one of
- a local folder, walked recursively in sorted order (a folder's files before its sub-folders;
  hidden entries and the output folder skipped). Images (.jpg/.jpeg/.png/.webp/.bmp, any case) pair
  with a same-stem caption file; `.tar` / `.tar.gz` / `.tgz` files inside are read as shards;
  anything else is skipped as "not_image". Several images sharing a stem in one folder (a.jpg,
  a.png: one caption a.txt) keep the first by sorted file name; the others are skipped as
  "duplicate_stem".
- a tar: a local path, a `file://` or `http(s)://` URL (read with urllib, streamed), or, only when
  `allow_shell_urls` is set, a `pipe:COMMAND` URL (webdataset's gopen; it runs COMMAND in a shell).
  Members are grouped into samples by key as webdataset does (`KEY.jpg`, `KEY.txt`, `KEY.json`).
  The image is the first of jpg/jpeg/png/webp/bmp; the caption is `KEY.txt`, else the "caption"
  field of `KEY.json` (img2dataset writes both); img2dataset's "url" is carried into KEY.json.
A string source may use webdataset's brace notation (`shards-{000000..000009}.tar`).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .files import local_path
from .images import IMAGE_EXTENSIONS

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
SHELL_SCHEMES = frozenset({"pipe"})
URL_SCHEMES = frozenset({"http", "https"})
TAR_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, ValueError, EOFError, zlib.error)
HTTP_TIMEOUT_S = 60.0
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def error_text(exc: BaseException) -> str:
    """`Type: message` of an exception for a report, without the `<... object at 0x...>` reprs
    some messages carry (PIL: "cannot identify image file <_io.BytesIO object at 0x7f...>"): the
    same input gives the same text in every build."""
    return f"{type(exc).__name__}: {_OBJECT_REPR.sub('', str(exc))}"


class SkipInput(Exception):
    """One input cannot be used: `kind` (short, for counting) and `reason` (for people)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass
class InputItem:
    """One candidate sample. `load()` returns (image bytes, caption or None when there is none)
    and may raise SkipInput; `skip` is set instead when the input is known bad without reading."""

    source: str
    load: Callable[[], tuple[bytes, str | None]] | None
    caption_hint: str = "caption"
    skip: SkipInput | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """A resolved source: a local folder, or a tar at `location` (path or URL)."""

    kind: str  # "folder" | "tar"
    location: str
    display: str  # how index.json names it


def resolve_sources(src: object, *, allow_shell_urls: bool) -> list[Source]:
    """Expand braces and check every source exists or has a supported scheme (nothing is read).

    Raises:
        ValueError: naming the source: a missing path, a file that is neither a folder nor a tar,
            an unsupported URL scheme, or a `pipe:` URL without `allow_shell_urls`.
    """
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)  # type: ignore[arg-type]
    if not items:
        raise ValueError("src: expected at least one folder, tar file or URL")
    out = []
    for item in items:
        texts = braceexpand.braceexpand(item) if isinstance(item, str) and "{" in item else [os.fspath(item)]
        out += [_resolve(text, allow_shell_urls) for text in texts]
    return out


def _resolve(text: str, allow_shell_urls: bool) -> Source:
    scheme = urlparse(text).scheme
    if scheme in SHELL_SCHEMES or text.startswith("pipe:"):
        if not allow_shell_urls:
            raise ValueError(f"src {text!r}: '{scheme or 'pipe'}:' URLs run a shell command; pass "
                             "allow_shell_urls=True (--allow-shell-urls) only for commands you trust")
        return Source("tar", text, text)
    if scheme in URL_SCHEMES:
        return Source("tar", text, text)
    if len(scheme) > 1 and scheme != "file":  # one letter is a Windows drive
        raise ValueError(f"src {text!r}: unsupported URL scheme {scheme}://; use a local path, file://, "
                         "http(s):// or pipe: (with allow_shell_urls)")
    path = local_path(text)
    if path.is_dir():
        return Source("folder", str(path), str(path))
    if path.is_file() and path.name.lower().endswith(TAR_SUFFIXES):
        return Source("tar", str(path), text)
    raise ValueError(f"src {text}: not a folder, a .tar file or a URL (found nothing usable there)")


def open_stream(location: str) -> IO[bytes]:
    """A readable binary stream for a local path, file://, http(s):// or (already allowed) pipe: URL."""
    scheme = urlparse(location).scheme
    if scheme in URL_SCHEMES:
        return urllib.request.urlopen(location, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (scheme checked)
    if scheme in SHELL_SCHEMES or location.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(location, "rb")
    return open(local_path(location), "rb")


def iter_inputs(sources: Sequence[Source], out: Path, caption_ext: str) -> Iterator[InputItem]:
    """Every candidate input of every source, in a deterministic order."""
    for source in sources:
        if source.kind == "tar":
            yield from iter_tar(source.location, source.display)
            continue
        root = Path(source.location)
        for kind, path, detail in walk_folder(root, out, caption_ext):
            rel = path.relative_to(root).as_posix()
            if kind == "image":
                yield _folder_item(path, rel, caption_ext)
            elif kind == "tar":
                yield from iter_tar(str(path), rel)
            else:
                yield InputItem(rel, None, skip=SkipInput(kind, detail))


def walk_folder(root: Path, out: Path, caption_ext: str) -> Iterator[tuple[str, Path, str]]:
    """(kind, path, detail) for every file: kind "image", "tar", "duplicate_stem" or "not_image"."""
    out_resolved = out.resolve()
    allowed = "/".join(sorted({e[1:] for e in IMAGE_EXTENSIONS} | {"tar"}))
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (here / d).resolve() != out_resolved)
        kept_stems: dict[str, str] = {}
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or path.suffix == caption_ext:
                continue
            if name.lower().endswith(TAR_SUFFIXES):
                yield "tar", path, ""
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                yield "not_image", path, f"not an image input (extension {path.suffix or 'none'!r}, expected {allowed})"
            elif path.stem in kept_stems:
                yield "duplicate_stem", path, (
                    f"duplicate stem: {name} shares the stem {path.stem!r} (caption "
                    f"{path.stem}{caption_ext}) with {kept_stems[path.stem]}, which is kept (first by name)")
            else:
                kept_stems[path.stem] = name
                yield "image", path, ""


def folder_missing_captions(root: Path, out: Path, caption_ext: str) -> list[str]:
    """Images of a folder source (duplicates excluded) without a caption file, relative posix paths."""
    return [path.relative_to(root).as_posix() for kind, path, _ in walk_folder(root, out, caption_ext)
            if kind == "image" and not path.with_suffix(caption_ext).is_file()]


def _folder_item(path: Path, rel: str, caption_ext: str) -> InputItem:
    caption_path = path.with_suffix(caption_ext)

    def load() -> tuple[bytes, str | None]:
        caption = None
        if caption_path.is_file():
            try:
                caption = caption_path.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError as exc:
                raise SkipInput("caption_encoding", f"caption file {caption_path.name} is not UTF-8 "
                                f"({exc.reason} at byte {exc.start})") from None
        return path.read_bytes(), caption

    return InputItem(rel, load, caption_hint=f"caption file {caption_path.name}")


def iter_tar(location: str, display: str) -> Iterator[InputItem]:
    """The samples of one tar; a tar that cannot be opened or read to its end yields a skipped item
    for the tar itself (samples read before the error are kept)."""
    count = 0
    try:
        with open_stream(location) as stream:
            files = ({**f, "__url__": display} for f in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                count += 1
                yield _tar_item(sample, display)
    except TAR_ERRORS as exc:
        where = f"after {count} samples" if count else "before any sample"
        yield InputItem(display, None, skip=SkipInput(
            "tar", f"cannot read tar {where}: {error_text(exc)}"))


def _tar_item(sample: dict[str, Any], display: str) -> InputItem:
    source = f"{display}#{sample['__key__']}"
    members = sorted(k for k in sample if not k.startswith("__"))
    image_key = next((k for k in TAR_IMAGE_KEYS if k in sample), None)
    if image_key is None:
        return InputItem(source, None, skip=SkipInput("no_image", f"no image member (has {members})"))
    meta_doc = _json_member(sample.get("json"))
    meta = {"url": meta_doc["url"]} if isinstance(meta_doc.get("url"), str) else {}

    def load() -> tuple[bytes, str | None]:
        caption = meta_doc.get("caption") if isinstance(meta_doc.get("caption"), str) else None
        if "txt" in sample:
            try:
                caption = sample["txt"].decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise SkipInput("caption_encoding", f"caption member .txt is not UTF-8 "
                                f"({exc.reason} at byte {exc.start})") from None
        return sample[image_key], None if caption is None else caption.strip()

    return InputItem(source, load, caption_hint="caption (.txt member or 'caption' in .json)", meta=meta)


def _json_member(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}
