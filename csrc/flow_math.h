// Per-sample coefficients of the flow-matching SDE step, shared by the CPU and CUDA kernels.
// ddpo_fast/flow_reference.py is the specification; this is the same function in affine form:
//   mean = cx x + cm v,   x' = mean + noise_scale z,
//   log_prob = lp_scale * mean over elements of (x' - mean)^2 + lp_shift,
//   KL to a reference step = mean over elements of (mean - mean_ref)^2 inv_var / 2.
#pragma once
#include "flow_core.h"  // first: ddim_math.h uses ddim_core.h's enums
#include "ddim_math.h"

namespace ddpo {

template <typename T>
struct FlowCoef {
  T cx, cm;
  T std_dev_t;    // what flow_grpo returns as std_dev_t
  T noise_scale;  // standard deviation of x' given x_t
  T lp_scale, lp_shift;
  T inv_var;      // 1 / noise_scale^2, 0 for a deterministic step: the KL penalty's (ddim_math.h)
};

// cps_sin = sin(noise_level pi / 2), formed in double on the host and rounded once to T, as
// flow_grpo's `sigma_prev * math.sin(...)` does.
template <typename T>
DDPO_HD FlowCoef<T> make_flow_coef(T sigma, T sigma_prev, T sigma_max, T noise_level, T cps_sin, int32_t sde_type) {
  FlowCoef<T> k;
  if (sde_type == kSde) {
    T dt = sigma_prev - sigma;
    T denominator = sigma == T(1) ? sigma_max : sigma;  // sigma == 1 would divide by zero
    k.std_dev_t = std::sqrt(sigma / (T(1) - denominator)) * noise_level;
    T var_t = k.std_dev_t * k.std_dev_t;
    k.cx = T(1) + var_t / (T(2) * sigma) * dt;
    k.cm = (T(1) + var_t * (T(1) - sigma) / (T(2) * sigma)) * dt;
    k.noise_scale = k.std_dev_t * std::sqrt(-dt);
    bool stochastic = k.noise_scale > T(0);  // noise_level 0: a deterministic step, log_prob 0
    k.lp_scale = stochastic ? T(-0.5) / (k.noise_scale * k.noise_scale) : T(0);
    k.lp_shift = stochastic ? -std::log(k.noise_scale) - T(0.91893853320467274178) : T(0);
  } else {
    k.std_dev_t = sigma_prev * cps_sin;
    T c2 = sigma_prev * sigma_prev - k.std_dev_t * k.std_dev_t;
    T c = std::sqrt(c2 > T(0) ? c2 : T(0));
    // mean = (1 - sigma') (x - sigma v) + c (x + (1 - sigma) v)
    k.cx = (T(1) - sigma_prev) + c;
    k.cm = c * (T(1) - sigma) - (T(1) - sigma_prev) * sigma;
    k.noise_scale = k.std_dev_t;
    k.lp_scale = T(-1);  // flow_grpo's cps log-prob: -(x' - mean)^2, no constants
    k.lp_shift = T(0);
  }
  const T var = k.noise_scale * k.noise_scale;
  k.inv_var = var > T(0) ? T(1) / var : T(0);
  return k;
}

}  // namespace ddpo
