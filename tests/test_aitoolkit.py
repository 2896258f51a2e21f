"""ai-toolkit job files run as they are: every key mapped, noted or refused by its path; each
family's job (written in the shape of ai-toolkit's config/examples and UI presets) trains on
the tiny models and real photos, and diffusers loads the LoRA it makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from difftrain_dist.config import RecipeError, load_recipe
from difftrain_dist.config.aitoolkit import convert_job
from difftrain_dist.data_shards.examples import write_example_folder
from difftrain_dist.distrib.driver.datasets import build_datasets
from difftrain_dist.distrib.loop import train_worker
from difftrain_dist.distrib.session import LocalSession
from difftrain_dist.models import get_adapter, read_lora_file

from .gloo import run_ranks
from .test_train_run import run_cli

# The shape of ai-toolkit's config/examples/train_lora_flux_24gb.yaml (its comments shortened).
FLUX_JOB = """\
---
job: extension
config:
  name: "my_first_flux_lora_v1"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 16
        linear_alpha: 16
      save:
        dtype: float16 # precision to save
        save_every: 250 # save every this many steps
        max_step_saves_to_keep: 4
        push_to_hub: false
      datasets:
        - folder_path: "{folder}"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 512, 768, 1024 ]
      train:
        batch_size: 1
        steps: 2000
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        optimizer: "adamw8bit"
        lr: 1e-4
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: "{model}"
        is_flux: true
        quantize: false
      sample:
        sampler: "flowmatch"
        sample_every: 250
        width: 1024
        height: 1024
        prompts:
          - "woman with red hair, playing chess at the park"
          - "[trigger] holding a sign that says 'I LOVE PROMPTS!'"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""

FAMILY_MODEL = {  # the model section of each family's job, as ai-toolkit spells it
    "sd15": {"name_or_path": "{model}", "is_xl": False, "is_v2": False},
    "sdxl": {"name_or_path": "{model}", "arch": "sdxl"},
    "sd3": {"name_or_path": "{model}", "is_v3": True, "quantize": False},
    "flux": {"name_or_path": "{model}", "is_flux": True, "quantize": False},
}
ON_THIS_MACHINE = ["distributed.use_gpu=false", "model.dtype=float32"]
"""What a user without a GPU adds to a job written for `device: cuda:0` and `dtype: bf16`."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("aitk-photos")
    write_example_folder(folder)
    return folder


def flux_job(tmp_path: Path, model: Path, folder: Path, text: str = FLUX_JOB) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text.replace("{folder}", str(folder)).replace("{model}", str(model)))
    return path


def test_the_flux_example_maps_key_by_key(tmp_path, tiny_model, photos, caplog):
    job = flux_job(tmp_path, tiny_model("flux"), photos)
    raw = yaml.safe_load(job.read_text())
    conv = convert_job(raw, str(job))
    recipe, sources = conv.recipe, conv.sources
    assert recipe["run"] == {"name": "my_first_flux_lora_v1", "storage_path": "output",
                             "output_dir": "output/my_first_flux_lora_v1"}
    assert recipe["model"] == {"path": str(tiny_model("flux")), "arch": "flux", "dtype": "bfloat16"}
    assert recipe["lora"] == {"rank": 16, "alpha": 16, "train_text_encoder": False}
    assert recipe["checkpoint"] == {"lora_dtype": "float16", "every_n_steps": 250, "keep_last": 4}
    train = recipe["train"]
    assert (train["optimizer"], train["lr"], train["ema_decay"], train["max_steps"]) == ("adamw8bit", 1e-4, 0.99, 2000)
    assert train["optimizer_args"] == {"eps": 1e-6} and train["weight_decay"] == 0.01  # ai-toolkit's and bnb's
    dataset = recipe["data"]["datasets"][0]
    assert dataset["resolutions"] == [512, 768, 1024] and dataset["caption_dropout"] == 0.05
    assert recipe["data"]["trigger_word"] == "p3r5on"
    assert recipe["sample"]["prompts"][1] == "p3r5on holding a sign that says 'I LOVE PROMPTS!'"
    assert sources["lora.alpha"] == "config.process[0].network.linear_alpha"
    assert sources["data.datasets.0.caption_dropout"] == "config.process[0].datasets[0].caption_dropout_rate"
    assert any(note.startswith("config.process[0].device: ") for note in conv.notes)
    # Read as `difftrain-dist train` reads it (ai-toolkit's float resolver: `lr: 1e-4` is a float).
    native = load_recipe(job, ON_THIS_MACHINE + ["train.max_steps=2"])
    assert native.train.lr == 1e-4 and native.data.datasets[0].caption_ext == ".txt"
    assert "note: config.process[0].device: one GPU per worker" in caplog.text


def test_recipe_convert_prints_a_recipe_that_loads_as_the_job_does(tmp_path, tiny_model, photos):
    job = flux_job(tmp_path, tiny_model("flux"), photos)
    proc = run_cli("recipe", "convert", str(job), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lora:\n  rank: 16  # ← config.process[0].network.linear\n" in proc.stdout
    assert "#   config.process[0].datasets[0].cache_latents_to_disk: latents are encoded" in proc.stdout
    (tmp_path / "native.yaml").write_text(proc.stdout)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert load_recipe(Path("native.yaml")).model_dump() == load_recipe(job).model_dump()
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("change, message", [
    (("linear_alpha: 16", "linear_alpa: 16"),
     "config.process[0].network.linear_alpa: unknown key; did you mean 'linear_alpha'?"),
    (('type: "lora"', 'type: "lokr"'), "config.process[0].network.type: 'lokr' networks are not trained here yet"),
    (("quantize: false", "quantize: true"), "config.process[0].model.quantize: true: quantized base models are not "
                                            "supported yet; set quantize: false"),
    (("noise_scheduler: \"flowmatch\"", "noise_scheduler: \"flowmatch\"\n        noise_offset: 0.1"),
     "config.process[0].train.noise_offset: 0.1: not supported yet; remove the key"),
])
def test_a_typo_or_an_unsupported_key_is_one_line_naming_its_path(tmp_path, tiny_model, photos, change, message):
    job = flux_job(tmp_path, tiny_model("flux"), photos, FLUX_JOB.replace(*change))
    with pytest.raises(RecipeError) as caught:
        load_recipe(job)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"cannot train ai-toolkit job {job} as it is:" and len(lines) == 2
    assert lines[1].strip().startswith(message)


def family_job(arch: str, model: Path, folder: Path, out: Path) -> dict:
    """A short job of `arch` in ai-toolkit's schema: rank 4, 2 steps, a save each step."""
    flow = arch in ("sd3", "flux")
    return {"job": "extension", "config": {"name": f"aitk_{arch}", "process": [{
        "type": "sd_trainer", "training_folder": str(out), "device": "cuda:0", "trigger_word": "sks",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4 if flow else 2},
        "save": {"dtype": "bf16" if arch == "sdxl" else "float16", "save_every": 1, "max_step_saves_to_keep": 2},
        "datasets": [{"folder_path": str(folder), "caption_ext": "txt", "resolution": [64],
                      "caption_dropout_rate": 0.1, "shuffle_tokens": False, "cache_latents_to_disk": True}],
        "train": {"batch_size": 1, "steps": 2, "gradient_accumulation": 1, "train_unet": True,
                  "train_text_encoder": False, "gradient_checkpointing": arch != "sd15",
                  "noise_scheduler": "flowmatch" if flow else "ddpm", "dtype": "bf16",
                  "optimizer": {"sd15": "adamw", "sdxl": "prodigy", "sd3": "adamw8bit", "flux": "lion"}[arch],
                  "lr": 1e-3, "ema_config": {"use_ema": arch in ("sd3", "flux"), "ema_decay": 0.99},
                  **({"timestep_type": "sigmoid"} if flow else {"lr_scheduler": "constant"})},
        "model": {k: str(model) if v == "{model}" else v for k, v in FAMILY_MODEL[arch].items()},
        "sample": {"sampler": "flowmatch" if flow else "ddpm", "sample_every": 250, "width": 64, "height": 64,
                   "prompts": ["[trigger] in a garden"], "neg": "", "seed": 42, "walk_seed": True,
                   "guidance_scale": 4, "sample_steps": 2},
    }]}, "meta": {"name": "[name]", "version": "1.0"}}


