"""Short 2-worker Ray runs for SDXL, SD3 and FLUX tiny models, each with a different set of
options, then the LoRA files and sample grids a user gets are checked with diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from difftrain_dist.models import get_adapter, read_lora_file

from .test_train_run import run_cli

pytestmark = pytest.mark.slow

RUNS = {
    # SDXL: text-encoder LoRA on both CLIPs, gradient checkpointing, samples every 3 steps.
    "sdxl": ({"lora": {"train_text_encoder": True}, "train": {"gradient_checkpointing": True}},
             ("unet", "text_encoder", "text_encoder_2"), "diffusers", ("unet.", "text_encoder.", "text_encoder_2.")),
    # SD3 without T5, logit-normal timesteps, ZeRO-3 (every rank renders the samples).
    "sd3": ({"model": {"use_t5": False}, "train": {"timestep_sampling": "logit_normal"},
             "distributed": {"zero_stage": 3}},
            ("transformer",), "diffusers", ("transformer.",)),
    # FLUX.1-dev layout: resolution-dependent shift, guidance input, ZeRO-1.
    "flux": ({"train": {"guidance_scale": 1.0}, "distributed": {"zero_stage": 1}},
             ("transformer",), "kohya", ("lora_transformer_",)),
}


def _merge(base: dict, extra: dict) -> dict:
    out = {**base}
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("arch", sorted(RUNS))
def test_two_worker_run_per_architecture(arch, tmp_path: Path, tiny_model, photo_shards) -> None:
    options, components, export_format, export_prefixes = RUNS[arch]
    model = tiny_model(arch)
    recipe = _merge({
        "run": {"name": arch, "seed": 3, "output_dir": "out", "storage_path": "runs"},
        "model": {"arch": arch, "path": str(model)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"shards": str(photo_shards), "resolution": 64, "micro_batch_size": 1},
        "train": {"max_steps": 3, "lr": 1e-2},
        "distributed": {"num_workers": 2, "zero_stage": 2},
        "checkpoint": {"every_n_steps": 3},
        "sample": {"every_n_steps": 3, "prompts": ["a photo of a cat", "a red door"], "num_inference_steps": 2},
    }, options)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = run_cli("train", "recipe.yaml", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    adapter = get_adapter(arch)
    lora_file = tmp_path / "out" / f"{arch}.safetensors"
    tensors, _ = read_lora_file(lora_file)
    if adapter.lora_file_format == "kohya":  # the layout every client of the family loads
        prefixes = {adapter.kohya_prefixes[component] + "_" for component in components}
        assert {prefix for prefix in prefixes if any(key.startswith(prefix) for key in tensors)} == prefixes
        assert all(key.startswith(tuple(prefixes)) for key in tensors)
    else:
        assert {key.partition(".")[0] for key in tensors} == set(components)
    assert all(torch.isfinite(v).all() for v in tensors.values())

    grid = tmp_path / "runs" / arch / "samples" / "step_000000003.png"
    with Image.open(grid) as image:
        assert image.size == (2 * 64, 64)

    exported = tmp_path / f"{arch}-{export_format}.safetensors"
    checkpoint = tmp_path / "runs" / arch / "checkpoint_000000003"
    proc = run_cli("export", str(checkpoint), "--output", str(exported), "--format", export_format, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported_tensors, _ = read_lora_file(exported)
    assert all(key.startswith(export_prefixes) for key in exported_tensors)

    for path in (lora_file, exported):
        pipe = adapter.pipeline_class.from_pretrained(str(model))
        pipe.load_lora_weights(str(path))
        loaded = {n for n, c in pipe.components.items() if getattr(c, "peft_config", None)}
        assert loaded == set(components), path
