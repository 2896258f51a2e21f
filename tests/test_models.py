"""Models tier: tiny SD1.5 pipeline, SD1.5 adapter, LoRA injection and LoRA files.

Everything runs on CPU in fp32 against a tiny random pipeline built once per module.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig

from difftrain_dist.models import (
    DiffusionAdapter,
    get_adapter,
    init_tiny,
    inject_lora,
    lora_config_dict,
    lora_state_dict,
    read_lora_file,
    save_lora_file,
    strip_adapter_name,
    training_metadata,
)
from difftrain_dist.models.tiny.tokenizers import tiny_clip_vocab

from .lora_checks import hand_merged_unet, lora_scale, outputs_without_and_with_lora, randomize_lora, unet_output

RANK, ALPHA = 4, 8.0  # alpha != rank so the alpha / rank scaling is exercised
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# fp32 on CPU: LoRA-as-adapter vs hand-merged weights differ only by summation order.
ATOL = 1e-5
FIXED_DATE = "2026-01-01T00:00:00+00:00"


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sd15_model: Path) -> Path:
    """The session's tiny SD1.5 pipeline (built once, in conftest.py)."""
    return tiny_sd15_model


def _load_adapter(path: Path, **kwargs) -> DiffusionAdapter:
    return get_adapter("sd15").from_pretrained(
        str(path), dtype=torch.float32, device=torch.device("cpu"), **kwargs
    )


# ---------------------------------------------------------------- tiny model


