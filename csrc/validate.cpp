// Argument checks shared by the launchers of every backend. The Python layer validates tensors
// (shapes, dtypes, devices, contiguity) and names the user's argument; these checks guard the
// raw interface against what would otherwise be a crash.
#include <cmath>
#include <stdexcept>
#include <string>

#include "ddim_core.h"
#include "require.h"

namespace ddpo {
namespace {

void require_compute(const DdimArgs& a) {
  require(a.compute == kFloat32 || a.compute == kFloat64, "compute dtype must be float32 or float64");
  require(a.batch > 0, "batch must be >= 1, got " + std::to_string(a.batch));
}

}  // namespace

void validate_args(const DdimArgs& a, bool backward) {
  require_compute(a);
  require(a.numel > 0, "numel (elements per sample) must be >= 1, got " + std::to_string(a.numel));
  require(std::isfinite(a.eta) && a.eta >= 0.0 && a.eta <= 1.0, "eta must lie in [0, 1], got " + std::to_string(a.eta));
  require(!a.cfg || std::isfinite(a.guidance_scale), "guidance_scale must be finite");
  require(a.prediction >= kEpsilon && a.prediction <= kVPrediction, "prediction type code must be 0, 1 or 2");
  require(!a.clip_sample || (std::isfinite(a.clip_sample_range) && a.clip_sample_range > 0.0),
          "clip_sample_range must be finite and > 0");
  require_pointer(a.model_output, "model_output");
  require_pointer(a.sample, "sample");
  require_pointer(a.alpha_t, "alpha_t");
  require_pointer(a.alpha_prev, "alpha_prev");
  require_pointer(a.prev_sample, "prev_sample");
  require_dtype(a.model_output_dtype, "model_output");
  require_dtype(a.sample_dtype, "sample");
  require_dtype(a.prev_sample_dtype, "prev_sample");
  if (a.reference_output != 0) {
    require_dtype(a.reference_output_dtype, "reference_output");
    require(a.grad_direction == 0, "grad_direction cannot be combined with reference_output");
  }
  if (backward) {
    require_pointer(a.grad_log_prob, "grad_log_prob");
    require_pointer(a.grad_model_output, "grad_model_output");
    if (a.grad_prev_sample != 0) require_dtype(a.grad_prev_sample_dtype, "grad_prev_sample");
    require(a.grad_direction == 0 || a.grad_prev_sample == 0, "grad_direction cannot be combined with grad_prev_sample");
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
  if (a.old_log_prob != 0) validate_ppo_args(a);
  require(a.grad_direction == 0 || (!a.sample_noise && a.old_log_prob == 0),
          "grad_direction is written only by the log-probability of a given prev_sample");
}

void validate_ppo_args(const DdimArgs& a) {
  require_compute(a);
  require_pointer(a.log_prob, "log_prob");
  require_pointer(a.old_log_prob, "old_log_prob");
  require_pointer(a.advantages, "advantages");
  require_pointer(a.loss, "loss");
  require_pointer(a.approx_kl, "approx_kl");
  require_pointer(a.clipfrac, "clipfrac");
  require_pointer(a.dloss_dlogp, "dloss_dlogp");
  require(std::isfinite(a.ppo_clip_range) && a.ppo_clip_range > 0.0, "clip_range must be finite and > 0");
  require(std::isfinite(a.adv_clip_max) && a.adv_clip_max > 0.0, "adv_clip_max must be finite and > 0");
  if (a.kl != 0) {  // the KL penalty
    require_pointer(a.kl_mean, "kl_mean");
    require(std::isfinite(a.kl_beta) && a.kl_beta >= 0.0, "kl_beta must be finite and >= 0");
  }
}

}  // namespace ddpo
