"""GPU check: our worker step against a plain eager PyTorch LoRA loop, SDXL and FLUX.1 layouts.

`python -m benchmarks.gpu_check` on a machine with one CUDA GPU builds each denoiser with the
published SDXL-base / FLUX.1-dev configuration and random weights (bf16, nothing downloaded),
puts rank-16 LoRA on the attention projections, and trains at 1024 px on precomputed-shaped
inputs (random VAE posteriors and text embeddings of the real shapes) twice in one process:

- ours: `setup_trainee` (LoRA injection, DeepSpeed engine, ZeRO-1 by default, bf16 torch_autocast) and, per
  step, `train_step` + `reduce_step_stats`, the body of the worker loop;
- plain: the same model and LoRA (peft) with `torch.autocast(bf16)`, `torch.optim.AdamW`, grad
  clipping at 1.0 and `loss.item()` per step, written out with diffusers calls only.

It prints samples/s and peak CUDA memory of each, and their ratios, and writes
build/bench/gpu_check.json. `--scale tiny` runs the same code on the tiny random models at 64 px
(CPU, fp32, gloo): a dry run that needs no GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, FluxPipeline, FluxTransformer2DModel, UNet2DConditionModel

from benchmarks.common import single_rank_group, write_result
from difftrain_dist.config import load_recipe
from difftrain_dist.distrib.loop import frozen_setup_objects
from difftrain_dist.distrib.step import reduce_step_stats, train_step
from difftrain_dist.distrib.trainee import setup_trainee
from difftrain_dist.models import get_adapter, init_tiny, inject_lora
from difftrain_dist.models.objectives import DDPMObjective, FlowMatchingObjective, TimestepOptions

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json and vae/config.json.
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_VAE = {
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
SDXL_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
# black-forest-labs/FLUX.1-dev transformer/, vae/ and scheduler/ configs.
FLUX_TRANSFORMER = {
    "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
    "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {**SDXL_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}
TEXT_TOKENS = {"sdxl": 77, "flux": 512}
BATCH = {"sdxl": 4, "flux": 1}
REFERENCE = {"sdxl": 6.57, "flux": 1.83}
"""samples/s of an earlier eager bf16 measurement on one H200 (LoRA r16 on attention)."""


class Setting:
    """Device, dtype, resolution and model configs of one scale ("full" on GPU, "tiny" on CPU)."""

    def __init__(self, scale: str, work: Path):
        self.scale = scale
        self.gpu = scale == "full"
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        self.resolution = 1024 if self.gpu else 64
        self.work = work

    def configs(self, arch: str) -> tuple[dict, dict, dict]:
        """(denoiser config, VAE config, scheduler config) for `arch`."""
        if self.gpu:
            full = {"sdxl": (SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER), "flux": (FLUX_TRANSFORMER, FLUX_VAE, FLUX_SCHEDULER)}
            return full[arch]
        model = self.model_path(arch)
        denoiser = _denoiser_class(arch).load_config(model, subfolder=get_adapter(arch).lora_prefix)
        scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        return denoiser, AutoencoderKL.load_config(model, subfolder="vae"), scheduler

    def model_path(self, arch: str) -> Path:
        """A diffusers folder for the recipe: the tiny model, or a configs-only stand-in."""
        folder = self.work / f"model-{arch}"
        if not (folder / "model_index.json").is_file():
            if self.gpu:
                folder.mkdir(parents=True)
                (folder / "model_index.json").write_text(json.dumps({"_class_name": "random-weights"}))
            else:
                init_tiny(arch, folder, seed=0)
        return folder


def _denoiser_class(arch: str):
    return UNet2DConditionModel if arch == "sdxl" else FluxTransformer2DModel


def build_models(arch: str, setting: Setting) -> tuple[torch.nn.Module, AutoencoderKL, dict]:
    """Random-weight denoiser (frozen, eval) and VAE on the device in the setting's dtype."""
    denoiser_config, vae_config, scheduler = setting.configs(arch)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(setting.dtype)  # built in bf16 directly: no fp32 copy of 12B weights
    try:
        with torch.device(setting.device):
            denoiser = _denoiser_class(arch).from_config(denoiser_config)
            vae = AutoencoderKL.from_config(vae_config)
    finally:
        torch.set_default_dtype(default_dtype)
    for module in (denoiser, vae):
        module.requires_grad_(False).eval()
    return denoiser, vae, scheduler


