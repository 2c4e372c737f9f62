// CUDA backend of the fused DDIM step with log-probability, its backward, and the PPO stage.
//
// Semantics: csrc/ddim_core.h (the entry points and DdimArgs) and ddpo_fast/reference.py (the math).
// The per-element math is ddim_math.h's, shared with the CPU backend.
//
// Layout of the work
// ------------------
// Each sample's numel elements are cut into chunks of kChunk = 4096 elements. One block of
// kThreads = 512 threads handles one (sample, chunk) pair; thread t handles the kVec = 8
// consecutive elements chunk_start + 8t .. +7 (one "unit"). The grid is flat, sample-major:
// block = sample * chunks + chunk, so consecutive blocks read consecutive memory.
//
// Vector path (all of: numel % 8 == 0, every pointer 16-byte aligned, every storage dtype no wider
// than the compute type): a unit of every tensor is one to four 16-byte loads (LDG.E.128). All
// loads of a thread are issued as raw bits before any of them is used; the per-sample
// coefficients and the Philox noise are computed while they are in flight, and the conversion to
// the compute type comes after. Scalar path (anything else): element loads with bounds checks.
//
// Noise: element i of sample b is element g = b*numel + i of the stream, normal number g % 4 of
// Philox block g / 4 (ddim_math.h philox_normal4). A unit is 8 elements: on the vector path it
// starts at a multiple of 4 in the stream (2 Philox blocks); on the scalar path it may start
// inside a block when numel % 4 != 0, and then takes the 8 normals it needs out of 3 blocks.
//
// Log-prob reduction (deterministic, no atomics): each block sums (x' - mu)^2 over its chunk
// (per thread in element order, then a fixed shuffle tree) into workspace[sample * chunks + chunk];
// a one-block finalize kernel adds each sample's partials in chunk order, writes log_prob and,
// with the PPO stage, reduces loss / approx_kl / clipfrac over the batch in a fixed order. The KL
// penalty (a reference output) sums (mu - mu_ref)^2 the same way into the workspace's second half.
//
// No host synchronisation, allocation or memset: a step can be captured in a CUDA graph.
//
// Files: the per-thread work (one unit, both paths, dtype packing, Philox) is in
// ddim_cuda_units.cuh; csrc/cuda/emulate_units.cpp runs that code on a CPU against an independent
// element-by-element loop (a check of the indexing and packing logic without a GPU). This file has
// the kernels (grid, block reductions, finalize) and the launchers.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ddim_cuda_units.cuh"
#include "ddim_core.h"
#include "ddim_math.h"

