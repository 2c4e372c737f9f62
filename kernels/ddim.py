"""Triton backend of the fused DDIM step: x_{t-1} and its log-probability, the PPO stage, the gradient.

Three entry points with the semantics of the C++ core (csrc/ddim_core.h), each taking one
`ddpo_fast.backends.DdimCall` whose outputs the caller has allocated:

    forward(call)   x_{t-1} (when call.sample_noise) and log_prob, with call.reference_output also the
                    per-sample KL to the reference step (call.kl), then the PPO stage when
                    call.old_log_prob is set (with the KL penalty when call.kl is set)
    backward(call)  grad_model_output = d mu / d m * (grad_prev_sample + c_b (x' - mu) + k_b (mu - mu_ref)),
                    c_b = grad_log_prob[b] / (sigma_b^2 numel), k_b = grad_kl[b] / (sigma_b^2 numel)
                    (the last term with call.grad_kl only)
    ppo(call)       the PPO stage alone, reading call.log_prob (and call.kl when set)

Each entry point builds its launches (forward_launches, ppo_launches, backward_launches: kernel,
grid, arguments, constexprs), which tests/triton_aot.py compiles ahead of time for sm_90, then runs
them with the tensors' CUDA device made current.

The per-element and per-sample math is that of csrc/ddim_math.h, written the same way (the
(p - a) / p form of sigma, the StepCoef coefficients, the clip rule, the PPO tie rule, the Philox
counters and keys, the Box-Muller layout and its polynomial log / sincos), so that the Triton, CPU
and CUDA backends compute the same function; ddpo_fast/reference.py is the specification.

Compute dtype: float32 for float32 / float16 / bfloat16 tensors (each tensor may have its own
dtype), float64 when call.compute_dtype (the dtype of alpha_t) is float64. Scalars (eta, guidance
scale, clip ranges) reach the kernels as the bits of the Python float, so float64 calls see them
exactly and float32 calls round them once, as the C++ core does.

Reduction: the forward grid is (chunk, sample); each program reduces one tile of its sample to a
partial sum of (x' - mu)^2, and a single-program finalize kernel adds each sample's partials in chunk
order, forms log_prob and runs the PPO stage. Results are deterministic (no atomics) and no value
is read back to the host, so a call can be captured in a CUDA graph.

On CPU tensors the kernels run under Triton's interpreter: set TRITON_INTERPRET=1 before Triton
is first imported.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from ddpo_fast.backends import DdimCall

__all__ = ["forward", "backward", "ppo", "KernelConfig", "config", "Launch", "forward_launches",
           "ppo_launches", "backward_launches"]


class KernelConfig:
    """Tile sizes. `forward_block`: elements per forward program (a multiple of 4: it is a tile of
    forward_block / 4 Philox blocks), also the reduction chunk; `backward_block`: elements per
    backward program; `batch_tile` x `partial_tile`: the finalize kernel's tile of partial sums."""

    def __init__(self, forward_block: int, backward_block: int, batch_tile: int = 32,
                 partial_tile: int = 32, num_warps: int = 4):
        for name, v in (("forward_block", forward_block), ("backward_block", backward_block),
                        ("batch_tile", batch_tile), ("partial_tile", partial_tile)):
            if v < 4 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 4, got {v}")
        self.forward_block = forward_block
        self.backward_block = backward_block
        self.batch_tile = batch_tile
        self.partial_tile = partial_tile
        self.num_warps = num_warps


# GPU: 1024 elements (8 per thread at 4 warps) keep enough programs in flight for B = 32 latents.
# The interpreter pays per program and per op, not per element: larger tiles run faster there.
GPU_CONFIG = KernelConfig(forward_block=1024, backward_block=1024)
INTERPRETER_CONFIG = KernelConfig(forward_block=4096, backward_block=4096)


def config(device: torch.device) -> KernelConfig:
    """The tile sizes used for tensors on `device` (tests may replace the module attributes)."""
    if device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return INTERPRETER_CONFIG
    return GPU_CONFIG


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
LOG_SQRT_2PI = tl.constexpr(0.91893853320467274178)  # log sqrt(2 pi)


def _f64_bits(x: float) -> int:
    """The IEEE-754 bits of a Python float as a signed 64-bit integer (a kernel int64 argument)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _words(x: int) -> tuple[int, int]:
    """Low and high 32-bit words of a uint64, each as a signed int32 (a kernel int32 argument)."""
    x &= (1 << 64) - 1
    lo, hi = x & 0xFFFFFFFF, x >> 32
    return tuple(w - (1 << 32) if w >= (1 << 31) else w for w in (lo, hi))


# ---- Device helpers --------------------------------------------------------------------------


@triton.jit
def _f64_arg(bits, CT: tl.constexpr):
    """A float argument passed as its float64 bits, in the compute dtype (one rounding)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(CT)


