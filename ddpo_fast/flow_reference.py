"""Plain-PyTorch reference of the flow-matching SDE step (Flow-GRPO) and its PPO loss: the test
oracle and the fallback backend of ddpo_fast.flow_ops.

Notation: sigma = sigmas[i] and sigma' = sigmas[i + 1] of a FlowMatchEulerDiscreteScheduler, per
sample, dt = sigma' - sigma < 0, v the predicted velocity (after classifier-free guidance), x = x_t,
x' the next latent, eta = noise_level.

sde (Flow-GRPO's SDE, arXiv 2505.05470 eq. 9):
    std_t    = eta * sqrt(sigma / (1 - s)),  s = sigma_max where sigma == 1, else sigma
    mean     = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'       = mean + std_t sqrt(-dt) z
    log_prob = mean over the non-batch dims of log N(x'; mean, (std_t sqrt(-dt))^2)
    (sigma_max is sigmas[1] of the scheduler: the first step, sigma == 1, would divide by zero;
    without it such a step is NaN here, and the public ops refuse it.)

cps (coefficients-preserving sampling, as flow_grpo implements it):
    std_t    = sigma' sin(eta pi / 2)
    x0 = x - sigma v,  x1 = x + (1 - sigma) v
    mean     = (1 - sigma') x0 + sqrt(sigma'^2 - std_t^2) x1
    x'       = mean + std_t z
    log_prob = -mean over the non-batch dims of (x' - mean)^2   (no constants, no 1 / (2 std^2))

KL penalty to a reference policy: the reference step from the reference model's velocity v_ref (after
the same guidance), mean_ref from the same mean function, the same step std, so per sample
    KL = mean over the non-batch dims of (mean - mean_ref)^2 / (2 step_std^2)
with step_std = std_t sqrt(-dt) (sde) or std_t (cps) (reference.gaussian_kl; flow_grpo leaves the dt
out of the sde std there: flow_grpo#78, #111).

A deterministic sde step (std_t sqrt(-dt) == 0, i.e. noise_level 0) has log_prob 0 with zero
gradient, as the DDIM op defines it (flow_grpo divides by zero there). Everything is computed in
float32, or in float64 when any floating input is float64.
"""
from __future__ import annotations

import math

import torch

from ddpo_fast.reference import (LOG_SQRT_2PI, _per_sample, add_kl_penalty, apply_guidance, compute_dtype,
                                 gaussian_kl, philox_normal, ppo_clip_loss)

SDE_TYPES = ("sde", "cps")


def flow_sde_std(sigma: torch.Tensor, sigma_prev: torch.Tensor, noise_level: float, sde_type: str,
                 sigma_max: float | None = None) -> torch.Tensor:
    """std_dev_t of the step, one per sample (the shape of sigma)."""
    if sde_type == "sde":
        # No host branch here (it would break torch.compile graphs): without sigma_max a step at
        # sigma == 1 is NaN; the public ops refuse it before they get here.
        replacement = torch.full_like(sigma, math.nan if sigma_max is None else sigma_max)
        denominator = torch.where(sigma == 1, replacement, sigma)
        return torch.sqrt(sigma / (1 - denominator)) * noise_level
    if sde_type == "cps":
        return sigma_prev * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")


def flow_sde_mean(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_prev: torch.Tensor,
                  noise_level: float, sde_type: str = "sde", *, sigma_max: float | None = None,
                  guidance_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std_dev_t, step std), the last two per sample and broadcastable, in the compute dtype."""
    dtype = compute_dtype(model_output, sample, sigma, sigma_prev)
    v = apply_guidance(model_output.to(dtype), guidance_scale)
    x = sample.to(dtype)
    s = _per_sample(sigma.to(dtype), x)
    s_prev = _per_sample(sigma_prev.to(dtype), x)
    std = flow_sde_std(s, s_prev, noise_level, sde_type, sigma_max)
    if sde_type == "sde":
        dt = s_prev - s
        mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        return mean, std, std * torch.sqrt(-dt)
    x0 = x - s * v
    x1 = x + (1 - s) * v
    # sigma'^2 - std^2 = sigma'^2 cos^2(eta pi / 2) >= 0; the clamp only absorbs rounding.
    mean = (1 - s_prev) * x0 + torch.sqrt((s_prev**2 - std**2).clamp(min=0)) * x1
    return mean, std, std


def flow_sde_log_prob(prev_sample: torch.Tensor, mean: torch.Tensor, step_std: torch.Tensor,
                      sde_type: str) -> torch.Tensor:
    """log_prob per sample of `prev_sample` (detached) under the step's policy."""
    diff = prev_sample.detach().to(mean.dtype) - mean
    dims = tuple(range(1, mean.dim()))
    if sde_type == "cps":
        return -(diff**2).mean(dim=dims)
    stochastic = step_std > 0
    safe = torch.where(stochastic, step_std, torch.ones_like(step_std))
    log_prob = (-(diff**2) / (2 * safe**2) - torch.log(safe) - LOG_SQRT_2PI).mean(dim=dims)
    return torch.where(stochastic.reshape(-1), log_prob, torch.zeros_like(log_prob))


def flow_sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_prev: torch.Tensor,
    *,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    sigma_max: float | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    prev_sample: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prev_sample, log_prob (B,), prev_sample_mean, std_dev_t (B,)).

    prev_sample given: returned unchanged with its log-prob. Otherwise mean + step_std z with z =
    `noise` or the Philox stream of (seed, offset), stored in out_dtype (default sample.dtype), and
    the log-prob is that of the stored value.
    """
    mean, std, step_std = flow_sde_mean(model_output, sample, sigma, sigma_prev, noise_level, sde_type,
                                        sigma_max=sigma_max, guidance_scale=guidance_scale)
    if prev_sample is None:
        if noise is None:
            noise = philox_normal(mean.numel(), seed, offset, device=mean.device).reshape(mean.shape)
        prev_sample = (mean + step_std * noise.to(mean.dtype)).to(out_dtype or sample.dtype)
    return prev_sample, flow_sde_log_prob(prev_sample, mean, step_std, sde_type), mean, std.reshape(-1)


def flow_sde_ppo_loss(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_prev: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    sigma_max: float | None = None,
    guidance_scale: float | None = None,
    reference_output: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-prob of the stored x' under the current model output, then the clipped PPO loss; with
    `reference_output`, plus kl_beta * the batch mean of the KL to the reference step (stats "kl")."""
    policy = dict(sigma_max=sigma_max, guidance_scale=guidance_scale)
    mean, _, step_std = flow_sde_mean(model_output, sample, sigma, sigma_prev, noise_level, sde_type, **policy)
    log_prob = flow_sde_log_prob(prev_sample, mean, step_std, sde_type)
    loss, stats = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    stats["log_prob"] = log_prob.detach()
    if reference_output is not None:
        mean_ref, _, _ = flow_sde_mean(reference_output, sample, sigma, sigma_prev, noise_level, sde_type, **policy)
        loss, stats = add_kl_penalty(loss, stats, gaussian_kl(mean, mean_ref, step_std), kl_beta)
    return loss, stats
