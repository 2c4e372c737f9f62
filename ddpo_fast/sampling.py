"""Batched sampling with log-probabilities, classifier-free guidance and the trajectory buffer, for
every model family (ddpo_fast.families) and step kind (ddpo_fast.steps: DDIM, Flow-GRPO's SDE).

Every step goes through a fused op (CFG fused, noise from the in-kernel Philox stream of (seed, step
index), so a batch is reproducible from its seed alone).

The trajectory buffer keeps, per sample, only what training needs: for the K = num_train_timesteps
steps chosen for that sample *before* sampling, x_t, x_{t-1} (both in the storage dtype, exactly as
the sampler produced and consumed them), the old log-probability (float32, computed from the stored
x_{t-1}) and the step index, plus the sample's prompt conditioning (SD: the text embedding; SDXL and
SD3 add pooled embeddings). Everything stays on the sampling device; nothing is copied to the host
per step. Bytes per sample:

    K * (2 * C*H*W * storage_itemsize + 4 + 8) + the conditioning's bytes
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ddpo_fast.families import Conditioning, ModelFamily
from ddpo_fast.precision import FP32, Precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def derive_seed(*parts: int) -> int:
    """A 62-bit seed mixed from integers (run seed, epoch, batch, rank, ...): independent streams."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 30) ^ int(state[1])


@dataclass
class Trajectories:
    """Per-sample training data; the first dimension is the sample, K = trained steps per sample."""

    latents: torch.Tensor  # (N, K, C, H, W) x_t, storage dtype
    next_latents: torch.Tensor  # (N, K, C, H, W) x_{t-1}, storage dtype
    log_probs: torch.Tensor  # (N, K) float32, old log-probabilities of next_latents
    step_indices: torch.Tensor  # (N, K) int64, indices into the step's timesteps
    conditioning: Conditioning  # the family's prompt conditioning, (N, ...) each

    def __len__(self) -> int:
        return self.latents.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "conditioning"}
        return {**plain, **{f"conditioning.{k}": v for k, v in self.conditioning.items()}}

    def bytes_per_sample(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors().values())

    def select(self, index: torch.Tensor) -> "Trajectories":
        return Trajectories(self.latents[index], self.next_latents[index], self.log_probs[index],
                            self.step_indices[index], {k: v[index] for k, v in self.conditioning.items()})

    @staticmethod
    def cat(parts: list["Trajectories"]) -> "Trajectories":
        def joined(get):
            return torch.cat([get(p) for p in parts])

        return Trajectories(joined(lambda p: p.latents), joined(lambda p: p.next_latents),
                            joined(lambda p: p.log_probs), joined(lambda p: p.step_indices),
                            {k: joined(lambda p: p.conditioning[k]) for k in parts[0].conditioning})


def expected_bytes_per_sample(num_train_timesteps: int, latent_shape, storage_dtype: torch.dtype,
                              conditioning: Conditioning) -> int:
    """The buffer formula of the module docstring (`conditioning`: one sample's, or a batch's)."""
    latent_numel = int(np.prod(latent_shape))
    storage_itemsize = torch.empty((), dtype=storage_dtype).element_size()
    conditioning_bytes = sum(v[0].numel() * v.element_size() for v in conditioning.values())
    return num_train_timesteps * (2 * latent_numel * storage_itemsize + 4 + 8) + conditioning_bytes


def choose_train_steps(batch_size: int, num_steps: int, num_train_timesteps: int, generator: torch.Generator,
                       selection: str = "random", window_start: int = 0) -> torch.Tensor:
    """(B, K) sorted distinct step indices per sample, chosen before sampling: at random per sample
    (DDPO), the first K steps (Flow-GRPO), or the K steps from `window_start` (MixGRPO's window)."""
    # Drawn in every mode: the generator then makes the same initial noise whichever steps train.
    picks = [torch.randperm(num_steps, generator=generator)[:num_train_timesteps] for _ in range(batch_size)]
    if selection in ("first", "window"):
        start = window_start if selection == "window" else 0
        return torch.arange(start, start + num_train_timesteps).expand(batch_size, -1).clone()
    return torch.stack(picks).sort(dim=1).values


