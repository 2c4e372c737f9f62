"""Plain-PyTorch reference of every fused op: the test oracle and the fallback backend.

Notation follows the DDIM paper (Song et al., 2010.02502) and diffusers' DDIMScheduler:
a = alpha_prod_t, p = alpha_prod_t_prev (per sample), m = model output (after classifier-free
guidance), x = x_t, x' = x_{t-1}.

    x0    = prediction-type specific (epsilon / sample / v_prediction), optionally clipped
    eps   = prediction-type specific, or re-derived from the clipped x0
    sigma = eta * sqrt((1 - p) / (1 - a)) * sqrt((p - a) / p)
    mu    = sqrt(p) x0 + sqrt(1 - p - sigma^2) eps
    x'    = mu + sigma z
    log_prob = mean over the non-batch dims of  -(x' - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)

`(p - a) / p` is the same quantity as diffusers' `1 - a / p`, written so that it does not cancel in
float32 when a and p are close (the last steps).

A step with sigma == 0 (eta == 0, or the last step with final_alpha_cumprod == 1) is deterministic:
x' = mu and log_prob is defined as 0 with zero gradient (a Dirac policy has no density; 0 makes the
PPO ratio exactly 1, so such a step contributes nothing to the loss).

KL penalty to a reference policy (the starting model): the reference step is the same Gaussian step
with the reference model's output m_ref (after the same guidance), mu_ref from the same mean function,
and the same sigma, so per sample

    KL = mean over the non-batch dims of (mu - mu_ref)^2 / (2 sigma^2)

(0 with zero gradient where sigma == 0, as log_prob). mu_ref is a constant: the gradient is the
policy's alone. With the KL, ddim_ppo_loss returns loss = PPO loss + kl_beta * mean over the batch of KL.

Everything is computed in float32, or in float64 when any floating input is float64.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (fp16/bf16 inputs accumulate in fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a < 2**32 and int64 b < 2**32, without int64 overflow."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16) + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(counter: torch.Tensor, offset: int, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 of the 128-bit counters (counter, offset) under the 64-bit key `seed`.

    counter: int64 tensor of block indices (>= 0). Returns four int64 tensors holding uint32 values.
    """
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32  # two's complement: any int64 bit pattern
    c2 = torch.full_like(counter, offset & _MASK32)
    c3 = torch.full_like(counter, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def uint32_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Maps uint32 values to odd multiples of 2**-24 in (0, 1), exactly representable in float32."""
    return ((x >> 9) * 2 + 1).to(torch.float64) * 2.0**-24


def philox_normal(numel: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The noise stream of the fused kernels, in float64: element i is normal number i % 4 of the
    Philox block i // 4, turned into normals by Box-Muller on the pairs (u0, u1) and (u2, u3)."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    u0, u1, u2, u3 = (uint32_to_unit(x) for x in philox4x32(blocks, offset, seed))
    r01 = torch.sqrt(-2.0 * torch.log(u0))
    r23 = torch.sqrt(-2.0 * torch.log(u2))
    z = torch.stack(
        [
            r01 * torch.cos(2 * math.pi * u1),
            r01 * torch.sin(2 * math.pi * u1),
            r23 * torch.cos(2 * math.pi * u3),
            r23 * torch.sin(2 * math.pi * u3),
        ],
        dim=1,
    )
    return z.reshape(-1)[:numel]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def ddim_sigma(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    a, p = alpha_prod_t, alpha_prod_t_prev
    return eta * torch.sqrt((1 - p) / (1 - a) * ((p - a) / p))


def apply_guidance(model_output: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """Classifier-free guidance on the stacked [unconditional; conditional] halves (diffusers order)."""
    if guidance_scale is None:
        return model_output
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def ddim_mean(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    eta: float,
    *,
    guidance_scale: float | None = None,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and sigma (broadcastable, per sample) of the DDIM policy, in the compute dtype."""
    dtype = compute_dtype(model_output, sample, alpha_prod_t, alpha_prod_t_prev)
    m = apply_guidance(model_output.to(dtype), guidance_scale)
    x = sample.to(dtype)
    a = _per_sample(alpha_prod_t.to(dtype), x)
    p = _per_sample(alpha_prod_t_prev.to(dtype), x)
    sqrt_a, sqrt_1ma = torch.sqrt(a), torch.sqrt(1 - a)
    if prediction_type == "epsilon":
        x0, eps = (x - sqrt_1ma * m) / sqrt_a, m
    elif prediction_type == "sample":
        x0, eps = m, (x - sqrt_a * m) / sqrt_1ma
    elif prediction_type == "v_prediction":
        x0, eps = sqrt_a * x - sqrt_1ma * m, sqrt_a * m + sqrt_1ma * x
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        eps = (x - sqrt_a * x0) / sqrt_1ma
    sigma = ddim_sigma(a, p, eta)
    # 1 - p - sigma^2 >= 0 for eta <= 1; the clamp only absorbs rounding, as the kernels do.
    mu = torch.sqrt(p) * x0 + torch.sqrt((1 - p - sigma**2).clamp(min=0)) * eps
    return mu, sigma


def gaussian_log_prob(prev_sample: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over the non-batch dims of log N(prev_sample; mu, sigma^2); 0 where sigma == 0."""
    stochastic = sigma > 0
    safe_sigma = torch.where(stochastic, sigma, torch.ones_like(sigma))
    diff = prev_sample.detach().to(mu.dtype) - mu
    elementwise = -(diff**2) / (2 * safe_sigma**2) - torch.log(safe_sigma) - LOG_SQRT_2PI
    log_prob = elementwise.mean(dim=tuple(range(1, mu.dim())))
    return torch.where(stochastic.reshape(-1), log_prob, torch.zeros_like(log_prob))


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per sample, mean over the non-batch dims:
    (mean - mean_ref)^2 / (2 std^2); 0 with zero gradient where std == 0. mean_ref is detached.
    The one formula of the KL penalty for the DDIM and the flow SDE steps."""
    stochastic = std.reshape(-1) > 0
    safe_std = torch.where(stochastic, std.reshape(-1), torch.ones_like(stochastic, dtype=std.dtype))
    kl = ((mean - mean_ref.detach()) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * safe_std**2)
    return torch.where(stochastic, kl, torch.zeros_like(kl))


def ddim_kl(
    model_output: torch.Tensor,
    reference_output: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    *,
    eta: float,
    guidance_scale: float | None = None,
    sample: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Per-sample KL(policy step || reference step), shape (B,), mean over the latent's elements, with
    the policy's gradient (the fused ops' `kl`, on its own). Both outputs are [uncond; cond] halves
    with `guidance_scale`.

    `sample` (x_t) may be left out without clipping: the mean is then affine in x_t and m with the
    same coefficients for both steps, so x_t cancels and mu - mu_ref = (d mu / d m) (m - m_ref), the
    slope per sample being the mean function of a unit output at x_t = 0 (the trainer's call; cheaper).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 (the steps have no density at eta = 0), got {eta}")
    if model_output.shape != reference_output.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and reference_output "
                         f"{tuple(reference_output.shape)} must have the same shape")
    policy = dict(guidance_scale=guidance_scale, prediction_type=prediction_type,
                  clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output)
    if sample is None:
        if clip_sample_range is not None:
            raise ValueError("sample (x_t) is needed with clip_sample_range: the clipped mean depends on it")
        dtype = compute_dtype(model_output, alpha_prod_t, alpha_prod_t_prev)
        difference = apply_guidance(model_output.to(dtype) - reference_output.detach().to(dtype), guidance_scale)
        per_sample = (difference.shape[0],) + (1,) * (difference.dim() - 1)
        slope, sigma = ddim_mean(difference.new_ones(per_sample), difference.new_zeros(per_sample), alpha_prod_t,
                                 alpha_prod_t_prev, eta, **dict(policy, guidance_scale=None))
        return gaussian_kl(slope * difference, difference.new_zeros(()), sigma)
    mu, sigma = ddim_mean(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, **policy)
    mu_ref, _ = ddim_mean(reference_output.detach(), sample, alpha_prod_t, alpha_prod_t_prev, eta, **policy)
    return gaussian_kl(mu, mu_ref, sigma)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    prev_sample: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    use_clipped_model_output: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step with its log-probability: (x_{t-1} in out_dtype, log_prob (B,)).

    With `prev_sample` given, returns it unchanged with its log-probability under the policy.
    Otherwise x_{t-1} = mu + sigma z with z = `noise` or the Philox stream of `seed`/`offset`, and
    log_prob is that of x_{t-1} as rounded to out_dtype (default: sample.dtype).
    """
    mu, sigma = ddim_mean(
        model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta,
        guidance_scale=guidance_scale, prediction_type=prediction_type,
        clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output,
    )
    if prev_sample is None:
        if noise is None:
            noise = philox_normal(mu.numel(), seed, offset, device=mu.device).reshape(mu.shape)
        prev_sample = (mu + sigma * noise.to(mu.dtype)).to(out_dtype or sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mu, sigma)


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO-IS: mean over the batch of max(-A r, -A clip(r, 1 - clip, 1 + clip)), r = exp(log_prob - old)."""
    dtype = compute_dtype(log_prob, old_log_prob, advantages)
    log_prob, old_log_prob = log_prob.to(dtype), old_log_prob.to(dtype)
    adv = advantages.to(dtype).clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).to(dtype).mean(),
    }
    return loss, stats


