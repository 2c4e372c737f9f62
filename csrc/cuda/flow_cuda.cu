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
// finalize kernel adds each sample's partials in chunk order (the KL penalty's sums of
// (mean - mean_ref)^2 likewise, in the workspace's second half). Deterministic, no atomics, no host
// synchronisation or allocation: a step can be captured in a CUDA graph.
//
// The per-thread code is in flow_cuda_units.cuh (run on the CPU by flow_emulate.cpp). This first
// version uses scalar loads; the DDIM kernels' 16-byte vector path is the next step.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/flow_cuda_units.cuh"
#include "flow_core.h"
#include "flow_math.h"

namespace ddpo {
namespace {

using namespace flow_cuda;

// With a reference output, the block's sum of (mean - mean_ref)^2 too, into the workspace's second
// half (the same tree; the branch is uniform over the grid).
template <typename T>
__global__ void __launch_bounds__(kThreads) flow_forward_kernel(const FlowArgs a, double cps_sin, int64_t chunks) {
  __shared__ T partial[kThreads];
  __shared__ T kl_partial[kThreads];
  const bool with_kl = a.reference_output != 0;
  const int64_t b = int64_t(blockIdx.x) / chunks, c = int64_t(blockIdx.x) % chunks;
  T kl = T(0);
  partial[threadIdx.x] = forward_thread<T>(a, coef_of<T>(a, b, cps_sin), b, c, int(threadIdx.x), &kl);
  kl_partial[threadIdx.x] = kl;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {  // a fixed tree: deterministic
    if (int(threadIdx.x) < stride) {
      partial[threadIdx.x] += partial[threadIdx.x + stride];
      if (with_kl) kl_partial[threadIdx.x] += kl_partial[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    reinterpret_cast<T*>(a.workspace)[blockIdx.x] = partial[0];
    if (with_kl) reinterpret_cast<T*>(a.workspace)[a.batch * chunks + blockIdx.x] = kl_partial[0];
  }
}

template <typename T>
__global__ void flow_finalize_kernel(const FlowArgs a, double cps_sin, int64_t chunks) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < a.batch) finalize_sample<T>(a, cps_sin, chunks, b);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) flow_backward_kernel(const FlowArgs a, double cps_sin) {
  const int64_t total = a.batch * a.numel;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < total; g += int64_t(gridDim.x) * kThreads) {
    backward_element<T>(a, cps_sin, g);
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
  flow_forward_kernel<T><<<unsigned(a.batch * chunks), kThreads, 0, stream>>>(a, cps_sin_of(a), chunks);
  check(cudaGetLastError(), "flow_forward_kernel");
  const unsigned finalize_blocks = unsigned((a.batch + kFinalizeThreads - 1) / kFinalizeThreads);
  flow_finalize_kernel<T><<<finalize_blocks, kFinalizeThreads, 0, stream>>>(a, cps_sin_of(a), chunks);
  check(cudaGetLastError(), "flow_finalize_kernel");
}

template <typename T>
void launch_backward(const FlowArgs& a) {
  const int64_t blocks = (a.batch * a.numel + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65535 * 16 ? blocks : 65535 * 16);
  flow_backward_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, cps_sin_of(a));
  check(cudaGetLastError(), "flow_backward_kernel");
}

}  // namespace

void flow_forward_cuda(const FlowArgs& args) {
  validate_flow_args(args, /*backward=*/false);
  if (args.workspace == 0)
    throw std::invalid_argument(
        "workspace must be set (batch * chunks_per_sample(numel) values, twice that with reference_output)");
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