namespace ddpo {
namespace {

using namespace cuda_detail;

struct FinalizeParams {
  int64_t batch;
  int64_t numel;
  uint32_t chunks;
  int32_t prediction;
  double eta;
  bool reduce;  // sum the workspace partials into log_prob (else read log_prob)
  bool ppo;     // run the PPO stage
  const void* alpha_t;
  const void* alpha_prev;
  const void* workspace;
  void* log_prob;
  const void* old_log_prob;
  const void* advantages;
  double clip_range;
  double adv_clip_max;
  void* loss;         // optional outputs (null: not written)
  void* approx_kl;
  void* clipfrac;
  void* dloss_dlogp;
  void* kl;           // the KL penalty (null: none): per-sample KL, written when reduce, else read
  void* kl_mean;
  double kl_beta;
};

// ---- Block reductions (fixed order: deterministic for a fixed block size) ----------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Sum over the block of kCount values per thread; the result is valid in thread 0.
template <int kBlock, int kCount, typename T>
__device__ __forceinline__ void block_sum(T (&v)[kCount]) {
  constexpr int kWarps = kBlock / 32;
  static_assert(kWarps <= 32, "one warp finishes the reduction");
  __shared__ T partial[kCount][kWarps];
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
#pragma unroll
  for (int c = 0; c < kCount; ++c) {
    v[c] = warp_sum(v[c]);
    if (lane == 0) partial[c][warp] = v[c];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int c = 0; c < kCount; ++c) v[c] = warp_sum(lane < kWarps ? partial[c][lane] : T(0));
  }
}

// ---- The kernels ---------------------------------------------------------------------------------

// kKL: also the block's sum of (mu - mu_ref)^2, into the workspace's second half.
template <typename T, bool kClip, bool kKL>
__global__ void __launch_bounds__(kThreads) ddim_forward_kernel(const StepParams p) {
  const uint32_t block = blockIdx.x;
  const uint32_t b = block / p.chunks;
  const uint32_t chunk = block - b * p.chunks;
  const int64_t i0 = int64_t(chunk) * kChunk + int64_t(threadIdx.x) * kVec;
  constexpr int kSums = kKL ? 2 : 1;
  T v[kSums];
#pragma unroll
  for (int s = 0; s < kSums; ++s) v[s] = T(0);
  if (i0 < p.numel) {
    T* kl = kKL ? &v[kSums - 1] : nullptr;
    v[0] = p.vec ? forward_unit<T, kClip, true, kKL>(p, b, i0, kl) : forward_unit<T, kClip, false, kKL>(p, b, i0, kl);
  }
  block_sum<kThreads, kSums>(v);
  if (threadIdx.x == 0) {
    static_cast<T*>(p.workspace)[block] = v[0];
    if (kKL) static_cast<T*>(p.workspace)[uint32_t(p.batch) * p.chunks + block] = v[kSums - 1];
  }
}

template <typename T, bool kClip, bool kKL>
__global__ void __launch_bounds__(kThreads) ddim_backward_kernel(const StepParams p) {
  const uint32_t block = blockIdx.x;
  const uint32_t b = block / p.chunks;
  const uint32_t chunk = block - b * p.chunks;
  const int64_t i0 = int64_t(chunk) * kChunk + int64_t(threadIdx.x) * kVec;
  if (i0 >= p.numel) return;
  if (p.vec) {
    backward_unit<T, kClip, true, kKL>(p, b, i0);
  } else {
    backward_unit<T, kClip, false, kKL>(p, b, i0);
  }
}

// One block: per sample, the chunk partials in chunk order -> log_prob (and the KL to the reference
// step); then the PPO stage, with the KL penalty when p.kl is set.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const FinalizeParams p) {
  T acc[4] = {T(0), T(0), T(0), T(0)};  // loss, approx kl, clipped, kl to the reference
  const T batch = T(p.batch);
  const bool with_kl = p.kl != nullptr;
  for (int64_t b = threadIdx.x; b < p.batch; b += kFinalizeThreads) {
    T lp, kl = T(0);
    if (p.reduce) {
      const T* partial = static_cast<const T*>(p.workspace) + b * int64_t(p.chunks);
      T sumsq = T(0);
      for (uint32_t c = 0; c < p.chunks; ++c) sumsq += partial[c];
      const StepCoef<T> k = make_step_coef<T>(load_scalar_param<T>(p.alpha_t, b),
                                              load_scalar_param<T>(p.alpha_prev, b), T(p.eta), p.prediction);
      lp = log_prob_from_sumsq<T>(k, sumsq, p.numel);
      static_cast<T*>(p.log_prob)[b] = lp;
      if (with_kl) {  // the workspace's second half
        const T* kl_partial = partial + p.batch * int64_t(p.chunks);
        T kl_sumsq = T(0);
        for (uint32_t c = 0; c < p.chunks; ++c) kl_sumsq += kl_partial[c];
        kl = kl_from_sumsq<T>(k.inv_var, kl_sumsq, p.numel);
        static_cast<T*>(p.kl)[b] = kl;
      }
    } else {
      lp = load_scalar_param<T>(p.log_prob, b);
      if (with_kl) kl = load_scalar_param<T>(p.kl, b);
    }
    if (p.ppo) {
      const PpoTerm<T> t = ppo_term<T>(lp, load_scalar_param<T>(p.old_log_prob, b),
                                       load_scalar_param<T>(p.advantages, b), T(p.clip_range), T(p.adv_clip_max));
      acc[0] += t.loss;
      acc[1] += t.kl;
      acc[2] += t.clipped;
      acc[3] += kl;
      if (p.dloss_dlogp != nullptr) static_cast<T*>(p.dloss_dlogp)[b] = t.dloss_dlogp / batch;
    }
  }
  if (!p.ppo) return;  // uniform over the block
  block_sum<kFinalizeThreads, 4>(acc);
  if (threadIdx.x == 0) {
    const T kl_mean = acc[3] / batch;
    if (p.loss != nullptr) *static_cast<T*>(p.loss) = with_kl ? acc[0] / batch + T(p.kl_beta) * kl_mean : acc[0] / batch;
    if (p.approx_kl != nullptr) *static_cast<T*>(p.approx_kl) = acc[1] / batch;
    if (p.clipfrac != nullptr) *static_cast<T*>(p.clipfrac) = acc[2] / batch;
    if (with_kl && p.kl_mean != nullptr) *static_cast<T*>(p.kl_mean) = kl_mean;
  }
}

