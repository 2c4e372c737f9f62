// Argument checks of the flow SDE entry points (every backend), and the PPO stage's arguments.
#include <cmath>
#include <stdexcept>
#include <string>

#include "flow_core.h"
#include "require.h"

namespace ddpo {

void validate_flow_args(const FlowArgs& a, bool backward) {
  require(a.compute == kFloat32 || a.compute == kFloat64, "compute dtype must be float32 or float64");
  require(a.batch > 0, "batch must be >= 1, got " + std::to_string(a.batch));
  require(a.numel > 0, "numel (elements per sample) must be >= 1, got " + std::to_string(a.numel));
  require(a.sde_type == kSde || a.sde_type == kCps, "sde_type code must be 0 (sde) or 1 (cps)");
  require(std::isfinite(a.noise_level) && a.noise_level >= 0.0, "noise_level must be finite and >= 0");
  require(std::isfinite(a.sigma_max) && a.sigma_max >= 0.0 && a.sigma_max < 1.0, "sigma_max must lie in [0, 1)");
  require(!a.cfg || std::isfinite(a.guidance_scale), "guidance_scale must be finite");
  require_pointer(a.model_output, "model_output");
  require_pointer(a.sample, "sample");
  require_pointer(a.sigma, "sigma");
  require_pointer(a.sigma_prev, "sigma_prev");
  require_pointer(a.prev_sample, "prev_sample");
  require_dtype(a.model_output_dtype, "model_output");
  require_dtype(a.sample_dtype, "sample");
  require_dtype(a.prev_sample_dtype, "prev_sample");
  if (a.reference_output != 0) require_dtype(a.reference_output_dtype, "reference_output");
  if (backward) {
    require_pointer(a.grad_log_prob, "grad_log_prob");
    require_pointer(a.grad_model_output, "grad_model_output");
    if (a.grad_prev_sample != 0) require_dtype(a.grad_prev_sample_dtype, "grad_prev_sample");
    if (a.grad_prev_sample_mean != 0) require_dtype(a.grad_prev_sample_mean_dtype, "grad_prev_sample_mean");
    require(a.grad_kl == 0 || a.reference_output != 0, "grad_kl needs reference_output");
    return;
  }
  require_pointer(a.log_prob, "log_prob");
  if (a.sample_noise && a.noise != 0) require_dtype(a.noise_dtype, "noise");
  if (a.reference_output != 0) {
    require(!a.sample_noise, "reference_output (the KL penalty) needs a given prev_sample, not sampling");
    require_pointer(a.kl, "kl");
  } else {
    require(a.kl == 0, "kl is written only with reference_output");
  }
  if (a.old_log_prob != 0) validate_ppo_args(flow_ppo_args(a));
}

DdimArgs flow_ppo_args(const FlowArgs& a) {
  DdimArgs d;
  d.batch = a.batch;
  d.numel = a.numel;
  d.compute = a.compute;
  d.log_prob = a.log_prob;
  d.old_log_prob = a.old_log_prob;
  d.advantages = a.advantages;
  d.ppo_clip_range = a.ppo_clip_range;
  d.adv_clip_max = a.adv_clip_max;
  d.loss = a.loss;
  d.approx_kl = a.approx_kl;
  d.clipfrac = a.clipfrac;
  d.dloss_dlogp = a.dloss_dlogp;
  d.kl = a.kl;  // the KL penalty: the PPO stage reads the per-sample KL of the flow forward pass
  d.kl_beta = a.kl_beta;
  d.kl_mean = a.kl_mean;
  d.stream = a.stream;
  d.device = a.device;
  return d;
}

}  // namespace ddpo