@triton.jit
def _sigma_var(a, p, eta):
    """sigma and sigma^2 of the DDIM policy: (p - a) / p is 1 - a / p without cancellation."""
    variance = eta * eta * ((1.0 - p) / (1.0 - a)) * ((p - a) / p)
    return tl.sqrt(variance), variance


@triton.jit
def _log_density_terms(a, p, eta, CT: tl.constexpr):
    """inv_var = 1 / sigma^2 and log_norm = -log sigma - log sqrt(2 pi); both 0 when sigma == 0."""
    sigma, variance = _sigma_var(a, p, eta)
    stochastic = sigma > 0.0
    safe_sigma = tl.where(stochastic, sigma, 1.0)
    safe_var = tl.where(stochastic, variance, 1.0)
    inv_var = tl.where(stochastic, 1.0 / safe_var, 0.0)
    log_norm = tl.where(stochastic, -tl.log(safe_sigma) - tl.full([], LOG_SQRT_2PI, CT), 0.0)
    return inv_var, log_norm


@triton.jit
def _step_coef(a, p, eta, PRED: tl.constexpr):
    """StepCoef of ddim_math.h: x0 = cx x + cm m, eps = ex x + em m, mu = sqrt_p x0 + dir eps."""
    sqrt_a = tl.sqrt(a)
    sqrt_1ma = tl.sqrt(1.0 - a)
    if PRED == 0:  # epsilon
        cx = 1.0 / sqrt_a
        cm = -sqrt_1ma / sqrt_a
        ex = 0.0 * a
        em = 1.0 + 0.0 * a
    elif PRED == 1:  # sample
        cx = 0.0 * a
        cm = 1.0 + 0.0 * a
        ex = 1.0 / sqrt_1ma
        em = -sqrt_a / sqrt_1ma
    else:  # v_prediction
        cx = sqrt_a
        cm = -sqrt_1ma
        ex = sqrt_1ma
        em = sqrt_a
    inv_sqrt_1ma = 1.0 / sqrt_1ma
    sigma, variance = _sigma_var(a, p, eta)
    dir2 = 1.0 - p - variance
    sqrt_p = tl.sqrt(p)
    dir = tl.sqrt(tl.where(dir2 > 0.0, dir2, 0.0))
    mx = sqrt_p * cx + dir * ex
    mm = sqrt_p * cm + dir * em
    return cx, cm, ex, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mx, mm, sigma


@triton.jit
def _ddim_mean(x, m, cx, cm, ex, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mx, mm, rng,
               CLIP: tl.constexpr, USE_CLIPPED: tl.constexpr):
    """mu and d mu / d m per element (ddim_mean of ddim_math.h)."""
    if CLIP:
        x0 = cx * x + cm * m
        inside = (x0 >= -rng) & (x0 <= rng)
        dx0 = tl.where(inside, cm, 0.0)
        x0 = tl.where(x0 < -rng, -rng, tl.where(x0 > rng, rng, x0))
        if USE_CLIPPED:
            eps = (x - sqrt_a * x0) * inv_sqrt_1ma
            deps = -sqrt_a * inv_sqrt_1ma * dx0
        else:
            eps = ex * x + em * m
            deps = em
        mu = sqrt_p * x0 + dir * eps
        dmu = sqrt_p * dx0 + dir * deps
    else:
        mu = mx * x + mm * m
        dmu = mm
    return mu, dmu


@triton.jit
def _ddim_mean_gap(x, m, m_ref, cx, cm, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mm, rng,
                   CLIP: tl.constexpr, USE_CLIPPED: tl.constexpr):
    """mu - mu_ref for model outputs m and m_ref at the same x (ddim_mean_gap of ddim_math.h): exactly 0
    for m == m_ref, without the cancellation of two rounded means."""
    dm = m - m_ref
    if CLIP:
        raw = cx * x + cm * m
        raw_ref = raw - cm * dm
        dx0 = (tl.where(raw < -rng, -rng, tl.where(raw > rng, rng, raw))
               - tl.where(raw_ref < -rng, -rng, tl.where(raw_ref > rng, rng, raw_ref)))
        if USE_CLIPPED:
            deps = -sqrt_a * inv_sqrt_1ma * dx0
        else:
            deps = em * dm
        gap = sqrt_p * dx0 + dir * deps
    else:
        gap = mm * dm
    return gap


