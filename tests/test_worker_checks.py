"""The worker's checks before training: shards that suit the model, when precomputed text
embeddings may be used, a data loader that leaves the global RNG alone, and set-up objects kept out
of the collector's way during the step loop."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import yaml

from difftrain_dist.config import load_recipe
from difftrain_dist.data_shards import ShardIndex, ShardStream
from difftrain_dist.data_shards.index import Precomputed
from difftrain_dist.distrib.data import make_loader
from difftrain_dist.distrib.loop import frozen_setup_objects
from difftrain_dist.distrib.preflight import check_data_fits_model
from difftrain_dist.distrib.trainee import precomputed_text_unusable


def _recipe(tmp_path: Path, model_path: Path, shards: Path, arch: str = "sd15", **sections):
    raw = {"run": {"name": "r", "storage_path": str(tmp_path / "runs")},
           "model": {"arch": arch, "path": str(model_path)}, "data": {"shards": str(shards)},
           "train": {"max_steps": 1}, **sections}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    return load_recipe(tmp_path / "r.yaml")


def test_precomputed_text_is_used_only_for_captions_and_encoders_as_stored(tmp_path, tiny_model, photo_shards):
    sd15, sd3 = tiny_model("sd15"), tiny_model("sd3")
    assert precomputed_text_unusable(_recipe(tmp_path, sd15, photo_shards)) is None
    cases = [
        ({"data": {"shards": str(photo_shards), "trigger_word": "sks"}}, "sd15", sd15, "trigger_word"),
        ({"lora": {"train_text_encoder": True}}, "sd15", sd15, "train_text_encoder"),
        ({"model": {"arch": "sd3", "path": str(sd3), "use_t5": False}}, "sd3", sd3, "use_t5"),
    ]
    for sections, arch, model, reason in cases:
        recipe = _recipe(tmp_path, model, photo_shards, arch, **sections)
        assert reason in precomputed_text_unusable(recipe)


def test_shards_must_suit_the_architecture(tmp_path, tiny_model, photo_shards):
    index = ShardIndex.load(photo_shards)
    sd3 = _recipe(tmp_path, tiny_model("sd3"), photo_shards, "sd3")
    check_data_fits_model(sd3, index)  # 64 px buckets: fine
    odd = index.model_copy(update={"shards": [s.model_copy(update={"buckets": {"72x72": s.num_samples}})
                                              for s in index.shards]})
    check_data_fits_model(_recipe(tmp_path, tiny_model("sd15"), photo_shards), odd)  # 72 = 9 latents: fine for sd15
    with pytest.raises(ValueError, match=r"72x72.*multiples of 16.*sd3"):
        check_data_fits_model(sd3, odd)
    other = index.model_copy(update={"precomputed": Precomputed(
        model="m", arch="sd15", conditioning=("encoder_hidden_states",), sidecars=())})
    with pytest.raises(ValueError, match="precomputed for arch 'sd15'.*'sd3'.*shards precompute"):
        check_data_fits_model(sd3, other)


def test_starting_the_loader_leaves_the_global_rng_alone(tmp_path, tiny_sd15_model, photo_shards):
    recipe = _recipe(tmp_path, tiny_sd15_model, photo_shards)
    stream = ShardStream(photo_shards, micro_batch_size=1, global_rank=0, world_size=1, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(make_loader(stream, recipe)))  # LoRA dropout draws from the global RNG after this
    assert torch.equal(torch.rand(3), expected)


def test_set_up_objects_are_frozen_during_the_step_loop_only():
    class Node:  # a reference cycle: only the cyclic collector frees it
        def __init__(self):
            self.me = self

    set_up = Node()
    assert gc.get_freeze_count() == 0
    with frozen_setup_objects():
        assert gc.get_freeze_count() > 0
        assert gc.is_tracked(set_up) and all(set_up is not o for o in gc.get_objects())  # not walked
        during = Node()
        assert any(during is o for o in gc.get_objects())  # what the loop allocates is collected as usual
        with frozen_setup_objects():  # nested: leaves the outer block's objects frozen
            pass
        # (the count itself may drop: a frozen object freed by reference counting leaves it)
        assert gc.get_freeze_count() > 0 and all(set_up is not o for o in gc.get_objects())
    assert gc.get_freeze_count() == 0
