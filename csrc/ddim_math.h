// Per-element and per-sample math of the fused ops, shared by the CPU (C++) and CUDA kernels so
// that both compute the same function in the same order. The formulas are those of
// ddpo_fast/reference.py; that file's docstring is the specification.
//
// Everything here is branch-light, inlinable arithmetic so that the CPU compiler vectorises the
// loops that call it; the transcendental functions used per element (log, sin, cos of the
// Box-Muller transform) are polynomials for the same reason, accurate to a few float32 ulps.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DDPO_HD __host__ __device__ __forceinline__
#else
#define DDPO_HD inline __attribute__((always_inline))
#endif

namespace ddpo {

DDPO_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DDPO_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---- Storage conversions (round to nearest even, NaN preserved) --------------------------------

DDPO_HD float bf16_bits_to_float(uint16_t h) { return bits_as_float(uint32_t(h) << 16); }

DDPO_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_as_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(is_nan ? ((u >> 16) | 0x40u) : rounded);
}

DDPO_HD float fp16_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  // Normal numbers: rebias the exponent. Subnormals: scale the mantissa by 2^-24 exactly.
  float normal = bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
  float subnormal = float(mant) * 5.9604644775390625e-08f;
  float special = bits_as_float(sign | 0x7F800000u | (mant << 13));
  float magnitude = exp == 0 ? subnormal : normal;
  float value = sign ? -magnitude : magnitude;
  return exp == 0x1Fu ? special : (exp == 0 ? value : normal);
}

// Branch-free (every candidate computed, then selected) so that conversion loops vectorise.
DDPO_HD uint16_t float_to_fp16_bits(float f) {
  uint32_t u = float_as_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7FFFFFFFu;
  // fp16 subnormal or zero: adding 0.5 makes the float32 adder round to a multiple of 2^-24.
  uint32_t subnormal = float_as_bits(bits_as_float(abs) + 0.5f) - 0x3F000000u;
  // Normal: rebias the exponent (-112 << 23) and round to nearest even on the dropped 13 bits.
  uint32_t normal = (abs + 0xC8000FFFu + ((abs >> 13) & 1u)) >> 13;
  uint32_t out = abs > 0x7F800000u ? 0x7E00u                    // NaN
               : abs >= 0x477FF000u ? 0x7C00u                   // rounds to >= 65520: inf
               : abs < 0x38800000u ? subnormal : normal;
  return uint16_t(sign | out);
}

// ---- Philox4x32-10 and the Box-Muller normal stream --------------------------------------------

