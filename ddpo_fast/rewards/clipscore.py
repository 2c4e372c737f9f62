"""The `clipscore` reward: CLIP image-text cosine similarity.

score = cos(image embedding, prompt embedding) of a transformers CLIPModel (L2-normalised
get_image_features / get_text_features); with the option w, CLIPScore's scaling
w * max(cos, 0) (Hessel et al., 2021, use w = 2.5).

Options: model (a local directory or hub id; default openai/clip-vit-large-patch14, CLIP ViT-L/14),
processor (tokenizer and preprocessor config; default: model), w (a number > 0; default: the plain
cosine), device, dtype (fp32 or bf16, default fp32), batch_size (default 32).
"""
from __future__ import annotations

import torch

from ddpo_fast.rewards import options as opt
from ddpo_fast.rewards.clip import clip_options, load_clip_similarity

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


def clipscore_options(model=DEFAULT_MODEL, processor=None, w=None, device=None, dtype="fp32", batch_size=32) -> dict:
    options = clip_options("clipscore", model, processor, device, dtype, batch_size, DEFAULT_MODEL, DEFAULT_MODEL)
    no_w = w is None or (isinstance(w, str) and not w.strip())
    return {**options, "w": None if no_w else opt.number("clipscore", "w", w)}


class ClipScoreReward:
    """(images, prompts, metadata) -> (cos or w * max(cos, 0) (N,), info)."""

    __name__ = "clipscore"

    def __init__(self, model: str, processor: str, w: float | None, device: torch.device, dtype: torch.dtype,
                 batch_size: int):
        self.similarity = load_clip_similarity("clipscore", model, processor, device, dtype, batch_size)
        self.w = w

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        cos = self.similarity(images, prompts)
        scores = cos if self.w is None else self.w * cos.clamp(min=0)
        return scores, {"clipscore_mean": float(scores.mean()), "cosine_mean": float(cos.mean())}