@triton.jit
def _load_guided(mo_ptr, g, b, i, B, N, mask, w_bits, CT: tl.constexpr, CFG: tl.constexpr):
    """Model output of elements i of sample b (flat index g) after classifier-free guidance:
    m_u + w (m_c - m_u) with m_u in row b and m_c in row B + b."""
    if CFG:
        w = _f64_arg(w_bits, CT)
        m_u = tl.load(mo_ptr + g, mask=mask, other=0.0).to(CT)
        m_c = tl.load(mo_ptr + ((b + B) * N + i), mask=mask, other=0.0).to(CT)
        m = m_u + w * (m_c - m_u)
    else:
        m = tl.load(mo_ptr + g, mask=mask, other=0.0).to(CT)
    return m


@triton.jit
def _uint_to_unit(x):
    """Odd multiples of 2^-24 in (0, 1), exact in float32."""
    return (((x >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _log_positive(v):
    """log of a normal positive float32: e log 2 + 2 atanh((m - 1) / (m + 1)), m in [sqrt(1/2), sqrt(2))."""
    bits = v.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    halve = m > 1.41421356
    m = tl.where(halve, m * 0.5, m)
    e = tl.where(halve, e + 1, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    tail = s2 * (0.333333333 + s2 * (0.2 + s2 * (0.142857143 + s2 * 0.111111111)))
    return e.to(tl.float32) * 0.693147181 + (2.0 * s + 2.0 * s * tail)


@triton.jit
def _sincos_2pi(u):
    """sin and cos of 2 pi u, u in [0, 1): nearest quarter turn, then Taylor on [-pi/4, pi/4]."""
    quarter = (4.0 * u + 0.5).to(tl.int32)
    y = (u - 0.25 * quarter.to(tl.float32)) * 6.28318530717958648
    y2 = y * y
    sy = y * (1.0 + y2 * (-1.66666667e-1 + y2 * (8.33333333e-3 + y2 * (-1.98412698e-4 + y2 * 2.75573192e-6))))
    cy = 1.0 + y2 * (-0.5 + y2 * (4.16666667e-2 + y2 * (-1.38888889e-3 + y2 * (2.48015873e-5 + y2 * -2.75573192e-7))))
    q = quarter & 3
    c = tl.where(q == 0, cy, tl.where(q == 1, -sy, tl.where(q == 2, -cy, sy)))
    s = tl.where(q == 0, sy, tl.where(q == 1, cy, tl.where(q == 2, -sy, -cy)))
    return s, c


@triton.jit
def _philox_normal4(block, off_lo, off_hi, seed_lo, seed_hi):
    """Philox4x32-10 of counters (block lo, block hi, offset lo, offset hi) under key (seed lo, hi),
    then Box-Muller on (u0, u1) and (u2, u3): the four float32 normals of each int64 `block`."""
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + off_lo
    c3 = zero + off_hi
    k0 = seed_lo
    k1 = seed_hi
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    rad01 = tl.sqrt(-2.0 * _log_positive(_uint_to_unit(c0)))
    rad23 = tl.sqrt(-2.0 * _log_positive(_uint_to_unit(c2)))
    s1, co1 = _sincos_2pi(_uint_to_unit(c1))
    s3, co3 = _sincos_2pi(_uint_to_unit(c3))
    return rad01 * co1, rad01 * s1, rad23 * co3, rad23 * s3


@triton.jit
def _round_to_bf16(v):
    """v rounded to bfloat16, to nearest even, as float_to_bf16_bits of ddim_math.h (from float32).
    Done by hand because Triton's interpreter truncates in its own float32 -> bfloat16 cast (the
    GPU's cast rounds): this gives the same bits on both. Other storage dtypes use the cast."""
    u = v.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = tl.where(is_nan, (u >> 16) | 0x40, rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _tile_index(b, c, N, PHILOX: tl.constexpr, R: tl.constexpr):
    """The (R, 4) tile of chunk c of sample b: Philox block indices, flat indices g, indices i in the
    sample, mask. With PHILOX the tile is R whole Philox blocks of the flattened (B, N) tensor
    (element g = b N + i is normal g % 4 of block g // 4): chunk c covers blocks b N // 4 + c R ...
    + R - 1, masked to the sample's elements, so each block's Philox and Box-Muller run once."""
    row0 = b * N
    r = tl.arange(0, R)
    col = tl.arange(0, 4)
    if PHILOX:
        block = row0 // 4 + c * R + r
        g = block[:, None] * 4 + col[None, :]
        i = g - row0
    else:
        block = r  # unused
        i = (c * (4 * R) + r * 4)[:, None] + col[None, :]
        g = row0 + i
    return block, g, i, (i >= 0) & (i < N)


@triton.jit
def _tile_noise(block, g, mask, noise_ptr, seed_lo, seed_hi, off_lo, off_hi, CT: tl.constexpr,
                PHILOX: tl.constexpr):
    """The standard normals of a _tile_index tile: the Philox stream of (seed, offset), or noise_ptr."""
    if PHILOX:
        z0, z1, z2, z3 = _philox_normal4(
            block, off_lo.to(tl.uint32, bitcast=True), off_hi.to(tl.uint32, bitcast=True),
            seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True))
        cc = tl.arange(0, 4)[None, :]
        z = tl.where(cc == 0, z0[:, None], tl.where(cc == 1, z1[:, None], tl.where(cc == 2, z2[:, None], z3[:, None])))
        return z.to(CT)
    else:
        return tl.load(noise_ptr + g, mask=mask, other=0.0).to(CT)


@triton.jit
def _store_guided_grad(gmo_ptr, g, b, i, B, N, mask, grad, w_bits, CT: tl.constexpr, CFG: tl.constexpr,
                       GRAD_BF16: tl.constexpr):
    """Stores the gradient w.r.t. the guided model output: with CFG the unconditional row (b) gets
    (1 - w) of it and the conditional row (B + b) w; bf16 rounded as _round_to_bf16."""
    if CFG:
        w = _f64_arg(w_bits, CT)
        grad_u = (1.0 - w) * grad
        grad_c = w * grad
        if GRAD_BF16:
            grad_u = _round_to_bf16(grad_u)
            grad_c = _round_to_bf16(grad_c)
        tl.store(gmo_ptr + g, grad_u.to(gmo_ptr.dtype.element_ty), mask=mask)
        tl.store(gmo_ptr + ((b + B) * N + i), grad_c.to(gmo_ptr.dtype.element_ty), mask=mask)
    else:
        if GRAD_BF16:
            grad = _round_to_bf16(grad)
        tl.store(gmo_ptr + g, grad.to(gmo_ptr.dtype.element_ty), mask=mask)


# ---- Kernels ---------------------------------------------------------------------------------

_SCALAR_ARGS = ["eta_bits", "w_bits", "range_bits", "seed_lo", "seed_hi", "off_lo", "off_hi"]


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _ddim_forward_kernel(
    mo_ptr, x_ptr, at_ptr, ap_ptr, prev_ptr, noise_ptr, partial_ptr, ref_ptr, kl_partial_ptr,
    B, N, nchunks,
    eta_bits, w_bits, range_bits, seed_lo, seed_hi, off_lo, off_hi,
    CT: tl.constexpr, PRED: tl.constexpr, CFG: tl.constexpr, CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr, SAMPLE: tl.constexpr, PHILOX: tl.constexpr, PREV_BF16: tl.constexpr,
    KL: tl.constexpr, R: tl.constexpr,
):
    """One tile of R x 4 elements of sample b: mu, x' (stored when SAMPLE), partial sum of (x' - mu)^2;
    with KL (a given x') also of (mu - mu_ref)^2, mu_ref from the reference output (ref_ptr).

    With PHILOX the tile is R whole Philox blocks of the flattened (B, N) tensor (element g = b N + i
    is normal g % 4 of block g // 4), so each block's Philox and Box-Muller run once; chunk c of
    sample b covers blocks b N // 4 + c R ... + R - 1, masked to the sample's elements.
    """
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    block, g, i, mask = _tile_index(b, c, N, PHILOX, R)

    a = tl.load(at_ptr + b).to(CT)
    p = tl.load(ap_ptr + b).to(CT)
    eta = _f64_arg(eta_bits, CT)
    cx, cm, ex, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mx, mm, sigma = _step_coef(a, p, eta, PRED)

    x = tl.load(x_ptr + g, mask=mask, other=0.0).to(CT)
    m = _load_guided(mo_ptr, g, b, i, B, N, mask, w_bits, CT, CFG)
    rng = _f64_arg(range_bits, CT)
    mu, dmu = _ddim_mean(x, m, cx, cm, ex, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mx, mm, rng,
                         CLIP, USE_CLIPPED)

    if SAMPLE:
        z = _tile_noise(block, g, mask, noise_ptr, seed_lo, seed_hi, off_lo, off_hi, CT, PHILOX)
        if PREV_BF16:
            stored = _round_to_bf16(mu + sigma * z)
        else:
            stored = (mu + sigma * z).to(prev_ptr.dtype.element_ty)
        tl.store(prev_ptr + g, stored, mask=mask)
        xp = stored.to(CT)  # the log-prob of x' as stored, not as computed
    else:
        xp = tl.load(prev_ptr + g, mask=mask, other=0.0).to(CT)
    d = xp - mu
    sq = tl.where(mask, d * d, 0.0)
    tl.store(partial_ptr + b * nchunks + c, tl.sum(tl.sum(sq, axis=1), axis=0))
    if KL:
        r = _load_guided(ref_ptr, g, b, i, B, N, mask, w_bits, CT, CFG)
        gap = _ddim_mean_gap(x, m, r, cx, cm, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mm, rng, CLIP, USE_CLIPPED)
        tl.store(kl_partial_ptr + b * nchunks + c, tl.sum(tl.sum(tl.where(mask, gap * gap, 0.0), axis=1), axis=0))


@triton.jit
def _ppo_term(lp, old, advantage, clip, adv_max):
    """ppo_term of ddim_math.h: loss, d loss / d log_prob (torch.maximum's tie rule), kl, clipped."""
    adv = tl.where(advantage < -adv_max, -adv_max, tl.where(advantage > adv_max, adv_max, advantage))
    log_ratio = lp - old
    ratio = tl.exp(log_ratio)
    lo = 1.0 - clip
    hi = 1.0 + clip
    ratio_clipped = tl.where(ratio < lo, lo, tl.where(ratio > hi, hi, ratio))
    unclipped = -adv * ratio
    clipped = -adv * ratio_clipped
    unclipped_wins = unclipped >= clipped
    loss = tl.where(unclipped_wins, unclipped, clipped)
    dloss = tl.where(unclipped_wins, unclipped, 0.0)
    kl = 0.5 * log_ratio * log_ratio
    deviation = ratio - 1.0
    is_clipped = tl.where(tl.where(deviation < 0.0, -deviation, deviation) > clip, 1.0, 0.0)
    return loss, dloss, kl, is_clipped


@triton.jit
def _partial_sums(partial_ptr, bs, bmask, nchunks, cidx, CT: tl.constexpr, BB: tl.constexpr, PC: tl.constexpr):
    """Each sample's partial sums (a (B, nchunks) array), added in chunk order."""
    total = tl.zeros([BB], dtype=CT)
    for c0 in range(0, nchunks, PC):
        cs = c0 + cidx
        part = tl.load(partial_ptr + bs[:, None] * nchunks + cs[None, :],
                       mask=bmask[:, None] & (cs < nchunks)[None, :], other=0.0)
        total += tl.sum(part, axis=1)
    return total


@triton.jit(do_not_specialize=["eta_bits", "clip_bits", "advmax_bits", "klbeta_bits"])
def _finalize_kernel(
    partial_ptr, at_ptr, ap_ptr, logp_ptr, old_ptr, adv_ptr,
    loss_ptr, kl_ptr, clipfrac_ptr, dlogp_ptr, kl_partial_ptr, klref_ptr, klmean_ptr,
    B, N, nchunks, old_stride, adv_stride,
    eta_bits, clip_bits, advmax_bits, klbeta_bits,
    CT: tl.constexpr, FROM_PARTIALS: tl.constexpr, PPO: tl.constexpr, KL: tl.constexpr,
    BB: tl.constexpr, PC: tl.constexpr,
):
    """One program: log_prob[b] from sample b's partial sums (added in chunk order), then the PPO
    stage over the whole batch (means over B). KL: the per-sample KL to the reference step
    (klref_ptr) from its partial sums (FROM_PARTIALS) or as given, and the penalty kl_beta * its mean
    added to the loss (mean in klmean_ptr). kl_ptr is approx_kl, the PPO ratio's."""
    bidx = tl.arange(0, BB)
    cidx = tl.arange(0, PC)
    eta = _f64_arg(eta_bits, CT)
    clip = _f64_arg(clip_bits, CT)
    adv_max = _f64_arg(advmax_bits, CT)
    loss_acc = tl.zeros([BB], dtype=CT)
    kl_acc = tl.zeros([BB], dtype=CT)
    clip_acc = tl.zeros([BB], dtype=CT)
    klref_acc = tl.zeros([BB], dtype=CT)
    for b0 in range(0, B, BB):
        bs = b0 + bidx
        bmask = bs < B
        if FROM_PARTIALS:
            sumsq = _partial_sums(partial_ptr, bs, bmask, nchunks, cidx, CT, BB, PC)
            a = tl.load(at_ptr + bs, mask=bmask, other=0.5).to(CT)
            p = tl.load(ap_ptr + bs, mask=bmask, other=0.5).to(CT)
            inv_var, log_norm = _log_density_terms(a, p, eta, CT)
            lp = -0.5 * inv_var * sumsq / N + log_norm
            tl.store(logp_ptr + bs, lp, mask=bmask)
            if KL:
                klref = 0.5 * inv_var * _partial_sums(kl_partial_ptr, bs, bmask, nchunks, cidx, CT, BB, PC) / N
                tl.store(klref_ptr + bs, klref, mask=bmask)
        else:
            lp = tl.load(logp_ptr + bs, mask=bmask, other=0.0).to(CT)
            if KL:
                klref = tl.load(klref_ptr + bs, mask=bmask, other=0.0).to(CT)
        if PPO:
            old = tl.load(old_ptr + bs * old_stride, mask=bmask, other=0.0).to(CT)
            adv = tl.load(adv_ptr + bs * adv_stride, mask=bmask, other=0.0).to(CT)
            loss, dloss, kl, is_clipped = _ppo_term(lp, old, adv, clip, adv_max)
            tl.store(dlogp_ptr + bs, dloss / B, mask=bmask)
            loss_acc += tl.where(bmask, loss, 0.0)
            kl_acc += tl.where(bmask, kl, 0.0)
            clip_acc += tl.where(bmask, is_clipped, 0.0)
            if KL:
                klref_acc += tl.where(bmask, klref, 0.0)
    if PPO:
        if KL:
            klref_mean = tl.sum(klref_acc, axis=0) / B
            tl.store(klmean_ptr, klref_mean)
            tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / B + _f64_arg(klbeta_bits, CT) * klref_mean)
        else:
            tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / B)
        tl.store(kl_ptr, tl.sum(kl_acc, axis=0) / B)
        tl.store(clipfrac_ptr, tl.sum(clip_acc, axis=0) / B)


@triton.jit(do_not_specialize=["eta_bits", "w_bits", "range_bits"])
def _ddim_backward_kernel(
    mo_ptr, x_ptr, at_ptr, ap_ptr, prev_ptr, gprev_ptr, glogp_ptr, gmo_ptr, ref_ptr, gkl_ptr,
    B, N, eta_bits, w_bits, range_bits,
    CT: tl.constexpr, PRED: tl.constexpr, CFG: tl.constexpr, CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr, HAS_GPREV: tl.constexpr, GRAD_BF16: tl.constexpr, KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad m = d mu / d m * (grad_prev_sample + grad_log_prob[b] inv_var / N (x' - mu)), with KL
    + grad_kl[b] inv_var / N (mu - mu_ref); with CFG the unconditional row gets (1 - w) of it and the
    conditional row w."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = c * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    g = b * N + i

    a = tl.load(at_ptr + b).to(CT)
    p = tl.load(ap_ptr + b).to(CT)
    eta = _f64_arg(eta_bits, CT)
    cx, cm, ex, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mx, mm, sigma = _step_coef(a, p, eta, PRED)
    inv_var, log_norm = _log_density_terms(a, p, eta, CT)
    coef = tl.load(glogp_ptr + b).to(CT) * inv_var / N

    x = tl.load(x_ptr + g, mask=mask, other=0.0).to(CT)
    m = _load_guided(mo_ptr, g, b, i, B, N, mask, w_bits, CT, CFG)
    rng = _f64_arg(range_bits, CT)
    mu, dmu = _ddim_mean(x, m, cx, cm, ex, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mx, mm, rng,
                         CLIP, USE_CLIPPED)
    xp = tl.load(prev_ptr + g, mask=mask, other=0.0).to(CT)
    upstream = coef * (xp - mu)
    if HAS_GPREV:
        upstream = tl.load(gprev_ptr + g, mask=mask, other=0.0).to(CT) + upstream
    if KL:
        r = _load_guided(ref_ptr, g, b, i, B, N, mask, w_bits, CT, CFG)
        gap = _ddim_mean_gap(x, m, r, cx, cm, em, sqrt_a, inv_sqrt_1ma, sqrt_p, dir, mm, rng, CLIP, USE_CLIPPED)
        upstream += tl.load(gkl_ptr + b).to(CT) * inv_var / N * gap
    grad = dmu * upstream
    _store_guided_grad(gmo_ptr, g, b, i, B, N, mask, grad, w_bits, CT, CFG, GRAD_BF16)


# ---- Launchers -------------------------------------------------------------------------------


def _compute(call: DdimCall):
    try:
        return _TL_DTYPE[call.compute_dtype]
    except KeyError:
        raise ValueError(f"compute dtype must be float32 or float64, got {call.compute_dtype}") from None


def _stride(t: torch.Tensor | None, batch: int) -> int:
    """Per-sample stride of a (B,) or single-element tensor (broadcast)."""
    if t is None:
        return 0
    if t.numel() == 1:
        return 0
    if t.numel() != batch:
        raise ValueError(f"expected {batch} or 1 elements, got shape {tuple(t.shape)}")
    return 1


def _check_call(call: DdimCall, *, backward: bool = False) -> None:
    B, N = call.sample.shape
    rows = 2 * B if call.guidance_scale is not None else B
    if call.model_output.shape != (rows, N):
        raise ValueError(f"model_output must be ({rows}, {N}), got {tuple(call.model_output.shape)}")
    if call.prev_sample.shape != (B, N):
        raise ValueError(f"prev_sample must be ({B}, {N}), got {tuple(call.prev_sample.shape)}")
    for name in ("model_output", "sample", "prev_sample", "alpha_t", "alpha_prev", "noise",
                 "grad_prev_sample", "grad_model_output"):
        t = getattr(call, name)
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if call.alpha_t.numel() != B or call.alpha_prev.numel() != B:
        raise ValueError("alpha_t and alpha_prev must have one element per sample")
    if call.prediction not in (0, 1, 2):
        raise ValueError(f"prediction must be 0, 1 or 2, got {call.prediction}")
    if backward and (call.grad_log_prob is None or call.grad_model_output is None):
        raise ValueError("backward needs grad_log_prob and grad_model_output")
    _check_kl_call(call, backward, rows)


def _check_kl_call(call, backward: bool, rows: int) -> None:
    """The KL penalty's tensors of a DDIM or flow call (the same fields)."""
    B, N = call.sample.shape
    ref = call.reference_output
    if ref is None:
        if call.kl is not None or call.grad_kl is not None:
            raise ValueError("kl and grad_kl need reference_output")
        return
    if ref.shape != (rows, N) or not ref.is_contiguous():
        raise ValueError(f"reference_output must be contiguous ({rows}, {N}), got {tuple(ref.shape)}")
    if not backward and (call.sample_noise or call.kl is None):
        raise ValueError("reference_output (the KL penalty) needs a given prev_sample and a kl output")


class Launch(NamedTuple):
    """One kernel launch as the entry points make it: the JIT kernel, its grid, its runtime arguments
    and constexprs by parameter name, num_warps. Built apart from the launch so that a test can
    compile the same variants ahead of time (tests/triton_aot.py)."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int


def _on_device(device: torch.device):
    """Makes `device` the current CUDA device for the block (nothing for CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(launches: list[Launch], device: torch.device) -> None:
    # Triton launches on the current CUDA device (and its current stream), not on the device of the
    # tensors: with tensors on cuda:1 while cuda:0 is current it would run on the wrong GPU.
    with _on_device(device):
        for launch in launches:
            launch.kernel[launch.grid](**launch.args, **launch.constexprs, num_warps=launch.num_warps)


def _finalize_launch(call: DdimCall, cfg: KernelConfig, partial: torch.Tensor | None, nchunks: int,
                     from_partials: bool) -> Launch:
    B, N = call.batch, call.numel
    run_ppo = call.old_log_prob is not None
    if run_ppo and (call.advantages is None or call.loss is None or call.approx_kl is None
                    or call.clipfrac is None or call.dloss_dlogp is None):
        raise ValueError("the PPO stage needs advantages, loss, approx_kl, clipfrac and dloss_dlogp")
    with_kl = call.kl is not None
    if with_kl and run_ppo and call.kl_mean is None:
        raise ValueError("the KL penalty needs a kl_mean output")
    dummy = call.alpha_t
    return Launch(_finalize_kernel, (1,), dict(
        partial_ptr=partial[0] if partial is not None else dummy, at_ptr=call.alpha_t, ap_ptr=call.alpha_prev,
        logp_ptr=call.log_prob, old_ptr=call.old_log_prob if run_ppo else dummy,
        adv_ptr=call.advantages if run_ppo else dummy, loss_ptr=call.loss if run_ppo else dummy,
        kl_ptr=call.approx_kl if run_ppo else dummy, clipfrac_ptr=call.clipfrac if run_ppo else dummy,
        dlogp_ptr=call.dloss_dlogp if run_ppo else dummy,
        kl_partial_ptr=partial[1] if with_kl and partial is not None else dummy,
        klref_ptr=call.kl if with_kl else dummy, klmean_ptr=call.kl_mean if with_kl and run_ppo else dummy,
        B=B, N=N, nchunks=nchunks, old_stride=_stride(call.old_log_prob, B), adv_stride=_stride(call.advantages, B),
        eta_bits=_f64_bits(call.eta), clip_bits=_f64_bits(call.ppo_clip_range),
        advmax_bits=_f64_bits(call.adv_clip_max), klbeta_bits=_f64_bits(call.kl_beta),
    ), dict(
        CT=_compute(call), FROM_PARTIALS=from_partials, PPO=run_ppo, KL=with_kl, BB=cfg.batch_tile,
        PC=cfg.partial_tile,
    ), cfg.num_warps)


def forward_launches(call: DdimCall, cfg: KernelConfig) -> list[Launch]:
    """The launches of forward(call) with tile sizes `cfg` (allocates the partial-sum workspace)."""
    _check_call(call)
    if call.log_prob is None:
        raise ValueError("forward needs a log_prob output")
    B, N = call.batch, call.numel
    philox = call.sample_noise and call.noise is None
    block = cfg.forward_block
    # A Philox tile starts at the sample's first whole block, up to 3 elements before the sample
    # (none when N % 4 == 0: every sample then starts on a block).
    nchunks = triton.cdiv(N + 3 if philox and N % 4 else N, block)
    # The sums of (x' - mu)^2 and, for the KL penalty, of (mu - mu_ref)^2.
    with_kl = call.reference_output is not None
    partial = torch.empty((2 if with_kl else 1, B, nchunks), dtype=call.compute_dtype, device=call.sample.device)
    seed_lo, seed_hi = _words(call.seed)
    off_lo, off_hi = _words(call.offset)
    step = Launch(_ddim_forward_kernel, (nchunks, B), dict(
        mo_ptr=call.model_output, x_ptr=call.sample, at_ptr=call.alpha_t, ap_ptr=call.alpha_prev,
        prev_ptr=call.prev_sample, noise_ptr=call.noise if call.noise is not None else call.sample,
        partial_ptr=partial[0], ref_ptr=call.reference_output if with_kl else call.model_output,
        kl_partial_ptr=partial[-1], B=B, N=N, nchunks=nchunks,
        eta_bits=_f64_bits(call.eta), w_bits=_f64_bits(call.guidance_scale or 0.0),
        range_bits=_f64_bits(call.clip_sample_range if call.clip_sample_range is not None else 1.0),
        seed_lo=seed_lo, seed_hi=seed_hi, off_lo=off_lo, off_hi=off_hi,
    ), dict(
        CT=_compute(call), PRED=call.prediction, CFG=call.guidance_scale is not None,
        CLIP=call.clip_sample_range is not None,
        USE_CLIPPED=call.clip_sample_range is not None and call.use_clipped_model_output,
        SAMPLE=call.sample_noise, PHILOX=philox, PREV_BF16=call.prev_sample.dtype == torch.bfloat16,
        KL=with_kl, R=block // 4,
    ), cfg.num_warps)
    return [step, _finalize_launch(call, cfg, partial, nchunks, from_partials=True)]


def ppo_launches(call: DdimCall, cfg: KernelConfig) -> list[Launch]:
    """The launch of ppo(call) with tile sizes `cfg`."""
    if call.log_prob is None or call.old_log_prob is None:
        raise ValueError("ppo needs log_prob and old_log_prob")
    return [_finalize_launch(call, cfg, None, 1, from_partials=False)]


def backward_launches(call: DdimCall, cfg: KernelConfig) -> list[Launch]:
    """The launch of backward(call) with tile sizes `cfg`."""
    _check_call(call, backward=True)
    B, N = call.batch, call.numel
    block = cfg.backward_block
    gprev = call.grad_prev_sample
    with_kl = call.grad_kl is not None  # the KL penalty's term (needs reference_output)
    return [Launch(_ddim_backward_kernel, (triton.cdiv(N, block), B), dict(
        mo_ptr=call.model_output, x_ptr=call.sample, at_ptr=call.alpha_t, ap_ptr=call.alpha_prev,
        prev_ptr=call.prev_sample, gprev_ptr=gprev if gprev is not None else call.sample,
        glogp_ptr=call.grad_log_prob, gmo_ptr=call.grad_model_output,
        ref_ptr=call.reference_output if with_kl else call.model_output,
        gkl_ptr=call.grad_kl if with_kl else call.grad_log_prob,
        B=B, N=N, eta_bits=_f64_bits(call.eta), w_bits=_f64_bits(call.guidance_scale or 0.0),
        range_bits=_f64_bits(call.clip_sample_range if call.clip_sample_range is not None else 1.0),
    ), dict(
        CT=_compute(call), PRED=call.prediction, CFG=call.guidance_scale is not None,
        CLIP=call.clip_sample_range is not None,
        USE_CLIPPED=call.clip_sample_range is not None and call.use_clipped_model_output,
        HAS_GPREV=gprev is not None, GRAD_BF16=call.grad_model_output.dtype == torch.bfloat16, KL=with_kl,
        BLOCK=block,
    ), cfg.num_warps)]


def forward(call: DdimCall) -> None:
    """x_{t-1} (when call.sample_noise) and log_prob, then the PPO stage when old_log_prob is set."""
    _run(forward_launches(call, config(call.sample.device)), call.sample.device)


def ppo(call: DdimCall) -> None:
    """The PPO stage alone: loss, approx_kl, clipfrac and dloss_dlogp from call.log_prob (with the
    KL penalty from call.kl when set)."""
    _run(ppo_launches(call, config(call.sample.device)), call.sample.device)


def backward(call: DdimCall) -> None:
    """grad_model_output of the step: d mu / d m * (grad_prev_sample + c_b (x' - mu) + k_b (mu - mu_ref))."""
    _run(backward_launches(call, config(call.sample.device)), call.sample.device)
