"""Rewards: a registry of named reward functions, `module:function` user rewards, and a background
pool that computes them while the next batch samples.

A reward function takes (images, prompts, metadata): images a uint8 tensor (N, 3, H, W) on the
CPU, prompts a list of N strings, metadata a list of N dicts; it returns (rewards, info) with
rewards a float tensor or array of shape (N,) and info a dict (logged when its values are numbers).
"""
from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ddpo_fast.prompts import load_function

RewardFn = Callable[[torch.Tensor, list, list], tuple]
REWARDS: dict[str, RewardFn] = {}
JPEG_QUALITY = 95  # as in the paper


def register_reward(name: str):
    def decorator(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return decorator


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG file size in kB (1000 bytes) of each uint8 (N, 3, H, W) image."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    array = images.permute(0, 2, 3, 1).contiguous().numpy()
    sizes = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(images: torch.Tensor, prompts: list, metadata: list):
    """Reward = -(JPEG size in kB): smaller files score higher."""
    sizes = jpeg_sizes_kb(images)
    return -torch.from_numpy(sizes), {"jpeg_kb": float(sizes.mean())}


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(images: torch.Tensor, prompts: list, metadata: list):
    """Reward = JPEG size in kB: larger files score higher."""
    sizes = jpeg_sizes_kb(images)
    return torch.from_numpy(sizes), {"jpeg_kb": float(sizes.mean())}


def get_reward_fn(spec: str) -> RewardFn:
    """Resolves the `reward` config value: a registered name or module:function."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        return load_function(spec, "reward")
    raise ValueError(f"reward={spec!r}: expected one of {', '.join(sorted(REWARDS))} or module:function")


def _checked_call(fn: RewardFn, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
    result = fn(images, prompts, metadata)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"reward function {getattr(fn, '__name__', fn)} must return (rewards, info), got {type(result).__name__}")
    rewards, info = result
    rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float32) if not torch.is_tensor(rewards) else rewards)
    rewards = rewards.detach().float().cpu().reshape(-1)
    if rewards.shape[0] != images.shape[0]:
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)} returned {rewards.shape[0]} rewards for "
                         f"{images.shape[0]} images")
    return rewards, dict(info or {})


class RewardPool:
    """Computes rewards in background threads: `submit` returns a Future of (rewards (N,), info)."""

    def __init__(self, fn: RewardFn, workers: int = 2):
        self.fn = fn
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")

    def submit(self, images: torch.Tensor, prompts: list, metadata: list) -> Future:
        return self.executor.submit(_checked_call, self.fn, images, prompts, metadata)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
