// CUDA backend of the flow SDE step (Flow-GRPO): forward (x', log_prob, optional mean and
// std_dev_t, then the DDIM backend's PPO stage) and backward. Semantics: csrc/flow_core.h; math:
// csrc/flow_math.h (per-sample coefficients) and ddim_math.h (Philox, Box-Muller, dtype rounding),
// shared with the CPU kernels.
//
// Layout: one block of kThreads threads per (sample, chunk of kChunk elements); the grid is flat,
// sample-major. A thread handles whole Philox blocks (4 consecutive elements of the flattened
// (B, N) tensor: element g is normal g % 4 of block g / 4, the DDIM kernels' stream), masked to its
// chunk, so each block's Philox and Box-Muller run once. Each block writes the partial sum of
// (x' - mean)^2 of its chunk (a fixed shared-memory tree) to workspace[sample * chunks + chunk]; a
// finalize kernel adds each sample's partials in chunk order. Deterministic, no atomics, no host
// synchronisation or allocation: a step can be captured in a CUDA graph.
//
// This first version uses scalar loads; the DDIM kernels' 16-byte vector path is the next step.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flow_core.h"
#include "flow_math.h"

namespace ddpo {
namespace {

constexpr int kFlowThreads = 256;
constexpr int kFlowFinalizeThreads = 128;

template <typename T>
__device__ __forceinline__ T load_as(uintptr_t base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kFloat32: return T(reinterpret_cast<const float*>(base)[index]);
    case kFloat64: return T(reinterpret_cast<const double*>(base)[index]);
    case kFloat16: return T(fp16_bits_to_float(reinterpret_cast<const uint16_t*>(base)[index]));
    default: return T(bf16_bits_to_float(reinterpret_cast<const uint16_t*>(base)[index]));
  }
}

// Stores v in `dtype` and returns the stored value (rounded), for the log-prob of x' as stored.
template <typename T>
__device__ __forceinline__ T store_as(uintptr_t base, int32_t dtype, int64_t index, T v) {
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

template <typename T>
__device__ __forceinline__ T velocity(const FlowArgs& a, int64_t b, int64_t i) {
  const T v = load_as<T>(a.model_output, a.model_output_dtype, b * a.numel + i);
  if (!a.cfg) return v;
  const T cond = load_as<T>(a.model_output, a.model_output_dtype, (a.batch + b) * a.numel + i);
  return v + T(a.guidance_scale) * (cond - v);
}

template <typename T>
__device__ __forceinline__ FlowCoef<T> coef_of(const FlowArgs& a, int64_t b, T cps_sin) {
  const T* sigma = reinterpret_cast<const T*>(a.sigma);
  const T* sigma_prev = reinterpret_cast<const T*>(a.sigma_prev);
  return make_flow_coef<T>(sigma[b], sigma_prev[b], T(a.sigma_max), T(a.noise_level), cps_sin, a.sde_type);
}

template <typename T>
__global__ void __launch_bounds__(kFlowThreads) flow_forward_kernel(const FlowArgs a, double cps_sin, int64_t chunks) {
  __shared__ T partial[kFlowThreads];
  const int64_t b = int64_t(blockIdx.x) / chunks, c = int64_t(blockIdx.x) % chunks;
  const int64_t i0 = c * kChunk, i1 = min(a.numel, i0 + kChunk);
  const int64_t g0 = b * a.numel + i0, g1 = b * a.numel + i1;
  const FlowCoef<T> k = coef_of<T>(a, b, T(cps_sin));
  const bool philox = a.sample_noise && a.noise == 0;
  T acc = T(0);
  for (int64_t q = (g0 >> 2) + threadIdx.x; q <= ((g1 - 1) >> 2); q += kFlowThreads) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (philox) philox_normal4(uint64_t(q), a.offset, a.seed, z);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t g = 4 * q + lane;
      if (g < g0 || g >= g1) continue;
      const int64_t i = g - b * a.numel;
      const T x = load_as<T>(a.sample, a.sample_dtype, g);
      const T mean = k.cx * x + k.cm * velocity<T>(a, b, i);
      if (a.prev_sample_mean != 0) reinterpret_cast<T*>(a.prev_sample_mean)[g] = mean;
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
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kFlowThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) reinterpret_cast<T*>(a.workspace)[blockIdx.x] = partial[0];
}

template <typename T>
__global__ void flow_finalize_kernel(const FlowArgs a, double cps_sin, int64_t chunks) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.batch) return;
  const T* workspace = reinterpret_cast<const T*>(a.workspace);
  T sumsq = T(0);
  for (int64_t c = 0; c < chunks; ++c) sumsq += workspace[b * chunks + c];
  const FlowCoef<T> k = coef_of<T>(a, b, T(cps_sin));
  reinterpret_cast<T*>(a.log_prob)[b] = k.lp_scale * sumsq / T(a.numel) + k.lp_shift;
  if (a.std_dev_t != 0) reinterpret_cast<T*>(a.std_dev_t)[b] = k.std_dev_t;
}

