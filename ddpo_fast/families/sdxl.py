"""Stable Diffusion XL: a UNet2DConditionModel on two CLIP text encoders (their penultimate hidden
states side by side), the second one's pooled embedding and the add_time_ids micro-conditioning
(original size, crop corner, target size), DDIM. As diffusers' StableDiffusionXLPipeline: the empty
negative prompt is all zeros when the pipeline says force_zeros_for_empty_prompt (SDXL base does)."""
from __future__ import annotations

import torch

from ddpo_fast.families.base import Conditioning, ModelFamily, tokenize


class SdxlFamily(ModelFamily):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    @classmethod
    def load_options(cls) -> dict:
        return {"add_watermarker": False}

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def place(self, device, dtype) -> None:
        super().place(device, dtype)
        if dtype == torch.float16 and self.vae.config.force_upcast:  # SDXL's VAE overflows in fp16
            torch.nn.Module.to(self.vae, dtype=torch.float32)

    def time_ids(self, batch: int, device) -> torch.Tensor:
        """(original size, crop top-left, target size) per sample: the model's own resolution, no crop."""
        size = self.latent_shape[1] * self.pipe.vae_scale_factor
        return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device).expand(batch, -1)

    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                   (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled,
                "time_ids": self.time_ids(len(prompts), device).to(pooled.dtype)}

    def negative_conditioning(self, device) -> Conditioning:
        cond = self.encode([""], device)
        if self.pipe.config.force_zeros_for_empty_prompt:
            cond["prompt_embeds"] = torch.zeros_like(cond["prompt_embeds"])
            cond["pooled"] = torch.zeros_like(cond["pooled"])
        return cond

    def call_denoiser(self, module, latents, timesteps, cond):
        return module(latents, timesteps, encoder_hidden_states=cond["prompt_embeds"],
                      added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}).sample
