// The torch-free interface of the compiled core: raw pointers, sizes and dtype codes.
// The Python layer (ddpo_fast/ops.py) validates shapes, dtypes and devices and fills DdimArgs
// from tensor.data_ptr(); the launchers here re-check what a wrong pointer would turn into a crash.
#pragma once
#include <cstdint>

namespace ddpo {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum Prediction : int32_t { kEpsilon = 0, kSample = 1, kVPrediction = 2 };

// Elements per reduction chunk: log-prob partial sums are formed per (sample, chunk) and added in
// chunk order, so results do not depend on the number of threads or blocks.
constexpr int64_t kChunk = 4096;

inline int64_t chunks_per_sample(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

struct DdimArgs {
  // Sizes: `batch` samples of `numel` elements each (C*H*W). model_output has 2*batch rows with CFG.
  int64_t batch = 0;
  int64_t numel = 0;
  int32_t compute = kFloat32;  // kFloat32, or kFloat64 when the inputs are float64

  // The DDIM policy.
  double eta = 1.0;
  bool cfg = false;
  double guidance_scale = 1.0;
  int32_t prediction = kEpsilon;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool use_clipped_model_output = false;

  // Inputs, contiguous. alpha_t / alpha_prev: (batch,) in the compute dtype.
  uintptr_t model_output = 0;
  int32_t model_output_dtype = kFloat32;
  uintptr_t sample = 0;
  int32_t sample_dtype = kFloat32;
  uintptr_t alpha_t = 0;
  uintptr_t alpha_prev = 0;

  // x_{t-1}: written when sample_noise is true (mu + sigma z), read otherwise.
  uintptr_t prev_sample = 0;
  int32_t prev_sample_dtype = kFloat32;
  bool sample_noise = false;
  uintptr_t noise = 0;  // optional (batch*numel) noise; 0 means the Philox stream of (seed, offset)
  int32_t noise_dtype = kFloat32;
  uint64_t seed = 0;
  uint64_t offset = 0;

  uintptr_t log_prob = 0;  // out: (batch,), compute dtype

  // Optional PPO stage, run when old_log_prob != 0. (batch,) inputs and outputs, compute dtype;
  // loss / approx_kl / clipfrac are single elements. dloss_dlogp = d loss / d log_prob.
  uintptr_t old_log_prob = 0;
  uintptr_t advantages = 0;
  double ppo_clip_range = 1e-4;
  double adv_clip_max = 5.0;
  uintptr_t loss = 0;
  uintptr_t approx_kl = 0;
  uintptr_t clipfrac = 0;
  uintptr_t dloss_dlogp = 0;

  // Optional KL penalty to a reference policy, for a given x_{t-1} (sample_noise false): the
  // reference model's output (model_output's shape, both CFG halves) gives mu_ref by the same mean
  // function, and the forward pass writes kl (batch,) = mean over elements of (mu - mu_ref)^2 /
  // (2 sigma^2) (0 where sigma == 0). The PPO stage (its own entry point too) reads kl when set:
  // loss += kl_beta * mean(kl), and kl_mean = mean(kl).
  uintptr_t reference_output = 0;
  int32_t reference_output_dtype = kFloat32;
  uintptr_t kl = 0;       // (batch,), compute dtype: out of the forward pass, in of the PPO stage
  double kl_beta = 0.0;
  uintptr_t kl_mean = 0;  // out, one element (PPO stage)

  // CPU only: with the PPO stage, a forward call with grad_model_output set also writes
  // d loss / d model_output (for a unit upstream gradient) in the same pass over the data, the KL
  // term's (d loss / d kl_b = kl_beta / batch) included.
  //
  // Backward: grad_model_output = d mu / d m * (grad_prev_sample + c_b (x' - mu) + k_b (mu - mu_ref)),
  // c_b = grad_log_prob[b] / (sigma_b^2 numel), k_b = grad_kl[b] / (sigma_b^2 numel) (0 where sigma_b
  // == 0). grad_prev_sample and grad_kl are optional (0 = none); grad_kl needs reference_output.
  uintptr_t grad_prev_sample = 0;
  int32_t grad_prev_sample_dtype = kFloat32;
  uintptr_t grad_log_prob = 0;     // (batch,), compute dtype
  uintptr_t grad_kl = 0;           // (batch,), compute dtype, optional
  uintptr_t grad_model_output = 0;  // out, model_output's shape and dtype

  // CPU only, the log-probability of a given x_{t-1} (sample_noise false, no PPO stage): a forward
  // call with grad_direction set also writes d log_prob_b / d m (m the guided model output) of each
  // element, (batch, numel) in the compute dtype, while the data is in cache; a backward call with
  // it set reads it instead of the inputs: grad_model_output = grad_log_prob[b] * direction (split
  // (1 - w, w) over the CFG halves). grad_prev_sample must be 0 then.
  uintptr_t grad_direction = 0;

  // CUDA only: workspace of batch * chunks_per_sample(numel) compute-dtype partial sums (twice that
  // with reference_output), the stream (cudaStream_t as an integer) and the device index.
  uintptr_t workspace = 0;
  uintptr_t stream = 0;
  int32_t device = 0;
};

// Each backend provides these three entry points (throwing std::invalid_argument on bad args).
// forward:  x_{t-1} (if sample_noise) and log_prob, then the PPO stage if old_log_prob is set.
// backward: grad_model_output.
// ppo:      the PPO stage alone, reading log_prob as an input.
void ddim_forward_cpu(const DdimArgs& args);
void ddim_backward_cpu(const DdimArgs& args);
void ppo_forward_cpu(const DdimArgs& args);

#ifdef DDPO_WITH_CUDA
void ddim_forward_cuda(const DdimArgs& args);
void ddim_backward_cuda(const DdimArgs& args);
void ppo_forward_cuda(const DdimArgs& args);
#endif

// Checks shared by the launchers of every backend (throw std::invalid_argument).
void validate_args(const DdimArgs& args, bool backward);  // forward (+ PPO stage if set) or backward
void validate_ppo_args(const DdimArgs& args);              // the PPO stage alone

}  // namespace ddpo
