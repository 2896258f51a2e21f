"""What ComfyUI and A1111/Forge require of a LoRA file, checked on the files training writes.

The rules below are read from the loaders' own code and written down here, so that CI checks
them without those programs:

- ComfyUI: Comfy-Org/ComfyUI at a125cd84 (2025-10-12). `comfy/lora.py` `model_lora_keys_unet`
  maps, for SD1.x/SDXL UNets, `lora_unet_<diffusers weight path, dots as _>` and peft-style
  `unet.<path>` only in the old `….processor.to_q` form (`to_out.0` → `processor.to_out`); for
  SD3 and FLUX `transformer.<path>` and `lora_transformer_<path, dots as _>`.
  `model_lora_keys_clip` maps `lora_te_`/`lora_te1_` (CLIP-L), `lora_te2_` (SDXL's CLIP-G) and
  `text_encoder.` / `text_encoder_2.` + `text_model.encoder.layers.<b>.<module>` for the modules
  of its `LORA_CLIP_MAP` (self_attn q/k/v/out_proj, mlp fc1/fc2). `load_lora` reads `<stem>.alpha`;
  `comfy/weight_adapter/lora.py` applies alpha / r with it and 1.0 without it, never a header.
  Keys it does not map are logged "lora key not loaded" and dropped.
- Forge: lllyasviel/stable-diffusion-webui-forge at dfdcbab6, `packages_3rdparty/
  comfyui_lora_collection/lora.py`: the same key map and alpha rule for SD1.x, SDXL and FLUX.
- A1111: AUTOMATIC1111/stable-diffusion-webui, `extensions-builtin/Lora/networks.py`
  `convert_diffusers_name_to_compvis` at 873edba4: `lora_unet_down_blocks_<i>_attentions_<j>_…` →
  `diffusion_model_input_blocks_<1 + 3i + j>_1_…`, `mid_block_attentions_0` → `middle_block_1`,
  `up_blocks_<i>_attentions_<j>` → `output_blocks_<3i + j>_1`; `lora_te_text_model_…` (SD1),
  `lora_te1_text_model` → `0_transformer_text_model`, `lora_te2_…_self_attn_<q|k|v>_proj` → the
  OpenCLIP `1_model_transformer_resblocks_<n>_attn` in-projection (all of q, k, v and out_proj
  needed). `network.py` scales by alpha / r when `.alpha` is present, else 1.0.

A run of ComfyUI's own `comfy.lora` on these files (tiny models built with ComfyUI's model
classes, weights patched by its `calculate_weight`) found every key mapped and the patched
weights equal to W + (alpha / r)·B·A for the default file of every family (README, "LoRA files").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from difftrain_dist.models import get_adapter, inject_lora, lora_config_dict, read_lora_file, save_lora_file
from difftrain_dist.models.base import TEXT_ENCODER_LORA_TARGETS
from difftrain_dist.models.lora import LoraComponents, lora_state_dict

from .lora_checks import randomize_lora

RANK, ALPHA = 4, 2.0  # scale 0.5: a loader that applies 1.0 would land at twice the trained strength
CPU = torch.device("cpu")
COMFYUI_CLIP_MAP = {  # comfy/lora.py LORA_CLIP_MAP
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
COMFYUI_CLIP_PREFIXES = {  # component → (kohya stem prefix, diffusers prefix) model_lora_keys_clip maps
    "sd15": {"text_encoder": ("lora_te_", "text_encoder.")},
    "sdxl": {"text_encoder": ("lora_te1_", "text_encoder."), "text_encoder_2": ("lora_te2_", "text_encoder_2.")},
}
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_B.weight", ".lora_A.weight", ".alpha")


def _trained_lora(tiny_model, arch: str) -> tuple[object, dict[str, torch.Tensor], dict]:
    """A tiny `arch` adapter with a random LoRA on the denoiser and every text encoder that can
    take one: (adapter, peft state dict, lora configs)."""
    adapter = get_adapter(arch).from_pretrained(str(tiny_model(arch)), dtype=torch.float32, device=CPU)
    configs = {adapter.lora_prefix: inject_lora(adapter.denoiser, rank=RANK, alpha=ALPHA,
                                                target_modules=adapter.default_lora_targets)}
    for name, encoder in adapter.text_encoders.items():
        configs[name] = inject_lora(encoder, rank=RANK, alpha=ALPHA, target_modules=TEXT_ENCODER_LORA_TARGETS)
    module = LoraComponents(adapter.lora_prefix, {name: adapter.components[name] for name in configs})
    randomize_lora(module, seed=5, scale=0.3)
    return adapter, module.lora_state_dict(), {name: lora_config_dict(c) for name, c in configs.items()}


def _write(path: Path, adapter, state, configs, fmt: str | None = None) -> Path:
    return save_lora_file(path, state, lora_configs=configs, fmt=fmt or adapter.lora_file_format,
                          kohya_prefixes=adapter.kohya_prefixes)


def _weight_paths(module: torch.nn.Module) -> list[str]:
    """Paths of the submodules that own a `weight` (the `.weight` keys a state dict has)."""
    return [name for name, child in module.named_modules() if name and isinstance(getattr(child, "weight", None),
                                                                               torch.Tensor)]


def comfyui_key_map(arch: str, adapter) -> dict[str, str]:
    """ComfyUI's map from LoRA key stem to our `component.path` (see the module docstring)."""
    key_map: dict[str, str] = {}
    denoiser = adapter.lora_prefix
    for path in _weight_paths(adapter.denoiser):
        path = path.replace(".base_layer", "")
        if arch in ("sd15", "sdxl"):
            key_map[f"lora_unet_{path.replace('.', '_')}"] = f"{denoiser}.{path}"
            old = path.replace(".to_", ".processor.to_")
            old = old[:-2] if old.endswith(".to_out.0") else old
            key_map[old] = key_map[f"unet.{old}"] = f"{denoiser}.{path}"
        else:
            target = f"{denoiser}.{path}"
            key_map[f"transformer.{path}"] = key_map[f"lora_transformer_{path.replace('.', '_')}"] = target
    for component, (kohya, diffusers) in COMFYUI_CLIP_PREFIXES.get(arch, {}).items():
        layers = adapter.text_encoders[component].config.num_hidden_layers
        for b in range(layers):
            for module, kohya_name in COMFYUI_CLIP_MAP.items():
                target = f"{component}.text_model.encoder.layers.{b}.{module}"
                key_map[f"{kohya}text_model_encoder_layers_{b}_{kohya_name}"] = target
                key_map[f"{diffusers}text_model.encoder.layers.{b}.{module}"] = target
    return key_map


