"""Model families: one interface over a diffusers pipeline, one file per family.

A family knows how to load its pipeline, encode prompts (and the negative prompt for CFG), call the
denoiser on a batch of latents and timesteps, make the policy's step (DDIM or Flow-GRPO's SDE step,
ddpo_fast.steps), decode latents to uint8 images, which modules LoRA targets, and how the finetuned
weights are saved and loaded back. The trainer, the sampler, `evaluate` and the benchmarks use only
this interface, so adding a family is one file plus a line in FAMILIES.

    sd    Stable Diffusion 1.x / 2.x (UNet2DConditionModel, CLIP text encoder, DDIM)
    sdxl  Stable Diffusion XL (two CLIP text encoders, pooled embeddings and add_time_ids, DDIM)
    sd3   Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, two CLIPs and optional T5, flow matching
          with Flow-GRPO's SDE step)

The family is read from the pipeline's model_index.json (`_class_name`).
"""
from __future__ import annotations

from ddpo_fast.families.base import Conditioning, ModelFamily
from ddpo_fast.families.sd import SdFamily
from ddpo_fast.families.sd3 import Sd3Family
from ddpo_fast.families.sdxl import SdxlFamily

FAMILIES: dict[str, type[ModelFamily]] = {f.name: f for f in (SdFamily, SdxlFamily, Sd3Family)}
PIPELINE_CLASSES = {f.pipeline_class_name: f for f in FAMILIES.values()}

__all__ = ["Conditioning", "ModelFamily", "FAMILIES", "family_for_pipeline_class", "wrap"]


def family_for_pipeline_class(class_name: str, source: str) -> type[ModelFamily]:
    """The family of a pipeline by its model_index.json `_class_name`."""
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"model={source!r}: a {class_name} is not supported (supported: "
                         + ", ".join(f"{c} ({f.name})" for c, f in PIPELINE_CLASSES.items()) + ")")
    return PIPELINE_CLASSES[class_name]


def wrap(pipe, resolution: int = 0) -> ModelFamily:
    """The family interface over a loaded pipeline (`resolution`: sample.resolution)."""
    return family_for_pipeline_class(type(pipe).__name__, type(pipe).__name__)(pipe, resolution)
