// CPU kernels of the fused DDIM step (forward: x_{t-1} and log_prob; backward: d/d model_output).
// Compiled once per instruction set with DDPO_CPU_ISA naming the namespace.
//
// Work is split into (sample, chunk of kChunk elements) items across the thread pool; each item
// walks its elements in tiles of kTile: the inputs of a tile are converted to the compute type in
// small L1-resident buffers, then plain loops over the buffers do the math (and vectorise), so the
// dtype of each tensor is a run-time choice without a template per dtype combination.
#include <algorithm>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ddim_math.h"

#ifndef DDPO_CPU_ISA
#error "DDPO_CPU_ISA must name the instruction-set variant"
#endif

namespace ddpo {
namespace DDPO_CPU_ISA {
namespace {

constexpr int kTile = 256;
// Below this many elements a call runs on the calling thread: waking workers would cost more.
constexpr int64_t kParallelElements = 1 << 16;

template <typename T>
void load_tile(uintptr_t base, int32_t dtype, int64_t offset, int n, T* out) {
  switch (dtype) {
    case kFloat32: {
      const float* p = reinterpret_cast<const float*>(base) + offset;
      for (int j = 0; j < n; ++j) out[j] = T(p[j]);
      break;
    }
    case kFloat64: {
      const double* p = reinterpret_cast<const double*>(base) + offset;
      for (int j = 0; j < n; ++j) out[j] = T(p[j]);
      break;
    }
    case kFloat16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(base) + offset;
      for (int j = 0; j < n; ++j) out[j] = T(fp16_bits_to_float(p[j]));
      break;
    }
    default: {  // kBFloat16
      const uint16_t* p = reinterpret_cast<const uint16_t*>(base) + offset;
      for (int j = 0; j < n; ++j) out[j] = T(bf16_bits_to_float(p[j]));
      break;
    }
  }
}

// Stores values[0, n) in `dtype`; with kReadBack, values is replaced by what was stored (rounded).
template <bool kReadBack, typename T>
void store_tile(uintptr_t base, int32_t dtype, int64_t offset, int n, T* values) {
  switch (dtype) {
    case kFloat32: {
      float* p = reinterpret_cast<float*>(base) + offset;
      for (int j = 0; j < n; ++j) {
        float v = float(values[j]);
        p[j] = v;
        if (kReadBack) values[j] = T(v);
      }
      break;
    }
    case kFloat64: {
      double* p = reinterpret_cast<double*>(base) + offset;
      for (int j = 0; j < n; ++j) p[j] = double(values[j]);
      break;
    }
    case kFloat16: {
      uint16_t* p = reinterpret_cast<uint16_t*>(base) + offset;
      for (int j = 0; j < n; ++j) {
        uint16_t h = float_to_fp16_bits(float(values[j]));
        p[j] = h;
        if (kReadBack) values[j] = T(fp16_bits_to_float(h));
      }
      break;
    }
    default: {  // kBFloat16
      uint16_t* p = reinterpret_cast<uint16_t*>(base) + offset;
      for (int j = 0; j < n; ++j) {
        uint16_t h = float_to_bf16_bits(float(values[j]));
        p[j] = h;
        if (kReadBack) values[j] = T(bf16_bits_to_float(h));
      }
      break;
    }
  }
}

// m = the rows of sample b, elements [i, i + n), of a model output (`base`: the policy's or the
// reference's, with its [uncond; cond] halves under CFG) after classifier-free guidance.
template <typename T>
void load_guided_rows(const DdimArgs& a, uintptr_t base, int32_t dtype, int64_t b, int64_t i, int n, T* m,
                      T* scratch) {
  load_tile(base, dtype, b * a.numel + i, n, m);
  if (!a.cfg) return;
  load_tile(base, dtype, (a.batch + b) * a.numel + i, n, scratch);
  const T w = T(a.guidance_scale);
  for (int j = 0; j < n; ++j) m[j] = m[j] + w * (scratch[j] - m[j]);
}

template <typename T>
void load_guided_tile(const DdimArgs& a, int64_t b, int64_t i, int n, T* m, T* scratch) {
  load_guided_rows(a, a.model_output, a.model_output_dtype, b, i, n, m, scratch);
}

// ---- Philox4x32-10 words, one block per 32-bit vector lane ----------------------------------------
// The counter-based generator is integer arithmetic: two 32x32 -> 64-bit products per round. Written
// as uint64 products, compilers vectorise it on 64-bit lanes with widening shuffles (1.2 ns per
// normal on AVX-512, more than Box-Muller). Here each product is two even/odd-lane vector multiplies
// (pmuludq) whose halves are blended back into 32-bit lanes: the same words, bit for bit.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
using VecU32 = __m512i;
inline VecU32 v_set1(uint32_t x) { return _mm512_set1_epi32(int(x)); }
inline VecU32 v_iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline VecU32 v_add(VecU32 a, VecU32 b) { return _mm512_add_epi32(a, b); }
inline VecU32 v_xor(VecU32 a, VecU32 b) { return _mm512_xor_si512(a, b); }
inline void v_store(uint32_t* p, VecU32 v) { _mm512_store_si512(reinterpret_cast<void*>(p), v); }
inline void v_mul_wide(VecU32 a, VecU32 b, VecU32& hi, VecU32& lo) {  // b: the same value in every lane
  VecU32 even = _mm512_mul_epu32(a, b), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
#elif defined(__AVX2__)
constexpr int kLanes = 8;
using VecU32 = __m256i;
inline VecU32 v_set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
inline VecU32 v_iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline VecU32 v_add(VecU32 a, VecU32 b) { return _mm256_add_epi32(a, b); }
inline VecU32 v_xor(VecU32 a, VecU32 b) { return _mm256_xor_si256(a, b); }
inline void v_store(uint32_t* p, VecU32 v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
inline void v_mul_wide(VecU32 a, VecU32 b, VecU32& hi, VecU32& lo) {
  VecU32 even = _mm256_mul_epu32(a, b), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#elif defined(__SSE2__)
constexpr int kLanes = 4;
using VecU32 = __m128i;
inline VecU32 v_set1(uint32_t x) { return _mm_set1_epi32(int(x)); }
inline VecU32 v_iota() { return _mm_setr_epi32(0, 1, 2, 3); }
inline VecU32 v_add(VecU32 a, VecU32 b) { return _mm_add_epi32(a, b); }
inline VecU32 v_xor(VecU32 a, VecU32 b) { return _mm_xor_si128(a, b); }
inline void v_store(uint32_t* p, VecU32 v) { _mm_store_si128(reinterpret_cast<__m128i*>(p), v); }
inline void v_mul_wide(VecU32 a, VecU32 b, VecU32& hi, VecU32& lo) {  // no blend in SSE2: masks
  const VecU32 low_half = _mm_set_epi32(0, -1, 0, -1);
  VecU32 even = _mm_mul_epu32(a, b), odd = _mm_mul_epu32(_mm_srli_epi64(a, 32), b);
  hi = _mm_or_si128(_mm_srli_epi64(even, 32), _mm_andnot_si128(low_half, odd));
  lo = _mm_or_si128(_mm_and_si128(even, low_half), _mm_slli_epi64(odd, 32));
}
#else
constexpr int kLanes = 1;  // no vector path: the scalar loop below
#endif

constexpr int kPhiloxBlocks = (kTile / 4 + 2 + 15) / 16 * 16;  // blocks of one tile, whole vectors

// The four words of Philox blocks first .. first + count - 1 into r0..r3 (counter = (block, offset),
// key = seed).
void philox_words(uint64_t first, int count, uint64_t offset, uint64_t seed, uint32_t* r0, uint32_t* r1,
                  uint32_t* r2, uint32_t* r3) {
  const uint32_t lo = uint32_t(first), hi = uint32_t(first >> 32);
  const uint32_t w2 = uint32_t(offset), w3 = uint32_t(offset >> 32);
  const uint32_t key0 = uint32_t(seed), key1 = uint32_t(seed >> 32);
  int done = 0;
#if defined(__SSE2__)
  // The vector path keeps the counter's high word fixed: a tile whose blocks carry into it (once
  // in 2^32 blocks) takes the scalar loop.
  if (uint64_t(lo) + uint64_t(count) + kLanes <= (uint64_t(1) << 32)) {
    const VecU32 m0 = v_set1(0xD2511F53u), m1 = v_set1(0xCD9E8D57u);
    for (; done < count; done += kLanes) {
      VecU32 c0 = v_add(v_set1(lo + uint32_t(done)), v_iota()), c1 = v_set1(hi), c2 = v_set1(w2), c3 = v_set1(w3);
      uint32_t k0 = key0, k1 = key1;
      for (int round = 0; round < 10; ++round) {
        VecU32 hi0, lo0, hi1, lo1;
        v_mul_wide(c0, m0, hi0, lo0);
        v_mul_wide(c2, m1, hi1, lo1);
        c0 = v_xor(v_xor(hi1, c1), v_set1(k0));
        c1 = lo1;
        c2 = v_xor(v_xor(hi0, c3), v_set1(k1));
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      v_store(r0 + done, c0);
      v_store(r1 + done, c1);
      v_store(r2 + done, c2);
      v_store(r3 + done, c3);
    }
    return;
  }
#endif
  for (int q = done; q < count; ++q) {
    uint32_t out[4];
    philox4x32_10(first + uint64_t(q), offset, seed, out);
    r0[q] = out[0];
    r1[q] = out[1];
    r2[q] = out[2];
    r3[q] = out[3];
  }
  (void)lo, (void)hi, (void)w2, (void)w3, (void)key0, (void)key1;
}

// Normals g0 .. g0 + n - 1 of the Philox stream: the words of whole blocks, Box-Muller over them
// (the arithmetic of philox_normal4 in ddim_math.h, bit for bit, one block per lane), the four
// normals of each block interleaved into `blocks`, then the window.
template <typename T>
void philox_tile(uint64_t g0, int n, uint64_t offset, uint64_t seed, T* z) {
  alignas(64) uint32_t r0[kPhiloxBlocks], r1[kPhiloxBlocks], r2[kPhiloxBlocks], r3[kPhiloxBlocks];
  alignas(64) float blocks[4 * kPhiloxBlocks];
  const uint64_t first = g0 >> 2;
  const int count = int(((g0 + uint64_t(n) - 1) >> 2) - first + 1);
  philox_words(first, count, offset, seed, r0, r1, r2, r3);
#pragma omp simd
  for (int q = 0; q < count; ++q) {
    float rad01 = std::sqrt(-2.0f * log_positive(uint_to_unit(r0[q])));
    float rad23 = std::sqrt(-2.0f * log_positive(uint_to_unit(r2[q])));
    float s1, c1, s3, c3;
    sincos_2pi(uint_to_unit(r1[q]), s1, c1);
    sincos_2pi(uint_to_unit(r3[q]), s3, c3);
    blocks[4 * q] = rad01 * c1;
    blocks[4 * q + 1] = rad01 * s1;
    blocks[4 * q + 2] = rad23 * c3;
    blocks[4 * q + 3] = rad23 * s3;
  }
  const int shift = int(g0 & 3);
  for (int j = 0; j < n; ++j) z[j] = T(blocks[shift + j]);
}

// Sum over a tile of a given x' of (x' - mu)^2; kDirection: also d log_prob / d m of each element.
template <bool kClip, bool kDirection, typename T>
T given_tile_sumsq(const StepCoef<T>& k, const T* x, const T* m, const T* xp, int n, T range, bool use_clipped,
                   int64_t numel, T* direction) {
  const T scale = k.inv_var / T(numel);
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int j = 0; j < n; ++j) {
    T mu, dmu;
    ddim_mean<kClip>(k, x[j], m[j], range, use_clipped, mu, dmu);
    T diff = xp[j] - mu;
    acc += diff * diff;
    if (kDirection) direction[j] = dmu * diff * scale;
  }
  return acc;
}

// Sum over a tile of (mu - mu_ref)^2, mu_ref from the guided reference output mr by the same mean
// function (ddim_mean_gap). A loop of its own: the log-prob's loop is the same code with or without
// the KL penalty, so its sums keep their bits.
template <bool kClip, typename T>
T tile_kl_sumsq(const StepCoef<T>& k, const T* x, const T* m, const T* mr, int n, T range, bool use_clipped) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int j = 0; j < n; ++j) {
    T gap = ddim_mean_gap<kClip>(k, x[j], m[j], mr[j], range, use_clipped);
    acc += gap * gap;
  }
  return acc;
}

// Sum over elements [i0, i1) of sample b of (x' - mu)^2; writes x' first when sampling. With a
// reference output (a given x' only), also the sum of (mu - mu_ref)^2 into *kl_total.
template <typename T, bool kClip>
double forward_chunk(const DdimArgs& a, const StepCoef<T>& k, int64_t b, int64_t i0, int64_t i1,
                     double* kl_total = nullptr) {
  alignas(64) T m[kTile], scratch[kTile], x[kTile], xp[kTile], z[kTile];
  const T range = T(a.clip_sample_range);
  const bool use_clipped = a.use_clipped_model_output;
  double total = 0.0;
  for (int64_t i = i0; i < i1; i += kTile) {
    const int n = int(std::min<int64_t>(kTile, i1 - i));
    const int64_t at = b * a.numel + i;
    load_guided_tile(a, b, i, n, m, scratch);
    load_tile(a.sample, a.sample_dtype, at, n, x);
    T acc = T(0);
    if (a.sample_noise) {
      if (a.noise != 0) {
        load_tile(a.noise, a.noise_dtype, at, n, z);
      } else {
        philox_tile(uint64_t(at), n, a.offset, a.seed, z);
      }
      for (int j = 0; j < n; ++j) {
        T mu, dmu;
        ddim_mean<kClip>(k, x[j], m[j], range, use_clipped, mu, dmu);
        scratch[j] = mu;
        xp[j] = mu + k.sigma * z[j];
      }
      store_tile<true>(a.prev_sample, a.prev_sample_dtype, at, n, xp);
#pragma omp simd reduction(+ : acc)
      for (int j = 0; j < n; ++j) {
        T diff = xp[j] - scratch[j];
        acc += diff * diff;
      }
    } else {
      load_tile(a.prev_sample, a.prev_sample_dtype, at, n, xp);
      // With grad_direction, d log_prob / d m too, while the tile is in L1.
      acc = a.grad_direction != 0
                ? given_tile_sumsq<kClip, true>(k, x, m, xp, n, range, use_clipped, a.numel,
                                                reinterpret_cast<T*>(a.grad_direction) + at)
                : given_tile_sumsq<kClip, false>(k, x, m, xp, n, range, use_clipped, a.numel, static_cast<T*>(nullptr));
      if (a.reference_output != 0) {  // z is free without sampling: the guided reference output
        load_guided_rows(a, a.reference_output, a.reference_output_dtype, b, i, n, z, scratch);
        *kl_total += double(tile_kl_sumsq<kClip>(k, x, m, z, n, range, use_clipped));
      }
    }
    total += double(acc);
  }
  return total;
}

// Stores g = d loss / d m of elements [i, i + n) of sample b as grad_model_output; with CFG split
// over the halves (d m / d m_uncond = 1 - w, d m / d m_cond = w), using `scratch`; g is overwritten.
template <typename T>
void store_guided_gradient(const DdimArgs& a, int64_t b, int64_t i, int n, T* g, T* scratch) {
  const int64_t at = b * a.numel + i;
  if (!a.cfg) {
    store_tile<false>(a.grad_model_output, a.model_output_dtype, at, n, g);
    return;
  }
  const T w = T(a.guidance_scale);
  for (int j = 0; j < n; ++j) {
    scratch[j] = w * g[j];
    g[j] = g[j] - scratch[j];
  }
  store_tile<false>(a.grad_model_output, a.model_output_dtype, at, n, g);
  store_tile<false>(a.grad_model_output, a.model_output_dtype, (a.batch + b) * a.numel + i, n, scratch);
}

// grad_model_output over elements [i0, i1) of sample b; c = grad_log_prob[b] / (sigma^2 numel), and
// with kl_term the KL's ck (mu - mu_ref), ck = kl_grad_coef (the reference output is then read),
// added to grad_prev_sample (both are upstream gradients of mu).
template <typename T, bool kClip>
void backward_chunk(const DdimArgs& a, const StepCoef<T>& k, T c, int64_t b, int64_t i0, int64_t i1,
                    bool kl_term = false, T ck = T(0)) {
  alignas(64) T m[kTile], scratch[kTile], x[kTile], xp[kTile], gp[kTile], g[kTile];
  const T range = T(a.clip_sample_range);
  const bool use_clipped = a.use_clipped_model_output;
  for (int64_t i = i0; i < i1; i += kTile) {
    const int n = int(std::min<int64_t>(kTile, i1 - i));
    const int64_t at = b * a.numel + i;
    load_guided_tile(a, b, i, n, m, scratch);
    load_tile(a.sample, a.sample_dtype, at, n, x);
    load_tile(a.prev_sample, a.prev_sample_dtype, at, n, xp);
    if (a.grad_prev_sample != 0) {
      load_tile(a.grad_prev_sample, a.grad_prev_sample_dtype, at, n, gp);
    } else {
      std::fill(gp, gp + n, T(0));
    }
    if (kl_term) {  // d loss / d mu of the KL, ck (mu - mu_ref), joins the upstream gradient of mu
      load_guided_rows(a, a.reference_output, a.reference_output_dtype, b, i, n, g, scratch);  // g: free
      for (int j = 0; j < n; ++j) gp[j] += ck * ddim_mean_gap<kClip>(k, x[j], m[j], g[j], range, use_clipped);
    }
    for (int j = 0; j < n; ++j) {
      T mu, dmu;
      ddim_mean<kClip>(k, x[j], m[j], range, use_clipped, mu, dmu);
      g[j] = dmu * (gp[j] + c * (xp[j] - mu));
    }
    store_guided_gradient(a, b, i, n, g, scratch);
  }
}

// grad_model_output over elements [i0, i1) of sample b from the direction the forward pass wrote:
// c * direction, split over the CFG halves as (1 - w, w).
template <typename T>
void direction_backward_chunk(const DdimArgs& a, T c, int64_t b, int64_t i0, int64_t i1) {
  alignas(64) T g[kTile], cond[kTile];
  const T* direction = reinterpret_cast<const T*>(a.grad_direction);
  for (int64_t i = i0; i < i1; i += kTile) {
    const int n = int(std::min<int64_t>(kTile, i1 - i));
    const int64_t at = b * a.numel + i;
    for (int j = 0; j < n; ++j) g[j] = c * direction[at + j];
    store_guided_gradient(a, b, i, n, g, cond);
  }
}

template <typename T>
std::vector<StepCoef<T>> step_coefficients(const DdimArgs& a) {
  const T* alpha_t = reinterpret_cast<const T*>(a.alpha_t);
  const T* alpha_prev = reinterpret_cast<const T*>(a.alpha_prev);
  std::vector<StepCoef<T>> coef(size_t(a.batch));
  for (int64_t b = 0; b < a.batch; ++b) coef[b] = make_step_coef<T>(alpha_t[b], alpha_prev[b], T(a.eta), a.prediction);
  return coef;
}

// log_prob of each sample from the per-(sample, chunk) sums of squares, added in chunk order; with
// kl_partial (a reference output), kl the same way from the sums of (mu - mu_ref)^2.
template <typename T>
void log_prob_from_partials(const DdimArgs& a, const double* partial, const double* kl_partial = nullptr) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = step_coefficients<T>(a);
  T* log_prob = reinterpret_cast<T*>(a.log_prob);
  for (int64_t b = 0; b < a.batch; ++b) {
    double sumsq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sumsq += partial[b * chunks + c];
    log_prob[b] = log_prob_from_sumsq(coef[b], T(sumsq), a.numel);
  }
  if (kl_partial == nullptr) return;
  T* kl = reinterpret_cast<T*>(a.kl);
  for (int64_t b = 0; b < a.batch; ++b) {
    double sumsq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sumsq += kl_partial[b * chunks + c];
    kl[b] = kl_from_sumsq(coef[b].inv_var, T(sumsq), a.numel);
  }
}

template <typename T>
void forward_impl(const DdimArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = step_coefficients<T>(a);
  std::vector<double> partial(size_t(a.batch * chunks));
  std::vector<double> kl_partial(a.reference_output != 0 ? size_t(a.batch * chunks) : 0);
  parallel_for(a.batch * chunks, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, i0 = (item % chunks) * kChunk, i1 = std::min(a.numel, i0 + kChunk);
      double* kl = kl_partial.empty() ? nullptr : &kl_partial[item];
      partial[item] = a.clip_sample ? forward_chunk<T, true>(a, coef[b], b, i0, i1, kl)
                                    : forward_chunk<T, false>(a, coef[b], b, i0, i1, kl);
    }
  }, a.batch * a.numel >= kParallelElements);
  log_prob_from_partials<T>(a, partial.data(), kl_partial.empty() ? nullptr : kl_partial.data());
}

