"""Triton backend of the flow SDE step (Flow-GRPO): x', its log-probability, the optional mean, the
PPO stage and the gradient, with the semantics of the C++ core (csrc/flow_core.h).

Entry points take one `ddpo_fast.flow_ops.FlowCall` whose outputs the caller has allocated:

    forward(call)   x' (when call.sample_noise), log_prob, std_dev_t, prev_sample_mean when
                    allocated, with call.reference_output the per-sample KL to the reference step
                    (call.kl), then the PPO stage when call.old_log_prob is set (with the KL penalty)
    backward(call)  grad_model_output = cm * (grad_prev_sample + grad_prev_sample_mean
                    - 2 lp_scale_b grad_log_prob[b] / N (x' - mean) + grad_kl[b] / (N scale_b^2) (mean - mean_ref))

The per-sample coefficients are those of csrc/flow_math.h (mean = cx x + cm v; log_prob =
lp_scale * mean (x' - mean)^2 + lp_shift), computed in the kernels from sigma[b] and sigma_prev[b].
The Philox stream, the CFG load, the bf16 rounding, the tile sizes and the PPO stage are the DDIM
kernels' (kernels/ddim.py), so both families draw the same noise for the same (seed, offset).

Reduction as there: the forward grid is (chunk, sample), each program writes one partial sum of
(x' - mean)^2, and a finalize kernel adds each sample's partials in chunk order; deterministic, no
atomics, no host synchronisation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ddpo_fast.backends import DdimCall
from ddpo_fast.kernels import ddim
from ddpo_fast.kernels.ddim import (LOG_SQRT_2PI, Launch, _check_kl_call, _f64_arg, _f64_bits, _load_guided,
                                    _partial_sums, _round_to_bf16, _run, _store_guided_grad, _tile_index, _tile_noise,
                                    _words)

if TYPE_CHECKING:
    from ddpo_fast.flow_ops import FlowCall

__all__ = ["forward", "backward", "forward_launches", "backward_launches"]


@triton.jit
def _inv_var(scale):
    """1 / scale^2, 0 for a deterministic step (FlowCoef::inv_var): the KL penalty's factor."""
    stochastic = scale > 0.0
    safe = tl.where(stochastic, scale, 1.0)
    return tl.where(stochastic, 1.0 / (safe * safe), 0.0)


@triton.jit
def _flow_coef(s, sp, smax, eta, cps_sin, CT: tl.constexpr, SDE: tl.constexpr):
    """make_flow_coef of csrc/flow_math.h: cx, cm, std_dev_t, noise scale, lp_scale, lp_shift."""
    if SDE == 0:
        dt = sp - s
        denominator = tl.where(s == 1.0, smax, s)  # sigma == 1 would divide by zero
        std = tl.sqrt(s / (1.0 - denominator)) * eta
        var_t = std * std
        cx = 1.0 + var_t / (2.0 * s) * dt
        cm = (1.0 + var_t * (1.0 - s) / (2.0 * s)) * dt
        scale = std * tl.sqrt(-dt)
        stochastic = scale > 0.0
        safe = tl.where(stochastic, scale, 1.0)
        lp_scale = tl.where(stochastic, -0.5 / (safe * safe), 0.0)
        lp_shift = tl.where(stochastic, -tl.log(safe) - tl.full([], LOG_SQRT_2PI, CT), 0.0)
    else:
        std = sp * cps_sin
        c2 = sp * sp - std * std
        c = tl.sqrt(tl.where(c2 > 0.0, c2, 0.0))
        cx = (1.0 - sp) + c
        cm = c * (1.0 - s) - (1.0 - sp) * s
        scale = std
        lp_scale = 0.0 * s - 1.0
        lp_shift = 0.0 * s
    return cx, cm, std, scale, lp_scale, lp_shift


_SCALARS = ["eta_bits", "smax_bits", "sin_bits", "w_bits", "seed_lo", "seed_hi", "off_lo", "off_hi"]


