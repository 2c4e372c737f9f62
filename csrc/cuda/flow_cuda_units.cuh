// Per-thread work of the flow SDE CUDA kernels (flow_cuda.cu): element access in any storage dtype,
// the CFG velocity, one thread's share of a (sample, chunk) block in the forward, one element of the
// backward, one sample's finalize. Host-compilable (DDPO_HD) so that csrc/cuda/flow_emulate.cpp runs
// this exact code on the CPU against an independent element loop (tests/test_flow_cuda_emulation.py).
#pragma once
#include <cstdint>

#include "flow_core.h"
#include "flow_math.h"

namespace ddpo {
namespace flow_cuda {

constexpr int kThreads = 256;          // threads per (sample, chunk) block
constexpr int kFinalizeThreads = 128;

template <typename T>
DDPO_HD T load_as(uintptr_t base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kFloat32: return T(reinterpret_cast<const float*>(base)[index]);
    case kFloat64: return T(reinterpret_cast<const double*>(base)[index]);
    case kFloat16: return T(fp16_bits_to_float(reinterpret_cast<const uint16_t*>(base)[index]));
    default: return T(bf16_bits_to_float(reinterpret_cast<const uint16_t*>(base)[index]));
  }
}

// Stores v in `dtype` and returns the stored value (rounded), for the log-prob of x' as stored.
template <typename T>
DDPO_HD T store_as(uintptr_t base, int32_t dtype, int64_t index, T v) {
  switch (dtype) {
    case kFloat32: {
      const float f = float(v);
      reinterpret_cast<float*>(base)[index] = f;
      return T(f);
    }
    case kFloat64:
      reinterpret_cast<double*>(base)[index] = double(v);
      return v;
    case kFloat16: {
      const uint16_t h = float_to_fp16_bits(float(v));
      reinterpret_cast<uint16_t*>(base)[index] = h;
      return T(fp16_bits_to_float(h));
    }
    default: {
      const uint16_t h = float_to_bf16_bits(float(v));
      reinterpret_cast<uint16_t*>(base)[index] = h;
      return T(bf16_bits_to_float(h));
    }
  }
}

// The guided velocity at element i of sample b, of the policy's model output or (`base`, its dtype)
// the reference's.
template <typename T>
DDPO_HD T velocity(const FlowArgs& a, int64_t b, int64_t i, uintptr_t base = 0, int32_t dtype = kFloat32) {
  if (base == 0) base = a.model_output, dtype = a.model_output_dtype;
  const T v = load_as<T>(base, dtype, b * a.numel + i);
  if (!a.cfg) return v;
  const T cond = load_as<T>(base, dtype, (a.batch + b) * a.numel + i);
  return v + T(a.guidance_scale) * (cond - v);
}

template <typename T>
DDPO_HD FlowCoef<T> coef_of(const FlowArgs& a, int64_t b, double cps_sin) {
  const T* sigma = reinterpret_cast<const T*>(a.sigma);
  const T* sigma_prev = reinterpret_cast<const T*>(a.sigma_prev);
  return make_flow_coef<T>(sigma[b], sigma_prev[b], T(a.sigma_max), T(a.noise_level), T(cps_sin), a.sde_type);
}

// Thread `thread` of block (sample b, chunk c): whole Philox blocks q = first + thread, + kThreads, ...
// of the flattened (B, N) tensor (element g is normal g % 4 of block g / 4), masked to the chunk's
// elements [g0, g1). Writes x' (when sampling) and the mean (when asked); returns its sum of
// (x' - mean)^2. With a reference output (a given x'), its sum of (mean - mean_ref)^2 goes to *kl_acc.
template <typename T>
DDPO_HD T forward_thread(const FlowArgs& a, const FlowCoef<T>& k, int64_t b, int64_t c, int thread,
                         T* kl_acc = nullptr) {
  const int64_t i0 = c * kChunk, i1 = a.numel < i0 + kChunk ? a.numel : i0 + kChunk;
  const int64_t g0 = b * a.numel + i0, g1 = b * a.numel + i1;
  const bool philox = a.sample_noise && a.noise == 0;
  const bool with_kl = a.reference_output != 0;
  T acc = T(0), kl = T(0);
  for (int64_t q = (g0 >> 2) + thread; q <= ((g1 - 1) >> 2); q += kThreads) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (philox) philox_normal4(uint64_t(q), a.offset, a.seed, z);
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t g = 4 * q + lane;
      if (g < g0 || g >= g1) continue;
      const T v = velocity<T>(a, b, g - b * a.numel);
      const T mean = k.cx * load_as<T>(a.sample, a.sample_dtype, g) + k.cm * v;
      if (a.prev_sample_mean != 0) reinterpret_cast<T*>(a.prev_sample_mean)[g] = mean;
      if (with_kl) {  // mean - mean_ref = cm (v - v_ref): exactly 0 for v == v_ref
        const T gap = k.cm * (v - velocity<T>(a, b, g - b * a.numel, a.reference_output, a.reference_output_dtype));
        kl += gap * gap;
      }
      T xp;
      if (a.sample_noise) {
        const T noise = philox ? T(z[lane]) : load_as<T>(a.noise, a.noise_dtype, g);
        xp = store_as<T>(a.prev_sample, a.prev_sample_dtype, g, mean + k.noise_scale * noise);
      } else {
        xp = load_as<T>(a.prev_sample, a.prev_sample_dtype, g);
      }
      const T d = xp - mean;
      acc += d * d;
    }
  }
  if (with_kl) *kl_acc = kl;
  return acc;
}