// Work item `item` = (sample, chunk) of forward_impl, on its own: the sum of squares of the chunk.
template <typename T>
double forward_item_impl(const DdimArgs& a, int64_t item) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const int64_t b = item / chunks, i0 = (item % chunks) * kChunk, i1 = std::min(a.numel, i0 + kChunk);
  const StepCoef<T> k = make_step_coef<T>(reinterpret_cast<const T*>(a.alpha_t)[b],
                                          reinterpret_cast<const T*>(a.alpha_prev)[b], T(a.eta), a.prediction);
  return a.clip_sample ? forward_chunk<T, true>(a, k, b, i0, i1) : forward_chunk<T, false>(a, k, b, i0, i1);
}

// The PPO loss forward and its gradient in one pass over the data, one sample per work item: the
// sample's rows are read from memory once to reduce its log-probability, the PPO derivative of that
// sample alone (d loss / d log_prob_b) follows, and the gradient pass re-reads the rows from cache.
// Writes grad_model_output for a unit upstream gradient. Bit-identical to forward_impl followed by
// the PPO stage and backward_impl with grad_log_prob = dloss_dlogp (same sums in the same order).
// With a reference output, the KL term too: kl[b] from the same pass, and d loss / d kl_b =
// kl_beta / batch (the PPO stage adds kl_beta * mean(kl) to the loss) in the gradient pass.
template <typename T>
void forward_with_gradient_impl(const DdimArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = step_coefficients<T>(a);
  const T* old_log_prob = reinterpret_cast<const T*>(a.old_log_prob);
  const T* advantages = reinterpret_cast<const T*>(a.advantages);
  T* log_prob = reinterpret_cast<T*>(a.log_prob);
  const bool with_kl = a.reference_output != 0;
  // Rounded once from double, as the Python layer forms the backward's grad_kl: bit-identical.
  const T grad_kl = T(a.kl_beta / double(a.batch));
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double sumsq = 0.0, kl_sumsq = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i0 = c * kChunk, i1 = std::min(a.numel, i0 + kChunk);
        double kl_chunk = 0.0;
        double* kl = with_kl ? &kl_chunk : nullptr;
        sumsq += a.clip_sample ? forward_chunk<T, true>(a, coef[b], b, i0, i1, kl)
                               : forward_chunk<T, false>(a, coef[b], b, i0, i1, kl);
        kl_sumsq += kl_chunk;
      }
      log_prob[b] = log_prob_from_sumsq(coef[b], T(sumsq), a.numel);
      if (with_kl) reinterpret_cast<T*>(a.kl)[b] = kl_from_sumsq(coef[b].inv_var, T(kl_sumsq), a.numel);
      const PpoTerm<T> term = ppo_term<T>(log_prob[b], old_log_prob[b], advantages[b], T(a.ppo_clip_range),
                                          T(a.adv_clip_max));
      const T grad_log_prob = term.dloss_dlogp / T(a.batch);
      const T scale = grad_log_prob * coef[b].inv_var / T(a.numel);
      const T ck = kl_grad_coef(coef[b].inv_var, grad_kl, a.numel);
      const bool kl_term = with_kl && ck != T(0);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i0 = c * kChunk, i1 = std::min(a.numel, i0 + kChunk);
        if (a.clip_sample) {
          backward_chunk<T, true>(a, coef[b], scale, b, i0, i1, kl_term, ck);
        } else {
          backward_chunk<T, false>(a, coef[b], scale, b, i0, i1, kl_term, ck);
        }
      }
    }
  }, a.batch * a.numel >= kParallelElements);
}

