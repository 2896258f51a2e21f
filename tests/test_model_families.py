"""Every architecture: adapter losses, and LoRA files that diffusers loads with the right strength.

For each architecture and file format, a LoRA with random weights (denoiser, plus the text
encoders where they can take one) is written with `save_lora_file`, loaded into a fresh diffusers
pipeline with `load_lora_weights`, and the pipeline's output is compared with a pipeline whose
weights were merged by hand, W' = W + (alpha / r) · B @ A, from the in-memory weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from difftrain_dist.models import (
    get_adapter,
    inject_lora,
    lora_config_dict,
    read_lora_file,
    save_lora_file,
    training_metadata,
)
from difftrain_dist.models.base import TEXT_ENCODER_LORA_TARGETS, DiffusionAdapter
from difftrain_dist.models.families import FAMILIES
from difftrain_dist.models.lora import LoraComponents
from difftrain_dist.models.objectives import FlowMatchingObjective, TimestepOptions, sample_unit_times

from .lora_checks import randomize_lora

RANK, ALPHA = 4, 8.0
CPU = torch.device("cpu")
TINY = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "flux-schnell": "flux"}
"""Tiny model name → architecture."""


def _adapter(tiny_model, name: str, **kwargs):
    return get_adapter(TINY[name]).from_pretrained(str(tiny_model(name)), dtype=torch.float32, device=CPU, **kwargs)


def _with_lora(adapter, *, text_encoders: bool) -> LoraComponents:
    configs = {adapter.lora_prefix: inject_lora(adapter.denoiser, rank=RANK, alpha=ALPHA,
                                                target_modules=adapter.default_lora_targets)}
    if text_encoders:
        for name, encoder in adapter.text_encoders.items():
            configs[name] = inject_lora(encoder, rank=RANK, alpha=ALPHA, target_modules=TEXT_ENCODER_LORA_TARGETS)
    module = LoraComponents(adapter.lora_prefix, {name: adapter.components[name] for name in configs})
    module.lora_configs = {name: lora_config_dict(config) for name, config in configs.items()}
    return module


def _render(pipe, arch: str) -> torch.Tensor:
    kwargs = {"max_sequence_length": 16} if arch in ("sd3", "flux") else {}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out = pipe(["a photo of a cat"], num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                   generator=generator, output_type="latent", **kwargs)
    return out.images


def test_each_family_record_matches_its_adapter() -> None:
    for family in FAMILIES.values():
        adapter = family.adapter()
        assert adapter.arch == family.name and adapter.default_lora_targets
        assert adapter.pipeline_class.__name__ == family.pipeline_class_name
        ddpm = adapter.load_objective.__func__ is DiffusionAdapter.load_objective.__func__
        assert ddpm == (family.objective == "ddpm")
        assert bool(adapter.text_encoder_names) == family.text_encoder_lora
        assert ("text_encoder_3" in adapter.optional_components) == family.optional_t5
        assert family.lora_file_format == "diffusers" or family.lora_file_format == "kohya" and adapter.kohya_prefixes


CASES = [(name, fmt) for name in ("sd15", "sdxl", "sd3", "flux") for fmt in ("diffusers", "kohya")]


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_lora_file_loads_into_diffusers_as_hand_merged(tiny_model, tmp_path: Path, name: str, fmt: str) -> None:
    arch = TINY[name]
    adapter = _adapter(tiny_model, name)
    module = _with_lora(adapter, text_encoders=bool(adapter.text_encoder_names))
    randomize_lora(module, seed=3, scale=0.3)
    state = module.lora_state_dict()
    metadata = training_metadata(arch=arch, base_model="tiny", rank=RANK, alpha=ALPHA, steps=1, resolution=64, seed=0)
    path = tmp_path / f"{name}-{fmt}.safetensors"
    if fmt == "kohya" and not adapter.kohya_prefixes:
        with pytest.raises(ValueError, match="no kohya key layout"):
            save_lora_file(path, state, lora_configs=module.lora_configs, fmt=fmt, metadata=metadata)
        return
    save_lora_file(path, state, lora_configs=module.lora_configs, fmt=fmt,
                   kohya_prefixes=adapter.kohya_prefixes, metadata=metadata)
    tensors, header = read_lora_file(path)
    assert header["modelspec.architecture"].endswith("/lora")
    # kohya files carry alpha as `.alpha`; diffusers-layout files fold alpha / r into lora_B.
    assert header["ss_network_alpha"] == ("8.0" if fmt == "kohya" else "4.0")
    if fmt == "kohya":
        prefixes = tuple(p + "_" for p in adapter.kohya_prefixes.values())
        assert all(key.startswith(prefixes) for key in tensors)
        assert all(v.item() == ALPHA for k, v in tensors.items() if k.endswith(".alpha"))
        assert len(tensors) == len(state) // 2 * 3
    components = {key.partition(".")[0] for key in state}
    assert components == set(module.lora_configs)
    # Text encoders are named with CLIP's `text_model.` level, whatever transformers' own layout,
    # the names ComfyUI, A1111 and kohya map.
    for component in adapter.text_encoders:
        if fmt == "diffusers":
            expected = f"{component}.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
        else:
            stem = "text_model_encoder_layers_0_self_attn_q_proj"
            expected = f"{adapter.kohya_prefixes[component]}_{stem}.lora_down.weight"
        assert expected in tensors

    # float64 pipelines, so rounding stays far below the LoRA's effect; a wrong strength (alpha)
    # or a component left out would differ by a fraction of the effect itself.
    pipeline_class, model = adapter.pipeline_class, str(tiny_model(name))
    base = _render(pipeline_class.from_pretrained(model, dtype=torch.float64), arch)
    loaded_pipe = pipeline_class.from_pretrained(model, dtype=torch.float64)
    loaded_pipe.load_lora_weights(str(path))
    loaded = _render(loaded_pipe, arch)
    merged_pipe = pipeline_class.from_pretrained(model, dtype=torch.float64)
    _merge_by_hand(merged_pipe, state, scale=ALPHA / RANK)
    merged = _render(merged_pipe, arch)
    effect = (loaded - base).abs().max()
    assert effect > 1e-2
    assert (loaded - merged).abs().max() <= 1e-3 * effect


@torch.no_grad()
def _merge_by_hand(pipe, state: dict[str, torch.Tensor], *, scale: float) -> None:
    for key, lora_a in state.items():
        if key.endswith(".lora_A.weight"):
            component, _, path = key.removesuffix(".lora_A.weight").partition(".")
            lora_b = state[key.replace(".lora_A.", ".lora_B.")]
            weight = getattr(pipe, component).get_submodule(path).weight
            weight += scale * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype))


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux", "flux-schnell"])
def test_training_loss_trains_only_lora_and_is_reproducible(tiny_model, name: str) -> None:
    adapter = _adapter(tiny_model, name, timesteps=TimestepOptions("logit_normal"))
    module = _with_lora(adapter, text_encoders=bool(adapter.text_encoder_names))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_images(pixels)
    channels = 4 if TINY[name] in ("sd15", "sdxl") else 16
    assert latents.shape == (2, channels, 8, 8) and latents.dtype == torch.float32

    def loss() -> torch.Tensor:
        conditioning = adapter.encode_prompts(["a cat", "a dog"])
        return adapter.training_loss(module, latents, conditioning, torch.Generator().manual_seed(5))

    first = loss()
    assert first.dtype == torch.float32 and first.ndim == 0 and torch.isfinite(first)
    first.backward()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    if adapter.text_encoder_names:  # the text encoders' LoRA gets gradients through the prompts
        assert any(n.startswith("text_encoder") for n in with_grad)
    assert torch.equal(loss().detach(), first.detach())


def test_sdxl_size_conditioning_changes_the_prediction(tiny_model) -> None:
    adapter = _adapter(tiny_model, "sdxl")
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = adapter.encode_prompts(["a cat"])
    timesteps = torch.tensor([500])
    with torch.no_grad():
        plain = adapter.predict(adapter.denoiser, noisy, timesteps, conditioning)
        same = adapter.predict(adapter.denoiser, noisy, timesteps, {
            **conditioning, "original_sizes": torch.tensor([[64, 64]]), "crops_top_left": torch.tensor([[0, 0]])})
        # The sizes travel from the reader's batch into the conditioning.
        batch = {"captions": ["a cat"], "original_sizes": torch.tensor([[300, 200]]),
                 "crops_top_left": torch.tensor([[40, 0]])}
        cropped = adapter.predict(adapter.denoiser, noisy, timesteps, adapter.batch_conditioning(batch))
    torch.testing.assert_close(plain, same)
    assert (plain - cropped).abs().max() > 1e-4


def test_flux_dev_uses_guidance_and_schnell_has_none(tiny_model) -> None:
    dev = _adapter(tiny_model, "flux", guidance_scale=1.0)
    assert dev.denoiser.config.guidance_embeds
    assert not _adapter(tiny_model, "flux-schnell").denoiser.config.guidance_embeds
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = dev.encode_prompts(["a cat"])
    with torch.no_grad():
        low = dev.predict(dev.denoiser, noisy, torch.tensor([0.5]), conditioning)
        dev.guidance_scale = 4.0
        high = dev.predict(dev.denoiser, noisy, torch.tensor([0.5]), conditioning)
    assert low.shape == noisy.shape and (low - high).abs().max() > 1e-5


def test_sd3_trains_without_t5(tiny_model) -> None:
    adapter = _adapter(tiny_model, "sd3", load_optional=False)
    assert adapter.components["text_encoder_3"] is None
    conditioning = adapter.encode_prompts(["a cat"])
    with_t5 = _adapter(tiny_model, "sd3").encode_prompts(["a cat"])
    assert conditioning["encoder_hidden_states"].shape[-1] == with_t5["encoder_hidden_states"].shape[-1]
    assert conditioning["encoder_hidden_states"][:, 77:].abs().max() == 0  # T5's part is zeros
    latents = torch.randn(1, 16, 8, 8)
    assert torch.isfinite(adapter.training_loss(adapter.denoiser, latents, conditioning, torch.Generator()))


def test_prediction_type_is_refused_for_flow_models(tiny_model) -> None:
    with pytest.raises(ValueError, match="prediction_type.*flow-matching"):
        _adapter(tiny_model, "sd3", prediction_type="v_prediction")


def test_flow_shift_static_dynamic_and_override() -> None:
    sd3 = FlowMatchingObjective({"shift": 3.0}, TimestepOptions())
    assert sd3.shift_for(16) == sd3.shift_for(4096) == 3.0
    dev_config = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}
    dev = FlowMatchingObjective(dev_config, TimestepOptions())
    assert dev.shift_for(256) == pytest.approx(math.exp(0.5))
    assert dev.shift_for(4096) == pytest.approx(math.exp(1.15))  # 1024 px FLUX: 64 x 64 latent tokens
    assert FlowMatchingObjective(dev_config, TimestepOptions(flow_shift=2.0)).shift_for(4096) == 2.0
    latents, noise = torch.zeros(4, 16, 2, 2), torch.ones(4, 16, 2, 2)
    batch = sd3.noise(latents, noise, torch.Generator().manual_seed(0), image_seq_len=1)
    sigma = batch.timesteps.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy_latents, sigma.expand_as(latents))  # (1 - σ)·0 + σ·1
    torch.testing.assert_close(batch.target, noise - latents)


def test_logit_normal_and_sigmoid_sampling() -> None:
    generator = torch.Generator().manual_seed(0)
    uniform = sample_unit_times(TimestepOptions("uniform"), 20000, generator, CPU)
    logit = sample_unit_times(TimestepOptions("logit_normal", logit_mean=1.0), 20000, generator, CPU)
    sigmoid = sample_unit_times(TimestepOptions("sigmoid", logit_std=0.5), 20000, generator, CPU)
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    assert abs(torch.logit(logit).mean() - 1.0) < 0.03  # sigmoid(N(1, 1))
    assert abs(torch.logit(sigmoid).std() - 0.5) < 0.02
    with pytest.raises(ValueError, match="timestep_sampling"):
        TimestepOptions("cosmap")


def test_architecture_is_read_from_the_model(tiny_model, tmp_path: Path) -> None:
    from difftrain_dist.models.lora_formats import check_lora_fits
    from difftrain_dist.models.registry import arch_of_model, checked_arch

    for name, arch in TINY.items():
        assert arch_of_model(str(tiny_model(name))) == arch
    assert checked_arch(str(tiny_model("sdxl")), None) == "sdxl"
    with pytest.raises(ValueError, match="--arch sd15: the model .* is sdxl"):
        checked_arch(str(tiny_model("sdxl")), "sd15")
    with pytest.raises(ValueError, match="model_index.json"):
        arch_of_model(str(tmp_path))
    adapter = _adapter(tiny_model, "sd15")
    module = _with_lora(adapter, text_encoders=False)
    path = save_lora_file(tmp_path / "x.safetensors", module.lora_state_dict(), lora_configs=module.lora_configs,
                          metadata=training_metadata(arch="sd15", base_model="m", rank=RANK, alpha=ALPHA,
                                                     steps=1, resolution=64, seed=0))
    check_lora_fits(path, "sd15")
    with pytest.raises(ValueError, match="trained for stable-diffusion-v1, not for this flux model"):
        check_lora_fits(path, "flux")
