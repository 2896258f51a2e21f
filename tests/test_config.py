"""Recipe schema: validation messages name the field; overrides; every shipped recipe loads."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from difftrain_dist.config import Recipe, RecipeError, load_recipe
from difftrain_dist.launcher.app import app

from .shard_sources import EMPTY_INDEX

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text(EMPTY_INDEX)
    return model, shards


def write_recipe(tmp_path: Path, model_dir: Path, shards_dir: Path, **sections) -> Path:
    raw = {
        "run": {"name": "t", "storage_path": str(tmp_path / "runs")},
        "model": {"arch": "sd15", "path": str(model_dir)},
        "data": {"shards": str(shards_dir), "resolution": 64},
        "train": {"max_steps": 3},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_recipe_has_defaults_and_absolute_paths(tmp_path, paths):
    recipe = load_recipe(write_recipe(tmp_path, *paths))
    assert recipe.lora.rank == 16 and recipe.distributed.zero_stage == 1
    assert recipe.run.storage_path.is_absolute() and recipe.data.shards.is_absolute()
    assert recipe.run_dir == tmp_path / "runs" / "t"


def test_typo_key_is_named_with_its_path(tmp_path, paths):
    path = write_recipe(tmp_path, *paths, train={"lrr": 1e-4})
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown key"):
        load_recipe(path)


def test_unknown_section_is_named(tmp_path, paths):
    path = write_recipe(tmp_path, *paths, trainer={"x": 1})
    with pytest.raises(RecipeError, match=r"trainer: unknown key"):
        load_recipe(path)


def test_wrong_type_names_field_and_value(tmp_path, paths):
    path = write_recipe(tmp_path, *paths, train={"max_steps": "many"})
    with pytest.raises(RecipeError, match=r"train\.max_steps: .*'many'"):
        load_recipe(path)


def test_missing_model_folder_is_named(tmp_path, paths):
    path = write_recipe(tmp_path, tmp_path / "nope", paths[1])
    with pytest.raises(RecipeError, match=r"model\.path: .*no diffusers model folder"):
        load_recipe(path)


def test_missing_shards_index_is_named(tmp_path, paths):
    path = write_recipe(tmp_path, paths[0], tmp_path / "missing")
    with pytest.raises(RecipeError, match=r"data\.shards: .*no index.json"):
        load_recipe(path)


def test_missing_required_field(tmp_path, paths):
    path = write_recipe(tmp_path, *paths)
    raw = yaml.safe_load(path.read_text())
    del raw["train"]["max_steps"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"train\.max_steps: required field is missing"):
        load_recipe(path)


def test_every_problem_is_reported_at_once(tmp_path, paths):
    path = write_recipe(tmp_path, *paths, train={"lrr": 1, "max_steps": 0}, lora={"rank": 0})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "train.lrr" in text and "train.max_steps" in text and "lora.rank" in text


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_set_overrides_nested_fields_with_yaml_types(tmp_path, paths):
    path = write_recipe(tmp_path, *paths)
    recipe = load_recipe(path, ["train.lr=2e-4", "distributed.num_workers=3", "lora.target_modules=[to_q, to_v]"])
    assert recipe.train.lr == pytest.approx(2e-4)
    assert recipe.distributed.num_workers == 3
    assert recipe.lora.target_modules == ["to_q", "to_v"]


def test_set_typo_is_an_error(tmp_path, paths):
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown key"):
        load_recipe(write_recipe(tmp_path, *paths), ["train.lrr=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(write_recipe(tmp_path, *paths), ["train.lr"])


def test_cpu_run_rejects_half_precision(tmp_path, paths):
    path = write_recipe(tmp_path, *paths, model={"dtype": "bfloat16"})
    with pytest.raises(RecipeError, match="model.dtype"):
        load_recipe(path)


def test_recipe_hash_ignores_lr_but_not_rank(tmp_path, paths):
    path = write_recipe(tmp_path, *paths)
    base = load_recipe(path).recipe_hash()
    assert load_recipe(path, ["train.lr=1e-3"]).recipe_hash() == base
    assert load_recipe(path, ["lora.rank=4"]).recipe_hash() != base


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_recipes_validate(config, paths):
    model, shards = paths
    recipe = load_recipe(config, [f"model.path={model}", f"data.shards={shards}"])
    assert isinstance(recipe, Recipe)
    assert recipe.run.name


def test_configs_folder_is_not_empty():
    assert CONFIGS, "configs/ ships no recipe"


def test_folder_without_model_index_is_not_a_model(tmp_path, paths):
    (tmp_path / "photos").mkdir()
    with pytest.raises(RecipeError, match=r"model\.path: .*not a diffusers model"):
        load_recipe(write_recipe(tmp_path, tmp_path / "photos", paths[1]))


def test_odd_values_are_rejected(tmp_path, paths):
    path = write_recipe(tmp_path, *paths)
    for override, field in [("train.betas=[2, -1]", "train.betas"), ("train.lr=.inf", "train.lr"),
                            ("run.seed=-1", "run.seed"), ("lora.target_modules=[]", "lora.target_modules")]:
        with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
            load_recipe(path, [override])


def test_resume_identity_follows_contents_not_paths(tmp_path, paths):
    model, shards = paths
    before = load_recipe(write_recipe(tmp_path, model, shards)).recipe_hash()
    moved = tmp_path / "moved-model"
    model.rename(moved)
    path = write_recipe(tmp_path, moved, shards)
    assert load_recipe(path).recipe_hash() == before
    (moved / "model_index.json").write_text('{"_class_name": "Other"}')
    assert load_recipe(path).recipe_hash() != before


def test_resolution_must_be_one_the_shards_were_built_at(tmp_path, paths):
    model, shards = paths
    (shards / "index.json").write_text(EMPTY_INDEX.replace('"resolutions": []', '"resolutions": [64, 128]'))
    path = write_recipe(tmp_path, model, shards)
    assert load_recipe(path).data.resolution == 64
    assert load_recipe(path, ["data.resolution=null"]).data.resolution == 128
    with pytest.raises(RecipeError, match=r"data: resolution 512, but the shards were built at \[64, 128\]"):
        load_recipe(path, ["data.resolution=512"])


def test_text_encoder_lora_needs_zero_below_3(tmp_path, paths):
    path = write_recipe(tmp_path, *paths)
    with pytest.raises(RecipeError, match="train_text_encoder needs distributed.zero_stage 0-2"):
        load_recipe(path, ["lora.train_text_encoder=true", "distributed.zero_stage=3"])
    assert load_recipe(path, ["lora.train_text_encoder=true", "distributed.zero_stage=2"]).lora.train_text_encoder


# --------------------------------------------------------------------------- run folders: checked at load

@pytest.mark.parametrize("field", ["run.storage_path", "run.output_dir"])
def test_folder_under_a_file_cannot_be_created(tmp_path, paths, field):
    (tmp_path / "afile").write_text("a file, not a folder")
    impossible = tmp_path / "afile" / "runs"
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, *paths), [f"{field}={impossible}"])
    lines = str(err.value).splitlines()
    assert lines[1:] == [f"  {field}: {tmp_path / 'afile'} is a file, not a folder, so {impossible} "
                         "cannot be created"], lines
    assert (tmp_path / "afile").read_text() == "a file, not a folder"
    with pytest.raises(RecipeError, match=re.escape(field) + r": .*afile is a file, not a folder$"):
        load_recipe(write_recipe(tmp_path, *paths), [f"{field}={tmp_path / 'afile'}"])


def test_unwritable_folder_is_refused(tmp_path, paths):
    # /proc/self is a folder that even root cannot create anything in (access(2) says so too).
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc/self on this system")
    with pytest.raises(OSError):
        (Path("/proc/self") / "runs").mkdir()
    with pytest.raises(RecipeError, match=r"run\.storage_path: cannot create /proc/self/runs/x: "
                                          r"/proc/self is not writable$"):
        load_recipe(write_recipe(tmp_path, *paths), ["run.storage_path=/proc/self/runs/x"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write read-only folders")
def test_read_only_folder_is_refused(tmp_path, paths):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(RecipeError, match=r"run\.output_dir: cannot create .*locked is not writable"):
        load_recipe(write_recipe(tmp_path, *paths), [f"run.output_dir={locked / 'out'}"])


def test_folders_are_checked_without_being_created(tmp_path, paths):
    recipe = load_recipe(write_recipe(tmp_path, *paths), [f"run.output_dir={tmp_path / 'new' / 'deeper'}"])
    assert recipe.run.output_dir == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()


def test_cluster_paths_are_not_checked_here(tmp_path, paths):
    (tmp_path / "afile").write_text("")
    path = write_recipe(tmp_path, *paths)
    recipe = load_recipe(path, [f"run.storage_path={tmp_path / 'afile' / 'runs'}"], check_paths=False)
    assert recipe.run.storage_path == tmp_path / "afile" / "runs"


def test_cli_train_refuses_an_impossible_storage_path_before_starting(tmp_path, paths):
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path, *paths)), "--no-progress",
                                      "--set", f"run.storage_path={tmp_path / 'afile' / 'runs'}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "run.storage_path: " in text and "afile is a file, not a folder" in text
    assert "Traceback" not in result.output and "worker(s), ZeRO" not in text  # run() never began


def test_a_model_of_another_family_is_refused_when_the_recipe_loads(tmp_path, tiny_sd15_model, photo_shards):
    path = write_recipe(tmp_path, tiny_sd15_model, photo_shards)
    assert load_recipe(path).model.arch == "sd15"
    with pytest.raises(RecipeError, match=r"model: arch: sdxl, but the model at .* is a StableDiffusionPipeline "
                                          r"\(sd15\); set model.arch: sd15"):
        load_recipe(path, ["model.arch=sdxl"])
