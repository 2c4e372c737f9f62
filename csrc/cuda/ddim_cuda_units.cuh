// Per-thread work of the CUDA kernels (csrc/cuda/ddim_cuda.cu): the kernel parameters, raw
// 8-element units and their conversions, single-element access, the Philox unit, and the forward
// and backward of one unit of kVec consecutive elements. Kept apart from the kernels so that
// csrc/cuda/emulate_units.cpp can run this exact code on the CPU (see there).
#pragma once
#if defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>

#include "ddim_core.h"
#include "ddim_math.h"

namespace ddpo {
namespace cuda_detail {

constexpr int kThreads = 512;        // threads per (sample, chunk) block
constexpr int kVec = 8;              // consecutive elements per thread
constexpr int kFinalizeThreads = 256;
static_assert(int64_t(kThreads) * kVec == kChunk, "one block covers one reduction chunk");

__host__ __device__ __forceinline__ constexpr int dtype_size(int32_t dtype) {
  return dtype == kFloat64 ? 8 : (dtype == kFloat32 ? 4 : 2);
}

// Everything the element kernels need, passed by value (kernel parameter space).
struct StepParams {
  int64_t batch;
  int64_t numel;
  uint32_t chunks;
  int32_t prediction;
  double eta;
  double guidance_scale;
  double clip_range;
  bool cfg;
  bool use_clipped;
  bool sample_noise;  // forward: write x' = mu + sigma z (else read x' from prev_sample)
  bool vec;           // the vector path's conditions hold
  const void* model_output;
  int32_t model_output_dtype;
  const void* sample;
  int32_t sample_dtype;
  void* prev_sample;
  int32_t prev_sample_dtype;
  const void* noise;  // null: Philox
  int32_t noise_dtype;
  const void* alpha_t;
  const void* alpha_prev;
  uint64_t seed;
  uint64_t offset;
  void* workspace;
  const void* grad_prev_sample;  // backward, optional
  int32_t grad_prev_sample_dtype;
  const void* grad_log_prob;  // backward, optional (null: 0)
  void* grad_model_output;
  const void* reference_output;  // the KL penalty (kernels instantiated with kKL), model_output's rows
  int32_t reference_output_dtype;
  const void* grad_kl;  // backward with kKL, optional (null: 0)
};

// ---- Raw 8-element units (vector path) ----------------------------------------------------------

// The bits of kVec elements of one tensor. A float kernel holds storage types up to 4 bytes
// (2 x 16 bytes), a double kernel up to 8 bytes (4 x 16 bytes).
template <typename T>
struct Unit {
  static constexpr int kWords = int(sizeof(T)) * kVec / 16;
  uint4 q[kWords];
};

template <typename T>
__device__ __forceinline__ uint32_t get_word(const Unit<T>& u, int i) {
  const uint4& q = u.q[i >> 2];
  switch (i & 3) {
    case 0: return q.x;
    case 1: return q.y;
    case 2: return q.z;
    default: return q.w;
  }
}

template <typename T>
__device__ __forceinline__ void set_word(Unit<T>& u, int i, uint32_t v) {
  uint4& q = u.q[i >> 2];
  switch (i & 3) {
    case 0: q.x = v; break;
    case 1: q.y = v; break;
    case 2: q.z = v; break;
    default: q.w = v; break;
  }
}

// Loads elements idx .. idx+7 (16-byte aligned) as raw bits: dtype_size/2 16-byte words, or
// nothing when !enable. Predicated rather than branched on, so that every load of a thread sits in
// one basic block and is issued before the first use of any of them.
template <typename T>
__device__ __forceinline__ void load_unit(const void* base, int32_t dtype, int64_t idx, Unit<T>& u,
                                          bool enable = true) {
  const int size = dtype_size(dtype);
  const uint4* p = reinterpret_cast<const uint4*>(static_cast<const char*>(base) + idx * size);
  const int words = enable ? size >> 1 : 0;
#pragma unroll
  for (int k = 0; k < Unit<T>::kWords; ++k) {
    if (k < words) u.q[k] = p[k];
  }
}

template <typename T>
__device__ __forceinline__ void store_unit(void* base, int32_t dtype, int64_t idx, const Unit<T>& u) {
  const int size = dtype_size(dtype);
  uint4* p = reinterpret_cast<uint4*>(static_cast<char*>(base) + idx * size);
  const int words = size >> 1;
#pragma unroll
  for (int k = 0; k < Unit<T>::kWords; ++k) {
    if (k < words) p[k] = u.q[k];
  }
}

__device__ __forceinline__ float half_bits_to_float(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

// Raw bits -> kVec compute-type values.
template <typename T>
__device__ __forceinline__ void decode_unit(const Unit<T>& u, int32_t dtype, T out[kVec]) {
  if (dtype == kFloat32) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = T(__uint_as_float(get_word(u, j)));
  } else if (dtype == kBFloat16) {
#pragma unroll
    for (int j = 0; j < kVec; j += 2) {
      const uint32_t w = get_word(u, j >> 1);
      out[j] = T(__uint_as_float(w << 16));
      out[j + 1] = T(__uint_as_float(w & 0xFFFF0000u));
    }
  } else if (dtype == kFloat16) {
#pragma unroll
    for (int j = 0; j < kVec; j += 2) {
      const uint32_t w = get_word(u, j >> 1);
      out[j] = T(half_bits_to_float(w & 0xFFFFu));
      out[j + 1] = T(half_bits_to_float(w >> 16));
    }
  } else {
    if constexpr (Unit<T>::kWords == 4) {  // kFloat64, double kernels only
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out[j] = T(__hiloint2double(int(get_word(u, 2 * j + 1)), int(get_word(u, 2 * j))));
      }
    }
  }
}

// kVec compute-type values -> raw bits of the storage dtype (round to nearest even), and the
// values as stored, converted back to the compute type.
template <typename T>
__device__ __forceinline__ void encode_unit(const T in[kVec], int32_t dtype, Unit<T>& u, T stored[kVec]) {
  if (dtype == kFloat32) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = float(in[j]);
      set_word(u, j, __float_as_uint(f));
      stored[j] = T(f);
    }
  } else if (dtype == kBFloat16) {
#pragma unroll
    for (int j = 0; j < kVec; j += 2) {
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(float(in[j])));
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(float(in[j + 1])));
      set_word(u, j >> 1, lo | (hi << 16));
      stored[j] = T(__uint_as_float(lo << 16));
      stored[j + 1] = T(__uint_as_float(hi << 16));
    }
  } else if (dtype == kFloat16) {
#pragma unroll
    for (int j = 0; j < kVec; j += 2) {
      const uint32_t lo = __half_as_ushort(__float2half_rn(float(in[j])));
      const uint32_t hi = __half_as_ushort(__float2half_rn(float(in[j + 1])));
      set_word(u, j >> 1, lo | (hi << 16));
      stored[j] = T(half_bits_to_float(lo));
      stored[j + 1] = T(half_bits_to_float(hi));
    }
  } else {
    if constexpr (Unit<T>::kWords == 4) {  // kFloat64, double kernels only
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const double d = double(in[j]);
        set_word(u, 2 * j, uint32_t(__double2loint(d)));
        set_word(u, 2 * j + 1, uint32_t(__double2hiint(d)));
        stored[j] = T(d);
      }
    }
  }
}