def test_init_tiny_pipeline_generates_64px_image(tiny_sd15: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.safety_checker is None
    result = pipe(
        "a photo of the cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = result.images
    assert image.shape == (1, 64, 64, 3)
    assert (image >= 0).all() and (image <= 1).all()


def test_init_tiny_is_deterministic_per_seed(tiny_sd15: Path, tmp_path: Path) -> None:
    again = init_tiny("sd15", tmp_path / "again", seed=0)
    other = init_tiny("sd15", tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (tiny_sd15 / weights).read_bytes()
    assert (other / weights).read_bytes() != (tiny_sd15 / weights).read_bytes()


def test_tiny_tokenizer_round_trips_a_caption(tiny_sd15: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    assert len(vocab) == 2 * 256 + len(merges) + 2
    tokenizer_dir = tiny_sd15 / "tokenizer"
    assert json.loads((tokenizer_dir / "vocab.json").read_text("utf-8")) == vocab
    assert (tokenizer_dir / "merges.txt").read_text("utf-8").startswith("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    caption = "a photo of the cat with 2 dogs"  # lower case, no punctuation: CLIP decodes
    # every word end as a space, so "cat," would come back as "cat ,"
    ids = tokenizer(caption).input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert vocab["the</w>"] in ids  # merges applied: t+h, th+e</w>
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert tokenizer.model_max_length == 77


def test_init_tiny_unknown_arch_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sd15"):
        init_tiny("sd9", tmp_path)


# ---------------------------------------------------------------- adapter


def test_adapter_loads_frozen_and_encodes(tiny_sd15: Path) -> None:
    adapter = _load_adapter(tiny_sd15)
    assert adapter.arch == "sd15" and adapter.lora_prefix == "unet"
    assert adapter.pipeline_class is StableDiffusionPipeline
    for module in (adapter.denoiser, adapter.vae, adapter.components["text_encoder"]):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    conditioning = adapter.encode_prompts(["a cat", "the dog"])
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 32)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = adapter.encode_images(pixels)
    assert mean.shape == (2, 4, 8, 8) and mean.dtype == torch.float32
    sample_a = adapter.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    sample_b = adapter.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_a, sample_b) and not torch.equal(sample_a, mean)
    with pytest.raises(ValueError, match="pixel_values"):
        adapter.encode_images(torch.zeros(1, 3, 60, 64))


def test_adapter_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no_such_model"):
        _load_adapter(missing)
    (missing / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="text_encoder"):
        _load_adapter(missing)


def _loss_inputs(adapter: DiffusionAdapter) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return latents, adapter.encode_prompts(["a cat", "a dog"])


def test_training_loss_grads_only_on_lora(tiny_sd15: Path) -> None:
    adapter = _load_adapter(tiny_sd15)
    inject_lora(adapter.denoiser, rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    latents, conditioning = _loss_inputs(adapter)
    named = dict(adapter.denoiser.named_parameters())
    lora_names = {name for name in named if ".lora_" in name}
    assert lora_names and {n for n, p in named.items() if p.requires_grad} == lora_names

    randomize_lora(adapter.denoiser, seed=3)
    loss = adapter.training_loss(
        adapter.denoiser, latents, conditioning, torch.Generator().manual_seed(0)
    )
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, param in named.items():
        if name in lora_names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_training_loss_reproducible_per_generator(tiny_sd15: Path) -> None:
    adapter = _load_adapter(tiny_sd15)
    latents, conditioning = _loss_inputs(adapter)

    def loss(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return adapter.training_loss(adapter.denoiser, latents, conditioning, generator)

    assert torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(0), loss(1))
    v_adapter = _load_adapter(tiny_sd15, prediction_type="v_prediction")
    assert v_adapter.noise_scheduler.config.prediction_type == "v_prediction"
    v_loss = v_adapter.training_loss(
        v_adapter.denoiser, latents, conditioning, torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(v_loss) and not torch.equal(v_loss, loss(0))


def test_bf16_base_with_fp32_lora_trains(tiny_sd15: Path) -> None:
    adapter = _load_adapter_bf16(tiny_sd15)
    for module in (adapter.denoiser, adapter.vae, adapter.components["text_encoder"]):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    inject_lora(adapter.denoiser, rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    trainable = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    latents, conditioning = _loss_inputs(adapter)
    loss = adapter.training_loss(
        adapter.denoiser, latents, conditioning, torch.Generator().manual_seed(0)
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in trainable)


def _load_adapter_bf16(path: Path) -> DiffusionAdapter:
    return get_adapter("sd15").from_pretrained(
        str(path), dtype=torch.bfloat16, device=torch.device("cpu")
    )


def test_registry_unknown_arch() -> None:
    assert get_adapter("sd15").arch == "sd15"
    with pytest.raises(ValueError, match="nope.*sd15"):
        get_adapter("nope")


def test_model_code_imports_no_ray_or_deepspeed() -> None:
    import difftrain_dist.models.base  # noqa: F401

    source_dir = Path(difftrain_dist.models.base.__file__).parent
    for source in source_dir.glob("*.py"):
        text = source.read_text("utf-8")
        assert "import ray" not in text and "import deepspeed" not in text, source


# ---------------------------------------------------------------- LoRA


def test_inject_lora_unknown_target_names_it(tiny_sd15: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with pytest.raises(ValueError, match="to_nothing"):
        inject_lora(unet, rank=RANK, alpha=ALPHA, target_modules=["to_q", "to_nothing"])


def test_lora_config_dict_rebuilds_config() -> None:
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.1)
    as_json = json.loads(json.dumps(lora_config_dict(config)))
    assert as_json["target_modules"] == sorted(TARGETS)
    rebuilt = LoraConfig(**as_json)
    assert (rebuilt.r, rebuilt.lora_alpha, rebuilt.lora_dropout) == (RANK, ALPHA, 0.1)
    assert rebuilt.target_modules == set(TARGETS)


def test_strip_adapter_name_matches_peft_state_dict(tiny_sd15: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    inject_lora(unet, rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    raw = {name: p for name, p in unet.named_parameters() if ".lora_" in name}
    assert all(".default." in name for name in raw)  # what zero_to_fp32 gives
    stripped = strip_adapter_name(raw)
    peft_state = lora_state_dict(unet)
    assert set(stripped) == set(peft_state)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft_state
    for key, value in peft_state.items():
        assert value.dtype == torch.float32 and value.is_contiguous()
        assert torch.equal(value, stripped[key])
    with pytest.raises(ValueError, match="strip_adapter_name"):
        save_lora_file(Path("unused.safetensors"), {f"unet.{k}": v for k, v in raw.items()},
                       lora_configs={"unet": {"r": 4, "lora_alpha": 4}})


@pytest.fixture(scope="module")
def lora_files(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    config = inject_lora(unet, rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    randomize_lora(unet, seed=11)
    state = {f"unet.{key}": value for key, value in lora_state_dict(unet).items()}
    out = tmp_path_factory.mktemp("lora")
    metadata = training_metadata(
        arch="sd15", base_model=str(tiny_sd15), rank=RANK, alpha=ALPHA, steps=10,
        resolution=64, seed=0, date=datetime.datetime.fromisoformat(FIXED_DATE),
    )
    files = {}
    for fmt in ("diffusers", "kohya"):
        files[fmt] = save_lora_file(
            out / f"{fmt}.safetensors", state, lora_configs={"unet": lora_config_dict(config)},
            fmt=fmt, kohya_prefixes={"unet": "lora_unet"}, metadata=metadata,
        )
    return {"state": state, "configs": {"unet": lora_config_dict(config)}, **files}


def _pipeline_with_lora(model: Path, lora_file: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(lora_file))
    return pipe


def test_diffusers_lora_file_equals_hand_merged_weights(tiny_sd15: Path, lora_files: dict) -> None:
    path = lora_files["diffusers"]
    tensors, header = read_lora_file(path)
    state = lora_files["state"]
    assert set(tensors) == set(state)
    assert header["format"] == "pt"
    # alpha / r is folded into lora_B and the header says alpha = r: loaders that read alpha from
    # the header and loaders that never do (scale 1) apply the same trained strength.
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "4.0"
    assert header["difftrain.trained_lora_alpha"] == "8.0"
    assert lora_scale(header) == 1.0
    for key, value in tensors.items():
        expected = state[key] * (ALPHA / RANK) if ".lora_B." in key else state[key]
        torch.testing.assert_close(value, expected, atol=0, rtol=1e-7)
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["modelspec.date"] == FIXED_DATE

    base_out, lora_out = outputs_without_and_with_lora(tiny_sd15, path)
    assert (lora_out - base_out).abs().max() > 1e-3

    merged, n_merged = hand_merged_unet(tiny_sd15, path)
    assert n_merged == len(tensors) // 2 > 0
    torch.testing.assert_close(lora_out, unet_output(merged), atol=ATOL, rtol=0)


def test_kohya_lora_file_keys_and_same_output(tiny_sd15: Path, lora_files: dict) -> None:
    tensors, header = read_lora_file(lora_files["kohya"])
    state = lora_files["state"]
    assert header["ss_network_alpha"] == "8.0" and header["ss_network_dim"] == "4"
    assert len(tensors) == len(state) // 2 * 3
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    peft_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(tensors[f"{stem}.lora_down.weight"], state[f"{peft_key}.lora_A.weight"])
    assert torch.equal(tensors[f"{stem}.lora_up.weight"], state[f"{peft_key}.lora_B.weight"])
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in tensors
    for key, value in tensors.items():
        assert key.startswith("lora_unet_"), key
        assert key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")), key
        if key.endswith(".alpha"):
            assert value.ndim == 0 and value.item() == ALPHA
        elif key.endswith(".lora_down.weight"):
            assert value.shape[0] == RANK

    kohya_out = unet_output(_pipeline_with_lora(tiny_sd15, lora_files["kohya"]).unet)
    diffusers_out = unet_output(_pipeline_with_lora(tiny_sd15, lora_files["diffusers"]).unet)
    torch.testing.assert_close(kohya_out, diffusers_out, atol=ATOL, rtol=0)


def test_save_lora_file_rejects_bad_input(tmp_path: Path, lora_files: dict) -> None:
    state = lora_files["state"]
    configs = {"unet": {"r": RANK, "lora_alpha": ALPHA}}
    with pytest.raises(ValueError, match="fmt"):
        save_lora_file(tmp_path / "x.safetensors", state, lora_configs=configs, fmt="ckpt")
    with pytest.raises(ValueError, match="ss_steps"):
        save_lora_file(tmp_path / "x.safetensors", state, lora_configs=configs, metadata={"ss_steps": 10})
    with pytest.raises(ValueError, match="text_encoder"):
        save_lora_file(tmp_path / "x.safetensors", state, lora_configs={"text_encoder": configs["unet"]})
    with pytest.raises(ValueError, match="kohya key layout.*unet"):
        save_lora_file(tmp_path / "x.safetensors", state, lora_configs=configs, fmt="kohya", kohya_prefixes={})
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="nope.safetensors"):
        read_lora_file(tmp_path / "nope.safetensors")


def test_lora_file_mode_follows_the_umask(tmp_path: Path, lora_files: dict) -> None:
    old = os.umask(0o022)
    try:
        path = save_lora_file(tmp_path / "x.safetensors", lora_files["state"],
                              lora_configs={"unet": {"r": RANK, "lora_alpha": ALPHA}})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_float16_file_loads_in_diffusers_like_its_hand_merge(tiny_sd15: Path, lora_files: dict, tmp_path) -> None:
    path = save_lora_file(tmp_path / "half.safetensors", lora_files["state"], lora_configs=lora_files["configs"],
                          fmt="kohya",
                          kohya_prefixes={"unet": "lora_unet"}, dtype=torch.float16)
    base_out, lora_out = outputs_without_and_with_lora(tiny_sd15, path)
    assert (lora_out - base_out).abs().max() > 1e-3
    merged, n_merged = hand_merged_unet(tiny_sd15, path)
    assert n_merged > 0
    torch.testing.assert_close(lora_out, unet_output(merged), atol=ATOL, rtol=0)
