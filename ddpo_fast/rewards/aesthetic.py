"""The `aesthetic` reward: the LAION improved aesthetic predictor.

score = MLP(e / |e|), e the CLIP image embedding (transformers' CLIPModel: the vision tower's pooled
output through the visual projection; ViT-L/14 for the published predictor, 768 wide). The MLP is
LAION's layout, 768 -> 1024 -> 128 -> 64 -> 16 -> 1:

    layers.0 Linear, layers.1 Dropout(0.2), layers.2 Linear, layers.3 Dropout(0.2),
    layers.4 Linear, layers.5 Dropout(0.1), layers.6 Linear, layers.7 Linear

so its published state dict (keys `layers.0.weight`, `layers.0.bias`, `layers.2.weight`, ...) loads
as is, from `.safetensors` or `.pth`/`.pt` (torch.load with weights_only=True). Its input width is
read from the weights and must equal the CLIP model's projection_dim.

Preprocessing (ddpo_fast.rewards.clip, crop mode) runs on tensors on the reward device, in fp32, with
the crop size, mean and std of the model's preprocessor_config.json (CLIP's standard values without one); the
CLIP model then runs in `dtype` (fp32 or bf16) and the MLP in fp32.

Options: clip_model (local directory or hub id, required), mlp_weights (file, required),
device (default: cuda if available, else cpu), dtype (fp32 or bf16, default fp32),
batch_size (images per CLIP forward, default 32).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddpo_fast.rewards import options as opt
from ddpo_fast.rewards.clip import check_images, preprocess, preprocessor_config

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


class AestheticMLP(nn.Module):
    """LAION's aesthetic head; the layer indices match the published state dict."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_mlp(path: str | Path) -> AestheticMLP:
    """The MLP with the weights in `path` (.safetensors or .pth/.pt, LAION key names), in eval mode."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"mlp_weights={str(path)!r}: expected a state dict of tensors, got {type(state).__name__}")
    first = state.get("layers.0.weight")
    if first is None or first.dim() != 2:
        raise ValueError(f"mlp_weights={str(path)!r}: no 2-D 'layers.0.weight' (the LAION aesthetic MLP's key names: "
                         f"layers.0/2/4/6/7.weight and .bias); keys found: {', '.join(sorted(state)[:10])}")
    mlp = AestheticMLP(first.shape[1])
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"mlp_weights={str(path)!r}: not the LAION aesthetic MLP layout "
                         f"({mlp.input_size} -> 1024 -> 128 -> 64 -> 16 -> 1): {e}") from None
    return mlp.eval().requires_grad_(False)


def aesthetic_options(clip_model=None, mlp_weights=None, device=None, dtype="fp32", batch_size=32) -> dict:
    """Validates and converts the options of the aesthetic reward (strings accepted); builds nothing."""
    clip_model = opt.model_path("aesthetic", "clip_model", clip_model, "openai/clip-vit-large-patch14")
    if not mlp_weights:
        raise ValueError("aesthetic reward: option mlp_weights is required (the LAION aesthetic MLP weights, "
                         f"{' or '.join(WEIGHT_SUFFIXES)}); there is no random-weight default")
    weights = Path(str(mlp_weights)).expanduser()
    if weights.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"aesthetic reward: mlp_weights={str(mlp_weights)!r} must end in {', '.join(WEIGHT_SUFFIXES)}")
    if not weights.is_file():
        raise ValueError(f"aesthetic reward: mlp_weights={str(mlp_weights)!r}: no such file")
    return {"clip_model": clip_model, "mlp_weights": str(weights), "device": opt.device("aesthetic", device),
            "dtype": opt.dtype("aesthetic", dtype, ("fp32", "bf16")),
            "batch_size": opt.integer("aesthetic", "batch_size", batch_size)}


class AestheticReward:
    """The aesthetic reward function: (images, prompts, metadata) -> (scores (N,), info)."""

    __name__ = "aesthetic"

    def __init__(self, clip_model: str, mlp_weights: str, device: torch.device, dtype: torch.dtype, batch_size: int):
        from transformers import CLIPConfig, CLIPModel

        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        mlp = load_mlp(mlp_weights)
        config = CLIPConfig.from_pretrained(clip_model)
        if config.projection_dim != mlp.input_size:
            raise ValueError(f"aesthetic reward: mlp_weights={mlp_weights!r} takes {mlp.input_size}-wide embeddings, but "
                             f"clip_model={clip_model!r} has projection_dim {config.projection_dim} "
                             "(the LAION predictor needs CLIP ViT-L/14, 768)")
        self.clip = CLIPModel.from_pretrained(clip_model).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.mlp = mlp.to(device)
        self.image_size, self.mean, self.std = preprocessor_config(clip_model, config.vision_config.image_size)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values -> L2-normalised image embeddings, fp32."""
        pooled = self.clip.vision_model(pixel_values=pixels.to(self.dtype)).pooler_output
        embeddings = self.clip.visual_projection(pooled).float()
        return embeddings / torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        check_images(images)
        scores = []
        for chunk in images.split(self.batch_size):
            pixels = preprocess(chunk.to(self.device), self.image_size, self.mean, self.std)
            scores.append(self.mlp(self.embed(pixels)).squeeze(-1))
        scores = torch.cat(scores).float().cpu()
        return scores, {"aesthetic_mean": float(scores.mean())}
