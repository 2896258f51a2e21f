"""The plain single-GPU LoRA script people leave for difftrain-dist, as the baseline of
benchmarks/embedded_start.py: the shape of diffusers' examples/text_to_image/train_text_to_image_lora.py
(accelerate's Accelerator, peft's LoraConfig on the UNet's attention projections, DDPM noise,
MSE on epsilon, AdamW, `accelerator.save_state` checkpoints, the LoRA saved with
`StableDiffusionPipeline.save_lora_weights`), reading an image folder with `.txt` captions
through a torch DataLoader (PIL resize and center crop; no torchvision).

    python -m benchmarks.plain_lora MODEL PHOTOS OUT [--steps 60] [--batch 4] [--rank 4]
        [--resolution 64] [--checkpoint-every 20]

Writes OUT/steps.jsonl ({"step", "loss", "wall_time"} per optimizer step, Unix seconds) and
OUT/pytorch_lora_weights.safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CaptionedFolder(torch.utils.data.Dataset):
    """Images of `folder` with their same-stem `.txt` captions: pixel_values (3, R, R) float32 in
    [-1, 1] (shorter side resized to R, center crop) and input_ids (tokenizer's max length)."""

    def __init__(self, folder: Path, tokenizer, resolution: int):
        self.images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.tokenizer, self.resolution = tokenizer, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.images[index]
        image = Image.open(path).convert("RGB")
        scale = self.resolution / min(image.size)
        image = image.resize((max(self.resolution, round(image.width * scale)),
                              max(self.resolution, round(image.height * scale))), Image.BICUBIC)
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def load_models(model: Path, rank: int):
    """(tokenizer, text_encoder, vae, unet with a peft LoRA, noise scheduler) of a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for frozen in (text_encoder, vae, unet):
        frozen.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return tokenizer, text_encoder, vae, unet, DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def train(args: argparse.Namespace) -> None:
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    accelerator = Accelerator(project_dir=str(args.out))
    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(args.model, args.rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    loader = torch.utils.data.DataLoader(CaptionedFolder(args.photos, tokenizer, args.resolution),
                                         batch_size=args.batch, shuffle=True, drop_last=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    steps_file = (args.out / "steps.jsonl").open("w", encoding="utf-8")
    step = 0
    for _ in range(math.ceil(args.steps / len(loader))):
        for batch in loader:
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            steps_file.write(json.dumps({"step": step, "loss": float(loss.detach()), "wall_time": time.time()}) + "\n")
            steps_file.flush()
            if step % args.checkpoint_every == 0:
                accelerator.save_state(str(args.out / f"checkpoint-{step}"))
            if step == args.steps:
                break
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
    StableDiffusionPipeline.save_lora_weights(str(args.out), unet_lora_layers=lora, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("photos", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train(args)


if __name__ == "__main__":
    main()