// ---- Single elements (scalar path) --------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T load_elem(const void* base, int32_t dtype, int64_t idx) {
  switch (dtype) {
    case kFloat32: return T(static_cast<const float*>(base)[idx]);
    case kFloat16: return T(half_bits_to_float(static_cast<const unsigned short*>(base)[idx]));
    case kBFloat16: return T(__uint_as_float(uint32_t(static_cast<const unsigned short*>(base)[idx]) << 16));
    default: return T(static_cast<const double*>(base)[idx]);
  }
}

// Stores v rounded to dtype (a double is rounded to float first for the 16-bit types, as torch
// does) and returns the value as stored.
template <typename T>
__device__ __forceinline__ T store_elem(void* base, int32_t dtype, int64_t idx, T v) {
  switch (dtype) {
    case kFloat32: {
      const float f = float(v);
      static_cast<float*>(base)[idx] = f;
      return T(f);
    }
    case kFloat16: {
      const unsigned short h = __half_as_ushort(__float2half_rn(float(v)));
      static_cast<unsigned short*>(base)[idx] = h;
      return T(half_bits_to_float(h));
    }
    case kBFloat16: {
      const unsigned short h = __bfloat16_as_ushort(__float2bfloat16_rn(float(v)));
      static_cast<unsigned short*>(base)[idx] = h;
      return T(__uint_as_float(uint32_t(h) << 16));
    }
    default: {
      const double d = double(v);
      static_cast<double*>(base)[idx] = d;
      return T(d);
    }
  }
}

