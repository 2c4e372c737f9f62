// The torch-free interface of the flow-matching SDE step (Flow-GRPO) with its log-probability:
// raw pointers, sizes and dtype codes, as DdimArgs is for the DDIM step (ddim_core.h). The Python
// layer (ddpo_fast/flow_ops.py) validates the tensors; the launchers re-check what would crash.
#pragma once
#include <cstdint>

#include "ddim_core.h"

namespace ddpo {

enum SdeType : int32_t { kSde = 0, kCps = 1 };

struct FlowArgs {
  // Sizes: `batch` samples of `numel` elements; model_output has 2*batch rows with CFG.
  int64_t batch = 0;
  int64_t numel = 0;
  int32_t compute = kFloat32;  // kFloat32, or kFloat64 for float64 inputs

  // The policy (see ddpo_fast/flow_reference.py).
  int32_t sde_type = kSde;
  double noise_level = 0.7;
  double sigma_max = 0.0;  // replaces sigma in 1 - sigma where sigma == 1 (sde)
  bool cfg = false;
  double guidance_scale = 1.0;

  // Inputs, contiguous. sigma / sigma_prev: (batch,) in the compute dtype.
  uintptr_t model_output = 0;
  int32_t model_output_dtype = kFloat32;
  uintptr_t sample = 0;
  int32_t sample_dtype = kFloat32;
  uintptr_t sigma = 0;
  uintptr_t sigma_prev = 0;

  // x': written when sample_noise (mean + noise_scale z, z from `noise` or Philox(seed, offset)),
  // read otherwise.
  uintptr_t prev_sample = 0;
  int32_t prev_sample_dtype = kFloat32;
  bool sample_noise = false;
  uintptr_t noise = 0;
  int32_t noise_dtype = kFloat32;
  uint64_t seed = 0;
  uint64_t offset = 0;

  // Outputs (compute dtype): log_prob (batch,); optional prev_sample_mean (batch*numel) and
  // std_dev_t (batch,) (0 = not written).
  uintptr_t log_prob = 0;
  uintptr_t prev_sample_mean = 0;
  uintptr_t std_dev_t = 0;

  // Optional PPO stage (run when old_log_prob != 0), as in DdimArgs. CPU only: with it, a forward
  // call with grad_model_output set also writes d loss / d model_output (unit upstream gradient).
  uintptr_t old_log_prob = 0;
  uintptr_t advantages = 0;
  double ppo_clip_range = 1e-4;
  double adv_clip_max = 5.0;
  uintptr_t loss = 0;
  uintptr_t approx_kl = 0;
  uintptr_t clipfrac = 0;
  uintptr_t dloss_dlogp = 0;

  // Optional KL penalty to a reference policy, as in DdimArgs (a given x' only): mean_ref from the
  // reference output (velocity, both CFG halves) by the same mean function; the forward pass writes
  // kl (batch,) = mean over elements of (mean - mean_ref)^2 / (2 noise_scale^2); the PPO stage adds
  // kl_beta * mean(kl) to the loss and writes kl_mean.
  uintptr_t reference_output = 0;
  int32_t reference_output_dtype = kFloat32;
  uintptr_t kl = 0;
  double kl_beta = 0.0;
  uintptr_t kl_mean = 0;

  // Backward: grad_model_output = cm * (grad_prev_sample + grad_prev_sample_mean + c_b (x' - mean)
  // + k_b (mean - mean_ref)), c_b = -2 lp_scale_b grad_log_prob[b] / numel, k_b = grad_kl[b] /
  // (noise_scale_b^2 numel); the upstream tensors and grad_kl are optional (0 = none).
  uintptr_t grad_prev_sample = 0;
  int32_t grad_prev_sample_dtype = kFloat32;
  uintptr_t grad_prev_sample_mean = 0;
  int32_t grad_prev_sample_mean_dtype = kFloat32;
  uintptr_t grad_log_prob = 0;      // (batch,), compute dtype
  uintptr_t grad_kl = 0;            // (batch,), compute dtype, optional; needs reference_output
  uintptr_t grad_model_output = 0;  // out, model_output's shape and dtype

  // CUDA only: workspace of batch * chunks_per_sample(numel) compute-dtype partial sums (twice that
  // with reference_output), stream, device index.
  uintptr_t workspace = 0;
  uintptr_t stream = 0;
  int32_t device = 0;
};

// forward: x' (if sample_noise), log_prob, prev_sample_mean / std_dev_t if set, then the PPO stage.
// backward: grad_model_output.
void flow_forward_cpu(const FlowArgs& args);
void flow_backward_cpu(const FlowArgs& args);
#ifdef DDPO_WITH_CUDA
void flow_forward_cuda(const FlowArgs& args);
void flow_backward_cuda(const FlowArgs& args);
#endif

void validate_flow_args(const FlowArgs& args, bool backward);  // throws std::invalid_argument
DdimArgs flow_ppo_args(const FlowArgs& args);                   // the PPO stage as DdimArgs

}  // namespace ddpo