def ddim_ppo_loss(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    eta: float = 1.0,
    guidance_scale: float | None = None,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    use_clipped_model_output: bool = False,
    reference_output: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probability of the stored x_{t-1} under the current model output, then the PPO loss; with
    `reference_output`, plus kl_beta * the batch mean of the KL to the reference step (stats "kl")."""
    policy = dict(guidance_scale=guidance_scale, prediction_type=prediction_type,
                  clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output)
    mu, sigma = ddim_mean(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, **policy)
    log_prob = gaussian_log_prob(prev_sample, mu, sigma)
    loss, stats = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    stats["log_prob"] = log_prob.detach()
    if reference_output is not None:
        mu_ref, _ = ddim_mean(reference_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, **policy)
        loss, stats = add_kl_penalty(loss, stats, gaussian_kl(mu, mu_ref, sigma), kl_beta)
    return loss, stats


def add_kl_penalty(loss: torch.Tensor, stats: dict, kl: torch.Tensor, kl_beta: float) -> tuple[torch.Tensor, dict]:
    """loss + kl_beta * mean over the batch of the per-sample KL; stats["kl"] = that mean, detached."""
    kl_mean = kl.mean()
    stats["kl"] = kl_mean.detach()
    return loss + kl_beta * kl_mean, stats
