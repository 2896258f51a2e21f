"""`difftrain-dist shards build SRC... OUT`, `shards merge OUT PART...`, `shards precompute DIR MODEL`
and `shards verify DIR`: inputs → WebDataset shards, optionally with precomputed latents and text
embeddings, and a check of their checksums."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from difftrain_dist.launcher.common import console, user_errors

app = typer.Typer(help="Build WebDataset shards from image folders.", no_args_is_help=True, rich_markup_mode="markdown")

LISTED_PER_KIND = 10


@app.command("build")
def build(
    src: Annotated[list[str], typer.Argument(
        help="Folders of images with same-stem caption files, and/or WebDataset / img2dataset tars "
             "(paths, file://, http(s):// URLs; braces like shard-{000..009}.tar expand).",
        show_default=False)],
    out: Annotated[Path, typer.Argument(help="Empty (or new) folder for shard-*.tar and index.json.")],
    resolution: Annotated[list[int] | None, typer.Option(
        help="Training resolution in pixels; repeat for several (each image is written once per "
             "resolution). Default 512.")] = None,
    bucket_step: Annotated[int, typer.Option(help="Bucket sides are multiples of this, px.")] = 64,
    max_aspect: Annotated[float, typer.Option(
        help="Largest bucket aspect ratio (long/short side); 1 gives square crops only.")] = 4.0,
    caption_ext: Annotated[str, typer.Option(help="Caption file extension.")] = ".txt",
    default_caption: Annotated[
        str | None, typer.Option(help="Caption for inputs without one (default: skip them).")
    ] = None,
    missing_caption: Annotated[str | None, typer.Option(
        help="Inputs without a caption: skip | default (needs --default-caption) | error (fail, "
             "listing them). Default: default if --default-caption is given, else skip.")] = None,
    trigger_word: Annotated[str | None, typer.Option(
        help="Replaces [trigger] and [name] in captions.")] = None,
    num_repeats: Annotated[int, typer.Option(
        help="Times each sample is seen per epoch (ai-toolkit num_repeats), stored in index.json.")] = 1,
    small_images: Annotated[str, typer.Option(
        help="Images smaller than their bucket: upscale | skip.")] = "upscale",
    samples_per_shard: Annotated[int, typer.Option(help="Samples per tar shard.")] = 1000,
    allow_shell_urls: Annotated[bool, typer.Option(
        "--allow-shell-urls", help="Allow pipe: sources, which run a shell command.")] = False,
    precompute: Annotated[str | None, typer.Option(
        help="Model folder or hub id: also store VAE latents and text embeddings of every sample "
             "(as `shards precompute` does).", show_default=False)] = None,
    arch: Annotated[
        str | None, typer.Option(help="Architecture of the --precompute model (default: read from the model).")
    ] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster for --precompute (default: RAY_ADDRESS, else a local one).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Ray actors for --precompute (default: one per shard, up to the cluster's CPUs).")] = None,
) -> None:
    """Write OUT/shard-%06d.tar and OUT/index.json; bad inputs are skipped and reported."""
    from difftrain_dist.data_shards import build_shards

    with user_errors():
        index = build_shards(src, out, resolution=resolution or [512], caption_ext=caption_ext,
                             default_caption=default_caption, missing_caption=missing_caption,
                             trigger_word=trigger_word, num_repeats=num_repeats, small_images=small_images,
                             bucket_step=bucket_step, max_aspect=max_aspect,
                             samples_per_shard=samples_per_shard, allow_shell_urls=allow_shell_urls)
    _summary(index, out)
    if precompute is not None:
        _precompute(out, precompute, arch, address, workers)


@app.command("precompute")
def precompute_cmd(
    shards_dir: Annotated[Path, typer.Argument(help="Folder holding index.json and the shards.")],
    model_path: Annotated[str, typer.Argument(help="Diffusers model folder or hub id.")],
    arch: Annotated[str | None, typer.Option(help="Model architecture (default: read from the model).")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: RAY_ADDRESS, else a local one).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Ray actors, one model copy each (default: one per shard, up to the cluster's CPUs).")] = None,
) -> None:
    """Store VAE latents and text embeddings of every sample in sidecar tars (training uses them)."""
    _precompute(shards_dir, model_path, arch, address, workers)


def _precompute(shards_dir: Path, model_path: str, arch: str | None, address: str | None,
                workers: int | None) -> None:
    from difftrain_dist.distrib.driver.precompute import run_precompute, summary
    from difftrain_dist.models.registry import checked_arch

    with user_errors():
        arch = checked_arch(model_path, arch)
        stats = summary(run_precompute(shards_dir, model_path, arch=arch, address=address, num_workers=workers))
    console.print(f"precomputed {stats['samples']} samples in {stats['shards']} shard(s) on "
                  f"{stats['processes']} worker process(es) → {shards_dir}/*.precomputed.tar")


@app.command("verify")
def verify(
    shards_dir: Annotated[Path, typer.Argument(help="Folder holding index.json and the shards.")],
) -> None:
    """Check every shard (and precomputed sidecar) against the sizes and sha256 in index.json.

    Training checks each shard as it reads it anyway; this reads every byte up front (about
    1.6 GB/s per core), e.g. after copying a dataset to a cluster.
    """
    from difftrain_dist.data_shards import ShardIndex

    with user_errors():
        index = ShardIndex.load(shards_dir)
        index.verify_checksums()
    sidecars = "" if index.precomputed is None else " and their precomputed sidecars"
    console.print(f"{len(index.shards)} shard(s){sidecars} match {index.root}/index.json")


@app.command("merge")
def merge(
    out: Annotated[Path, typer.Argument(help="Folder that receives the merged index.json.")],
    parts: Annotated[list[Path], typer.Argument(help="Built shard folders inside OUT.", show_default=False)],
) -> None:
    """Write OUT/index.json over several built folders (e.g. datasets with different --num-repeats)."""
    from difftrain_dist.data_shards import merge_indexes

    with user_errors():
        index = merge_indexes(out, parts)
    _summary(index, out)


def _summary(index, out: Path) -> None:
    repeats = sorted({s.repeats for s in index.shards})
    console.print(f"{index.num_samples} samples in {len(index.shards)} shard(s) → {out} "
                  f"({index.samples_per_epoch} per epoch with repeats {repeats})")
    if index.buckets:
        console.print("buckets: " + ", ".join(f"{b}: {n}" for b, n in index.buckets.items()))
    _upscaled(index, out)
    if not index.skipped:
        return
    kinds = Counter(item.kind for item in index.skipped)
    console.print(f"[yellow]skipped {len(index.skipped)} input(s):[/yellow] "
                  + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
    shown: Counter[str] = Counter()
    for item in index.skipped:
        shown[item.kind] += 1
        if shown[item.kind] <= LISTED_PER_KIND:
            console.print(f"  [yellow]skipped[/yellow] {item['source']}: {item['reason']}")
    for kind, n in kinds.items():
        if n > LISTED_PER_KIND:
            console.print(f"  ... and {n - LISTED_PER_KIND} more {kind}; every one is listed in {out}/index.json")


def _upscaled(index, out: Path) -> None:
    """Count and list (the first LISTED_PER_KIND) samples written larger than their source."""
    if not index.upscaled:
        return
    console.print(f"[yellow]upscaled {len(index.upscaled)} sample(s)[/yellow] smaller than their bucket "
                  "(small_images: upscale; --small-images skip leaves them out):")
    for item in index.upscaled[:LISTED_PER_KIND]:
        console.print(f"  [yellow]upscaled[/yellow] {item.source}: {item.reason}")
    if len(index.upscaled) > LISTED_PER_KIND:
        console.print(f"  ... and {len(index.upscaled) - LISTED_PER_KIND} more upscaled; "
                      f"every one is listed in {out}/index.json")