def fake_batch(arch: str, denoiser: torch.nn.Module, setting: Setting) -> dict[str, Any]:
    """One micro-batch shaped as the precomputed shards give it (random values)."""
    batch, side = BATCH[arch], setting.resolution // 8
    generator = torch.Generator().manual_seed(1)
    channels = denoiser.config.in_channels if arch == "sdxl" else denoiser.config.in_channels // 4
    mean = torch.randn(batch, channels, side, side, generator=generator)
    parameters = torch.cat([mean, torch.full_like(mean, -8.0)], dim=1)  # log-variance: small noise
    config = denoiser.config
    if arch == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        conditioning = {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS[arch], config.cross_attention_dim),
                        "text_embeds": torch.randn(batch, pooled)}
    else:
        conditioning = {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS[arch], config.joint_attention_dim),
                        "pooled_projections": torch.randn(batch, config.pooled_projection_dim)}
    sizes = torch.tensor([[setting.resolution, setting.resolution]] * batch)
    return {"latent_parameters": parameters, "conditioning": conditioning, "captions": ["a photo"] * batch,
            "original_sizes": sizes, "crops_top_left": torch.zeros_like(sizes)}


def run_ours(arch: str, setting: Setting, steps: int, warmup: int, zero_stage: int = 1) -> dict[str, float]:
    denoiser, vae, scheduler = build_models(arch, setting)
    shards = setting.work / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "index.json").write_text(json.dumps({"resolutions": [setting.resolution], "shards": []}))
    recipe_file = setting.work / f"{arch}.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "run": {"name": f"gpu-check-{arch}", "storage_path": str(setting.work / "runs")},
        "model": {"arch": arch, "path": str(setting.model_path(arch)),
                  "dtype": "bfloat16" if setting.gpu else "float32"},
        "lora": {"rank": 16, "alpha": 16},
        "data": {"shards": str(shards), "micro_batch_size": BATCH[arch]},
        "train": {"max_steps": steps + warmup, "lr": 1e-4},
        "distributed": {"use_gpu": setting.gpu, "zero_stage": zero_stage},
    }))
    recipe = load_recipe(recipe_file)
    adapter_class = get_adapter(arch)
    objective = (DDPMObjective(DDPMScheduler.from_config(scheduler), TimestepOptions()) if arch == "sdxl"
                 else FlowMatchingObjective(scheduler, TimestepOptions()))
    adapter = adapter_class(path=str(recipe.model.path), components={adapter_class.lora_prefix: denoiser, "vae": vae},
                            objective=objective, device=setting.device)
    trainee = setup_trainee(recipe, 0, adapter=adapter)
    trainee.precomputed_conditioning = True
    batch = fake_batch(arch, denoiser, setting)

    def step() -> None:
        reduce_step_stats(train_step(trainee, iter([batch]), 1), False, trainee.device)

    with frozen_setup_objects():  # as the worker's step loop runs
        return _measure(step, setting, steps, warmup, BATCH[arch])  # the models go with this frame


