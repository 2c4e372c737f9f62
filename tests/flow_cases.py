"""Shared inputs and an independent statement of Flow-GRPO's step for the flow SDE op tests
(test_flow_ops.py, test_flow_triton.py, test_flow_cuda.py)."""
from __future__ import annotations

import math

import torch

# sigma, sigma_prev per step kind; "first" is sigma == 1 (sde divides by 1 - sigmas[1] there).
SIGMA_MAX = 0.9375
STEPS = {"first": (1.0, SIGMA_MAX), "mid": (0.6, 0.45), "late": (0.12, 0.05), "last": (0.05, 0.0)}
SHAPES = [(4, 17, 23), (4, 64, 64)]
HALF = [torch.bfloat16, torch.float16]


def sigmas(batch: int, start: int = 0, device="cpu", dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, sigma_prev) cycling through the step kinds, so every batch mixes first / last steps."""
    kinds = list(STEPS.values())
    picked = [kinds[(start + i) % len(kinds)] for i in range(batch)]
    return (torch.tensor([p[0] for p in picked], dtype=dtype, device=device),
            torch.tensor([p[1] for p in picked], dtype=dtype, device=device))


def make_inputs(batch, shape, dtype, cfg, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch if cfg else batch
    model_output = torch.randn((rows,) + shape, generator=g).to(device=device, dtype=dtype)
    sample = torch.randn((batch,) + shape, generator=g).to(device=device, dtype=dtype)
    noise = torch.randn((batch,) + shape, generator=g).to(device=device, dtype=dtype)
    return model_output, sample, noise


def reference64(model_output, sample, sigma, sigma_prev, **kwargs):
    """flow_reference.flow_sde_step in float64 on the upcast inputs (sigma_max = SIGMA_MAX): the oracle."""
    from ddpo_fast import flow_reference

    for name in ("noise", "prev_sample"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].double()
    return flow_reference.flow_sde_step(model_output.double(), sample.double(), sigma.double(), sigma_prev.double(),
                                        sigma_max=SIGMA_MAX, **kwargs)


def rel_err(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def flow_grpo_step(scheduler, velocity, timestep, sample, noise_level, prev_sample=None, noise=None, sde_type="sde"):
    """Flow-GRPO's sde_step_with_logprob, written here from its definition (flow_grpo,
    diffusers_patch/sd3_sde_with_logprob.py) for the tests: float32, per-sample timesteps looked up
    with the scheduler's own index_for_timestep."""
    v, x = velocity.float(), sample.float()
    index = [scheduler.index_for_timestep(t) for t in timestep]
    view = (-1,) + (1,) * (x.dim() - 1)
    s = scheduler.sigmas[index].view(view)
    s_next = scheduler.sigmas[[i + 1 for i in index]].view(view)
    dt = s_next - s
    dims = tuple(range(1, x.dim()))
    if sde_type == "sde":
        s_denominator = torch.where(s == 1, scheduler.sigmas[1].item(), s)
        std = torch.sqrt(s / (1 - s_denominator)) * noise_level
        mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        scale = std * torch.sqrt(-dt)
        prev = mean + scale * noise if prev_sample is None else prev_sample.float()
        log_prob = -((prev - mean) ** 2) / (2 * scale**2) - torch.log(scale) - math.log(math.sqrt(2 * math.pi))
    else:
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0, x1 = x - s * v, x + v * (1 - s)
        mean = x0 * (1 - s_next) + x1 * torch.sqrt(s_next**2 - std**2)
        prev = mean + std * noise if prev_sample is None else prev_sample.float()
        log_prob = -((prev - mean) ** 2)
    return prev, log_prob.mean(dim=dims), mean, std