// ---- Noise ---------------------------------------------------------------------------------------

// The normals of stream elements g0 .. g0+7. kAligned: g0 % 4 == 0 (2 Philox blocks); otherwise
// the 8 normals are taken out of 3 consecutive blocks.
template <bool kAligned>
__device__ __forceinline__ void philox_unit(uint64_t g0, uint64_t offset, uint64_t seed, float z[kVec]) {
  const uint64_t block = g0 >> 2;
  float r[12];
  philox_normal4(block, offset, seed, r);
  philox_normal4(block + 1, offset, seed, r + 4);
  const int shift = kAligned ? 0 : int(g0 & 3);
  if (shift == 0) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = r[j];
    return;
  }
  philox_normal4(block + 2, offset, seed, r + 8);
#pragma unroll
  for (int j = 0; j < kVec; ++j) z[j] = shift == 1 ? r[j + 1] : (shift == 2 ? r[j + 2] : r[j + 3]);
}

// ---- One unit: forward and backward --------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T load_scalar_param(const void* p, int64_t i) {
  return static_cast<const T*>(p)[i];
}

// The guided reference output of a unit (kKL), from its raw units (vector path) or by elements.
template <typename T, bool kVecPath>
__device__ __forceinline__ void load_reference_unit(const StepParams& p, int64_t row, int64_t row_c, int count,
                                                    Unit<T>& ur, Unit<T>& urc, T r[kVec], T rc[kVec]) {
  if constexpr (kVecPath) {
    load_unit(p.reference_output, p.reference_output_dtype, row, ur);
    load_unit(p.reference_output, p.reference_output_dtype, row_c, urc, p.cfg);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool ok = j < count;
      r[j] = ok ? load_elem<T>(p.reference_output, p.reference_output_dtype, row + j) : T(0);
      rc[j] = (ok && p.cfg) ? load_elem<T>(p.reference_output, p.reference_output_dtype, row_c + j) : T(0);
    }
  }
}

template <typename T, bool kVecPath>
__device__ __forceinline__ void decode_reference_unit(const StepParams& p, const Unit<T>& ur, const Unit<T>& urc,
                                                      T r[kVec], T rc[kVec]) {
  if constexpr (kVecPath) {
    decode_unit(ur, p.reference_output_dtype, r);
    if (p.cfg) decode_unit(urc, p.reference_output_dtype, rc);
  }
}

