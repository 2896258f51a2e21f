"""Short 2-rank runs for SDXL, SD3 and FLUX tiny models, each with a different set of options, in
the in-process gloo tier (one pair of ranks trains all three); then the LoRA files, sample grids
and `export` a user gets are checked with diffusers. (`difftrain-dist train` on Ray is proven
end to end by test_train_run.py and test_aitoolkit.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from difftrain_dist.config import recipe_from_dict
from difftrain_dist.distrib.driver.finish import finish_run
from difftrain_dist.distrib.loop import train_worker
from difftrain_dist.distrib.session import LocalSession
from difftrain_dist.models import get_adapter, read_lora_file

from .gloo import run_ranks
from .procs import cli_here

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


def _train_and_finish(raws: list[dict]) -> None:
    """On each rank: train every recipe, then rank 0 writes its LoRA file (as a run's driver does)."""
    for raw in raws:
        recipe = recipe_from_dict(raw)
        result = train_worker(recipe, LocalSession())
        dist.barrier()
        if dist.get_rank() == 0:
            finish_run(recipe, result.checkpoint, stopped_early=result.stopped_early)
        dist.barrier()


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_model, photo_shards) -> dict[str, Path]:
    """Folder of each architecture's run (runs/ARCH, out/ARCH.safetensors), trained on 2 ranks."""
    homes, raws = {}, []
    for arch, (options, *_) in sorted(RUNS.items()):
        homes[arch] = home = tmp_path_factory.mktemp(f"family-{arch}")
        raws.append(_merge({
            "run": {"name": arch, "seed": 3, "output_dir": str(home / "out"), "storage_path": str(home / "runs")},
            "model": {"arch": arch, "path": str(tiny_model(arch))},
            "lora": {"rank": 4, "alpha": 8},
            "data": {"shards": str(photo_shards), "resolution": 64, "micro_batch_size": 1},
            "train": {"max_steps": 3, "lr": 1e-2},
            "distributed": {"num_workers": 2, "zero_stage": 2},
            "checkpoint": {"every_n_steps": 3},
            "sample": {"every_n_steps": 3, "prompts": ["a photo of a cat", "a red door"], "num_inference_steps": 2},
        }, options))
    run_ranks(_train_and_finish, 2, raws)
    return homes


@pytest.mark.parametrize("arch", sorted(RUNS))
def test_two_worker_run_per_architecture(arch, family_runs, tiny_model) -> None:
    _, components, export_format, export_prefixes = RUNS[arch]
    model, tmp_path = tiny_model(arch), family_runs[arch]
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
    proc = cli_here("export", str(checkpoint), "--output", str(exported), "--format", export_format)
    assert proc.exit_code == 0, proc.output[-3000:]
    exported_tensors, _ = read_lora_file(exported)
    assert all(key.startswith(export_prefixes) for key in exported_tensors)

    for path in (lora_file, exported):
        pipe = adapter.pipeline_class.from_pretrained(str(model))
        pipe.load_lora_weights(str(path))
        loaded = {n for n, c in pipe.components.items() if getattr(c, "peft_config", None)}
        assert loaded == set(components), path