@triton.jit(do_not_specialize=_SCALARS)
def _flow_forward_kernel(
    mo_ptr, x_ptr, s_ptr, sp_ptr, prev_ptr, noise_ptr, mean_ptr, partial_ptr, ref_ptr, kl_partial_ptr,
    B, N, nchunks,
    eta_bits, smax_bits, sin_bits, w_bits, seed_lo, seed_hi, off_lo, off_hi,
    CT: tl.constexpr, SDE: tl.constexpr, CFG: tl.constexpr, SAMPLE: tl.constexpr, PHILOX: tl.constexpr,
    PREV_BF16: tl.constexpr, WRITE_MEAN: tl.constexpr, KL: tl.constexpr, R: tl.constexpr,
):
    """One tile of R x 4 elements of sample b (whole Philox blocks with PHILOX, as in the DDIM
    forward kernel): mean, x' (stored when SAMPLE), mean (stored when WRITE_MEAN), partial sum; with
    KL (a given x') also the partial sum of (mean - mean_ref)^2."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    block, g, i, mask = _tile_index(b, c, N, PHILOX, R)

    s = tl.load(s_ptr + b).to(CT)
    sp = tl.load(sp_ptr + b).to(CT)
    cx, cm, std, scale, lp_scale, lp_shift = _flow_coef(
        s, sp, _f64_arg(smax_bits, CT), _f64_arg(eta_bits, CT), _f64_arg(sin_bits, CT), CT, SDE)
    x = tl.load(x_ptr + g, mask=mask, other=0.0).to(CT)
    v = _load_guided(mo_ptr, g, b, i, B, N, mask, w_bits, CT, CFG)
    mean = cx * x + cm * v
    if WRITE_MEAN:
        tl.store(mean_ptr + g, mean, mask=mask)
    if SAMPLE:
        z = _tile_noise(block, g, mask, noise_ptr, seed_lo, seed_hi, off_lo, off_hi, CT, PHILOX)
        if PREV_BF16:
            stored = _round_to_bf16(mean + scale * z)
        else:
            stored = (mean + scale * z).to(prev_ptr.dtype.element_ty)
        tl.store(prev_ptr + g, stored, mask=mask)
        xp = stored.to(CT)  # the log-prob of x' as stored
    else:
        xp = tl.load(prev_ptr + g, mask=mask, other=0.0).to(CT)
    d = xp - mean
    sq = tl.where(mask, d * d, 0.0)
    tl.store(partial_ptr + b * nchunks + c, tl.sum(tl.sum(sq, axis=1), axis=0))
    if KL:  # mean - mean_ref = cm (v - v_ref): exactly 0 for v == v_ref
        gap = cm * (v - _load_guided(ref_ptr, g, b, i, B, N, mask, w_bits, CT, CFG))
        tl.store(kl_partial_ptr + b * nchunks + c, tl.sum(tl.sum(tl.where(mask, gap * gap, 0.0), axis=1), axis=0))


@triton.jit(do_not_specialize=["eta_bits", "smax_bits", "sin_bits"])
def _flow_finalize_kernel(
    partial_ptr, s_ptr, sp_ptr, logp_ptr, std_ptr, kl_partial_ptr, klref_ptr,
    B, N, nchunks, eta_bits, smax_bits, sin_bits,
    CT: tl.constexpr, SDE: tl.constexpr, KL: tl.constexpr, BB: tl.constexpr, PC: tl.constexpr,
):
    """log_prob[b] from sample b's partials (added in chunk order) and std_dev_t[b]; with KL, the KL
    to the reference step, klref[b], from its partials."""
    bs = tl.program_id(0) * BB + tl.arange(0, BB)
    bmask = bs < B
    cidx = tl.arange(0, PC)
    sumsq = _partial_sums(partial_ptr, bs, bmask, nchunks, cidx, CT, BB, PC)
    s = tl.load(s_ptr + bs, mask=bmask, other=0.5).to(CT)
    sp = tl.load(sp_ptr + bs, mask=bmask, other=0.25).to(CT)
    cx, cm, std, scale, lp_scale, lp_shift = _flow_coef(
        s, sp, _f64_arg(smax_bits, CT), _f64_arg(eta_bits, CT), _f64_arg(sin_bits, CT), CT, SDE)
    tl.store(logp_ptr + bs, lp_scale * sumsq / N + lp_shift, mask=bmask)
    tl.store(std_ptr + bs, std, mask=bmask)
    if KL:
        klref = 0.5 * _inv_var(scale) * _partial_sums(kl_partial_ptr, bs, bmask, nchunks, cidx, CT, BB, PC) / N
        tl.store(klref_ptr + bs, klref, mask=bmask)


@triton.jit(do_not_specialize=["eta_bits", "smax_bits", "sin_bits", "w_bits"])
def _flow_backward_kernel(
    mo_ptr, x_ptr, s_ptr, sp_ptr, prev_ptr, gprev_ptr, gmean_ptr, glogp_ptr, gmo_ptr, ref_ptr, gkl_ptr,
    B, N, eta_bits, smax_bits, sin_bits, w_bits,
    CT: tl.constexpr, SDE: tl.constexpr, CFG: tl.constexpr, HAS_GPREV: tl.constexpr, HAS_GMEAN: tl.constexpr,
    GRAD_BF16: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad v = cm (grad_prev + grad_mean - 2 lp_scale grad_log_prob[b] / N (x' - mean)), with KL
    + grad_kl[b] / (N scale^2) (mean - mean_ref); with CFG the unconditional row gets (1 - w) of it
    and the conditional row w."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = c * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    g = b * N + i
    s = tl.load(s_ptr + b).to(CT)
    sp = tl.load(sp_ptr + b).to(CT)
    cx, cm, std, scale, lp_scale, lp_shift = _flow_coef(
        s, sp, _f64_arg(smax_bits, CT), _f64_arg(eta_bits, CT), _f64_arg(sin_bits, CT), CT, SDE)
    coef = -2.0 * lp_scale * tl.load(glogp_ptr + b).to(CT) / N
    x = tl.load(x_ptr + g, mask=mask, other=0.0).to(CT)
    v = _load_guided(mo_ptr, g, b, i, B, N, mask, w_bits, CT, CFG)
    xp = tl.load(prev_ptr + g, mask=mask, other=0.0).to(CT)
    upstream = coef * (xp - (cx * x + cm * v))
    if HAS_GPREV:
        upstream += tl.load(gprev_ptr + g, mask=mask, other=0.0).to(CT)
    if HAS_GMEAN:
        upstream += tl.load(gmean_ptr + g, mask=mask, other=0.0).to(CT)
    if KL:  # mean - mean_ref = cm (v - v_ref)
        gap = cm * (v - _load_guided(ref_ptr, g, b, i, B, N, mask, w_bits, CT, CFG))
        upstream += tl.load(gkl_ptr + b).to(CT) * _inv_var(scale) / N * gap
    grad = cm * upstream
    _store_guided_grad(gmo_ptr, g, b, i, B, N, mask, grad, w_bits, CT, CFG, GRAD_BF16)


# ---- Launchers -------------------------------------------------------------------------------


def _policy_bits(call: FlowCall) -> dict:
    # sin(noise_level pi / 2) in double, rounded once in the kernel (as flow_grpo's math.sin).
    return dict(eta_bits=_f64_bits(call.noise_level), smax_bits=_f64_bits(call.sigma_max),
                sin_bits=_f64_bits(math.sin(call.noise_level * math.pi / 2)))


def _compute(call: FlowCall):
    if call.compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be float32 or float64, got {call.compute_dtype}")
    return tl.float64 if call.compute_dtype == torch.float64 else tl.float32


def _check_call(call: FlowCall, backward: bool = False) -> None:
    B, N = call.sample.shape
    rows = 2 * B if call.guidance_scale is not None else B
    if call.model_output.shape != (rows, N) or call.prev_sample.shape != (B, N):
        raise ValueError(f"model_output must be ({rows}, {N}) and prev_sample ({B}, {N})")
    if call.sigma.numel() != B or call.sigma_prev.numel() != B:
        raise ValueError("sigma and sigma_prev must have one element per sample")
    if call.sde_type not in (0, 1):
        raise ValueError(f"sde_type must be 0 (sde) or 1 (cps), got {call.sde_type}")
    _check_kl_call(call, backward, rows)


def forward_launches(call: FlowCall, cfg: ddim.KernelConfig) -> list[Launch]:
    """The step and finalize launches of forward(call) (allocates the partial-sum workspace)."""
    _check_call(call)
    B, N = call.batch, call.numel
    philox = call.sample_noise and call.noise is None
    block = cfg.forward_block
    nchunks = triton.cdiv(N + 3 if philox and N % 4 else N, block)  # a Philox tile may start before the sample
    with_kl = call.reference_output is not None  # + the partial sums of (mean - mean_ref)^2
    partial = torch.empty((2 if with_kl else 1, B, nchunks), dtype=call.compute_dtype, device=call.sample.device)
    seed_lo, seed_hi = _words(call.seed)
    off_lo, off_hi = _words(call.offset)
    bits = _policy_bits(call)
    step = Launch(_flow_forward_kernel, (nchunks, B), dict(
        mo_ptr=call.model_output, x_ptr=call.sample, s_ptr=call.sigma, sp_ptr=call.sigma_prev,
        prev_ptr=call.prev_sample, noise_ptr=call.noise if call.noise is not None else call.sample,
        mean_ptr=call.prev_sample_mean if call.prev_sample_mean is not None else partial[0], partial_ptr=partial[0],
        ref_ptr=call.reference_output if with_kl else call.model_output, kl_partial_ptr=partial[-1],
        B=B, N=N, nchunks=nchunks, w_bits=_f64_bits(call.guidance_scale or 0.0),
        seed_lo=seed_lo, seed_hi=seed_hi, off_lo=off_lo, off_hi=off_hi, **bits,
    ), dict(
        CT=_compute(call), SDE=call.sde_type, CFG=call.guidance_scale is not None, SAMPLE=call.sample_noise,
        PHILOX=philox, PREV_BF16=call.prev_sample.dtype == torch.bfloat16,
        WRITE_MEAN=call.prev_sample_mean is not None, KL=with_kl, R=block // 4,
    ), cfg.num_warps)
    finalize = Launch(_flow_finalize_kernel, (triton.cdiv(B, cfg.batch_tile),), dict(
        partial_ptr=partial[0], s_ptr=call.sigma, sp_ptr=call.sigma_prev, logp_ptr=call.log_prob,
        std_ptr=call.std_dev_t, kl_partial_ptr=partial[-1], klref_ptr=call.kl if with_kl else call.log_prob,
        B=B, N=N, nchunks=nchunks, **bits,
    ), dict(CT=_compute(call), SDE=call.sde_type, KL=with_kl, BB=cfg.batch_tile, PC=cfg.partial_tile),
        cfg.num_warps)
    launches = [step, finalize]
    if call.old_log_prob is not None:  # the DDIM kernels' PPO stage on log_prob
        launches += ddim.ppo_launches(_ppo_call(call), cfg)
    return launches


def _ppo_call(call: FlowCall) -> DdimCall:
    placeholder = call.log_prob.new_empty(call.batch, 1)
    return DdimCall(model_output=placeholder, sample=placeholder, alpha_t=call.log_prob, alpha_prev=call.log_prob,
                    prev_sample=placeholder, log_prob=call.log_prob, old_log_prob=call.old_log_prob,
                    advantages=call.advantages, ppo_clip_range=call.ppo_clip_range, adv_clip_max=call.adv_clip_max,
                    loss=call.loss, approx_kl=call.approx_kl, clipfrac=call.clipfrac, dloss_dlogp=call.dloss_dlogp,
                    kl=call.kl, kl_beta=call.kl_beta, kl_mean=call.kl_mean)


def backward_launches(call: FlowCall, cfg: ddim.KernelConfig) -> list[Launch]:
    _check_call(call, backward=True)
    if call.grad_log_prob is None or call.grad_model_output is None:
        raise ValueError("backward needs grad_log_prob and grad_model_output")
    B, N = call.batch, call.numel
    block = cfg.backward_block
    gprev, gmean = call.grad_prev_sample, call.grad_prev_sample_mean
    with_kl = call.grad_kl is not None  # the KL penalty's term (needs reference_output)
    return [Launch(_flow_backward_kernel, (triton.cdiv(N, block), B), dict(
        mo_ptr=call.model_output, x_ptr=call.sample, s_ptr=call.sigma, sp_ptr=call.sigma_prev,
        prev_ptr=call.prev_sample, gprev_ptr=gprev if gprev is not None else call.sample,
        gmean_ptr=gmean if gmean is not None else call.sample, glogp_ptr=call.grad_log_prob,
        gmo_ptr=call.grad_model_output, ref_ptr=call.reference_output if with_kl else call.model_output,
        gkl_ptr=call.grad_kl if with_kl else call.grad_log_prob,
        B=B, N=N, w_bits=_f64_bits(call.guidance_scale or 0.0), **_policy_bits(call),
    ), dict(
        CT=_compute(call), SDE=call.sde_type, CFG=call.guidance_scale is not None, HAS_GPREV=gprev is not None,
        HAS_GMEAN=gmean is not None, GRAD_BF16=call.grad_model_output.dtype == torch.bfloat16, KL=with_kl,
        BLOCK=block,
    ), cfg.num_warps)]


def forward(call: FlowCall) -> None:
    _run(forward_launches(call, ddim.config(call.sample.device)), call.sample.device)


def backward(call: FlowCall) -> None:
    _run(backward_launches(call, ddim.config(call.sample.device)), call.sample.device)