// Forward over one unit: writes x' when sampling, returns the unit's sum of (x' - mu)^2. kKL (a
// given x' only): also the sum of (mu - mu_ref)^2 into kl_sumsq, mu_ref by the same mean function.
template <typename T, bool kClip, bool kVecPath, bool kKL = false>
__device__ __forceinline__ T forward_unit(const StepParams& p, int64_t b, int64_t i0, T* kl_sumsq = nullptr) {
  const int64_t n = p.numel;
  const int64_t row = b * n + i0;                // (b, i0) in sample / prev_sample / noise
  const int64_t row_c = (p.batch + b) * n + i0;  // the conditional half of model_output
  const int count = kVecPath ? kVec : int(n - i0 < kVec ? n - i0 : kVec);
  const bool read_noise = p.sample_noise && p.noise != nullptr;
  const bool read_prev = !p.sample_noise;
  const int32_t in_dtype = read_prev ? p.prev_sample_dtype : p.noise_dtype;

  // 1. Issue every load.
  T m[kVec], mc[kVec], x[kVec], in[kVec];
  Unit<T> um, umc, ux, uin;
  if constexpr (kVecPath) {
    load_unit(p.model_output, p.model_output_dtype, row, um);
    load_unit(p.model_output, p.model_output_dtype, row_c, umc, p.cfg);
    load_unit(p.sample, p.sample_dtype, row, ux);
    load_unit(read_prev ? p.prev_sample : p.noise, in_dtype, row, uin, read_prev || read_noise);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool ok = j < count;
      m[j] = ok ? load_elem<T>(p.model_output, p.model_output_dtype, row + j) : T(0);
      mc[j] = (ok && p.cfg) ? load_elem<T>(p.model_output, p.model_output_dtype, row_c + j) : T(0);
      x[j] = ok ? load_elem<T>(p.sample, p.sample_dtype, row + j) : T(0);
      in[j] = (ok && read_prev) ? load_elem<T>(p.prev_sample, p.prev_sample_dtype, row + j)
              : (ok && read_noise) ? load_elem<T>(p.noise, p.noise_dtype, row + j)
                                   : T(0);
    }
  }
  T r[kVec], rc[kVec];
  Unit<T> ur, urc;
  if constexpr (kKL) load_reference_unit<T, kVecPath>(p, row, row_c, count, ur, urc, r, rc);

  // 2. While they are in flight: the Philox noise (no memory access) and the per-sample
  // coefficients.
  const T alpha_t = load_scalar_param<T>(p.alpha_t, b);
  const T alpha_prev = load_scalar_param<T>(p.alpha_prev, b);
  float z[kVec];
  const bool philox = p.sample_noise && p.noise == nullptr;
  if (philox) philox_unit<kVecPath>(uint64_t(row), p.offset, p.seed, z);
  const StepCoef<T> k = make_step_coef<T>(alpha_t, alpha_prev, T(p.eta), p.prediction);

  // 3. Convert.
  if constexpr (kVecPath) {
    decode_unit(um, p.model_output_dtype, m);
    if (p.cfg) decode_unit(umc, p.model_output_dtype, mc);
    decode_unit(ux, p.sample_dtype, x);
    if (read_prev || read_noise) decode_unit(uin, in_dtype, in);
  }
  if constexpr (kKL) decode_reference_unit<T, kVecPath>(p, ur, urc, r, rc);

  // 4. The mean, x', and the sum of squares over the valid elements.
  const T w = T(p.guidance_scale);
  const T range = T(p.clip_range);
  T mu[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const T mj = p.cfg ? m[j] + w * (mc[j] - m[j]) : m[j];
    T dmu_dm;
    ddim_mean<kClip, T>(k, x[j], mj, range, p.use_clipped, mu[j], dmu_dm);
  }
  if constexpr (kKL) {
    T kl = T(0);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const T mj = p.cfg ? m[j] + w * (mc[j] - m[j]) : m[j];
      const T rj = p.cfg ? r[j] + w * (rc[j] - r[j]) : r[j];
      const T gap = ddim_mean_gap<kClip, T>(k, x[j], mj, rj, range, p.use_clipped);
      if (kVecPath || j < count) kl += gap * gap;
    }
    *kl_sumsq = kl;
  }
  T stored[kVec];
  if (p.sample_noise) {
    T xnew[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) xnew[j] = mu[j] + k.sigma * (philox ? T(z[j]) : in[j]);
    if constexpr (kVecPath) {
      Unit<T> out;
      encode_unit(xnew, p.prev_sample_dtype, out, stored);
      store_unit(p.prev_sample, p.prev_sample_dtype, row, out);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        stored[j] = j < count ? store_elem<T>(p.prev_sample, p.prev_sample_dtype, row + j, xnew[j]) : T(0);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) stored[j] = in[j];
  }
  T sumsq = T(0);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const T d = stored[j] - mu[j];
    if (kVecPath || j < count) sumsq += d * d;
  }
  return sumsq;
}

