"""The keys of an ai-toolkit job, section by section, and what each one becomes here.

Names and defaults are ai-toolkit's (`toolkit/config_modules.py`); a key missing from these
tables is unknown to ai-toolkit too, so it is reported as a typo. "custom" keys are read by the
converter's own code (aitoolkit.py); the others have one generic outcome:

- map: copied to the native field `target` (`{i}`: the dataset's index);
- note: accepted, with `text` saying why it changes nothing here;
- refuse: accepted while its value is harmless (None, empty, or one of `ok`: ai-toolkit's
  default, which does nothing), else refused with `text` saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Key:
    kind: Literal["custom", "map", "note", "refuse"]
    text: str = ""
    target: str = ""
    ok: tuple[Any, ...] = ()

    def harmless(self, value: Any) -> bool:
        """Whether `value` asks for nothing beyond what runs here (empty lists and mappings never do)."""
        if isinstance(value, (list, dict)):
            return not value
        return value is None or any(type(value) is type(ok) and value == ok for ok in self.ok)


CUSTOM = Key("custom")


def _note(text: str) -> Key:
    return Key("note", text)


def _map(target: str) -> Key:
    return Key("map", target=target)


def _refuse(text: str, *ok: Any) -> Key:
    """Refused unless the value is None, empty, or one of `ok` (default: False, 0, 0.0, "")."""
    return Key("refuse", text, ok=ok or (False, 0, 0.0, ""))


LATER = "not supported yet; remove the key to train without it"
MODEL_FILES = "extra model files are not loaded here; give one diffusers model in name_or_path"
NO_MEANING = "means nothing here"
OTHER = "is not a family trained here (families: models/families.py)"

PROCESS = {
    "type": CUSTOM, "name": _note("the run is named after config.name"), "training_folder": CUSTOM,
    "device": _note("one GPU per worker when it names cuda (distributed.use_gpu), its index is not used"),
    "trigger_word": CUSTOM, "training_seed": CUSTOM,
    "performance_log_every": _note(NO_MEANING + "; the progress line reports step time"),
    "log_dir": _note("TensorBoard files are written under the run folder's tensorboard/"),
    "sqlite_db_path": _note("ai-toolkit's UI only"),
    "network": CUSTOM, "save": CUSTOM, "datasets": CUSTOM, "train": CUSTOM, "model": CUSTOM, "sample": CUSTOM,
    "logging": CUSTOM, "first_sample": _note("no sample is rendered before the first step"),
    "embedding": _refuse("textual inversion is not trained here"), "adapter": _refuse(LATER),
    "decorator": _refuse(LATER), "guidance": _refuse(LATER), "slider": _refuse(LATER), "do_lorm": _refuse(LATER),
    "lorm_extract_mode": _note(NO_MEANING), "lorm_extract_mode_param": _note(NO_MEANING),
    "torch_profiler": _note(NO_MEANING),
}

NETWORK = {
    "type": CUSTOM, "linear": CUSTOM, "rank": CUSTOM, "linear_alpha": CUSTOM, "alpha": CUSTOM, "dropout": CUSTOM,
    "conv": _refuse("LoRA on convolutions (LoCon) is " + LATER), "conv_alpha": _note("used only with conv"),
    "network_kwargs": _refuse("layer filters are not read here; set lora.target_modules after converting"),
    "transformer_only": _note("LoRA goes on the denoiser's attention layers (lora.target_modules)"),
    "lokr_full_rank": _note("used only by type: lokr"), "lokr_factor": _note("used only by type: lokr"),
    "old_lokr_format": _note("used only by type: lokr"), "split_multistage_loras": _note(NO_MEANING),
    "layer_offloading": _refuse(LATER), "pretrained_lora_path": _refuse("starting from a LoRA file is " + LATER),
    "all_layers": _refuse(LATER), "lorm": _refuse(LATER),
}

SAVE = {
    "dtype": CUSTOM, "save_every": CUSTOM, "max_step_saves_to_keep": CUSTOM,
    "save_format": _note("LoRA files are safetensors; save_format concerns full fine-tunes"),
    "push_to_hub": _refuse("uploading is not done here; upload run.output_dir's file yourself"),
    "hf_repo_id": _note("used only by push_to_hub"), "hf_private": _note("used only by push_to_hub"),
}

DATASET = {
    "folder_path": CUSTOM, "dataset_path": CUSTOM, "resolution": CUSTOM, "caption_ext": CUSTOM,
    "caption_type": CUSTOM, "default_caption": CUSTOM, "trigger_word": CUSTOM,
    "caption_dropout_rate": _map("data.datasets.{i}.caption_dropout"),
    "shuffle_tokens": _map("data.datasets.{i}.shuffle_captions"), "keep_tokens": _map("data.datasets.{i}.keep_tokens"),
    "num_repeats": _map("data.datasets.{i}.num_repeats"),
    "cache_latents": _note("latents are encoded at each step (`shards precompute` stores them)"),
    "cache_latents_to_disk": _note("latents are encoded at each step (`shards precompute` stores them)"),
    "cache_text_embeddings": _note("captions are encoded at each step (`shards precompute` stores them)"),
    "cache_latents_num_workers": _note(NO_MEANING), "load_image_when_caching_latents": _note(NO_MEANING),
    "buckets": _refuse("images are always bucketed by aspect ratio here", True),
    "bucket_tolerance": _note("buckets step by 64 px here"),
    "batch_size": _refuse("one micro-batch size per run here (train.batch_size)"),
    "type": _refuse("only image datasets are read", "image"), "is_reg": _refuse("regularization sets are " + LATER),
    "prior_reg": _refuse(LATER), "token_dropout_rate": _refuse(LATER), "random_triggers": _refuse(LATER),
    "random_triggers_max": _note("used only with random_triggers"), "flip_x": _refuse(LATER), "flip_y": _refuse(LATER),
    "augments": _refuse(LATER), "augmentations": _refuse(LATER), "shuffle_augmentations": _note(NO_MEANING),
    "alpha_mask": _refuse("masked loss is " + LATER), "mask_path": _refuse("masked loss is " + LATER),
    "invert_mask": _note("used only with mask_path"), "mask_min_value": _note("used only with mask_path"),
    "unconditional_path": _refuse(LATER), "control_path": _refuse(LATER), "controls": _refuse(LATER),
    "inpaint_path": _refuse(LATER), "clip_image_path": _refuse(LATER),
    "network_weight": _refuse(LATER, 1, 1.0), "loss_multiplier": _refuse(LATER, 1, 1.0),
    "scale": _refuse(LATER, 1, 1.0), "random_scale": _refuse(LATER), "random_crop": _refuse(LATER),
    "square_crop": _refuse(LATER), "num_workers": _note("readers per rank are data.loader_workers"),
    "prefetch_factor": _note(NO_MEANING), "num_frames": _refuse("video is not trained here", 1),
    "standardize_images": _refuse(LATER), "replacements": _refuse(LATER), "use_short_captions": _refuse(LATER),
    "extra_values": _refuse(LATER), "poi": _refuse("deprecated in ai-toolkit too"),
    "fast_image_size": _note(NO_MEANING),
}

TRAIN = {
    "steps": CUSTOM, "lr": CUSTOM, "optimizer": CUSTOM, "optimizer_params": CUSTOM, "lr_scheduler": CUSTOM,
    "lr_scheduler_params": CUSTOM, "batch_size": CUSTOM, "gradient_accumulation": CUSTOM,
    "gradient_accumulation_steps": CUSTOM, "gradient_checkpointing": CUSTOM, "dtype": CUSTOM,
    "timestep_type": CUSTOM, "noise_scheduler": CUSTOM, "ema_config": CUSTOM,
    "unet_lr": _note("ai-toolkit trains the LoRA at train.lr too"),
    "text_encoder_lr": _note("ai-toolkit trains the LoRA at train.lr too"),
    "refiner_lr": _note(NO_MEANING), "embedding_lr": _note(NO_MEANING), "adapter_lr": _note(NO_MEANING),
    "train_unet": _refuse("the denoiser's LoRA is always trained", True),
    "train_text_encoder": _map("lora.train_text_encoder"), "train_refiner": _note(NO_MEANING),
    "max_grad_norm": _map("train.max_grad_norm"),
    "xformers": _note("attention uses PyTorch's SDPA kernels"), "sdp": _note("attention uses PyTorch's SDPA kernels"),
    "attention_backend": _note("attention uses PyTorch's SDPA kernels"),
    "noise_offset": _refuse(LATER, 0, 0.0), "min_snr_gamma": _refuse(LATER), "snr_gamma": _refuse(LATER),
    "learnable_snr_gos": _refuse(LATER), "loss_type": _refuse("the loss is the mean squared error", "mse"),
    "content_or_style": _refuse("timesteps are drawn by timestep_type only", "balanced"),
    "linear_timesteps": _refuse(LATER), "linear_timesteps2": _refuse(LATER),
    "num_train_timesteps": _refuse(LATER, 1000), "min_denoising_steps": _refuse(LATER, 0),
    "max_denoising_steps": _refuse(LATER, 999, 1000),
    "skip_first_sample": _note("no sample is rendered before the first step"),
    "force_first_sample": _note("no sample is rendered before the first step"),
    "disable_sampling": _note("sampling is on when sample.prompts are given"),
    "unload_text_encoder": _note(NO_MEANING), "cache_text_embeddings": _note("see `shards precompute`"),
    "bypass_guidance_embedding": _refuse(LATER), "weight_jitter": _refuse(LATER, 0, 0.0),
    "prompt_dropout_prob": _refuse(LATER, 0, 0.0), "negative_prompt": _refuse(LATER),
    "do_cfg": _refuse(LATER), "do_random_cfg": _refuse(LATER), "do_guidance_loss": _refuse(LATER),
    "diff_output_preservation": _refuse(LATER), "blank_prompt_preservation": _refuse(LATER),
    "inverted_mask_prior": _refuse(LATER), "loss_target": _refuse(LATER, "noise"),
    "switch_boundary_every": _note(NO_MEANING), "validation_config": _refuse("validation runs are " + LATER),
    "start_step": _refuse(LATER), "merge_network_on_save": _refuse(LATER), "reg_weight": _note(NO_MEANING),
    "standardize_latents": _refuse(LATER), "train_turbo": _refuse(LATER), "free_u": _refuse(LATER),
    "do_paramiter_swapping": _refuse(LATER),
}

MODEL = {
    "name_or_path": CUSTOM, "arch": CUSTOM, "is_flux": CUSTOM, "is_xl": CUSTOM, "is_v3": CUSTOM,
    "is_v_pred": CUSTOM, "is_v2": _refuse("SD 2.x is not trained here"), "is_pixart": _refuse("PixArt " + OTHER),
    "is_pixart_sigma": _refuse("PixArt " + OTHER), "is_auraflow": _refuse("AuraFlow " + OTHER),
    "is_lumina2": _refuse("Lumina 2 " + OTHER), "is_ssd": _refuse("SSD-1B " + OTHER),
    "is_vega": _refuse("Vega " + OTHER),
    "dtype": _note("train.dtype decides, as in ai-toolkit"),
    "quantize": _refuse("quantized base models are not supported yet; set quantize: false (training then "
                        "needs the memory of the unquantized model)"),
    "quantize_te": _refuse("quantized text encoders are not supported yet; set quantize_te: false"),
    "qtype": _note("used only with quantize"), "qtype_te": _note("used only with quantize_te"),
    "quantize_kwargs": _note("used only with quantize"), "low_vram": _note("ZeRO-3 (distributed.zero_stage) "
                                                                            "spreads a model over GPUs instead"),
    "layer_offloading": _refuse(LATER), "auto_memory": _refuse(LATER), "text_encoder_bits": _refuse(LATER, 16),
    "vae_path": _refuse(MODEL_FILES), "te_name_or_path": _refuse(MODEL_FILES),
    "extras_name_or_path": _refuse(MODEL_FILES), "assistant_lora_path": _refuse(LATER),
    "inference_lora_path": _refuse(LATER), "unconditional_lora_path": _refuse(LATER), "lora_path": _refuse(LATER),
    "accuracy_recovery_adapter": _refuse(LATER), "refiner_name_or_path": _refuse(LATER),
    "refiner_start_at": _note(NO_MEANING), "unet_path": _refuse(MODEL_FILES), "model_kwargs": _refuse(LATER),
    "use_text_encoder_1": _refuse(LATER, True), "use_text_encoder_2": _refuse(LATER, True),
    "experimental_xl": _note(NO_MEANING), "use_flux_cfg": _refuse(LATER), "attn_masking": _refuse(LATER),
    "split_model_over_gpus": _refuse("ZeRO-3 (distributed.zero_stage: 3) spreads a model over GPUs"),
    "compile": _note("compilation is not offered yet"), "block_compile": _note("compilation is not offered yet"),
    "ignore_if_contains": _refuse(LATER), "only_if_contains": _refuse(LATER), "latent_space_version": _note(NO_MEANING),
}

SAMPLE = {
    "sample_every": CUSTOM, "prompts": CUSTOM, "samples": CUSTOM, "width": CUSTOM, "height": CUSTOM,
    "seed": _map("sample.seed"), "guidance_scale": _map("sample.guidance_scale"),
    "sample_steps": _map("sample.num_inference_steps"),
    "walk_seed": _note("prompt i of a grid starts from noise seeded sample.seed + i, as walk_seed: true does"),
    "neg": _note("sample grids use no negative prompt"), "sampler": _note("samples use the model's own scheduler"),
    "sample_start_step": _note("grids are rendered every sample_every steps"),
    "network_multiplier": _refuse("grids show the LoRA at strength 1", 1, 1.0),
    "guidance_rescale": _refuse(LATER, 0, 0.0), "format": _note("grids are PNG files"),
    "num_frames": _refuse("video is not sampled here", 1), "fps": _note(NO_MEANING),
    "adapter_conditioning_scale": _note(NO_MEANING), "refiner_start_at": _note(NO_MEANING),
    "extra_values": _note(NO_MEANING),
}

LOGGING = {
    "log_every": _map("train.log_every_n_steps"), "verbose": _note(NO_MEANING),
    "use_wandb": _map("logging.wandb"), "project_name": _map("logging.wandb_project"),
    "run_name": _note("the W&B run is named after config.name"), "use_ui_logger": _note("ai-toolkit's UI only"),
}

SECTIONS: dict[str, dict[str, Key]] = {
    "process": PROCESS, "network": NETWORK, "save": SAVE, "dataset": DATASET, "train": TRAIN, "model": MODEL,
    "sample": SAMPLE, "logging": LOGGING,
}

TRAINER_TYPES = ("sd_trainer", "diffusion_trainer", "ui_trainer")
DTYPES = {"float": "float32", "fp32": "float32", "single": "float32", "float32": "float32", "fp16": "float16",
          "half": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
"""ai-toolkit's dtype names (toolkit/train_tools.py `get_torch_dtype`) → ours."""
OPTIMIZERS = (("adamw", "adamw"), ("adamw8bit", "adamw8bit"), ("prodigy", "prodigy"), ("adafactor", "adafactor"),
              ("lion", "lion"), ("came", "came"))
"""ai-toolkit's optimizer names (prodigy: any name starting with it, e.g. prodigyopt) → ours."""
TIMESTEP_TYPES = {"sigmoid": "sigmoid", "linear": "uniform", "shift": "uniform", "flux_shift": "uniform"}
"""ai-toolkit's flow-matching timestep_type → train.timestep_sampling (the shift is the model scheduler's)."""