template <typename T>
__global__ void __launch_bounds__(kFlowThreads) flow_backward_kernel(const FlowArgs a, double cps_sin) {
  const int64_t total = a.batch * a.numel;
  for (int64_t g = int64_t(blockIdx.x) * kFlowThreads + threadIdx.x; g < total; g += int64_t(gridDim.x) * kFlowThreads) {
    const int64_t b = g / a.numel, i = g - b * a.numel;
    const FlowCoef<T> k = coef_of<T>(a, b, T(cps_sin));
    const T c = T(-2) * k.lp_scale * reinterpret_cast<const T*>(a.grad_log_prob)[b] / T(a.numel);
    const T mean = k.cx * load_as<T>(a.sample, a.sample_dtype, g) + k.cm * velocity<T>(a, b, i);
    T up = c * (load_as<T>(a.prev_sample, a.prev_sample_dtype, g) - mean);
    if (a.grad_prev_sample != 0) up += load_as<T>(a.grad_prev_sample, a.grad_prev_sample_dtype, g);
    if (a.grad_prev_sample_mean != 0) up += load_as<T>(a.grad_prev_sample_mean, a.grad_prev_sample_mean_dtype, g);
    const T grad = k.cm * up;
    if (!a.cfg) {
      store_as<T>(a.grad_model_output, a.model_output_dtype, g, grad);
    } else {  // d v / d v_uncond = 1 - w, d v / d v_cond = w
      const T w = T(a.guidance_scale);
      store_as<T>(a.grad_model_output, a.model_output_dtype, g, grad - w * grad);
      store_as<T>(a.grad_model_output, a.model_output_dtype, (a.batch + b) * a.numel + i, w * grad);
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ddpo_fast CUDA: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// Makes `device` current for the scope and restores the previous one.
struct FlowDeviceGuard {
  int previous = 0;
  bool switched = false;
  explicit FlowDeviceGuard(int device) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched = true;
    }
  }
  ~FlowDeviceGuard() {
    if (switched) (void)cudaSetDevice(previous);
  }
};

double cps_sin_of(const FlowArgs& a) { return std::sin(a.noise_level * 1.57079632679489661923); }

template <typename T>
void launch_forward(const FlowArgs& a) {
  const int64_t chunks = chunks_per_sample(a.numel);
  if (a.batch * chunks > int64_t(INT32_MAX)) throw std::invalid_argument("flow_forward_cuda: too many blocks");
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  flow_forward_kernel<T><<<unsigned(a.batch * chunks), kFlowThreads, 0, stream>>>(a, cps_sin_of(a), chunks);
  check(cudaGetLastError(), "flow_forward_kernel");
  const unsigned finalize_blocks = unsigned((a.batch + kFlowFinalizeThreads - 1) / kFlowFinalizeThreads);
  flow_finalize_kernel<T><<<finalize_blocks, kFlowFinalizeThreads, 0, stream>>>(a, cps_sin_of(a), chunks);
  check(cudaGetLastError(), "flow_finalize_kernel");
}

template <typename T>
void launch_backward(const FlowArgs& a) {
  const int64_t blocks = (a.batch * a.numel + kFlowThreads - 1) / kFlowThreads;
  const unsigned grid = unsigned(blocks < 65535 * 16 ? blocks : 65535 * 16);
  flow_backward_kernel<T><<<grid, kFlowThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, cps_sin_of(a));
  check(cudaGetLastError(), "flow_backward_kernel");
}

}  // namespace

void flow_forward_cuda(const FlowArgs& args) {
  validate_flow_args(args, /*backward=*/false);
  if (args.workspace == 0) throw std::invalid_argument("workspace must be set (batch * chunks_per_sample(numel) values)");
  FlowDeviceGuard guard(args.device);
  args.compute == kFloat64 ? launch_forward<double>(args) : launch_forward<float>(args);
  if (args.old_log_prob != 0) ppo_forward_cuda(flow_ppo_args(args));  // same stream, after the finalize
}

void flow_backward_cuda(const FlowArgs& args) {
  validate_flow_args(args, /*backward=*/true);
  FlowDeviceGuard guard(args.device);
  args.compute == kFloat64 ? launch_backward<double>(args) : launch_backward<float>(args);
}

}  // namespace ddpo