// Backward over one unit: grad_model_output = dmu/dm * (grad_prev_sample + c_b (x' - mu)), with kKL
// k_b (mu - mu_ref) added to grad_prev_sample first, k_b = kl_grad_coef(inv_var, grad_kl[b], numel).
template <typename T, bool kClip, bool kVecPath, bool kKL = false>
__device__ __forceinline__ void backward_unit(const StepParams& p, int64_t b, int64_t i0) {
  const int64_t n = p.numel;
  const int64_t row = b * n + i0;
  const int64_t row_c = (p.batch + b) * n + i0;
  const int count = kVecPath ? kVec : int(n - i0 < kVec ? n - i0 : kVec);
  const bool has_gp = p.grad_prev_sample != nullptr;

  T m[kVec], mc[kVec], x[kVec], xp[kVec], gp[kVec];
  Unit<T> um, umc, ux, uxp, ugp;
  if constexpr (kVecPath) {
    load_unit(p.model_output, p.model_output_dtype, row, um);
    load_unit(p.model_output, p.model_output_dtype, row_c, umc, p.cfg);
    load_unit(p.sample, p.sample_dtype, row, ux);
    load_unit(p.prev_sample, p.prev_sample_dtype, row, uxp);
    load_unit(p.grad_prev_sample, p.grad_prev_sample_dtype, row, ugp, has_gp);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool ok = j < count;
      m[j] = ok ? load_elem<T>(p.model_output, p.model_output_dtype, row + j) : T(0);
      mc[j] = (ok && p.cfg) ? load_elem<T>(p.model_output, p.model_output_dtype, row_c + j) : T(0);
      x[j] = ok ? load_elem<T>(p.sample, p.sample_dtype, row + j) : T(0);
      xp[j] = ok ? load_elem<T>(p.prev_sample, p.prev_sample_dtype, row + j) : T(0);
      gp[j] = (ok && has_gp) ? load_elem<T>(p.grad_prev_sample, p.grad_prev_sample_dtype, row + j) : T(0);
    }
  }
  T r[kVec], rc[kVec];
  Unit<T> ur, urc;
  if constexpr (kKL) load_reference_unit<T, kVecPath>(p, row, row_c, count, ur, urc, r, rc);

  const StepCoef<T> k = make_step_coef<T>(load_scalar_param<T>(p.alpha_t, b), load_scalar_param<T>(p.alpha_prev, b),
                                          T(p.eta), p.prediction);
  const T glp = p.grad_log_prob != nullptr ? load_scalar_param<T>(p.grad_log_prob, b) : T(0);
  const T c = glp * k.inv_var / T(n);
  const T gkl = (kKL && p.grad_kl != nullptr) ? load_scalar_param<T>(p.grad_kl, b) : T(0);
  const T ck = kl_grad_coef(k.inv_var, gkl, n);

  if constexpr (kVecPath) {
    decode_unit(um, p.model_output_dtype, m);
    if (p.cfg) decode_unit(umc, p.model_output_dtype, mc);
    decode_unit(ux, p.sample_dtype, x);
    decode_unit(uxp, p.prev_sample_dtype, xp);
    if (has_gp) {
      decode_unit(ugp, p.grad_prev_sample_dtype, gp);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) gp[j] = T(0);
    }
  }
  if constexpr (kKL) decode_reference_unit<T, kVecPath>(p, ur, urc, r, rc);

  const T w = T(p.guidance_scale);
  const T range = T(p.clip_range);
  T g[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const T mj = p.cfg ? m[j] + w * (mc[j] - m[j]) : m[j];
    T mu, dmu_dm;
    ddim_mean<kClip, T>(k, x[j], mj, range, p.use_clipped, mu, dmu_dm);
    T upstream = gp[j];
    if constexpr (kKL) {  // the KL's d loss / d mu joins the upstream gradient of mu, as the CPU kernels add it
      const T rj = p.cfg ? r[j] + w * (rc[j] - r[j]) : r[j];
      upstream += ck * ddim_mean_gap<kClip, T>(k, x[j], mj, rj, range, p.use_clipped);
    }
    g[j] = dmu_dm * (upstream + c * (xp[j] - mu));
  }

  // With CFG the unconditional row gets (1 - w) g and the conditional row w g.
  T scaled[kVec], unused[kVec];
  const int rows = p.cfg ? 2 : 1;
  for (int r = 0; r < rows; ++r) {
    const T factor = p.cfg ? (r == 0 ? T(1) - w : w) : T(1);
    const int64_t dst = r == 0 ? row : row_c;
#pragma unroll
    for (int j = 0; j < kVec; ++j) scaled[j] = p.cfg ? factor * g[j] : g[j];
    if constexpr (kVecPath) {
      Unit<T> out;
      encode_unit(scaled, p.model_output_dtype, out, unused);
      store_unit(p.grad_model_output, p.model_output_dtype, dst, out);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < count) store_elem<T>(p.grad_model_output, p.model_output_dtype, dst + j, scaled[j]);
      }
    }
  }
}

}  // namespace cuda_detail
}  // namespace ddpo
