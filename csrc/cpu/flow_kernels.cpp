// CPU kernels of the flow SDE step (forward: x', log_prob, optional mean; backward: d/d model_output).
// Compiled once per instruction set, DDPO_CPU_ISA naming the namespace.
//
// Work items are (sample, chunk of kChunk elements), as in the DDIM kernels, so the log-prob sums
// are added in the same fixed order whatever the thread count. Each item walks its chunk in tiles:
// inputs are widened to the compute type into small buffers, the math runs on the buffers (and
// vectorises), results are narrowed back; the storage dtype of each tensor is a run-time choice.
#include <algorithm>
#include <vector>

#include "cpu/flow_kernels.h"
#include "cpu/thread_pool.h"
#include "flow_math.h"

#ifndef DDPO_CPU_ISA
#error "DDPO_CPU_ISA must name the instruction-set variant"
#endif

namespace ddpo {
namespace DDPO_CPU_ISA {
namespace {

constexpr int kTile = 256;
constexpr int64_t kParallelElements = 1 << 16;  // below this, waking workers costs more than it saves

// Storage tags: the 16-bit formats are raw bits.
struct Half { uint16_t bits; };
struct BHalf { uint16_t bits; };

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(Half v) { return fp16_bits_to_float(v.bits); }
inline float widen(BHalf v) { return bf16_bits_to_float(v.bits); }

template <typename T> inline void narrow(T v, float& out) { out = float(v); }
template <typename T> inline void narrow(T v, double& out) { out = double(v); }
template <typename T> inline void narrow(T v, Half& out) { out.bits = float_to_fp16_bits(float(v)); }
template <typename T> inline void narrow(T v, BHalf& out) { out.bits = float_to_bf16_bits(float(v)); }

// Calls fn with a value of the storage type of dtype code `dtype`.
template <typename Fn>
inline void with_storage(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(float{}); break;
    case kFloat64: fn(double{}); break;
    case kFloat16: fn(Half{}); break;
    default: fn(BHalf{}); break;
  }
}

template <typename T>
void read(uintptr_t base, int32_t dtype, int64_t at, int n, T* out) {
  with_storage(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* p = reinterpret_cast<const S*>(base) + at;
    for (int j = 0; j < n; ++j) out[j] = T(widen(p[j]));
  });
}

// Stores values[0, n); values then holds what was stored (rounded), for the log-prob.
template <typename T>
void write_back(uintptr_t base, int32_t dtype, int64_t at, int n, T* values) {
  with_storage(dtype, [&](auto tag) {
    using S = decltype(tag);
    S* p = reinterpret_cast<S*>(base) + at;
    for (int j = 0; j < n; ++j) {
      narrow(values[j], p[j]);
      values[j] = T(widen(p[j]));
    }
  });
}

template <typename T>
void write(uintptr_t base, int32_t dtype, int64_t at, int n, const T* values) {
  with_storage(dtype, [&](auto tag) {
    using S = decltype(tag);
    S* p = reinterpret_cast<S*>(base) + at;
    for (int j = 0; j < n; ++j) narrow(values[j], p[j]);
  });
}

// v = velocity of sample b, elements [i, i + n), after classifier-free guidance, from the policy's
// model output or (`base`) the reference's.
template <typename T>
void read_velocity(const FlowArgs& a, int64_t b, int64_t i, int n, T* v, T* scratch, uintptr_t base = 0,
                   int32_t dtype = kFloat32) {
  if (base == 0) base = a.model_output, dtype = a.model_output_dtype;
  read(base, dtype, b * a.numel + i, n, v);
  if (!a.cfg) return;
  read(base, dtype, (a.batch + b) * a.numel + i, n, scratch);
  const T w = T(a.guidance_scale);
  for (int j = 0; j < n; ++j) v[j] = v[j] + w * (scratch[j] - v[j]);
}

// Normals g0 .. g0 + n - 1 of the Philox stream (ddim_math.h philox_normal4: element g is normal
// g % 4 of block g / 4), the same stream as the DDIM kernels'.
template <typename T>
void philox_normals(uint64_t g0, int n, uint64_t offset, uint64_t seed, T* z) {
  alignas(64) float normals[kTile + 8];
  const uint64_t first = g0 >> 2, last = (g0 + uint64_t(n) - 1) >> 2;
  for (uint64_t q = first; q <= last; ++q) philox_normal4(q, offset, seed, normals + 4 * (q - first));
  const float* window = normals + (g0 & 3);
  for (int j = 0; j < n; ++j) z[j] = T(window[j]);
}

// Sum over elements [i0, i1) of sample b of (x' - mean)^2; with a reference output (a given x'),
// also of (mean - mean_ref)^2 into *kl_total.
template <typename T>
double forward_chunk(const FlowArgs& a, const FlowCoef<T>& k, int64_t b, int64_t i0, int64_t i1,
                     double* kl_total = nullptr) {
  alignas(64) T v[kTile], mean[kTile], x[kTile], xp[kTile], z[kTile];
  double total = 0.0;
  for (int64_t i = i0; i < i1; i += kTile) {
    const int n = int(std::min<int64_t>(kTile, i1 - i));
    const int64_t at = b * a.numel + i;
    read_velocity(a, b, i, n, v, z);
    read(a.sample, a.sample_dtype, at, n, x);
    for (int j = 0; j < n; ++j) mean[j] = k.cx * x[j] + k.cm * v[j];
    if (a.prev_sample_mean != 0) write(a.prev_sample_mean, a.compute, at, n, mean);
    if (a.sample_noise) {
      if (a.noise != 0) {
        read(a.noise, a.noise_dtype, at, n, z);
      } else {
        philox_normals(uint64_t(at), n, a.offset, a.seed, z);
      }
      for (int j = 0; j < n; ++j) xp[j] = mean[j] + k.noise_scale * z[j];
      write_back(a.prev_sample, a.prev_sample_dtype, at, n, xp);
    } else {
      read(a.prev_sample, a.prev_sample_dtype, at, n, xp);
    }
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < n; ++j) {
      T d = xp[j] - mean[j];
      acc += d * d;
    }
    total += double(acc);
    if (a.reference_output != 0) {  // z and xp are free now: the reference velocity and a scratch
      read_velocity(a, b, i, n, z, xp, a.reference_output, a.reference_output_dtype);
      T kl = T(0);
#pragma omp simd reduction(+ : kl)
      for (int j = 0; j < n; ++j) {  // mean - mean_ref = cm (v - v_ref): exactly 0 for v == v_ref
        T gap = k.cm * (v[j] - z[j]);
        kl += gap * gap;
      }
      *kl_total += double(kl);
    }
  }
  return total;
}

