"""The policy's step, one class per kind: DDIM (SD, SDXL) and Flow-GRPO's SDE step (SD3).

A step object is made from the pipeline's scheduler for one run's sampler settings and hides how the
kind finds its coefficients: the trainer and the sampler only hand it step indices (positions in
`timesteps`), never raw timesteps. Every method goes through the fused ops of ddpo_fast.ops.

    sample(out, x, i, ...)          -> (x_next, log_prob)   one sampling step, noise from Philox
    log_prob(out, x, x_next, idx)   -> log_prob (B,)         differentiable in `out`
    ppo_loss(out, x, x_next, idx, old_log_prob, advantages, ..., reference_output, kl_beta)
                                    -> (loss, stats)         the clipped loss (+ kl_beta x KL), fused
    kl(out, reference_out, x, idx)  -> (B,)                  KL to the reference model's step (for the
                                                             losses without a fused op: SF, RWR)
"""
from __future__ import annotations

import torch

from ddpo_fast import flow_reference, reference
from ddpo_fast.flow_ops import flow_sde_ppo_loss, flow_sde_step_logprob
from ddpo_fast.ops import ddim_ppo_loss, ddim_step_logprob, scheduler_alphas


class DdimStep:
    """DDIM with eta > 0 as a Gaussian policy (DDPO), on a diffusers DDIMScheduler's schedule."""

    kind = "ddim"

    def __init__(self, scheduler, num_steps: int, device, *, eta: float):
        scheduler.set_timesteps(num_steps, device=device)
        self.scheduler, self.eta = scheduler, eta
        self.timesteps = scheduler.timesteps.to(device)
        self.num_steps = len(self.timesteps)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        config = scheduler.config
        self.policy = dict(prediction_type=config.prediction_type,
                           clip_sample_range=config.clip_sample_range if config.clip_sample else None)
        if config.get("thresholding"):
            raise ValueError("the DDIM scheduler's thresholding=True is not supported by the fused step (its mean is "
                             "not a per-element function of the model output)")

    def _alphas(self, indices: torch.Tensor):
        return scheduler_alphas(self.scheduler, self.timesteps[indices], len(indices), indices.device)

    def sample(self, out, x, i: int, *, seed: int, guidance_scale, out_dtype, stochastic: bool = True):
        index = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        alpha_t, alpha_prev = self._alphas(index)
        return ddim_step_logprob(out, x, alpha_t, alpha_prev, eta=self.eta if stochastic else 0.0, seed=seed,
                                 offset=i, guidance_scale=guidance_scale, out_dtype=out_dtype, **self.policy)

    def log_prob(self, out, x, x_next, indices, *, guidance_scale):
        alpha_t, alpha_prev = self._alphas(indices)
        return ddim_step_logprob(out, x, alpha_t, alpha_prev, eta=self.eta, prev_sample=x_next,
                                 guidance_scale=guidance_scale, **self.policy).log_prob

    def ppo_loss(self, out, x, x_next, indices, old_log_prob, advantages, *, clip_range, adv_clip_max,
                 guidance_scale, reference_output=None, kl_beta=0.0):
        alpha_t, alpha_prev = self._alphas(indices)
        return ddim_ppo_loss(out, x, x_next, alpha_t, alpha_prev, old_log_prob, advantages, clip_range=clip_range,
                             adv_clip_max=adv_clip_max, eta=self.eta, guidance_scale=guidance_scale,
                             reference_output=reference_output, kl_beta=kl_beta, **self.policy)

    def kl(self, out, reference_out, x, indices, *, guidance_scale):
        alpha_t, alpha_prev = self._alphas(indices)
        return reference.ddim_kl(out.float(), reference_out.float(), alpha_t, alpha_prev, eta=self.eta,
                                 guidance_scale=guidance_scale, sample=x.float(), **self.policy)


class FlowSdeStep:
    """Flow-GRPO's SDE step on a diffusers FlowMatchEulerDiscreteScheduler's sigmas (SD3 family)."""

    kind = "flow_sde"

    def __init__(self, scheduler, num_steps: int, device, *, noise_level: float, sde_type: str, **timestep_options):
        scheduler.set_timesteps(num_steps, device=device, **timestep_options)
        self.scheduler, self.noise_level, self.sde_type = scheduler, noise_level, sde_type
        self.timesteps = scheduler.timesteps.to(device)
        self.num_steps = len(self.timesteps)
        self.sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        self.sigma_max = float(self.sigmas[1]) if len(self.sigmas) > 1 else None
        self.init_noise_sigma = 1.0

    def _sigmas(self, indices: torch.Tensor):
        return self.sigmas[indices], self.sigmas[indices + 1]

    def _policy(self, noise_level=None) -> dict:
        return dict(noise_level=self.noise_level if noise_level is None else noise_level, sde_type=self.sde_type,
                    sigma_max=self.sigma_max)

    def sample(self, out, x, i: int, *, seed: int, guidance_scale, out_dtype, stochastic: bool = True):
        index = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        sigma, sigma_prev = self._sigmas(index)
        step = flow_sde_step_logprob(out, x, sigma, sigma_prev, seed=seed, offset=i, guidance_scale=guidance_scale,
                                     out_dtype=out_dtype, **self._policy(None if stochastic else 0.0))
        return step.prev_sample, step.log_prob

    def log_prob(self, out, x, x_next, indices, *, guidance_scale):
        sigma, sigma_prev = self._sigmas(indices)
        return flow_sde_step_logprob(out, x, sigma, sigma_prev, prev_sample=x_next, guidance_scale=guidance_scale,
                                     **self._policy()).log_prob

    def ppo_loss(self, out, x, x_next, indices, old_log_prob, advantages, *, clip_range, adv_clip_max,
                 guidance_scale, reference_output=None, kl_beta=0.0):
        sigma, sigma_prev = self._sigmas(indices)
        return flow_sde_ppo_loss(out, x, x_next, sigma, sigma_prev, old_log_prob, advantages, clip_range=clip_range,
                                 adv_clip_max=adv_clip_max, guidance_scale=guidance_scale,
                                 reference_output=reference_output, kl_beta=kl_beta, **self._policy())

    def kl(self, out, reference_out, x, indices, *, guidance_scale):
        sigma, sigma_prev = self._sigmas(indices)
        (mean, _, std), (reference_mean, _, _) = (
            flow_reference.flow_sde_mean(o.float(), x.float(), sigma, sigma_prev, guidance_scale=guidance_scale,
                                         **self._policy())
            for o in (out, reference_out.detach()))
        return reference.gaussian_kl(mean, reference_mean, std)