def loader_deltas(tensors: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict, list[str]]:
    """What a loader following ComfyUI's `load_lora` applies: `{target: scale · up @ down}` with
    scale `.alpha` / r, or 1.0 without `.alpha`; and the keys it leaves unloaded."""
    deltas, loaded = {}, set()
    for stem, target in key_map.items():
        for up_name, down_name in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if stem + up_name in tensors:
                up, down = tensors[stem + up_name].double(), tensors[stem + down_name].double()
                alpha = tensors.get(stem + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                deltas[target] = scale * (up @ down)
                loaded |= {stem + up_name, stem + down_name} | ({stem + ".alpha"} if alpha is not None else set())
    return deltas, sorted(set(tensors) - loaded)


def trained_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{component.path: (alpha / r) · B @ A}` as peft applies the LoRA in training."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            path = key.removesuffix(".lora_A.weight")
            if path.split(".", 1)[1].startswith(("encoder.", "embeddings.")):  # flattened CLIPTextModel
                path = path.replace(".", ".text_model.", 1)
            out[path] = (ALPHA / RANK) * (state[key.replace(".lora_A.", ".lora_B.")].double() @ down.double())
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_comfyui_maps_every_key_of_the_default_file_at_the_trained_strength(tiny_model, tmp_path, arch) -> None:
    adapter, state, configs = _trained_lora(tiny_model, arch)
    tensors, _ = read_lora_file(_write(tmp_path / "lora.safetensors", adapter, state, configs))
    assert all(key.endswith(LORA_SUFFIXES) for key in tensors)
    deltas, unloaded = loader_deltas(tensors, comfyui_key_map(arch, adapter))
    assert unloaded == []  # ComfyUI would log each as "lora key not loaded"
    expected = trained_deltas(state)
    assert set(deltas) == set(expected) and any(k.startswith("text_encoder") for k in expected) == (
        arch in ("sd15", "sdxl"))
    for target, delta in expected.items():
        torch.testing.assert_close(deltas[target], delta, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_comfyui_drops_every_peft_style_unet_key(tiny_model, tmp_path, arch) -> None:
    """Why the SD1.x/SDXL default is the kohya layout: ComfyUI maps no `unet.…attn1.to_q` key."""
    adapter, state, configs = _trained_lora(tiny_model, arch)
    tensors, _ = read_lora_file(_write(tmp_path / "lora.safetensors", adapter, state, configs, fmt="diffusers"))
    _, unloaded = loader_deltas(tensors, comfyui_key_map(arch, adapter))
    unet_keys = [key for key in tensors if key.startswith("unet.")]
    assert unet_keys and set(unet_keys) <= set(unloaded)
    assert adapter.lora_file_format == "kohya"


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_diffusers_layout_holds_the_scale_in_its_weights(tiny_model, tmp_path, arch) -> None:
    """Where the default layout has no `.alpha`, loaders that ignore the header (scale 1.0) and
    diffusers (alpha from `lora_adapter_metadata`) must agree."""
    import json

    adapter, state, configs = _trained_lora(tiny_model, arch)
    tensors, header = read_lora_file(_write(tmp_path / "lora.safetensors", adapter, state, configs))
    assert not any(key.endswith(".alpha") for key in tensors)
    saved = json.loads(header["lora_adapter_metadata"])
    assert saved[f"{adapter.lora_prefix}.lora_alpha"] == saved[f"{adapter.lora_prefix}.r"] == RANK
    assert header["difftrain.trained_lora_alpha"] == str(ALPHA)


def a1111_compvis_name(stem: str) -> str | None:
    """The compvis module name A1111's `load_network` looks up for a kohya stem (attention and
    text-encoder rules of `convert_diffusers_name_to_compvis` and its SDXL fallbacks)."""
    rules = [
        (r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)",
         lambda i, j, rest: f"diffusion_model_input_blocks_{1 + int(i) * 3 + int(j)}_1_{rest}"),
        (r"lora_unet_mid_block_attentions_(\d+)_(.+)", lambda _, rest: f"diffusion_model_middle_block_1_{rest}"),
        (r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)",
         lambda i, j, rest: f"diffusion_model_output_blocks_{int(i) * 3 + int(j)}_1_{rest}"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda n, rest: f"transformer_text_model_encoder_layers_{n}_{rest}"),
        (r"lora_te1_text_model_(.+)", lambda rest: f"0_transformer_text_model_{rest}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj",
         lambda n, which: f"1_model_transformer_resblocks_{n}_attn" + ("_out_proj" if which == "out" else "")),
    ]
    for pattern, name in rules:
        match = re.fullmatch(pattern, stem)
        if match:
            return name(*match.groups())
    return None


# Attention-carrying blocks of the original (ldm / sgm) UNets, as A1111 names their modules.
SD15_ATTENTION_BLOCKS = {f"input_blocks_{n}_1" for n in (1, 2, 4, 5, 7, 8)} | {"middle_block_1"} | {
    f"output_blocks_{n}_1" for n in range(3, 12)}
SDXL_ATTENTION_BLOCKS = {f"input_blocks_{n}_1" for n in (4, 5, 7, 8)} | {"middle_block_1"} | {
    f"output_blocks_{n}_1" for n in range(6)}


def _unet_with_layout(arch: str) -> UNet2DConditionModel:
    """A UNet with SD1.5's or SDXL's block layout (levels, 2 layers a block, where attention sits)
    at tiny widths: the layout A1111's block arithmetic assumes."""
    if arch == "sd15":
        down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
        return UNet2DConditionModel(block_out_channels=(8, 8, 16, 16), down_block_types=down, up_block_types=up,
                                    layers_per_block=2, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                    sample_size=8)
    return UNet2DConditionModel(block_out_channels=(8, 8, 16), layers_per_block=2, norm_num_groups=4, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 1, 2), cross_attention_dim=8, attention_head_dim=2)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a1111_maps_every_unet_key_to_an_attention_block_with_alpha(tmp_path, arch) -> None:
    unet = _unet_with_layout(arch)
    adapter = get_adapter(arch)
    config = inject_lora(unet, rank=RANK, alpha=ALPHA, target_modules=adapter.default_lora_targets)
    state = {f"unet.{key}": value for key, value in lora_state_dict(unet).items()}
    path = save_lora_file(tmp_path / "lora.safetensors", state, lora_configs={"unet": lora_config_dict(config)},
                          fmt=adapter.lora_file_format, kohya_prefixes=adapter.kohya_prefixes)
    tensors, _ = read_lora_file(path)
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert len(stems) == len(state) // 2
    blocks = SD15_ATTENTION_BLOCKS if arch == "sd15" else SDXL_ATTENTION_BLOCKS
    seen = set()
    for stem in stems:
        name = a1111_compvis_name(stem)
        assert name is not None, stem
        block = re.match(r"diffusion_model_((?:input|output)_blocks_\d+_1|middle_block_1)_transformer_blocks_\d+_"
                         r"attn[12]_to_(q|k|v|out_0)$", name)
        assert block is not None and block.group(1) in blocks, (stem, name)
        seen.add(block.group(1))
        assert tensors[f"{stem}.alpha"].item() == ALPHA  # A1111 scales by alpha / r, 1.0 without it
    assert seen == blocks


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a1111_maps_every_text_encoder_key(tiny_model, tmp_path, arch) -> None:
    adapter, state, configs = _trained_lora(tiny_model, arch)
    tensors, _ = read_lora_file(_write(tmp_path / "lora.safetensors", adapter, state, configs))
    te_stems = {key.rsplit(".", 2)[0] for key in tensors if key.startswith("lora_te") and key.endswith("up.weight")}
    assert te_stems
    for stem in te_stems:
        name = a1111_compvis_name(stem)
        assert name is not None and f"{stem}.alpha" in tensors, stem
    if arch == "sdxl":  # the OpenCLIP in-projection is patched only when q, k, v and out_proj all come
        layers = {re.search(r"layers_(\d+)_", s).group(1) for s in te_stems if s.startswith("lora_te2_")}
        for n in layers:
            for which in ("q", "k", "v", "out"):
                assert f"lora_te2_text_model_encoder_layers_{n}_self_attn_{which}_proj" in te_stems


@pytest.mark.parametrize("arch, dtype", [("sd15", torch.float16), ("sdxl", torch.bfloat16), ("flux", torch.float16)])
def test_half_precision_files_keep_every_key_and_say_their_dtype(tiny_model, tmp_path, arch, dtype) -> None:
    """`checkpoint.lora_dtype` (ai-toolkit's `save.dtype`): the same keys and strength at half precision."""
    adapter, state, configs = _trained_lora(tiny_model, arch)
    path = save_lora_file(tmp_path / "half.safetensors", state, lora_configs=configs, fmt=adapter.lora_file_format,
                          kohya_prefixes=adapter.kohya_prefixes, dtype=dtype)
    tensors, header = read_lora_file(path)
    assert header["difftrain.lora_dtype"] == str(dtype).removeprefix("torch.")
    assert {t.dtype for key, t in tensors.items() if not key.endswith(".alpha")} == {dtype}
    deltas, unloaded = loader_deltas(tensors, comfyui_key_map(arch, adapter))
    assert unloaded == []
    expected = trained_deltas(state)
    assert set(deltas) == set(expected)
    resolution = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # the dtype's relative rounding step
    for target, delta in expected.items():
        torch.testing.assert_close(deltas[target], delta, atol=4 * resolution * float(delta.abs().max()), rtol=0)
