"""Pretrains the built-in `shapes` model from scratch on the procedural shapes data set, on a CPU.

    OMP_NUM_THREADS=1 python -m ddpo_fast.pretrain_shapes --out DIR [--vae-steps N --unet-steps N --seed S]

The whole Stable-Diffusion-shaped pipeline: an AutoencoderKL, a UNet2DConditionModel, a CLIP text
encoder, the code-generated CLIP tokenizer (`models.shapes_tokenizer`) and SD's DDIM schedule. Two
phases: the VAE as a near-deterministic autoencoder (reconstruction loss, a KL weight of 1e-6, as
SD's VAE), then the UNet and the text encoder together on the frozen VAE's latents (epsilon loss,
captions dropped 10% of the time for classifier-free guidance, an EMA of the weights is saved).
DIR becomes a normal diffusers directory (safetensors) plus `pretraining.json` (settings, time,
losses). With one thread the result is a function of the arguments only.

Sizes (chosen for 2 CPU cores): the VAE downsamples 4x (64x64 images, 4x16x16 latents: 8x lost the
small shapes), the UNet has 1.4M parameters (forward + backward on 16 latents ~0.25 s on one core).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ddpo_fast import shapes
from ddpo_fast.models import SHAPES_MAX_LENGTH, scheduler_config, shapes_tokenizer

LATENT_SIZE = shapes.RESOLUTION // 4
CAPTION_DROPOUT = 0.1  # the unconditional branch of classifier-free guidance learns from empty captions
KL_WEIGHT = 1e-6


def build_shapes_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The shapes model's architecture with seeded random weights (pretraining starts here)."""
    tokenizer = shapes_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 48, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=shapes.RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=SHAPES_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=os.environ.get("DDPO_FAST_NO_PROGRESS") == "1")


def train_vae(vae: AutoencoderKL, steps: int, batch_size: int, seed: int, lr: float, log_every: int) -> list[dict]:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    log, running = [], []
    with _progress(steps, "vae") as bar:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, steps, lr)
            images, _ = shapes.batch(seed * 1_000_003 + step, batch_size)
            x = _pixels(images)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(z).sample
            rec_loss = F.mse_loss(reconstruction, x) + 0.1 * F.l1_loss(reconstruction, x)
            loss = rec_loss + KL_WEIGHT * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            running.append(rec_loss.item())
            bar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.append({"step": step + 1, "reconstruction_loss": sum(running) / len(running)})
                bar.set_postfix(loss=f"{log[-1]['reconstruction_loss']:.4f}")
                running = []
    vae.eval()
    return log


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, seed: int, n: int = 256) -> float:
    """scaling_factor = 1 / std of the latents (SD's 0.18215 was found the same way), so the UNet sees unit variance."""
    images, _ = shapes.batch(seed * 1_000_003 - 1, n)
    std = float(vae.encode(_pixels(images)).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


def train_denoiser(pipe: StableDiffusionPipeline, steps: int, batch_size: int, seed: int, lr: float,
                   ema_decay: float, log_every: int) -> list[dict]:
    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    alphas = DDIMScheduler(**scheduler_config()).alphas_cumprod
    generator = torch.Generator().manual_seed(seed + 17)
    log, running = [], []
    with _progress(steps, "unet") as bar:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, steps, lr)
            images, captions = shapes.batch(-(seed * 1_000_003 + step) - 2, batch_size)
            drop = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            with torch.no_grad():
                latents = vae.encode(_pixels(images)).latent_dist.mean * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=SHAPES_MAX_LENGTH, truncation=True,
                            return_tensors="pt").input_ids
            t = torch.randint(0, len(alphas), (batch_size,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            prediction = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            _ema_update(ema, params, min(ema_decay, (1 + step) / (10 + step)))  # short warm-up of the average
            running.append(loss.item())
            bar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.append({"step": step + 1, "loss": sum(running) / len(running)})
                bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
                running = []
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return log


def pretrain(out: Path, *, seed: int = 0, vae_steps: int = 1500, unet_steps: int = 4000, vae_batch_size: int = 8,
             unet_batch_size: int = 16, vae_lr: float = 2e-3, unet_lr: float = 1e-3, ema_decay: float = 0.999,
             log_every: int = 50) -> dict:
    """Trains the pipeline and saves it to `out`; returns the record written to out/pretraining.json."""
    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("vae_batch_size", vae_batch_size),
                        ("unet_batch_size", unet_batch_size), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    settings = dict(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, vae_batch_size=vae_batch_size,
                    unet_batch_size=unet_batch_size, vae_lr=vae_lr, unet_lr=unet_lr, ema_decay=ema_decay)
    torch.manual_seed(seed)
    pipe = build_shapes_pipeline(seed)
    start = time.perf_counter()
    vae_log = train_vae(pipe.vae, vae_steps, vae_batch_size, seed, vae_lr, log_every)
    vae_seconds = time.perf_counter() - start
    scale = set_latent_scale(pipe.vae, seed)
    unet_log = train_denoiser(pipe, unet_steps, unet_batch_size, seed, unet_lr, ema_decay, log_every)
    record = {
        "settings": settings, "threads": torch.get_num_threads(), "vae_seconds": round(vae_seconds, 1),
        "unet_seconds": round(time.perf_counter() - start - vae_seconds, 1), "scaling_factor": scale,
        "vae_loss": vae_log, "unet_loss": unet_log,
    }
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--unet-batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=50, help="steps per logged mean loss")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: the directory is not empty")
    try:
        record = pretrain(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                          vae_batch_size=args.vae_batch_size, unet_batch_size=args.unet_batch_size,
                          log_every=args.log_every)
    except ValueError as e:
        parser.error(str(e))
    print(f"saved {args.out}: VAE {record['vae_seconds']} s (loss {record['vae_loss'][-1]['reconstruction_loss']:.4f}), "
          f"UNet + text encoder {record['unet_seconds']} s (loss {record['unet_loss'][-1]['loss']:.4f}), "
          f"{record['threads']} thread(s)")


if __name__ == "__main__":
    main()
