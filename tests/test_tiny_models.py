"""Tiny SDXL, SD3 and FLUX pipelines: they load in their diffusers pipelines, generate, and
their weights depend only on the seed.

Everything runs on CPU in fp32; each pipeline is built once per module (well under a second).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import T5TokenizerFast

from difftrain_dist.models import init_tiny
from difftrain_dist.models.tiny import TINY_ARCHS
from difftrain_dist.models.tiny.tokenizers import tiny_t5_tokenizer, tiny_t5_vocab

PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "flux-schnell": FluxPipeline,
}
# The denoiser's weights file and the text encoders' subfolders of each architecture.
DENOISER = {
    "sdxl": "unet/diffusion_pytorch_model.safetensors",
    "sd3": "transformer/diffusion_pytorch_model.safetensors",
    "flux": "transformer/diffusion_pytorch_model.safetensors",
    "flux-schnell": "transformer/diffusion_pytorch_model.safetensors",
}
TEXT_ENCODERS = {
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
    "flux-schnell": ("text_encoder", "text_encoder_2"),
}
T5_SUBFOLDER = {"sd3": "tokenizer_3", "flux": "tokenizer_2", "flux-schnell": "tokenizer_2"}
GUIDANCE = {"sdxl": 5.0, "sd3": 7.0, "flux": 3.5, "flux-schnell": 0.0}


@pytest.fixture
def tiny(tiny_model) -> Callable[[str], Path]:
    """`tiny(arch)`: the session's tiny pipeline of `arch` with seed 0 (conftest.py)."""
    return tiny_model


def _load(arch: str, path: Path, **kwargs) -> DiffusionPipeline:
    pipe = PIPELINES[arch].from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(arch: str, pipe: DiffusionPipeline) -> torch.Tensor:
    extra = {} if arch == "sdxl" else {"max_sequence_length": 32}  # T5 tokens
    result = pipe(
        ["a photo"],
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=GUIDANCE[arch],
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **extra,
    )
    return result.images


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", sorted(PIPELINES))
def test_tiny_pipeline_loads_and_generates_64px(arch: str, tiny: Callable[[str], Path]) -> None:
    path = tiny(arch)
    index = json.loads((path / "model_index.json").read_text("utf-8"))
    assert index["_class_name"] == PIPELINES[arch].__name__
    pipe = _load(arch, path)
    assert pipe.vae_scale_factor == 8
    image = _generate(arch, pipe)
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert (image >= 0).all() and (image <= 1).all()


def test_tiny_sd3_generates_without_t5(tiny: Callable[[str], Path]) -> None:
    pipe = _load("sd3", tiny("sd3"), text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    image = _generate("sd3", pipe)
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("arch", sorted(PIPELINES))
def test_tiny_weights_depend_only_on_seed(arch: str, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    again = init_tiny(arch, tmp_path / "again", seed=0)
    other = init_tiny(arch, tmp_path / "other", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    weight_files = [DENOISER[arch], "vae/diffusion_pytorch_model.safetensors"]
    weight_files += [f"{name}/model.safetensors" for name in TEXT_ENCODERS[arch]]
    for weights in weight_files:
        reference = _tensors(tiny(arch) / weights)
        assert all(tensor.dtype == torch.float32 for tensor in reference.values())
        _assert_same_tensors(_tensors(again / weights), reference)
        differ = _tensors(other / weights)
        assert any(not torch.equal(differ[key], reference[key]) for key in reference), weights


# ---------------------------------------------------------------- layouts


def test_tiny_sdxl_layout(tiny: Callable[[str], Path]) -> None:
    pipe = _load("sdxl", tiny("sdxl"))
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size == 96
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert "CrossAttnDownBlock2D" in unet.down_block_types
    assert pipe.vae.config.latent_channels == 4 and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.config.force_zeros_for_empty_prompt
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert te1.max_position_embeddings == te2.max_position_embeddings == 77
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.00085, 0.012)
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_tiny_sd3_layout(tiny: Callable[[str], Path]) -> None:
    pipe = _load("sd3", tiny("sd3"))
    transformer, vae = pipe.transformer.config, pipe.vae.config
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert transformer.pooled_projection_dim == te1.projection_dim + te2.projection_dim
    assert transformer.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert transformer.joint_attention_dim > te1.hidden_size + te2.hidden_size  # CLIP states are zero-padded
    assert (transformer.patch_size, transformer.in_channels) == (2, 16)
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert pipe.scheduler.config.shift == 3.0


@pytest.mark.parametrize("arch", ["flux", "flux-schnell"])
def test_tiny_flux_layout(arch: str, tiny: Callable[[str], Path]) -> None:
    pipe = _load(arch, tiny(arch))
    transformer, vae, scheduler = pipe.transformer.config, pipe.vae.config, pipe.scheduler.config
    assert transformer.in_channels == 4 * vae.latent_channels == 64
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    if arch == "flux":
        assert transformer.guidance_embeds
        assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
        assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
        assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)
    else:
        assert not transformer.guidance_embeds
        assert not scheduler.use_dynamic_shifting and scheduler.shift == 1.0


# ---------------------------------------------------------------- T5 tokenizer


@pytest.mark.parametrize("arch", sorted(T5_SUBFOLDER))
def test_tiny_t5_tokenizer_round_trips(arch: str, tiny: Callable[[str], Path]) -> None:
    vocab = tiny_t5_vocab()
    assert [piece for piece, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    tokenizer = T5TokenizerFast.from_pretrained(tiny(arch), subfolder=T5_SUBFOLDER[arch])
    assert len(tokenizer) == len(vocab)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    caption = "a photo of the Cat, with 2 dogs!"
    ids = tokenizer(caption).input_ids
    assert ids == tiny_t5_tokenizer()(caption).input_ids  # the saved files rebuild the same tokenizer
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["\u2581a", "\u2581photo", "\u2581of", "\u2581the"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    padded = tokenizer(caption, padding="max_length", max_length=40, truncation=True).input_ids
    assert len(padded) == 40 and padded[-1] == tokenizer.pad_token_id
    assert tokenizer("caf\u00e9").input_ids[-2] == tokenizer.unk_token_id  # outside the ASCII pieces


# ---------------------------------------------------------------- names


def test_an_unknown_tiny_variant_lists_the_known_ones() -> None:
    assert TINY_ARCHS == ("sd15", "sdxl", "sd3", "flux", "flux-schnell")
    with pytest.raises(ValueError, match="flux-schnell"):
        init_tiny("flux-pro", Path("/nonexistent"))
