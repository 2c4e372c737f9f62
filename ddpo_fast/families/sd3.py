"""Stable Diffusion 3 / 3.5: an SD3Transformer2DModel (MMDiT) on two CLIP text encoders and an
optional T5, flow matching on a FlowMatchEulerDiscreteScheduler, sampled and trained with Flow-GRPO's
SDE step (ddpo_fast.flow_ops). The prompt conditioning is diffusers' StableDiffusion3Pipeline's:
the CLIPs' penultimate hidden states side by side, zero-padded to T5's width, followed by T5's
tokens (zeros without T5), and both CLIPs' pooled embeddings side by side. As there, the negative
prompt is the encoded empty prompt."""
from __future__ import annotations

import torch

from ddpo_fast.families.base import Conditioning, ModelFamily, tokenize

T5_TOKENS = 256  # diffusers' default max_sequence_length


class Sd3Family(ModelFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    # Flow-GRPO's targets: the attention projections of both streams of every joint block.
    lora_targets = "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v"

    @staticmethod
    def scheduler_for(scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"an SD3 pipeline needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        return scheduler

    def check_resolution(self, resolution: int) -> None:
        super().check_resolution(resolution)
        config = self.denoiser.config
        patches = resolution // self.pipe.vae_scale_factor / config.patch_size
        if patches != int(patches) or patches > config.pos_embed_max_size:
            largest = config.pos_embed_max_size * config.patch_size * self.pipe.vae_scale_factor
            raise ValueError(f"sample.resolution must be a multiple of {config.patch_size * self.pipe.vae_scale_factor} "
                             f"pixels and at most {largest} for this transformer (its patch size and position "
                             f"embedding), got {resolution}")

    def text_encoders(self) -> list[torch.nn.Module]:
        encoders = [self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3]
        return [e for e in encoders if e is not None]

    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> Conditioning:
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                   (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = self.denoiser.config.joint_attention_dim
        if self.pipe.text_encoder_3 is None:
            t5 = clip.new_zeros((len(prompts), T5_TOKENS, width))
        else:
            ids = self.pipe.tokenizer_3(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                        add_special_tokens=True, return_tensors="pt").input_ids.to(device)
            t5 = self.pipe.text_encoder_3(ids)[0].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def call_denoiser(self, module, latents, timesteps, cond):
        return module(hidden_states=latents, timestep=timesteps.expand(latents.shape[0]),
                      encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled"]).sample

    def make_step(self, sample_config, device):
        from ddpo_fast.steps import FlowSdeStep

        return FlowSdeStep(self.pipe.scheduler, sample_config.num_steps, device, noise_level=sample_config.noise_level,
                           sde_type=sample_config.sde_type, **self.timestep_options())

    def timestep_options(self) -> dict:
        """SD3.5's schedulers may shift by image size (use_dynamic_shifting): mu as diffusers computes it."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        _, height, width = self.latent_shape
        patch = self.denoiser.config.patch_size
        return {"mu": calculate_shift((height // patch) * (width // patch), config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.16))}
