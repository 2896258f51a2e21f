"""Half-precision runs fail loudly or not at all: the VAE encodes SDXL images in float32, small
gradients survive float16 autocast under every ZeRO stage, a non-finite loss stops the run, and a
v-prediction LoRA samples and is labelled as v-prediction."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from difftrain_dist.config import recipe_from_dict
from difftrain_dist.distrib.checkpoint import list_checkpoints
from difftrain_dist.distrib.engine import deepspeed_config
from difftrain_dist.distrib.export import lora_file_metadata
from difftrain_dist.distrib.step import NonFiniteLossError, check_finite_loss
from difftrain_dist.models import get_adapter, read_lora_file
from difftrain_dist.models.lora_formats import lora_prediction_type

from .procs import free_port, torchrun

CPU = torch.device("cpu")


def test_float16_sdxl_vae_encodes_in_float32(tiny_model) -> None:
    """SDXL's VAE declares force_upcast (NaN latents in float16): the images are encoded by a
    float32 copy read from disk, so the latents equal a float32 model's exactly."""
    path = str(tiny_model("sdxl"))
    half = get_adapter("sdxl").from_pretrained(path, dtype=torch.float16, device=CPU)
    full = get_adapter("sdxl").from_pretrained(path, dtype=torch.float32, device=CPU)
    assert half.vae.config.force_upcast and half.vae.dtype == torch.float16  # the pipeline's VAE
    assert half.denoiser.dtype == torch.float16
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(half.latent_parameters(pixels), full.latent_parameters(pixels))
    generator = torch.Generator().manual_seed(1)
    latents = half.encode_images(pixels, generator=generator)
    assert latents.dtype == torch.float32
    assert torch.equal(latents, full.encode_images(pixels, generator=torch.Generator().manual_seed(1)))


_SCALER_CHECK = textwrap.dedent("""
    import json, os, sys, torch
    import deepspeed, torch.distributed as dist
    from difftrain_dist.config import Recipe
    from difftrain_dist.distrib.engine import deepspeed_config
    dist.init_process_group("gloo")
    recipe = Recipe.model_validate_json(sys.argv[1], context={"check_paths": False})
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1, bias=False))
        model[0].requires_grad_(False)
        torch.nn.init.zeros_(model[1].weight)  # SGD's update is then -lr * gradient exactly
        return model

    reference = build()
    (1e-9 * reference(x).mean()).backward()  # float32: gradients of about 1e-10
    out = {"float32": (-reference[1].weight.grad).flatten().tolist()}
    for stage in (0, 1, 2, 3):
        recipe.distributed.zero_stage = stage
        model = build()
        trained = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trained, lr=1.0),
                                          config=deepspeed_config(recipe))
        engine.backward(1e-9 * engine(x).float().mean())
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module[1].parameters())):
            out[stage] = engine.module[1].weight.detach().float().flatten().tolist()
    print("RESULT" + json.dumps(out), flush=True)
    os._exit(0)  # gloo's threads may abort the interpreter's own exit after ZeRO-3
""")


def test_float16_autocast_keeps_small_gradients_at_every_zero_stage(tmp_path) -> None:
    """Gradients of about 1e-10 underflow to zero in float16 without loss scaling. With the
    recipe's DeepSpeed config (torch_autocast float16) every ZeRO stage scales the loss and
    unscales the gradients before the step (DeepSpeed 0.19: a GradScaler in the engine for stage
    0 and in the ZeRO optimizers for 1-3), so SGD's update equals the float32 one."""
    import json

    recipe = recipe_from_dict({
        "run": {"name": "fp16"}, "train": {"max_steps": 1},
        "model": {"arch": "sd15", "path": "unused", "dtype": "float16"},
        "data": {"shards": "unused", "resolution": 64},
        "distributed": {"use_gpu": True},
    }, check_paths=False)
    assert deepspeed_config(recipe)["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", _SCALER_CHECK, recipe.model_dump_json()], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = {key: torch.tensor(value) for key, value in json.loads(proc.stdout.split("RESULT", 1)[1]).items()}
    expected = result.pop("float32")
    assert 1e-12 < expected.abs().max() < 1e-8
    assert set(result) == {"0", "1", "2", "3"}
    for stage, update in result.items():
        assert update.abs().min() > 0, f"ZeRO-{stage}: the gradients underflowed to zero"
        torch.testing.assert_close(update, expected, rtol=1e-2, atol=0, msg=f"ZeRO-{stage}")