// grad_model_output over elements [i0, i1) of sample b; c multiplies (x' - mean) and, with kl_term,
// ck (mean - mean_ref) is added (the reference output is then read).
template <typename T>
void backward_chunk(const FlowArgs& a, const FlowCoef<T>& k, T c, int64_t b, int64_t i0, int64_t i1,
                    bool kl_term = false, T ck = T(0)) {
  alignas(64) T v[kTile], scratch[kTile], x[kTile], xp[kTile], up[kTile], g[kTile];
  const T w = T(a.guidance_scale);
  for (int64_t i = i0; i < i1; i += kTile) {
    const int n = int(std::min<int64_t>(kTile, i1 - i));
    const int64_t at = b * a.numel + i;
    read_velocity(a, b, i, n, v, scratch);
    read(a.sample, a.sample_dtype, at, n, x);
    read(a.prev_sample, a.prev_sample_dtype, at, n, xp);
    std::fill(up, up + n, T(0));
    if (a.grad_prev_sample != 0) read(a.grad_prev_sample, a.grad_prev_sample_dtype, at, n, up);
    if (a.grad_prev_sample_mean != 0) {
      read(a.grad_prev_sample_mean, a.grad_prev_sample_mean_dtype, at, n, scratch);
      for (int j = 0; j < n; ++j) up[j] += scratch[j];
    }
    if (kl_term) {  // the KL's d loss / d mean, ck (mean - mean_ref) = ck cm (v - v_ref), joins the upstream
      read_velocity(a, b, i, n, g, scratch, a.reference_output, a.reference_output_dtype);  // g: free
      for (int j = 0; j < n; ++j) up[j] += ck * (k.cm * (v[j] - g[j]));
    }
    for (int j = 0; j < n; ++j) g[j] = k.cm * (up[j] + c * (xp[j] - (k.cx * x[j] + k.cm * v[j])));
    if (!a.cfg) {
      write(a.grad_model_output, a.model_output_dtype, at, n, g);
      continue;
    }
    for (int j = 0; j < n; ++j) {  // d v / d v_uncond = 1 - w, d v / d v_cond = w
      scratch[j] = w * g[j];
      g[j] = g[j] - scratch[j];
    }
    write(a.grad_model_output, a.model_output_dtype, at, n, g);
    write(a.grad_model_output, a.model_output_dtype, (a.batch + b) * a.numel + i, n, scratch);
  }
}

template <typename T>
std::vector<FlowCoef<T>> coefficients(const FlowArgs& a) {
  const T* sigma = reinterpret_cast<const T*>(a.sigma);
  const T* sigma_prev = reinterpret_cast<const T*>(a.sigma_prev);
  const T cps_sin = T(std::sin(a.noise_level * 1.57079632679489661923));
  std::vector<FlowCoef<T>> coef(size_t(a.batch));
  for (int64_t b = 0; b < a.batch; ++b)
    coef[b] = make_flow_coef<T>(sigma[b], sigma_prev[b], T(a.sigma_max), T(a.noise_level), cps_sin, a.sde_type);
  return coef;
}

