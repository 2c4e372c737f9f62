"""The `imagereward` reward: ImageReward-v1.0 (Xu et al., 2023), BLIP finetuned on human preferences.

score = (MLP(t) - 0.16717362830052426) / 1.0333394966054072, where t is the [CLS] output of BLIP's
text encoder (BERT with cross-attention to the image) reading the prompt (tokenised with
bert-base-uncased, padded to 35 tokens, truncated) while attending to the ViT's image tokens, and the
MLP is ImageReward's 768 -> 1024 -> 128 -> 64 -> 16 -> 1 head (no activations; the mean and std are
ImageReward's constants). Images: CLIP's crop preprocessing at 224 with OpenAI's mean and std.

Loaded by our own code, not the `image-reward` package: it imports helpers that transformers 5 no
longer has (`apply_chunking_to_forward` from transformers.modeling_utils) and pins timm==0.6.13. The
checkpoint (ImageReward.pt, keys `blip.visual_encoder.*` (timm ViT names), `blip.text_encoder.*`
(BERT names), `mlp.layers.*`) is read with torch.load(weights_only=True) into transformers'
BlipVisionModel (renamed keys) and BlipTextModel (the same names); BLIP's unused projection heads
are skipped. The ViT's width, depth, patch and image size come from the checkpoint's shapes, its heads
are width / 64 (ViT-L/16: 16), its LayerNorm eps 1e-6 (timm's ViT); the text encoder's shape comes
from med_config.json, its cross-attention width from the ViT.

Options: checkpoint (ImageReward.pt, required), med_config (BLIP's med_config.json, required),
tokenizer (a directory or hub id of the BERT tokenizer; default bert-base-uncased), device, dtype
(fp32 or bf16, default fp32; the MLP runs in fp32), batch_size (default 32).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ddpo_fast.rewards import options as opt
from ddpo_fast.rewards.aesthetic import AestheticMLP
from ddpo_fast.rewards.clip import CLIP_MEAN, CLIP_STD, check_images, preprocess

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's normalisation of the MLP's output
IMAGE_SIZE = 224
MAX_LENGTH = 35  # ImageReward pads and truncates prompts to 35 tokens
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")
_VISION = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
           "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
           "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
           "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
          "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def vision_to_transformers(state: dict) -> dict:
    """BLIP's timm ViT state dict (without the blip.visual_encoder. prefix) in BlipVisionModel names."""
    out = {}
    for key, value in state.items():
        if key in _VISION:
            out[_VISION[key]] = value
        elif (m := _BLOCK_KEY.fullmatch(key)) and m.group(2) in _BLOCK:
            out[f"encoder.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise KeyError(key)
    return out


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def imagereward_options(checkpoint=None, med_config=None, tokenizer="bert-base-uncased", device=None, dtype="fp32",
                        batch_size=32) -> dict:
    return {"checkpoint": opt.file("imagereward", "checkpoint", checkpoint, CHECKPOINT_SUFFIXES,
                                   "ImageReward.pt from THUDM/ImageReward"),
            "med_config": opt.file("imagereward", "med_config", med_config, (".json",),
                                   "med_config.json from THUDM/ImageReward"),
            "tokenizer": opt.model_path("imagereward", "tokenizer", tokenizer, "bert-base-uncased"),
            "device": opt.device("imagereward", device), "dtype": opt.dtype("imagereward", dtype, ("fp32", "bf16")),
            "batch_size": opt.integer("imagereward", "batch_size", batch_size)}


def vit_config(vision_state: dict):
    """The BlipVisionConfig of a ViT state dict in BlipVisionModel names: width, depth, patch and image size
    from the shapes; heads width / 64 and LayerNorm eps 1e-6, as BLIP's timm ViT."""
    from transformers import BlipVisionConfig

    patch = vision_state["embeddings.patch_embedding.weight"]
    width, positions = patch.shape[0], vision_state["embeddings.position_embedding"].shape[1]
    if width % 64:
        raise ValueError(f"the ViT's width {width} is not a multiple of 64 (BLIP's ViTs have 64-wide heads)")
    grid = round((positions - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=width // 64, image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1], layer_norm_eps=1e-6, hidden_act="gelu")


def load_models(checkpoint: str, med_config: str, device: torch.device = torch.device("cpu")):
    """(BlipVisionModel, BlipTextModel, MLP) with the checkpoint's weights, in eval mode."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionModel

    def fail(message: str):
        return ValueError(f"imagereward reward: checkpoint={checkpoint!r}: {message}")

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise fail(f"expected a state dict of tensors, got {type(state).__name__}")
    vision_state, text_state = _part(state, "blip.visual_encoder."), _part(state, "blip.text_encoder.")
    mlp_state = _part(state, "mlp.")
    if "pos_embed" not in vision_state or "patch_embed.proj.weight" not in vision_state or not text_state:
        raise fail("no blip.visual_encoder.pos_embed / patch_embed.proj.weight or blip.text_encoder.* keys "
                   f"(ImageReward's key names); keys found: {', '.join(sorted(state)[:8])}")
    try:
        vision_state = vision_to_transformers(vision_state)
    except KeyError as e:
        raise fail(f"unknown ViT key blip.visual_encoder.{e.args[0]}") from None

    try:
        vision_config = vit_config(vision_state)
    except ValueError as e:
        raise fail(str(e)) from None
    med = json.loads(Path(med_config).read_text())
    try:
        text_config = BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
            num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
            max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            hidden_act=med.get("hidden_act", "gelu"), pad_token_id=med.get("pad_token_id", 0),
            encoder_hidden_size=vision_config.hidden_size, is_decoder=True,  # is_decoder: builds the cross-attention
            bos_token_id=None, sep_token_id=None)  # used by generation only
    except KeyError as e:
        raise ValueError(f"imagereward reward: med_config={med_config!r} has no {e.args[0]!r}") from None
    with torch.device(device):  # the random init before the load is fast there
        vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    text_state = {k: v for k, v in text_state.items() if k != "embeddings.position_ids"}  # a buffer, rebuilt

    if "layers.0.weight" not in mlp_state:
        raise fail("no mlp.layers.0.weight (ImageReward's MLP head)")
    mlp = AestheticMLP(mlp_state["layers.0.weight"].shape[1])  # ImageReward's head has the LAION layout
    for name, module, part in (("blip.visual_encoder", vision, vision_state), ("blip.text_encoder", text, text_state),
                               ("mlp", mlp, mlp_state)):
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise fail(f"{name} does not fit (med_config={med_config!r}): {e}") from None
    return vision.eval(), text.eval(), mlp.eval()


class ImageRewardReward:
    """(images, prompts, metadata) -> (ImageReward (N,), info)."""

    __name__ = "imagereward"

    def __init__(self, checkpoint: str, med_config: str, tokenizer: str, device: torch.device, dtype: torch.dtype,
                 batch_size: int):
        from transformers import AutoTokenizer

        vision, text, mlp = load_models(checkpoint, med_config, device)
        self.vision = vision.to(device=device, dtype=dtype).requires_grad_(False)
        self.text = text.to(device=device, dtype=dtype).requires_grad_(False)
        self.mlp = mlp.to(device).requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.image_size = vision.config.image_size

    @torch.inference_mode()
    def _scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = preprocess(images.to(self.device), self.image_size, CLIP_MEAN, CLIP_STD)
        image_tokens = self.vision(pixel_values=pixels.to(self.dtype)).last_hidden_state
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        out = self.text(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                        encoder_hidden_states=image_tokens,
                        encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device))
        return ((self.mlp(out.last_hidden_state[:, 0].float()).squeeze(-1) - MEAN) / STD)

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        scores = torch.cat([self._scores(images[i:i + self.batch_size], prompts[i:i + self.batch_size])
                            for i in range(0, images.shape[0], self.batch_size)]).cpu()
        return scores, {"imagereward_mean": float(scores.mean())}