def test_non_finite_loss_stops_the_step() -> None:
    check_finite_loss(0.25, 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteLossError, match="step 7: the loss is .*not finite.*newest checkpoint"):
            check_finite_loss(bad, 7)


@pytest.mark.slow
def test_run_that_diverges_stops_with_the_step_and_keeps_finite_checkpoints(tmp_path, tiny_sd15_model,
                                                                          photo_shards) -> None:
    """lr 1e30 makes step 1's update enormous and step 2's loss infinite: the run ends with an
    error naming the step; the checkpoint of step 1 is valid and finite, none of step 2 exists."""
    recipe = {
        "run": {"name": "nan", "seed": 1, "output_dir": "out", "storage_path": "runs"},
        "model": {"arch": "sd15", "path": str(tiny_sd15_model)},
        "lora": {"rank": 4, "alpha": 4},
        "data": {"shards": str(photo_shards), "resolution": 64, "micro_batch_size": 2},
        "train": {"max_steps": 4, "lr": 1e30},
        "distributed": {"num_workers": 1, "zero_stage": 1},
        "checkpoint": {"every_n_steps": 1},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(torchrun(1, "worker", "r.yaml"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "NonFiniteLossError: step 2: the loss is" in proc.stderr, proc.stderr[-4000:]
    checkpoints = list_checkpoints(tmp_path / "runs" / "nan")
    assert [(c.step, c.valid) for c in checkpoints] == [(1, True)]
    tensors, _ = read_lora_file(checkpoints[0].path / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert not (tmp_path / "out" / "nan.safetensors").exists()


def test_v_prediction_samples_with_a_v_scheduler_and_says_so_in_the_header(tiny_model, tmp_path) -> None:
    path = str(tiny_model("sd15"))
    adapter = get_adapter("sd15").from_pretrained(path, dtype=torch.float32, device=CPU, prediction_type="v_prediction")
    assert adapter.noise_scheduler.config.prediction_type == "v_prediction"
    pipe = adapter.pipeline()
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    default = get_adapter("sd15").from_pretrained(path, dtype=torch.float32, device=CPU)
    assert type(pipe.scheduler) is type(default.pipeline().scheduler)
    assert default.pipeline().scheduler.config.prediction_type == "epsilon"

    recipe = {"model": {"arch": "sd15", "path": path, "prediction_type": "v_prediction"},
              "data": {"resolution": 64}, "run": {"seed": 0, "name": "v"}}
    header = lora_file_metadata(recipe, {"r": 4, "lora_alpha": 4}, step=10)
    assert header["modelspec.prediction_type"] == "v" and header["ss_v_parameterization"] == "True"
    plain = lora_file_metadata({**recipe, "model": {"arch": "sd15", "path": path}}, {"r": 4, "lora_alpha": 4}, 10)
    assert "modelspec.prediction_type" not in plain

    from difftrain_dist.models import save_lora_file

    state = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
             "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)}
    lora = save_lora_file(tmp_path / "v.safetensors", state, lora_configs={"unet": {"r": 4, "lora_alpha": 4}},
                          metadata=header)
    assert lora_prediction_type(lora) == "v_prediction"
    assert lora_prediction_type(save_lora_file(tmp_path / "e.safetensors", state,
                                               lora_configs={"unet": {"r": 4, "lora_alpha": 4}})) is None