template <typename T>
void forward_impl(const FlowArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = coefficients<T>(a);
  std::vector<double> partial(size_t(a.batch * chunks));
  std::vector<double> kl_partial(a.reference_output != 0 ? size_t(a.batch * chunks) : 0);
  parallel_for(a.batch * chunks, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, i0 = (item % chunks) * kChunk;
      double* kl = kl_partial.empty() ? nullptr : &kl_partial[item];
      partial[item] = forward_chunk<T>(a, coef[b], b, i0, std::min(a.numel, i0 + kChunk), kl);
    }
  }, a.batch * a.numel >= kParallelElements);
  T* log_prob = reinterpret_cast<T*>(a.log_prob);
  T* std_dev_t = reinterpret_cast<T*>(a.std_dev_t);
  for (int64_t b = 0; b < a.batch; ++b) {
    double sumsq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sumsq += partial[b * chunks + c];
    log_prob[b] = coef[b].lp_scale * T(sumsq) / T(a.numel) + coef[b].lp_shift;
    if (std_dev_t != nullptr) std_dev_t[b] = coef[b].std_dev_t;
    if (kl_partial.empty()) continue;
    double kl_sumsq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) kl_sumsq += kl_partial[b * chunks + c];
    reinterpret_cast<T*>(a.kl)[b] = kl_from_sumsq(coef[b].inv_var, T(kl_sumsq), a.numel);
  }
}

// The PPO loss and its gradient in one pass over the data, one sample per work item: the sample's
// rows are read once to reduce its log-prob, d loss / d log_prob of that sample follows (the PPO
// term alone), and the gradient pass re-reads the rows from cache. Writes grad_model_output for a
// unit upstream gradient; the same sums in the same order as forward_impl + backward_impl.
template <typename T>
void forward_with_gradient_impl(const FlowArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = coefficients<T>(a);
  const T* old_log_prob = reinterpret_cast<const T*>(a.old_log_prob);
  const T* advantages = reinterpret_cast<const T*>(a.advantages);
  T* log_prob = reinterpret_cast<T*>(a.log_prob);
  T* std_dev_t = reinterpret_cast<T*>(a.std_dev_t);
  const bool with_kl = a.reference_output != 0;
  const T grad_kl = T(a.kl_beta / double(a.batch));  // d loss / d kl_b, rounded once as in Python
  parallel_for(a.batch, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double sumsq = 0.0, kl_sumsq = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i0 = c * kChunk;
        double kl_chunk = 0.0;
        sumsq += forward_chunk<T>(a, coef[b], b, i0, std::min(a.numel, i0 + kChunk), with_kl ? &kl_chunk : nullptr);
        kl_sumsq += kl_chunk;
      }
      log_prob[b] = coef[b].lp_scale * T(sumsq) / T(a.numel) + coef[b].lp_shift;
      if (std_dev_t != nullptr) std_dev_t[b] = coef[b].std_dev_t;
      if (with_kl) reinterpret_cast<T*>(a.kl)[b] = kl_from_sumsq(coef[b].inv_var, T(kl_sumsq), a.numel);
      const PpoTerm<T> term = ppo_term<T>(log_prob[b], old_log_prob[b], advantages[b], T(a.ppo_clip_range),
                                          T(a.adv_clip_max));
      const T scale = T(-2) * coef[b].lp_scale * (term.dloss_dlogp / T(a.batch)) / T(a.numel);
      const T ck = kl_grad_coef(coef[b].inv_var, grad_kl, a.numel);
      const bool kl_term = with_kl && ck != T(0);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i0 = c * kChunk;
        backward_chunk<T>(a, coef[b], scale, b, i0, std::min(a.numel, i0 + kChunk), kl_term, ck);
      }
    }
  }, a.batch * a.numel >= kParallelElements);
}

template <typename T>
void backward_impl(const FlowArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  const auto coef = coefficients<T>(a);
  const T* grad_log_prob = reinterpret_cast<const T*>(a.grad_log_prob);
  const T* grad_kl = reinterpret_cast<const T*>(a.grad_kl);
  parallel_for(a.batch * chunks, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, i0 = (item % chunks) * kChunk;
      // d log_prob / d mean = -2 lp_scale (x' - mean) / numel
      const T c = T(-2) * coef[b].lp_scale * grad_log_prob[b] / T(a.numel);
      const T ck = grad_kl != nullptr ? kl_grad_coef(coef[b].inv_var, grad_kl[b], a.numel) : T(0);
      backward_chunk<T>(a, coef[b], c, b, i0, std::min(a.numel, i0 + kChunk), ck != T(0), ck);
    }
  }, a.batch * a.numel >= kParallelElements);
}

}  // namespace

void flow_forward(const FlowArgs& args) {
  const bool with_gradient = args.old_log_prob != 0 && args.grad_model_output != 0;
  if (args.compute == kFloat64) {
    with_gradient ? forward_with_gradient_impl<double>(args) : forward_impl<double>(args);
  } else {
    with_gradient ? forward_with_gradient_impl<float>(args) : forward_impl<float>(args);
  }
}

void flow_backward(const FlowArgs& args) {
  args.compute == kFloat64 ? backward_impl<double>(args) : backward_impl<float>(args);
}

}  // namespace DDPO_CPU_ISA
}  // namespace ddpo
