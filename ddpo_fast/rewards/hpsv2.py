"""The `hpsv2` reward: Human Preference Score v2.1 (Wu et al., 2023), an open_clip ViT-H-14 finetuned on
human preferences between generated images.

score = cos(image embedding, prompt embedding), both L2-normalised, with no logit scale: HPS v2's own
score (`image_features @ text_features.T`, its diagonal); ~0.25-0.35 for the published model.
Images are preprocessed as open_clip's validation transform with `resize_longest_max` (HPS v2's
`preprocess_val`): the longest side resized to 224, the short side padded with black to a centred
square, OpenAI's mean and std. Prompts go through transformers' CLIP tokenizer, which has open_clip's
BPE vocabulary (open_clip also runs ftfy and unescapes HTML entities first).

The checkpoint (HPS_v2.1_compressed.pt: {"state_dict": ...} with open_clip's key names) is loaded with
torch.load(weights_only=True) and its weights are renamed into transformers' CLIPModel, which computes
the same function as open_clip's ViT-H-14 (GELU, pre-norm blocks, the text pooled at the end-of-text
token). Why not open_clip itself: it imports torchvision, whose only wheel for our pinned torch on
PyPI is a CUDA build that does not import beside the CPU build of torch; one CLIP code path also
serves pickscore and clipscore.

Options: checkpoint (the HPS file, required), clip_model (a directory or hub id with the CLIP ViT-H-14
config.json, tokenizer and preprocessor config, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K; only its
config and tokenizer are read, not its weights; required), device, dtype (fp32 or bf16, default fp32),
batch_size (default 32).
"""
from __future__ import annotations

import re

import torch

from ddpo_fast.rewards import options as opt
from ddpo_fast.rewards.clip import ClipSimilarity, preprocessor_config

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")
# open_clip block names -> transformers' CLIPEncoderLayer names (in_proj is split into q, k, v below)
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_to_transformers(state: dict) -> dict:
    """An open_clip CLIP state dict (ViT image tower, standard text tower) in transformers' CLIPModel names;
    KeyError naming the first key it does not know."""
    out = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "visual.proj":  # open_clip multiplies x @ proj; a Linear computes x @ weight.T
            out["visual_projection.weight"] = value.t()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()
        elif key == "attn_mask":  # the text tower's causal mask (a buffer in older open_clip files)
            continue
        elif m := _RESBLOCK.fullmatch(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, name = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for proj, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}_proj.{name.rsplit('_', 1)[1]}"] = part
            else:
                module, _, param = name.rpartition(".")
                if module not in _BLOCK:
                    raise KeyError(key)
                out[f"{prefix}{_BLOCK[module]}.{param}"] = value
        else:
            raise KeyError(key)
    return out


def load_checkpoint(path: str) -> dict:
    """The HPS checkpoint's state dict, loaded with weights_only=True."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"hpsv2 reward: checkpoint={path!r}: expected a state dict of tensors (or "
                         f"{{'state_dict': ...}}), got {type(state).__name__}")
    return state


def hpsv2_options(checkpoint=None, clip_model=None, device=None, dtype="fp32", batch_size=32) -> dict:
    return {"checkpoint": opt.file("hpsv2", "checkpoint", checkpoint, CHECKPOINT_SUFFIXES,
                                   "HPS_v2.1_compressed.pt from xswu/HPSv2"),
            "clip_model": opt.model_path("hpsv2", "clip_model", clip_model, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
            "device": opt.device("hpsv2", device), "dtype": opt.dtype("hpsv2", dtype, ("fp32", "bf16")),
            "batch_size": opt.integer("hpsv2", "batch_size", batch_size)}


class HPSv2Reward:
    """(images, prompts, metadata) -> (HPS v2 (N,), info)."""

    __name__ = "hpsv2"

    def __init__(self, checkpoint: str, clip_model: str, device: torch.device, dtype: torch.dtype, batch_size: int):
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        config = CLIPConfig.from_pretrained(clip_model)
        acts = {config.vision_config.hidden_act, config.text_config.hidden_act}
        if acts != {"gelu"}:  # open_clip's ViT-H-14 uses GELU; OpenAI's CLIP configs say quick_gelu
            raise ValueError(f"hpsv2 reward: clip_model={clip_model!r} has hidden_act {sorted(acts)}, but HPS v2's "
                             "open_clip ViT-H-14 uses gelu (give the laion/CLIP-ViT-H-14-laion2B-s32B-b79K config)")
        try:
            state = open_clip_to_transformers(load_checkpoint(checkpoint))
        except KeyError as e:
            raise ValueError(f"hpsv2 reward: checkpoint={checkpoint!r} is not an open_clip CLIP state dict: "
                             f"unknown key {e.args[0]!r}") from None
        with torch.device(device):  # random init of ViT-H/14 before the load: seconds on a GPU, a minute on a CPU
            clip = CLIPModel(config)
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"hpsv2 reward: checkpoint={checkpoint!r} does not fit clip_model={clip_model!r}'s "
                             f"architecture: {e}") from None
        tokenizer = AutoTokenizer.from_pretrained(clip_model)
        size, mean, std = preprocessor_config(clip_model, config.vision_config.image_size)
        self.similarity = ClipSimilarity(clip, tokenizer, device, dtype, batch_size, size, mean, std, mode="pad")

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        scores = self.similarity(images, prompts)
        return scores, {"hpsv2_mean": float(scores.mean())}