// log_prob[b] from sample b's partials (workspace, added in chunk order) and std_dev_t[b]; with a
// reference output, kl[b] from the workspace's second half.
template <typename T>
DDPO_HD void finalize_sample(const FlowArgs& a, double cps_sin, int64_t chunks, int64_t b) {
  const T* workspace = reinterpret_cast<const T*>(a.workspace);
  T sumsq = T(0);
  for (int64_t c = 0; c < chunks; ++c) sumsq += workspace[b * chunks + c];
  const FlowCoef<T> k = coef_of<T>(a, b, cps_sin);
  reinterpret_cast<T*>(a.log_prob)[b] = k.lp_scale * sumsq / T(a.numel) + k.lp_shift;
  if (a.std_dev_t != 0) reinterpret_cast<T*>(a.std_dev_t)[b] = k.std_dev_t;
  if (a.reference_output == 0) return;
  T kl_sumsq = T(0);
  for (int64_t c = 0; c < chunks; ++c) kl_sumsq += workspace[(a.batch + b) * chunks + c];
  reinterpret_cast<T*>(a.kl)[b] = kl_from_sumsq<T>(k.inv_var, kl_sumsq, a.numel);
}

// grad_model_output at flat element g = b N + i: cm (grad_prev + grad_mean + c_b (x' - mean) + k_b
// (mean - mean_ref)), split (1 - w, w) over the CFG halves; the KL term with grad_kl only.
template <typename T>
DDPO_HD void backward_element(const FlowArgs& a, double cps_sin, int64_t g) {
  const int64_t b = g / a.numel, i = g - b * a.numel;
  const FlowCoef<T> k = coef_of<T>(a, b, cps_sin);
  const T c = T(-2) * k.lp_scale * reinterpret_cast<const T*>(a.grad_log_prob)[b] / T(a.numel);
  const T v = velocity<T>(a, b, i);
  const T mean = k.cx * load_as<T>(a.sample, a.sample_dtype, g) + k.cm * v;
  T up = c * (load_as<T>(a.prev_sample, a.prev_sample_dtype, g) - mean);
  if (a.grad_kl != 0) {  // + d KL / d mean: mean - mean_ref = cm (v - v_ref)
    const T ck = kl_grad_coef<T>(k.inv_var, reinterpret_cast<const T*>(a.grad_kl)[b], a.numel);
    up += ck * (k.cm * (v - velocity<T>(a, b, i, a.reference_output, a.reference_output_dtype)));
  }
  if (a.grad_prev_sample != 0) up += load_as<T>(a.grad_prev_sample, a.grad_prev_sample_dtype, g);
  if (a.grad_prev_sample_mean != 0) up += load_as<T>(a.grad_prev_sample_mean, a.grad_prev_sample_mean_dtype, g);
  const T grad = k.cm * up;
  if (!a.cfg) {
    store_as<T>(a.grad_model_output, a.model_output_dtype, g, grad);
    return;
  }
  const T w = T(a.guidance_scale);  // d v / d v_uncond = 1 - w, d v / d v_cond = w
  store_as<T>(a.grad_model_output, a.model_output_dtype, g, grad - w * grad);
  store_as<T>(a.grad_model_output, a.model_output_dtype, (a.batch + b) * a.numel + i, w * grad);
}

}  // namespace flow_cuda
}  // namespace ddpo