def run_plain(arch: str, setting: Setting, steps: int, warmup: int) -> dict[str, float]:
    denoiser, _, scheduler = build_models(arch, setting)
    inject_lora(denoiser, rank=16, alpha=16, target_modules=get_adapter(arch).default_lora_targets)
    denoiser.train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = fake_batch(arch, denoiser, setting)
    device, dtype = setting.device, setting.dtype
    mean = batch["latent_parameters"].chunk(2, dim=1)[0].to(device)
    conditioning = {k: v.to(device, dtype) for k, v in batch["conditioning"].items()}
    generator = torch.Generator(device).manual_seed(0)
    ddpm = DDPMScheduler.from_config(scheduler) if arch == "sdxl" else None
    bsz = mean.shape[0]

    def step() -> None:
        noise = torch.randn(mean.shape, generator=generator, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=setting.gpu):
            if arch == "sdxl":
                timesteps = torch.randint(0, 1000, (bsz,), generator=generator, device=device)
                noisy = ddpm.add_noise(mean, noise, timesteps)
                time_ids = torch.tensor([[setting.resolution, setting.resolution, 0, 0,
                                          setting.resolution, setting.resolution]] * bsz, device=device, dtype=dtype)
                added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids}
                prediction = denoiser(noisy.to(dtype), timesteps, added_cond_kwargs=added,
                                      encoder_hidden_states=conditioning["encoder_hidden_states"]).sample
                target = noise
            else:
                sigmas = torch.sigmoid(torch.randn(bsz, generator=generator, device=device))
                sigma = sigmas.view(-1, 1, 1, 1)
                noisy = (1 - sigma) * mean + sigma * noise
                _, c, h, w = noisy.shape
                packed = FluxPipeline._pack_latents(noisy.to(dtype), bsz, c, h, w)
                image_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, dtype)
                text_ids = torch.zeros(TEXT_TOKENS[arch], 3, device=device, dtype=dtype)
                guidance = torch.ones(bsz, device=device) if denoiser.config.guidance_embeds else None
                out = denoiser(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance,
                               pooled_projections=conditioning["pooled_projections"],
                               encoder_hidden_states=conditioning["encoder_hidden_states"],
                               txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
                prediction = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
                target = noise - mean
            loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return _measure(step, setting, steps, warmup, BATCH[arch])


PROFILE_STEPS = 0
"""Steps to run under torch.profiler after the timed ones (`--profile`); 0: none."""


def _profile(step, setting: Setting) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setting.gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        if setting.gpu:
            torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_device_time_total" if setting.gpu else "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60), flush=True)


def _measure(step, setting: Setting, steps: int, warmup: int, batch: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    if setting.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if setting.gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if setting.gpu else float("nan")
    if PROFILE_STEPS:
        _profile(step, setting)
    return {"samples_per_s": steps * batch / seconds, "step_s": seconds / steps, "peak_gib": peak}


def _free(setting: Setting) -> None:
    gc.collect()
    if setting.gpu:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--archs", default="sdxl,flux")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stages", default="1", help="ZeRO stages to run ours at, first one reported, e.g. 1,2")
    parser.add_argument("--profile", type=int, default=0, help="also profile this many steps of each loop")
    args = parser.parse_args(argv)
    global PROFILE_STEPS
    PROFILE_STEPS = args.profile
    if args.scale == "full" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --scale full needs a CUDA GPU; use --scale tiny for a CPU dry run")
    results: dict[str, Any] = {"scale": args.scale}
    with tempfile.TemporaryDirectory() as tmp, single_rank_group("nccl" if args.scale == "full" else "gloo"):
        setting = Setting(args.scale, Path(tmp))
        if setting.gpu:
            results["device"] = torch.cuda.get_device_name(0)
            torch.backends.cuda.enable_cudnn_sdp(False)  # as setup_trainee does on GPU, for both loops
        for arch in args.archs.split(","):
            plain = run_plain(arch, setting, args.steps, args.warmup)
            _free(setting)
            stages = [int(stage) for stage in args.zero_stages.split(",")]
            variants = {}
            for stage in stages:
                print(f"-- ours, ZeRO-{stage}", flush=True)
                variants[stage] = run_ours(arch, setting, args.steps, args.warmup, zero_stage=stage)
                _free(setting)
            ours = variants[stages[0]]
            results[arch] = {"batch": BATCH[arch], "resolution": setting.resolution, "plain": plain, "ours": ours,
                             "ours_by_zero_stage": variants,
                             "speed_ratio": ours["samples_per_s"] / plain["samples_per_s"],
                             "memory_ratio": ours["peak_gib"] / plain["peak_gib"],
                             "reference_samples_per_s": REFERENCE[arch]}
            print(f"gpu_check {arch} b{BATCH[arch]} {setting.resolution}px: "
                  f"ours {ours['samples_per_s']:.2f} samples/s, "
                  f"peak {ours['peak_gib']:.1f} GiB | plain {plain['samples_per_s']:.2f} samples/s, "
                  f"peak {plain['peak_gib']:.1f} GiB | speed ratio {results[arch]['speed_ratio']:.3f}, "
                  f"memory ratio {results[arch]['memory_ratio']:.3f} (earlier eager reference "
                  f"{REFERENCE[arch]} samples/s)", flush=True)
            for stage, variant in variants.items():
                print(f"gpu_check {arch} ZeRO-{stage}: {variant['samples_per_s']:.2f} samples/s, "
                      f"peak {variant['peak_gib']:.1f} GiB", flush=True)
    write_result("gpu_check", results)
    return results


if __name__ == "__main__":
    main()
