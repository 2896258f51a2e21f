"""The moving average of the LoRA weights (`train.ema_decay`, ai-toolkit's `ema_config`) and
half-precision LoRA files (`checkpoint.lora_dtype`): saved with each checkpoint, resumed
exactly, and what the LoRA files hold."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from difftrain_dist.config import RecipeError, recipe_from_dict
from difftrain_dist.distrib.checkpoint import checkpoint_name, deepspeed_tag
from difftrain_dist.distrib.ema import EMA_FILE
from difftrain_dist.distrib.export import export_checkpoint
from difftrain_dist.models import read_lora_file

from .gloo import raw_recipe, run_ranks, straight_and_split

DECAY = 0.5


def test_ema_needs_whole_weights(tmp_path, tiny_sd15_model, photo_shards):
    raw = raw_recipe(tiny_sd15_model, photo_shards, tmp_path, train={"ema_decay": 0.99},
                     distributed={"zero_stage": 3})
    with pytest.raises(RecipeError, match="train.ema_decay needs distributed.zero_stage 0-2"):
        recipe_from_dict(raw)
    with pytest.raises(RecipeError, match=r"train.ema_decay: .*less than 1"):
        recipe_from_dict(raw_recipe(tiny_sd15_model, photo_shards, tmp_path, train={"ema_decay": 1.0}))


def test_ema_resumes_exactly_and_is_what_the_half_precision_lora_file_holds(tmp_path, tiny_sd15_model, photo_shards):
    raw = raw_recipe(tiny_sd15_model, photo_shards, tmp_path, train={"ema_decay": DECAY, "lr": 1e-2},
                     checkpoint={"every_n_steps": 1, "lora_dtype": "float16"}, distributed={"num_workers": 2})
    run_ranks(straight_and_split, 2, raw, tmp_path)
    straight, split = tmp_path / "straight" / "o", tmp_path / "split" / "o"

    def ema(run, step):
        return safetensors.torch.load_file(str(run / checkpoint_name(step) / EMA_FILE))

    want, got = ema(straight, 4), ema(split, 4)
    assert want.keys() == got.keys() and all(".lora_" in k for k in want)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    lora_want, lora_got = (read_lora_file(run / checkpoint_name(4) / "lora.safetensors")[0]
                           for run in (straight, split))
    assert max(float((lora_want[k].float() - lora_got[k].float()).abs().max()) for k in lora_want) <= 1e-6

    # The average follows its formula over the live weights the optimizer left in the shards.
    live = {name: weight.detach().float() for name, weight in get_fp32_state_dict_from_zero_checkpoint(
        str(straight / checkpoint_name(4)), tag=deepspeed_tag(4), exclude_frozen_parameters=True).items()}
    before = ema(straight, 3)
    for name, shadow in want.items():
        torch.testing.assert_close(shadow, DECAY * before[name] + (1 - DECAY) * live[name], rtol=0, atol=1e-7)
    assert max(float((want[k] - live[k]).abs().max()) for k in want) > 1e-6, "the EMA equals the weights"

    # The LoRA file is the average, in float16, and says so; export can give it in float32.
    tensors, header = read_lora_file(straight / checkpoint_name(4) / "lora.safetensors")
    assert header["difftrain.lora_dtype"] == "float16" and header["difftrain.ema_decay"] == "0.5"
    assert {t.dtype for key, t in tensors.items() if not key.endswith(".alpha")} == {torch.float16}
    full = read_lora_file(export_checkpoint(straight / checkpoint_name(4), tmp_path / "f32.safetensors",
                                            dtype="float32"))[0]
    assert full.keys() == tensors.keys() and all(t.dtype == torch.float32 for t in full.values())
    for key, value in tensors.items():
        torch.testing.assert_close(value.float(), full[key], rtol=2 ** -10, atol=1e-7)
