"""The model-family interface (see ddpo_fast.families) and what the families share."""
from __future__ import annotations

from pathlib import Path

import torch

from ddpo_fast.precision import Precision

# A batch of prompt conditioning: the family's tensors by name, first dimension the sample (SD:
# prompt_embeds; SDXL and SD3 add pooled embeddings, SDXL the add_time_ids). The trajectory buffer
# keeps it per sample.
Conditioning = dict[str, torch.Tensor]


class ModelFamily:
    name: str  # the family's short name (sd, sdxl, sd3)
    pipeline_class_name: str  # the diffusers pipeline class (model_index.json's _class_name)
    denoiser_name = "unet"  # the trained module's attribute and subfolder
    lora_targets = "to_q,to_k,to_v,to_out.0"  # peft target modules when lora.target_modules=auto

    def __init__(self, pipe, resolution: int = 0):
        self.pipe = pipe
        self.resolution = resolution  # pixels (sample.resolution); 0: the model's own
        if resolution:
            self.check_resolution(resolution)

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(cls, source, resolution: int = 0) -> "ModelFamily":
        """The pipeline in a diffusers directory or hub repository, with the scheduler the policy needs."""
        pipe = cls.pipeline_class().from_pretrained(source, **{**absent_components(source), **cls.load_options()})
        pipe.scheduler = cls.scheduler_for(pipe.scheduler)
        return cls(pipe, resolution)

    @classmethod
    def load_options(cls) -> dict:
        return {}

    @staticmethod
    def scheduler_for(scheduler):
        """DDIM families sample with a DDIMScheduler built from the pipeline's scheduler config."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler.config)

    def save_lora(self, out: Path, layers: dict) -> None:
        """LoRA weights in the format the family's pipeline `load_lora_weights` reads."""
        self.pipeline_class().save_lora_weights(str(out), **{f"{self.denoiser_name}_lora_layers": layers},
                                                safe_serialization=True)

    def load_finetuned(self, path: Path) -> None:
        """Replaces the denoiser by finetuned weights: a run's lora/ or unet/ (transformer/) directory,
        or a denoiser directory saved by save_pretrained."""
        if (path / "lora").is_dir():
            self.pipe.load_lora_weights(str(path / "lora"))
            return
        for directory in (path / self.denoiser_name, path):
            if (directory / "config.json").is_file() and any(directory.glob("diffusion_pytorch_model*")):
                setattr(self.pipe, self.denoiser_name, type(self.denoiser).from_pretrained(directory))
                return
        raise ValueError(f"--finetuned {path}: not a run directory with {self.denoiser_name}/ or lora/, nor a "
                         f"{type(self.denoiser).__name__} directory")

    # ---- modules -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder]

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """The frozen VAE and text encoders in the mixed-precision `dtype` (None: fp32), the trained
        denoiser in fp32 (autocast gives its mixed precision)."""
        # nn.Module.to: diffusers' override warns on any dtype cast, even when no module must stay fp32.
        torch.nn.Module.to(self.vae, device=device, dtype=dtype or torch.float32)
        for encoder in self.text_encoders():
            encoder.to(device, dtype=dtype or torch.float32)
        self.denoiser.to(device)

    def freeze_frozen_modules(self) -> None:
        for module in (self.vae, *self.text_encoders()):
            module.requires_grad_(False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        size = self.resolution // self.pipe.vae_scale_factor if self.resolution else config.sample_size
        return (config.in_channels, size, size)

    def check_resolution(self, resolution: int) -> None:
        factor = self.pipe.vae_scale_factor
        if resolution % factor:
            raise ValueError(f"sample.resolution must be a multiple of the VAE's downsampling factor {factor}, got "
                             f"{resolution}")

    # ---- prompts, denoiser, step, images ------------------------------------------------------
    def encode(self, prompts: list[str], device) -> Conditioning:
        raise NotImplementedError

    def negative_conditioning(self, device) -> Conditioning:
        """The conditioning of the empty negative prompt (one row), for classifier-free guidance."""
        return self.encode([""], device)

    def call_denoiser(self, module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning):
        """The denoiser's output on a batch (module: the denoiser or a training engine around it)."""
        raise NotImplementedError

    def denoise(self, module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                negative: Conditioning | None, precision: Precision) -> torch.Tensor:
        """The denoiser's output under the precision policy; with `negative` (CFG) on the stacked
        [uncond; cond] batch (2B rows), contiguous (the fused steps need it; SD3's transformer returns a
        permuted view). Every denoiser forward of sampling and training goes through here, so the two
        phases cannot differ in their autocast (see ddpo_fast.precision)."""
        if negative is not None:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps]) if timesteps.dim() else timesteps
            cond = {k: torch.cat([negative[k].expand_as(v), v]) for k, v in cond.items()}
        dtype = next(getattr(module, "module", module).parameters()).dtype
        with precision.autocast():
            out = self.call_denoiser(module, latents.to(dtype), timesteps,
                                     {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()})
        return out.contiguous()

    def make_step(self, sample_config, device):
        """The policy's step for the run's sampler settings (`sample.*`)."""
        from ddpo_fast.steps import DdimStep

        return DdimStep(self.pipe.scheduler, sample_config.num_steps, device, eta=sample_config.eta)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> uint8 images (N, 3, H, W) on the CPU (the one host copy per batch)."""
        vae = self.vae
        latents = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        if vae.config.get("shift_factor") is not None:
            latents = latents + vae.config.shift_factor
        images = vae.decode(latents).sample
        return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def absent_components(source) -> dict:
    """The components model_index.json lists as [null, null] (e.g. SD3 saved without T5): from_pretrained
    wants them passed as None."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(source))
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value[:1] == [None]}


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """Token ids padded (and truncated) to the tokenizer's max length."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
