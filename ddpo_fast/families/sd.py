"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel on one CLIP text encoder's last hidden states, DDIM."""
from __future__ import annotations

import torch

from ddpo_fast.families.base import Conditioning, ModelFamily, tokenize


class SdFamily(ModelFamily):
    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    @classmethod
    def load_options(cls) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> Conditioning:
        ids = tokenize(self.pipe.tokenizer, prompts, device)
        return {"prompt_embeds": self.pipe.text_encoder(ids)[0]}

    def call_denoiser(self, module, latents, timesteps, cond):
        return module(latents, timesteps, encoder_hidden_states=cond["prompt_embeds"]).sample