DDPO_HD void philox4x32_10(uint64_t block, uint64_t offset, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = uint32_t(block), c1 = uint32_t(block >> 32);
  uint32_t c2 = uint32_t(offset), c3 = uint32_t(offset >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Odd multiples of 2^-24 in (0, 1): never 0, so log() below is finite.
DDPO_HD float uint_to_unit(uint32_t x) { return float(((x >> 9) << 1) | 1u) * 5.9604644775390625e-08f; }

// Natural log of a normal positive float: log(m 2^e) = e log 2 + 2 atanh((m - 1) / (m + 1)),
// m in [sqrt(1/2), sqrt(2)). Selections are integer arithmetic (no branches), so it vectorises.
DDPO_HD float log_positive(float v) {
  uint32_t bits = float_as_bits(v);
  uint32_t mant = (bits & 0x7FFFFFu) | 0x3F800000u;  // m in [1, 2)
  uint32_t halve = mant > 0x3FB504F3u ? 1u : 0u;      // m > sqrt(2): use m / 2 and e + 1
  float m = bits_as_float(mant - (halve << 23));
  int32_t e = int32_t((bits >> 23) & 0xFFu) - 127 + int32_t(halve);
  float s = (m - 1.0f) / (m + 1.0f);
  float s2 = s * s;
  float tail = s2 * (0.333333333f + s2 * (0.2f + s2 * (0.142857143f + s2 * 0.111111111f)));
  return float(e) * 0.693147181f + (2.0f * s + 2.0f * s * tail);
}

// sin and cos of 2 pi u for u in [0, 1): reduce to the nearest quarter turn q, Taylor polynomials
// on [-pi/4, pi/4], then rotate by q quarter turns with sign and swap masks (no branches).
DDPO_HD void sincos_2pi(float u, float& s, float& c) {
  uint32_t quarter = uint32_t(4.0f * u + 0.5f);
  float y = (u - 0.25f * float(quarter)) * 6.28318530717958648f;
  float y2 = y * y;
  float sy = y * (1.0f + y2 * (-1.66666667e-1f + y2 * (8.33333333e-3f + y2 * (-1.98412698e-4f + y2 * 2.75573192e-6f))));
  float cy = 1.0f + y2 * (-0.5f + y2 * (4.16666667e-2f + y2 * (-1.38888889e-3f + y2 * (2.48015873e-5f + y2 * -2.75573192e-7f))));
  // Odd q: (cos, sin) = (-sin y, cos y); q & 2: both negated.
  uint32_t swap = 0u - (quarter & 1u);
  uint32_t negate = (quarter & 2u) << 30;
  uint32_t sy_bits = float_as_bits(sy), cy_bits = float_as_bits(cy);
  c = bits_as_float(((cy_bits & ~swap) | ((sy_bits ^ 0x80000000u) & swap)) ^ negate);
  s = bits_as_float(((sy_bits & ~swap) | (cy_bits & swap)) ^ negate);
}

// The four standard normals of Philox block `block`: elements 4*block .. 4*block+3 of the stream.
DDPO_HD void philox_normal4(uint64_t block, uint64_t offset, uint64_t seed, float z[4]) {
  uint32_t r[4];
  philox4x32_10(block, offset, seed, r);
  float rad01 = std::sqrt(-2.0f * log_positive(uint_to_unit(r[0])));
  float rad23 = std::sqrt(-2.0f * log_positive(uint_to_unit(r[2])));
  float s1, c1, s3, c3;
  sincos_2pi(uint_to_unit(r[1]), s1, c1);
  sincos_2pi(uint_to_unit(r[3]), s3, c3);
  z[0] = rad01 * c1;
  z[1] = rad01 * s1;
  z[2] = rad23 * c3;
  z[3] = rad23 * s3;
}

// ---- The DDIM policy ---------------------------------------------------------------------------

// Per-sample coefficients. Before clipping, x0 = cx x + cm m and eps = ex x + em m; without
// clipping the mean is affine, mu = mx x + mm m.
template <typename T>
struct StepCoef {
  T cx, cm, ex, em;
  T sqrt_a, inv_sqrt_1ma;  // for eps re-derived from the clipped x0
  T sqrt_p, dir;           // mu = sqrt_p x0 + dir eps
  T mx, mm;
  T sigma;
  T inv_var;               // 1 / sigma^2, 0 when sigma == 0
  T log_norm;              // -log sigma - log sqrt(2 pi), 0 when sigma == 0
};

template <typename T>
DDPO_HD StepCoef<T> make_step_coef(T a, T p, T eta, int32_t prediction) {
  StepCoef<T> k;
  T sqrt_a = std::sqrt(a), sqrt_1ma = std::sqrt(T(1) - a);
  if (prediction == kEpsilon) {
    k.cx = T(1) / sqrt_a;  k.cm = -sqrt_1ma / sqrt_a;  k.ex = T(0);  k.em = T(1);
  } else if (prediction == kSample) {
    k.cx = T(0);  k.cm = T(1);  k.ex = T(1) / sqrt_1ma;  k.em = -sqrt_a / sqrt_1ma;
  } else {  // kVPrediction
    k.cx = sqrt_a;  k.cm = -sqrt_1ma;  k.ex = sqrt_1ma;  k.em = sqrt_a;
  }
  k.sqrt_a = sqrt_a;
  k.inv_sqrt_1ma = T(1) / sqrt_1ma;
  // (p - a) / p is 1 - a / p without the float32 cancellation when a and p are close.
  T variance = eta * eta * ((T(1) - p) / (T(1) - a)) * ((p - a) / p);
  k.sigma = std::sqrt(variance);
  T dir2 = T(1) - p - variance;
  k.sqrt_p = std::sqrt(p);
  k.dir = std::sqrt(dir2 > T(0) ? dir2 : T(0));
  k.mx = k.sqrt_p * k.cx + k.dir * k.ex;
  k.mm = k.sqrt_p * k.cm + k.dir * k.em;
  bool stochastic = k.sigma > T(0);
  k.inv_var = stochastic ? T(1) / variance : T(0);
  k.log_norm = stochastic ? -std::log(k.sigma) - T(0.91893853320467274178) : T(0);
  return k;
}

// mu and d mu / d m for one element. kClip: clip x0 to [-range, range] (gradient 0 outside,
// passed through at the boundary, as torch.clamp); use_clipped: eps from the clipped x0.
template <bool kClip, typename T>
DDPO_HD void ddim_mean(const StepCoef<T>& k, T x, T m, T range, bool use_clipped, T& mu, T& dmu_dm) {
  if (!kClip) {
    mu = k.mx * x + k.mm * m;
    dmu_dm = k.mm;
    return;
  }
  T x0 = k.cx * x + k.cm * m;
  bool inside = x0 >= -range && x0 <= range;
  T dx0 = inside ? k.cm : T(0);
  x0 = x0 < -range ? -range : (x0 > range ? range : x0);
  T eps = use_clipped ? (x - k.sqrt_a * x0) * k.inv_sqrt_1ma : k.ex * x + k.em * m;
  T deps = use_clipped ? -k.sqrt_a * k.inv_sqrt_1ma * dx0 : k.em;
  mu = k.sqrt_p * x0 + k.dir * eps;
  dmu_dm = k.sqrt_p * dx0 + k.dir * deps;
}

// mu - mu_ref for the model outputs m and m_ref (guided) at the same x: ddim_mean's difference,
// formed so that it is exactly 0 for m == m_ref whatever the compiler contracts into FMAs, and keeps
// its relative precision for close outputs (no cancellation of two rounded means). Unclipped, mu is
// affine in m: mu - mu_ref = mm (m - m_ref). Clipped: x0_ref's pre-clip value is x0's minus
// cm (m - m_ref), both are clipped, and eps - eps_ref follows from m - m_ref or, with use_clipped,
// from x0 - x0_ref.
template <bool kClip, typename T>
DDPO_HD T ddim_mean_gap(const StepCoef<T>& k, T x, T m, T m_ref, T range, bool use_clipped) {
  const T dm = m - m_ref;
  if (!kClip) return k.mm * dm;
  const T raw = k.cx * x + k.cm * m;
  const T raw_ref = raw - k.cm * dm;
  const T x0 = raw < -range ? -range : (raw > range ? range : raw);
  const T x0_ref = raw_ref < -range ? -range : (raw_ref > range ? range : raw_ref);
  const T dx0 = x0 - x0_ref;
  const T deps = use_clipped ? -k.sqrt_a * k.inv_sqrt_1ma * dx0 : k.em * dm;
  return k.sqrt_p * dx0 + k.dir * deps;
}

// log_prob of a sample from the sum over its numel elements of (x' - mu)^2.
template <typename T>
DDPO_HD T log_prob_from_sumsq(const StepCoef<T>& k, T sumsq, int64_t numel) {
  return -T(0.5) * k.inv_var * sumsq / T(numel) + k.log_norm;
}

// ---- The KL penalty to a reference step with the same standard deviation -------------------------
// Shared by the DDIM and flow SDE steps: per sample, KL = mean over elements of (mu - mu_ref)^2 /
// (2 std^2), and its derivative d KL / d mu = (mu - mu_ref) / (std^2 numel). inv_var = 1 / std^2, 0
// for a deterministic step (KL 0, no gradient, as its log_prob).

template <typename T>
DDPO_HD T kl_from_sumsq(T inv_var, T sumsq, int64_t numel) {
  return T(0.5) * inv_var * sumsq / T(numel);
}

// The factor of (mu - mu_ref) in d loss / d mu for an upstream gradient grad_kl = d loss / d KL.
template <typename T>
DDPO_HD T kl_grad_coef(T inv_var, T grad_kl, int64_t numel) {
  return grad_kl * inv_var / T(numel);
}

// ---- The clipped PPO objective (DDPO-IS), per sample --------------------------------------------

template <typename T>
struct PpoTerm {
  T loss;         // max(-A r, -A clip(r))
  T dloss_dlogp;  // its derivative w.r.t. log_prob (torch.maximum's tie rule gives -A r there too)
  T kl;           // 0.5 (log_prob - old)^2
  T clipped;      // |r - 1| > clip_range
};

template <typename T>
DDPO_HD PpoTerm<T> ppo_term(T log_prob, T old_log_prob, T advantage, T clip_range, T adv_clip_max) {
  T adv = advantage < -adv_clip_max ? -adv_clip_max : (advantage > adv_clip_max ? adv_clip_max : advantage);
  T log_ratio = log_prob - old_log_prob;
  T ratio = std::exp(log_ratio);
  T lo = T(1) - clip_range, hi = T(1) + clip_range;
  T ratio_clipped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  T unclipped = -adv * ratio, clipped = -adv * ratio_clipped;
  PpoTerm<T> out;
  bool unclipped_wins = unclipped >= clipped;
  out.loss = unclipped_wins ? unclipped : clipped;
  out.dloss_dlogp = unclipped_wins ? unclipped : T(0);
  out.kl = T(0.5) * log_ratio * log_ratio;
  T deviation = ratio - T(1);
  out.clipped = (deviation < T(0) ? -deviation : deviation) > clip_range ? T(1) : T(0);
  return out;
}

}  // namespace ddpo
