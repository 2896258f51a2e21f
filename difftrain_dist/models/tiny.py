"""Tiny random-weight pipelines for tests and the demo, built locally (no downloads).

Each architecture has one builder in `_TINY_BUILDERS`; `init_tiny` looks it up, builds the
pipeline with a fixed seed and writes it in diffusers format, so that every later
`from_pretrained(out_dir, subfolder=...)` takes the same code path as a real checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # CLIP/GPT-2 byte table

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# A few merges so that the BPE path is exercised; each pair's product is added to the vocab.
_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("o", "n</w>"),
    ("i", "n"),
    ("e", "r</w>"),
)


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """Build a tiny byte-level BPE vocabulary in CLIP's layout.

    Returns `(vocab, merges)`: vocab maps the 256 byte symbols, then the same symbols with
    `"</w>"`, then one token per merge, then `<|startoftext|>` and `<|endoftext|>` to ids
    0..len-1 (the order of OpenAI CLIP's `bpe_simple_vocab_16e6`); merges are `"a b"` lines.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += [a + b for a, b in _TINY_MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: idx for idx, token in enumerate(tokens)}
    merges = [f"{a} {b}" for a, b in _TINY_MERGES]
    return vocab, merges


def write_tiny_clip_tokenizer_files(folder: Path) -> Path:
    """Write `vocab.json` and `merges.txt` (with the `#version: 0.2` header) into `folder`.

    Format: Hugging Face CLIPTokenizer's vocab/merges files. Returns `folder`.
    """
    vocab, merges = tiny_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _tiny_vae() -> AutoencoderKL:
    # 4 blocks → 3 downsamplings → latents at 1/8 of the pixel size, as in real SD.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )


def _tiny_clip_text_model(vocab: dict[str, int]) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    return CLIPTextModel(config)


def _build_sd15(seed: int, work_dir: Path) -> DiffusionPipeline:
    """Tiny SD1.5-architecture pipeline: UNet (32, 64), 4-block VAE (scale 8), 2-layer CLIP."""
    tokenizer_dir = write_tiny_clip_tokenizer_files(work_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(seed)
    unet = _tiny_unet()
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = _tiny_clip_text_model(tokenizer.get_vocab())
    # SD1.5's training schedule (CompVis v1-inference.yaml: linear_start/linear_end, 1000 steps).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


_TINY_BUILDERS: dict[str, Callable[[int, Path], DiffusionPipeline]] = {
    "sd15": _build_sd15,
}


def init_tiny(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random pipeline of architecture `arch` and save it to `out_dir`.

    The folder is a diffusers `save_pretrained` layout (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/; safetensors weights, fp32) that
    `DiffusionPipeline.from_pretrained(out_dir)` loads. Weights depend only on `seed`; the
    caller's global torch RNG state is left untouched.

    For "sd15" the tokenizer is a byte-level BPE CLIP tokenizer made here (see
    `tiny_clip_vocab`), and the VAE has 4 blocks so that latents are 1/8 of the pixel size.

    Raises ValueError if `arch` is not one of `sorted(_TINY_BUILDERS)`.
    Returns `out_dir`.
    """
    if arch not in _TINY_BUILDERS:
        raise ValueError(f"arch: unknown architecture {arch!r}; known: {sorted(_TINY_BUILDERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        pipeline = _TINY_BUILDERS[arch](seed, out_dir)
        pipeline.save_pretrained(out_dir)
    return out_dir