@torch.no_grad()
def sample_batch(model: ModelFamily, denoiser, step, cond: Conditioning, negative: Conditioning | None, *,
                 guidance_scale: float, num_train_timesteps: int, seed: int, storage_dtype: torch.dtype,
                 precision: Precision = FP32, progress=None, timestep_selection: str = "random",
                 window_start: int = 0) -> tuple[Trajectories, torch.Tensor]:
    """Samples B = len(cond's tensors) trajectories with `denoiser` (the family's trained module, or an
    engine around it) and `step` (model.make_step); returns (trajectories, final latents x_0).

    CFG is on when `negative` is given. The denoiser runs under `precision`, the policy training uses
    too (see ddpo_fast.precision). With `timestep_selection="window"` only the trained steps are
    stochastic; the others are deterministic (DDIM eta 0, the flow ODE step; MixGRPO), which need no
    log-probability.
    """
    first = next(iter(cond.values()))
    device, batch = first.device, first.shape[0]
    latent_shape = model.latent_shape
    generator = torch.Generator().manual_seed(seed)
    train_steps = choose_train_steps(batch, step.num_steps, num_train_timesteps, generator, timestep_selection,
                                     window_start).to(device)
    window = range(window_start, window_start + num_train_timesteps)
    x = torch.randn((batch, *latent_shape), generator=generator).to(device=device, dtype=storage_dtype)
    x = x * step.init_noise_sigma

    k = num_train_timesteps
    buf_x = torch.zeros((batch, k, *latent_shape), dtype=storage_dtype, device=device)
    buf_next = torch.zeros_like(buf_x)
    buf_logp = torch.zeros((batch, k), dtype=torch.float32, device=device)
    rows = torch.arange(batch, device=device)
    guidance = guidance_scale if negative is not None else None
    for i in range(step.num_steps):
        out = model.denoise(denoiser, x, step.timesteps[i], cond, negative, precision)
        prev, log_prob = step.sample(out, x, i, seed=seed, guidance_scale=guidance, out_dtype=storage_dtype,
                                     stochastic=timestep_selection != "window" or i in window)
        # Keep step i for the samples that chose it (no host sync: the slot is found on the device).
        hit = train_steps == i
        keep = hit.any(dim=1)
        slot = hit.to(torch.int64).argmax(dim=1)
        keep_latent = keep.view(-1, *([1] * (x.dim() - 1)))
        buf_x[rows, slot] = torch.where(keep_latent, x, buf_x[rows, slot])
        buf_next[rows, slot] = torch.where(keep_latent, prev, buf_next[rows, slot])
        buf_logp[rows, slot] = torch.where(keep, log_prob.float(), buf_logp[rows, slot])
        x = prev
        if progress is not None:
            progress.update(1)
    traj = Trajectories(latents=buf_x, next_latents=buf_next, log_probs=buf_logp, step_indices=train_steps,
                        conditioning=cond)
    return traj, x


@torch.no_grad()
def sample_images_per_seed(model: ModelFamily, denoiser, step, cond: Conditioning, negative: Conditioning | None,
                           seeds: list[int], *, guidance_scale: float, storage_dtype: torch.dtype,
                           precision: Precision = FP32) -> torch.Tensor:
    """uint8 images of the prompts, one per (prompt, seed), prompt-major then seed: one batch of all
    the prompts per seed, so a (prompts, seed) pair always gets the same noise (evaluations compare
    models on it)."""
    images = []
    for seed in seeds:
        _, final = sample_batch(model, denoiser, step, cond, negative, guidance_scale=guidance_scale,
                                num_train_timesteps=1, seed=seed, storage_dtype=storage_dtype, precision=precision)
        images.append(model.decode(final))
    return torch.stack(images, dim=1).flatten(0, 1)
