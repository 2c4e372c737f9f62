"""KL divergence of the policy's DDIM step to the reference (starting) model's step.

Both steps are Gaussians with the same variance sigma_t^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
around means that are linear in the predicted noise eps (epsilon prediction, no sample clipping):

    mu(eps) = sqrt(a_prev) (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - sigma_t^2) eps,

so mu - mu_ref = B (eps - eps_ref) with B = sqrt(1 - a_prev - sigma_t^2) - sqrt(a_prev (1 - a_t) / a_t), and
per element KL = (mu - mu_ref)^2 / (2 sigma_t^2) = B^2 (eps - eps_ref)^2 / (2 sigma_t^2). It is averaged over the
elements, as the step's log-probability is, and carries its gradient (the reference side is constant).
With classifier-free guidance both eps are the guided ones. tests/test_kl.py checks it against a
Monte-Carlo estimate from the fused op's log-probabilities. (Plain PyTorch: not yet fused into the loss op.)
"""
from __future__ import annotations

import torch


def guided(model_output: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """The [uncond; cond] halves combined as classifier-free guidance does; the output itself without."""
    if guidance_scale is None:
        return model_output
    uncond, cond = model_output.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def ddim_kl(model_output: torch.Tensor, reference_output: torch.Tensor, alpha_prod_t: torch.Tensor,
            alpha_prod_t_prev: torch.Tensor, *, eta: float, guidance_scale: float | None = None) -> torch.Tensor:
    """Per-sample KL(policy step || reference step), shape (B,), mean over the latent's elements."""
    if eta <= 0:
        raise ValueError(f"eta must be > 0 (the steps have no density at eta = 0), got {eta}")
    if model_output.shape != reference_output.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and reference_output "
                         f"{tuple(reference_output.shape)} must have the same shape")
    eps = guided(model_output, guidance_scale).float()
    eps_ref = guided(reference_output, guidance_scale).float().detach()
    a_t, a_prev = alpha_prod_t.double(), alpha_prod_t_prev.double()
    variance = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    b = (1 - a_prev - variance).clamp(min=0).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
    scale = (b**2 / (2 * variance)).float().view(-1, *([1] * (eps.dim() - 1)))
    return (scale * (eps - eps_ref) ** 2).flatten(1).mean(dim=1)