// ---- Host side -----------------------------------------------------------------------------------

[[noreturn]] void throw_cuda(const char* what, cudaError_t err) {
  (void)cudaGetLastError();  // clear a non-sticky error so that it is not reported again elsewhere
  throw std::runtime_error(std::string("ddpo_fast CUDA: ") + what + ": " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(kernel, err);
}

// Makes `device` current for the scope and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess) throw_cuda("cudaGetDevice", err);
    if (previous_ != device) {
      err = cudaSetDevice(device);
      if (err != cudaSuccess) throw_cuda("cudaSetDevice", err);
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

bool valid_dtype(int32_t d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16 || d == kFloat64; }

// Checks of what this backend relies on beyond validate_args.
void check_common(const DdimArgs& a, const char* op) {
  const std::string name(op);
  require(a.compute == kFloat32 || a.compute == kFloat64, name + ": compute must be float32 or float64");
  require(a.batch >= 0 && a.numel >= 0, name + ": negative size");
  require(a.device >= 0, name + ": negative device index");
}

void check_step(const DdimArgs& a, const char* op, bool backward) {
  const std::string name(op);
  check_common(a, op);
  require(a.prediction == kEpsilon || a.prediction == kSample || a.prediction == kVPrediction,
          name + ": unknown prediction type");
  require(a.model_output != 0 && a.sample != 0 && a.alpha_t != 0 && a.alpha_prev != 0 && a.prev_sample != 0,
          name + ": model_output, sample, alpha_t, alpha_prev and prev_sample must be set");
  require(valid_dtype(a.model_output_dtype) && valid_dtype(a.sample_dtype) && valid_dtype(a.prev_sample_dtype) &&
              valid_dtype(a.noise_dtype) && valid_dtype(a.grad_prev_sample_dtype) &&
              valid_dtype(a.reference_output_dtype),
          name + ": unknown dtype code");
  const int64_t chunks = chunks_per_sample(a.numel);
  require(a.batch * chunks <= int64_t(INT32_MAX) && chunks <= int64_t(UINT32_MAX),
          name + ": too many (sample, chunk) blocks for one launch");
  if (backward) {
    require(a.grad_model_output != 0, name + ": grad_model_output must be set");
  } else {
    require(a.log_prob != 0, name + ": log_prob must be set");
    require(a.workspace != 0, name + ": workspace must be set (batch * chunks_per_sample(numel) values, twice "
                                     "that with reference_output)");
  }
}

void check_ppo(const DdimArgs& a, const char* op) {
  require(a.log_prob != 0 && a.old_log_prob != 0 && a.advantages != 0,
          std::string(op) + ": log_prob, old_log_prob and advantages must be set for the PPO stage");
}

bool aligned16(uintptr_t ptr) { return (ptr & 15u) == 0; }

// The vector path's conditions (see the top of the file).
bool vector_path_ok(const DdimArgs& a, bool backward) {
  if (a.numel % kVec != 0) return false;
  const int widest = a.compute == kFloat64 ? 8 : 4;
  auto ok = [&](uintptr_t ptr, int32_t dtype) { return aligned16(ptr) && dtype_size(dtype) <= widest; };
  bool good = ok(a.model_output, a.model_output_dtype) && ok(a.sample, a.sample_dtype) &&
              ok(a.prev_sample, a.prev_sample_dtype);
  if (a.reference_output != 0) good = good && ok(a.reference_output, a.reference_output_dtype);
  if (backward) {
    good = good && ok(a.grad_model_output, a.model_output_dtype);
    if (a.grad_prev_sample != 0) good = good && ok(a.grad_prev_sample, a.grad_prev_sample_dtype);
  } else if (a.sample_noise && a.noise != 0) {
    good = good && ok(a.noise, a.noise_dtype);
  }
  return good;
}

StepParams make_step_params(const DdimArgs& a, bool backward) {
  StepParams p{};
  p.batch = a.batch;
  p.numel = a.numel;
  p.chunks = uint32_t(chunks_per_sample(a.numel));
  p.prediction = a.prediction;
  p.eta = a.eta;
  p.guidance_scale = a.guidance_scale;
  p.clip_range = a.clip_sample_range;
  p.cfg = a.cfg;
  p.use_clipped = a.use_clipped_model_output;
  p.sample_noise = !backward && a.sample_noise;
  p.vec = vector_path_ok(a, backward);
  p.model_output = reinterpret_cast<const void*>(a.model_output);
  p.model_output_dtype = a.model_output_dtype;
  p.sample = reinterpret_cast<const void*>(a.sample);
  p.sample_dtype = a.sample_dtype;
  p.prev_sample = reinterpret_cast<void*>(a.prev_sample);
  p.prev_sample_dtype = a.prev_sample_dtype;
  p.noise = p.sample_noise ? reinterpret_cast<const void*>(a.noise) : nullptr;
  p.noise_dtype = a.noise_dtype;
  p.alpha_t = reinterpret_cast<const void*>(a.alpha_t);
  p.alpha_prev = reinterpret_cast<const void*>(a.alpha_prev);
  p.seed = a.seed;
  p.offset = a.offset;
  p.workspace = reinterpret_cast<void*>(a.workspace);
  p.grad_prev_sample = backward ? reinterpret_cast<const void*>(a.grad_prev_sample) : nullptr;
  p.grad_prev_sample_dtype = a.grad_prev_sample_dtype;
  p.grad_log_prob = backward ? reinterpret_cast<const void*>(a.grad_log_prob) : nullptr;
  p.grad_model_output = backward ? reinterpret_cast<void*>(a.grad_model_output) : nullptr;
  p.reference_output = reinterpret_cast<const void*>(a.reference_output);
  p.reference_output_dtype = a.reference_output_dtype;
  p.grad_kl = backward ? reinterpret_cast<const void*>(a.grad_kl) : nullptr;
  return p;
}

FinalizeParams make_finalize_params(const DdimArgs& a, bool reduce) {
  FinalizeParams f{};
  f.batch = a.batch;
  f.numel = a.numel;
  f.chunks = uint32_t(chunks_per_sample(a.numel));
  f.prediction = a.prediction;
  f.eta = a.eta;
  f.reduce = reduce;
  f.ppo = a.old_log_prob != 0;
  f.alpha_t = reinterpret_cast<const void*>(a.alpha_t);
  f.alpha_prev = reinterpret_cast<const void*>(a.alpha_prev);
  f.workspace = reinterpret_cast<const void*>(a.workspace);
  f.log_prob = reinterpret_cast<void*>(a.log_prob);
  f.old_log_prob = reinterpret_cast<const void*>(a.old_log_prob);
  f.advantages = reinterpret_cast<const void*>(a.advantages);
  f.clip_range = a.ppo_clip_range;
  f.adv_clip_max = a.adv_clip_max;
  f.loss = reinterpret_cast<void*>(a.loss);
  f.approx_kl = reinterpret_cast<void*>(a.approx_kl);
  f.clipfrac = reinterpret_cast<void*>(a.clipfrac);
  f.dloss_dlogp = reinterpret_cast<void*>(a.dloss_dlogp);
  f.kl = reinterpret_cast<void*>(a.kl);
  f.kl_mean = reinterpret_cast<void*>(a.kl_mean);
  f.kl_beta = a.kl_beta;
  return f;
}

cudaStream_t stream_of(const DdimArgs& a) { return reinterpret_cast<cudaStream_t>(a.stream); }

template <typename T>
void launch_finalize(const FinalizeParams& f, cudaStream_t stream) {
  finalize_kernel<T><<<1, kFinalizeThreads, 0, stream>>>(f);
  check_launch("finalize_kernel");
}

// kl: the KL penalty's variants (a reference output; in the backward, a grad_kl too).
template <typename T>
void launch_forward(const StepParams& p, bool clip, bool kl, cudaStream_t stream) {
  const unsigned blocks = unsigned(p.batch) * p.chunks;
  if (clip) {
    if (kl) {
      ddim_forward_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      ddim_forward_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  } else {
    if (kl) {
      ddim_forward_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      ddim_forward_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  }
  check_launch("ddim_forward_kernel");
}

template <typename T>
void launch_backward(const StepParams& p, bool clip, bool kl, cudaStream_t stream) {
  const unsigned blocks = unsigned(p.batch) * p.chunks;
  if (clip) {
    if (kl) {
      ddim_backward_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      ddim_backward_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  } else {
    if (kl) {
      ddim_backward_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      ddim_backward_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  }
  check_launch("ddim_backward_kernel");
}

}  // namespace

void ddim_forward_cuda(const DdimArgs& args) {
  validate_args(args, /*backward=*/false);
  check_step(args, "ddim_forward_cuda", /*backward=*/false);
  if (args.old_log_prob != 0) check_ppo(args, "ddim_forward_cuda");
  if (args.batch == 0) return;
  DeviceGuard guard(args.device);
  const cudaStream_t stream = stream_of(args);
  const StepParams p = make_step_params(args, /*backward=*/false);
  const FinalizeParams f = make_finalize_params(args, /*reduce=*/true);
  const bool kl = args.reference_output != 0;
  if (args.compute == kFloat64) {
    if (p.chunks > 0) launch_forward<double>(p, args.clip_sample, kl, stream);
    launch_finalize<double>(f, stream);
  } else {
    if (p.chunks > 0) launch_forward<float>(p, args.clip_sample, kl, stream);
    launch_finalize<float>(f, stream);
  }
}

void ddim_backward_cuda(const DdimArgs& args) {
  validate_args(args, /*backward=*/true);
  check_step(args, "ddim_backward_cuda", /*backward=*/true);
  if (args.batch == 0 || args.numel == 0) return;
  DeviceGuard guard(args.device);
  const StepParams p = make_step_params(args, /*backward=*/true);
  const bool kl = args.reference_output != 0 && args.grad_kl != 0;
  if (args.compute == kFloat64) {
    launch_backward<double>(p, args.clip_sample, kl, stream_of(args));
  } else {
    launch_backward<float>(p, args.clip_sample, kl, stream_of(args));
  }
}

void ppo_forward_cuda(const DdimArgs& args) {
  validate_ppo_args(args);
  check_common(args, "ppo_forward_cuda");
  check_ppo(args, "ppo_forward_cuda");
  if (args.batch == 0) return;
  DeviceGuard guard(args.device);
  const FinalizeParams f = make_finalize_params(args, /*reduce=*/false);
  if (args.compute == kFloat64) {
    launch_finalize<double>(f, stream_of(args));
  } else {
    launch_finalize<float>(f, stream_of(args));
  }
}

}  // namespace ddpo