template <typename T>
void backward_impl(const DdimArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = step_coefficients<T>(a);
  const T* grad_log_prob = reinterpret_cast<const T*>(a.grad_log_prob);
  const T* grad_kl = reinterpret_cast<const T*>(a.grad_kl);
  parallel_for(a.batch * chunks, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, i0 = (item % chunks) * kChunk, i1 = std::min(a.numel, i0 + kChunk);
      if (a.grad_direction != 0) {
        direction_backward_chunk<T>(a, grad_log_prob[b], b, i0, i1);
        continue;
      }
      const T c = grad_log_prob[b] * coef[b].inv_var / T(a.numel);
      const T ck = a.grad_kl != 0 ? kl_grad_coef(coef[b].inv_var, grad_kl[b], a.numel) : T(0);
      const bool kl_term = ck != T(0);
      if (a.clip_sample) {
        backward_chunk<T, true>(a, coef[b], c, b, i0, i1, kl_term, ck);
      } else {
        backward_chunk<T, false>(a, coef[b], c, b, i0, i1, kl_term, ck);
      }
    }
  }, a.batch * a.numel >= kParallelElements);
}

}  // namespace

void forward(const DdimArgs& args) {
  const bool with_gradient = args.old_log_prob != 0 && args.grad_model_output != 0;
  if (args.compute == kFloat64) {
    with_gradient ? forward_with_gradient_impl<double>(args) : forward_impl<double>(args);
  } else {
    with_gradient ? forward_with_gradient_impl<float>(args) : forward_impl<float>(args);
  }
}

double forward_item(const DdimArgs& args, int64_t item) {
  return args.compute == kFloat64 ? forward_item_impl<double>(args, item) : forward_item_impl<float>(args, item);
}

void finish_forward(const DdimArgs& args, const double* partial) {
  if (args.compute == kFloat64) {
    log_prob_from_partials<double>(args, partial);
  } else {
    log_prob_from_partials<float>(args, partial);
  }
}

void backward(const DdimArgs& args) {
  if (args.compute == kFloat64) {
    backward_impl<double>(args);
  } else {
    backward_impl<float>(args);
  }
}

}  // namespace DDPO_CPU_ISA
}  // namespace ddpo
