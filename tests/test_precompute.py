"""`shards precompute`: sidecars written by Ray actors, read back by ShardStream, used by the worker."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difftrain_dist.data_shards import ShardIndex, ShardStream
from difftrain_dist.data_shards.files import sha256_file
from difftrain_dist.models import get_adapter


@pytest.fixture(scope="module")
def precomputed(tiny_sd15_model, photo_shards, tmp_path_factory):
    """A copy of the photo shards, precomputed on a 2-CPU local Ray cluster, and the task results."""
    ray = pytest.importorskip("ray")
    from difftrain_dist.distrib.driver.precompute import precompute_shards

    shards = tmp_path_factory.mktemp("precomputed") / "shards"
    shutil.copytree(photo_shards, shards)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        results = precompute_shards(shards, str(tiny_sd15_model), arch="sd15")
    finally:
        ray.shutdown()
    return shards, results


@pytest.fixture(scope="module")
def adapter(tiny_sd15_model):
    return get_adapter("sd15").from_pretrained(str(tiny_sd15_model), dtype=torch.float32, device=torch.device("cpu"))


def test_sidecars_are_listed_with_checksums(precomputed, photo_shards, tiny_sd15_model):
    shards, results = precomputed
    index = ShardIndex.load(shards)
    assert index.precomputed is not None
    assert index.precomputed.arch == "sd15"
    assert index.precomputed.model == str(Path(tiny_sd15_model).resolve())
    assert index.precomputed.conditioning == ("encoder_hidden_states",)
    assert len(index.precomputed.sidecars) == len(index.shards) >= 2
    for i, (shard, sidecar) in enumerate(zip(index.shards, index.precomputed.sidecars, strict=True)):
        assert sidecar.name == shard.name.replace(".tar", ".precomputed.tar")
        assert sha256_file(index.sidecar_path(i)) == sidecar.sha256
        with tarfile.open(index.sidecar_path(i)) as tar:
            assert all(m.pax_headers == {} for m in tar.getmembers())
        assert sha256_file(shards / shard.name) == sha256_file(photo_shards / shard.name)  # untouched
    index.verify_checksums()
    assert [r.num_samples for r in results] == index.shard_sizes


def test_work_is_spread_over_actors(precomputed):
    _, results = precomputed
    assert len(results) >= 2
    assert len({(r.host, r.pid) for r in results}) >= 2


def test_stream_yields_what_encoding_gives(precomputed, adapter):
    shards, _ = precomputed
    stream = ShardStream(shards, micro_batch_size=2, global_rank=0, world_size=1, seed=3)
    batch = next(iter(stream))
    params = batch["latent_parameters"]
    assert params.dtype == torch.float32 and params.shape == (2, 8, 8, 8)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    from_params = adapter.latents_from_parameters(params, generator=g1)
    from_pixels = adapter.encode_images(batch["pixel_values"], generator=g2)
    torch.testing.assert_close(from_params, from_pixels, atol=1e-5, rtol=0)
    expected = adapter.encode_prompts(batch["captions"])
    assert set(batch["conditioning"]) == set(expected)
    for name, value in expected.items():
        assert batch["conditioning"][name].dtype == torch.float32
        torch.testing.assert_close(batch["conditioning"][name], value, atol=1e-5, rtol=0)


def test_sidecars_change_nothing_else(precomputed, photo_shards):
    shards, _ = precomputed
    kwargs = dict(micro_batch_size=2, global_rank=1, world_size=2, seed=5, start_batch=1, shuffle_buffer=4)
    with_sidecars = ShardStream(shards, **kwargs)
    without = ShardStream(photo_shards, **kwargs)
    assert with_sidecars.batches_per_epoch == without.batches_per_epoch
    for a, b, _ in zip(iter(with_sidecars), iter(without), range(2 * without.batches_per_epoch), strict=False):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
        assert "latent_parameters" not in b


def test_worker_uses_precomputed_batches(precomputed, adapter):
    from difftrain_dist.distrib import step

    shards, _ = precomputed
    batch = next(iter(ShardStream(shards, micro_batch_size=2, global_rank=0, world_size=1, seed=0)))
    trainee = SimpleNamespace(adapter=adapter, device=torch.device("cpu"),
                              noise_generator=torch.Generator().manual_seed(1))
    latents = step.batch_latents(trainee, batch)
    trainee.noise_generator = torch.Generator().manual_seed(1)
    pixels_only = {k: v for k, v in batch.items() if k not in ("latent_parameters", "conditioning")}
    torch.testing.assert_close(latents, step.batch_latents(trainee, pixels_only), atol=1e-5, rtol=0)
    # conditioning is taken from the batch only when the recipe leaves captions as stored
    marker = {"encoder_hidden_states": torch.zeros(2, 77, 1)}
    marked = {**batch, "conditioning": marker}
    assert adapter.batch_conditioning(marked, precomputed=True)["encoder_hidden_states"].shape[-1] == 1
    assert adapter.batch_conditioning(marked, precomputed=False)["encoder_hidden_states"].shape[-1] != 1
