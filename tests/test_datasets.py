"""Image folders in a recipe (`data.datasets`): built into cached shards on first use, reused while
their files stay the same, rebuilt when one changes, each folder read with its own options."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from difftrain_dist.config import RecipeError, recipe_from_dict
from difftrain_dist.data_shards import ShardStream
from difftrain_dist.data_shards.cache import dataset_of
from difftrain_dist.data_shards.examples import write_example_folder
from difftrain_dist.distrib.data import per_shard_captions
from difftrain_dist.distrib.driver.datasets import CACHE_FOLDER, build_datasets

from .gloo import raw_recipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of the example photographs: "people" with .txt captions and one corrupt file,
    "things" with .caption files, two of them without a caption."""
    root = tmp_path_factory.mktemp("folders")
    photos = root / "all"
    write_example_folder(photos)
    images = sorted(p for p in photos.iterdir() if p.suffix != ".txt")
    people, things = root / "people", root / "things"
    people.mkdir(), things.mkdir()
    for i, image in enumerate(images):
        target = people if i % 2 == 0 else things
        shutil.copy(image, target / image.name)
        caption = image.with_suffix(".txt").read_text()
        if target is people:
            (target / image.name).with_suffix(".txt").write_text(caption)
        elif i > 3:
            (target / image.name).with_suffix(".caption").write_text(caption)
    (people / "broken.png").write_bytes(b"not a png")
    (people / "broken.txt").write_text("a broken file")
    return people, things


def _recipe(model, shards, tmp_path, people, things, **data):
    datasets = [
        {"folder": str(people), "resolutions": [64], "num_repeats": 2, "caption_dropout": 1.0},
        {"folder": str(things), "caption_ext": "caption", "default_caption": "a [trigger] thing"},
    ]
    raw = raw_recipe(model, shards, tmp_path, data={"shards": None, "datasets": datasets, "resolution": 64,
                                                    "trigger_word": "sks", **data})
    return recipe_from_dict(raw)


def test_folders_are_built_once_and_rebuilt_when_a_file_changes(tmp_path, tiny_sd15_model, photo_shards, folders,
                                                                 caplog):
    people, things = folders
    caplog.set_level(logging.INFO, logger="difftrain_dist")
    first = _recipe(tiny_sd15_model, photo_shards, tmp_path, people, things)
    assert first.data.shards is None
    assert build_datasets(first) is True
    entry = first.data.shards
    assert entry.parent == tmp_path / CACHE_FOLDER and (entry / "index.json").is_file()
    index_bytes = (entry / "index.json").read_bytes()
    assert "left out (1 decode)" in caplog.text  # the corrupt file, reported with its reason

    again = _recipe(tiny_sd15_model, photo_shards, tmp_path, people, things)
    assert build_datasets(again) is False, "the second run built the shards again"
    assert again.data.shards == entry and (entry / "index.json").read_bytes() == index_bytes
    assert again.recipe_hash() == first.recipe_hash()

    changed_folder = tmp_path / "things-changed"
    shutil.copytree(things, changed_folder)
    caption = next(changed_folder.glob("*.caption"))
    caption.write_text(caption.read_text() + ", edited")
    changed = _recipe(tiny_sd15_model, photo_shards, tmp_path, people, changed_folder)
    assert build_datasets(changed) is True
    assert changed.data.shards != entry and changed.recipe_hash() != first.recipe_hash()


def test_each_folder_keeps_its_own_build_and_caption_options(tmp_path, tiny_sd15_model, photo_shards, folders):
    people, things = folders
    recipe = _recipe(tiny_sd15_model, photo_shards, tmp_path, people, things)
    build_datasets(recipe)
    stream_index = ShardStream(recipe.data.shards, micro_batch_size=1, global_rank=0, world_size=1, seed=0).index
    by_dataset = {}
    for shard in stream_index.shards:
        by_dataset.setdefault(dataset_of(shard.name), []).append(shard)
    assert {shard.repeats for shard in by_dataset[0]} == {2} and {shard.repeats for shard in by_dataset[1]} == {1}
    kept = {dataset: sum(s.num_samples for s in shards) for dataset, shards in by_dataset.items()}
    photos = len(list(people.glob("*.png"))) + len(list(people.glob("*.jpg"))) - 1  # one is broken
    assert kept == {0: photos, 1: len([p for p in things.iterdir() if p.suffix != ".caption"])}  # default captions
    transforms = per_shard_captions(recipe, stream_index)
    stream = ShardStream(recipe.data.shards, micro_batch_size=1, global_rank=0, world_size=1, seed=0,
                         caption_transforms=transforms)
    captions = {}
    for batch, _ in zip(stream, range(stream.batches_per_epoch), strict=False):
        captions.setdefault(dataset_of(batch["keys"][0]), []).extend(batch["captions"])
    assert set(captions[0]) == {""}  # people: caption_dropout 1.0
    assert all(c.startswith("sks") or " sks " in c for c in captions[1]) and "a sks thing" in captions[1]


def test_a_recipe_names_shards_or_folders(tmp_path, tiny_sd15_model, photo_shards, folders):
    people, _ = folders
    raw = raw_recipe(tiny_sd15_model, photo_shards, tmp_path, data={"shards": None})
    with pytest.raises(RecipeError, match=r"data: give shards .* or datasets"):
        recipe_from_dict(raw)
    raw = raw_recipe(tiny_sd15_model, photo_shards, tmp_path,
                     data={"shards": None, "resolution": None, "datasets": [{"folder": str(people)}]})
    with pytest.raises(RecipeError, match=r"give each folder its resolutions, or data.resolution"):
        recipe_from_dict(raw)
    raw = raw_recipe(tiny_sd15_model, photo_shards, tmp_path,
                     data={"shards": None, "datasets": [{"folder": str(people), "resolutions": [64], "repeats": 2}]})
    with pytest.raises(RecipeError, match=r"data.datasets.0.repeats: unknown key"):
        recipe_from_dict(raw)
