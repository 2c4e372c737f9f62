"""The `pickscore` reward: PickScore (Kirstain et al., "Pick-a-Pic", 2023), a CLIP ViT-H/14 finetuned on
human preferences between generated images.

score = exp(logit_scale) * cos(image embedding, prompt embedding), the embeddings of transformers'
CLIPModel (get_image_features / get_text_features), L2-normalised: the PickScore authors' computation
(scores of ~20-23 for the published model, whose exp(logit_scale) is 100).

Options: model (the CLIPModel: a local directory or hub id, e.g. yuvalkirstain/PickScore_v1; required),
processor (the tokenizer and preprocessor config: a local directory or hub id, e.g.
laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default: model), device, dtype (fp32 or bf16, default fp32),
batch_size (images per forward, default 32).
"""
from __future__ import annotations

import torch

from ddpo_fast.rewards.clip import clip_options, load_clip_similarity


def pickscore_options(model=None, processor=None, device=None, dtype="fp32", batch_size=32) -> dict:
    return clip_options("pickscore", model, processor, device, dtype, batch_size, "yuvalkirstain/PickScore_v1",
                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


class PickScoreReward:
    """(images, prompts, metadata) -> (PickScore (N,), info)."""

    __name__ = "pickscore"

    def __init__(self, model: str, processor: str, device: torch.device, dtype: torch.dtype, batch_size: int):
        self.similarity = load_clip_similarity("pickscore", model, processor, device, dtype, batch_size)

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        scores = self.similarity.logit_scale * self.similarity(images, prompts)
        return scores, {"pickscore_mean": float(scores.mean())}