FAMILIES = ("sd15", "sdxl", "sd3", "flux")


def _train_jobs(jobs: dict[str, Path], overrides: list[str]) -> None:
    """Each job as `difftrain-dist train` reads it, trained by this one rank (one start-up for all)."""
    for job in jobs.values():
        os.chdir(job.parent)
        recipe = load_recipe(job, overrides)
        build_datasets(recipe)
        assert train_worker(recipe, LocalSession()).state.step == recipe.train.max_steps


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_model, photos) -> dict[str, Path]:
    jobs = {}
    for arch in FAMILIES:
        folder = tmp_path_factory.mktemp(f"aitk-{arch}")
        jobs[arch] = folder / "job.yaml"
        jobs[arch].write_text(yaml.safe_dump(family_job(arch, tiny_model(arch), photos, folder / "output")))
    run_ranks(_train_jobs, 1, jobs, ON_THIS_MACHINE)
    return {arch: job.parent for arch, job in jobs.items()}


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_familys_job_trains_and_diffusers_loads_its_lora(arch, family_runs, tiny_model):
    lora_file = family_runs[arch] / "output" / f"aitk_{arch}" / "checkpoint_000000002" / "lora.safetensors"
    tensors, header = read_lora_file(lora_file)
    want = {"sdxl": torch.bfloat16}.get(arch, torch.float16)
    assert {t.dtype for key, t in tensors.items() if not key.endswith(".alpha")} == {want}
    assert header["ss_network_dim"] == "4"
    adapter = get_adapter(arch)
    pipe = adapter.pipeline_class.from_pretrained(str(tiny_model(arch)))
    pipe.load_lora_weights(str(lora_file))
    assert getattr(pipe.components[adapter.lora_prefix], "peft_config", None)


@pytest.mark.slow
def test_the_cli_trains_an_ai_toolkit_job_on_two_workers(tmp_path, tiny_model, photos):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(family_job("sd15", tiny_model("sd15"), photos, tmp_path / "output")))
    sets = [f"--set={s}" for s in [*ON_THIS_MACHINE, "distributed.num_workers=2"]]
    proc = run_cli("train", str(job), *sets, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "note: config.process[0].device" in proc.stderr
    lora_file = tmp_path / "output" / "aitk_sd15" / "aitk_sd15.safetensors"
    tensors, _ = read_lora_file(lora_file)
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert len(list((tmp_path / "output" / ".shards-cache").iterdir())) == 1  # built once, by the driver
