"""Advantages from rewards: per-prompt stat tracking, global normalisation, or GRPO groups.

Rewards are gathered from all ranks first (in rank order), every rank computes the same advantages
for the whole gathered batch (so every rank's tracker holds the same state) and keeps its own slice.
Non-finite rewards are dropped: they are not tracked and get advantage 0 (no gradient).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ddpo_fast import distributed

EPS = 1e-6


class PerPromptStatTracker:
    """Normalises each reward by the mean and std of the last `buffer_size` rewards of its prompt;
    prompts seen fewer than `min_count` times use the statistics of the whole batch."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        valid = np.isfinite(rewards)
        advantages = np.zeros_like(rewards)
        if not valid.any():
            return advantages
        batch_mean, batch_std = rewards[valid].mean(), rewards[valid].std() + EPS
        prompts_arr = np.asarray(prompts, dtype=object)
        for prompt in dict.fromkeys(p for p, ok in zip(prompts, valid) if ok):
            mask = (prompts_arr == prompt) & valid
            history = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[mask].tolist())
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(history), np.std(history) + EPS
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def global_advantages(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    valid = np.isfinite(rewards)
    advantages = np.zeros_like(rewards)
    if valid.any():
        advantages[valid] = (rewards[valid] - rewards[valid].mean()) / (rewards[valid].std() + EPS)
    return advantages


def group_advantages(rewards: np.ndarray, group_size: int, global_std: bool = False) -> np.ndarray:
    """GRPO: (reward - its group's mean) / the group's std (or, with `global_std`, the std of all
    rewards), over the finite rewards; groups are consecutive runs of `group_size` samples. A
    non-finite reward, or a group whose rewards are all equal, gets advantage 0."""
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    valid = np.isfinite(rewards)
    counts = valid.sum(axis=1, keepdims=True)
    filled = np.where(valid, rewards, 0.0)
    mean = filled.sum(axis=1, keepdims=True) / np.maximum(counts, 1)
    if global_std:
        std = np.full_like(mean, rewards[valid].std() if valid.any() else 0.0)
    else:
        std = np.sqrt((np.where(valid, rewards - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / np.maximum(counts, 1))
    advantages = np.where(valid, (filled - mean) / (std + EPS), 0.0)
    return advantages.reshape(-1)


def gather(rewards: torch.Tensor, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    """All ranks' rewards and prompts, concatenated in rank order (identity in one process).
    Every rank holds the same number of samples (the config guarantees it)."""
    all_rewards = distributed.all_gather_cat(rewards.float())  # on the rank's device (NCCL's rule)
    all_prompts = [p for part in distributed.all_gather_objects(list(prompts)) for p in part]
    return all_rewards.double().cpu().numpy(), all_prompts


def compute_advantages(rewards: torch.Tensor, prompts: list[str], normalise, rank: int = 0,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """(this rank's advantages (float32, on `device`), the gathered rewards, advantages and prompts);
    `normalise(all_prompts, all_rewards)` gives the advantages (a tracker's update, or a group's)."""
    all_rewards, all_prompts = gather(rewards, prompts)
    advantages = normalise(all_prompts, all_rewards)
    n = len(prompts)
    mine = advantages[rank * n:(rank + 1) * n]
    return torch.from_numpy(mine.astype(np.float32)).to(device), all_rewards, advantages, all_prompts


def per_prompt_stats(prompts: list[str], rewards: np.ndarray) -> dict[str, dict]:
    """{prompt: {"mean": mean of its finite rewards (None if none), "count": its samples}}."""
    stats = {}
    for prompt in sorted(set(prompts)):
        values = rewards[[p == prompt for p in prompts]]
        finite = values[np.isfinite(values)]
        stats[prompt] = {"mean": float(finite.mean()) if len(finite) else None, "count": len(values)}
    return stats
