"""Session-wide fixtures: tiny models of every architecture and shards of the scikit-image photographs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from difftrain_dist.data_shards import build_shards
from difftrain_dist.data_shards.examples import write_example_folder
from difftrain_dist.models import init_tiny

pytest_plugins = ["tests.shard_sources"]

# DeepSpeed compiles its CPU shared-memory op on first use; torch's build lock waits forever on a
# lock file that a killed build left behind, so the suite builds into the checkout's own folder.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "build" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_sd15_model(tmp_path_factory) -> Path:
    """A tiny random SD1.5-architecture pipeline in diffusers format."""
    return init_tiny("sd15", tmp_path_factory.mktemp("tiny-sd15"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch)`: a tiny random pipeline of `arch` ("sd15", "sdxl", "sd3", "flux",
    "flux-schnell") in diffusers format, built once per session."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = init_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """The scikit-image photographs with captions, as 64 px shards of 6 samples each."""
    photos = tmp_path_factory.mktemp("photos")
    write_example_folder(photos)
    out = tmp_path_factory.mktemp("shards")
    build_shards(photos, out, resolution=64, samples_per_shard=6)
    return out
