"""JPEG compressibility rewards (the paper's first two tasks): the size of each image saved as JPEG."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

JPEG_QUALITY = 95  # as in the paper


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG file size in kB (1000 bytes) of each uint8 (N, 3, H, W) image."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    array = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    sizes = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float32)


def jpeg_compressibility(images: torch.Tensor, prompts: list, metadata: list):
    """Reward = -(JPEG size in kB): smaller files score higher."""
    sizes = jpeg_sizes_kb(images)
    return -torch.from_numpy(sizes), {"jpeg_kb": float(sizes.mean())}


def jpeg_incompressibility(images: torch.Tensor, prompts: list, metadata: list):
    """Reward = JPEG size in kB: larger files score higher."""
    sizes = jpeg_sizes_kb(images)
    return torch.from_numpy(sizes), {"jpeg_kb": float(sizes.mean())}


# Pure functions of their inputs: the reward pool may call them from several threads at once.
jpeg_compressibility.thread_safe = True
jpeg_incompressibility.thread_safe = True
