"""Fused ops of Flow-GRPO's SDE step on a flow-matching model (SD3 family): the step with its
log-probability and the clipped PPO loss, on the CPU (C++), CUDA and Triton backends.

Public functions (re-exported by ddpo_fast.ops):

- flow_sde_step_with_logprob(scheduler, ...): drop-in for flow_grpo's `sde_step_with_logprob` on
  a diffusers FlowMatchEulerDiscreteScheduler (sde_type "sde" and "cps").
- flow_sde_step_logprob(...): the same step on per-sample sigmas, noise from a tensor or from the
  in-kernel Philox stream (the DDIM kernels' stream), a chosen output dtype, and the log-prob of
  the value as returned.
- flow_sde_ppo_loss(...): log-prob of the stored x' plus the PPO loss in one pass, differentiable
  with respect to model_output (both CFG halves).

The math is specified in ddpo_fast/flow_reference.py. Backends are chosen as for the DDIM ops
(ddpo_fast.backends: DDPO_FAST_BACKEND / set_backend / use_backend). The compiled backends are
torch.library custom ops (namespace `ddpo_fast`, names `flow_sde_*`) with fake implementations and
autograd, so they work under torch.compile; on CUDA they never synchronise with the host.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ddpo_fast import flow_reference, reference
from ddpo_fast.backends import DTYPE_CODES, _C, resolve_backend
from ddpo_fast.ops import (_check_float64_consistency, _check_kl_penalty, _check_latents, _check_number,
                           _check_ppo_inputs, _check_prev_sample, _check_step_sources, _check_tensor, _flat,
                           _kl_grad_inputs, _kl_outputs, _loss_stats, _per_sample_alphas, _randn_like_diffusers,
                           _reject_grad, _unit_kl_grad)

__all__ = ["flow_sde_step_with_logprob", "flow_sde_step_logprob", "flow_sde_ppo_loss", "scheduler_sigmas",
           "FlowSdeStepOutput", "SDE_TYPES"]

SDE_TYPES = flow_reference.SDE_TYPES
_SDE_CODES = {"sde": 0, "cps": 1}


# ---- Backends ----------------------------------------------------------------------------------


@dataclass
class FlowCall:
    """One fused flow SDE call: tensors flattened to (rows, numel), outputs allocated by the caller."""

    model_output: Tensor  # (B or 2B, N)
    sample: Tensor  # (B, N)
    sigma: Tensor  # (B,), compute dtype
    sigma_prev: Tensor  # (B,), compute dtype
    prev_sample: Tensor  # (B, N): written when sample_noise, read otherwise
    sde_type: int = 0
    noise_level: float = 0.7
    sigma_max: float = 0.0
    guidance_scale: Optional[float] = None
    log_prob: Optional[Tensor] = None  # (B,) out
    prev_sample_mean: Optional[Tensor] = None  # (B, N) out, compute dtype, optional
    std_dev_t: Optional[Tensor] = None  # (B,) out, optional
    sample_noise: bool = False
    noise: Optional[Tensor] = None
    seed: int = 0
    offset: int = 0
    old_log_prob: Optional[Tensor] = None  # PPO stage when set
    advantages: Optional[Tensor] = None
    ppo_clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    loss: Optional[Tensor] = None
    approx_kl: Optional[Tensor] = None
    clipfrac: Optional[Tensor] = None
    dloss_dlogp: Optional[Tensor] = None
    reference_output: Optional[Tensor] = None  # the KL penalty, as in DdimCall
    kl: Optional[Tensor] = None
    kl_beta: float = 0.0
    kl_mean: Optional[Tensor] = None
    grad_prev_sample: Optional[Tensor] = None
    grad_prev_sample_mean: Optional[Tensor] = None
    grad_log_prob: Optional[Tensor] = None
    grad_kl: Optional[Tensor] = None
    grad_model_output: Optional[Tensor] = None

    @property
    def batch(self) -> int:
        return self.sample.shape[0]

    @property
    def numel(self) -> int:
        return self.sample.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.sigma.dtype


def _core_args(call: FlowCall):
    a = _C.FlowArgs()
    a.batch, a.numel, a.compute = call.batch, call.numel, DTYPE_CODES[call.compute_dtype]
    a.sde_type, a.noise_level, a.sigma_max = call.sde_type, call.noise_level, call.sigma_max
    a.cfg = call.guidance_scale is not None
    a.guidance_scale = 1.0 if call.guidance_scale is None else call.guidance_scale
    for name in ("model_output", "sample", "prev_sample", "noise", "grad_prev_sample", "grad_prev_sample_mean",
                 "reference_output"):
        t = getattr(call, name)
        if t is not None:
            setattr(a, name, t.data_ptr())
            setattr(a, name + "_dtype", DTYPE_CODES[t.dtype])
    for name in ("sigma", "sigma_prev", "log_prob", "prev_sample_mean", "std_dev_t", "old_log_prob", "advantages",
                 "loss", "approx_kl", "clipfrac", "dloss_dlogp", "grad_log_prob", "grad_model_output", "kl", "kl_mean",
                 "grad_kl"):
        t = getattr(call, name)
        if t is not None:
            setattr(a, name, t.data_ptr())
    a.sample_noise, a.seed, a.offset = call.sample_noise, call.seed, call.offset
    a.ppo_clip_range, a.adv_clip_max, a.kl_beta = call.ppo_clip_range, call.adv_clip_max, call.kl_beta
    return a


def _cuda_args(call: FlowCall):
    a = _core_args(call)
    device = call.sample.device
    a.device = device.index if device.index is not None else torch.cuda.current_device()
    a.stream = torch.cuda.current_stream(device).cuda_stream
    chunks = _C.chunks_per_sample(call.numel) * (2 if call.reference_output is not None else 1)  # + KL partials
    call._workspace = torch.empty(call.batch * chunks, dtype=call.compute_dtype, device=device)
    a.workspace = call._workspace.data_ptr()
    return a


def _dispatch(call: FlowCall, direction: str) -> None:
    """Runs the `direction` ("forward" or "backward") kernels of the backend for call's device."""
    backend = resolve_backend(call.sample.device)
    if backend in ("cpu", "cuda") and not hasattr(_C, f"flow_{direction}_{backend}"):
        raise RuntimeError(f"ddpo_fast._C ({_C.__file__}) has no flow SDE kernels for backend {backend!r}: "
                           "rebuild the extension (pip install -e . or setup.py build_ext --inplace)")
    if backend == "cpu":
        _C.set_num_threads(torch.get_num_threads())
        getattr(_C, f"flow_{direction}_cpu")(_core_args(call))
    elif backend == "cuda":
        getattr(_C, f"flow_{direction}_cuda")(_cuda_args(call))
    elif backend == "triton":
        from ddpo_fast.kernels import flow_sde

        getattr(flow_sde, direction)(call)
    else:
        raise ValueError(f"no compiled flow kernels for backend {backend!r}")


# ---- Custom ops --------------------------------------------------------------------------------


def _run_forward(model_output, sample, sigma, sigma_prev, prev_sample, noise, seed, offset, noise_level, sde_type,
                 sigma_max, guidance_scale, out_dtype, with_mean, **ppo):
    batch, rows = sample.shape[0], model_output.shape[0]
    sampling = prev_sample is None
    prev = torch.empty(sample.shape, dtype=out_dtype, device=sample.device) if sampling else prev_sample
    mean = torch.empty(sample.shape, dtype=sigma.dtype, device=sample.device) if with_mean else sigma.new_empty(0)
    call = FlowCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), sigma=sigma, sigma_prev=sigma_prev,
        prev_sample=_flat(prev, batch), sde_type=sde_type, noise_level=noise_level, sigma_max=sigma_max,
        guidance_scale=guidance_scale, log_prob=sigma.new_empty(batch),
        prev_sample_mean=_flat(mean, batch) if with_mean else None, std_dev_t=sigma.new_empty(batch),
        sample_noise=sampling, noise=_flat(noise, batch), seed=seed, offset=offset, **ppo)
    _dispatch(call, "forward")
    return prev, call.log_prob, mean, call.std_dev_t


@torch.library.custom_op("ddpo_fast::flow_sde_step", mutates_args=())
def _flow_step_op(
    model_output: Tensor, sample: Tensor, sigma: Tensor, sigma_prev: Tensor, noise: Optional[Tensor], seed: int,
    offset: int, noise_level: float, sde_type: int, sigma_max: float, guidance_scale: Optional[float],
    out_dtype: torch.dtype, with_mean: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outputs: prev_sample, log_prob, prev_sample_mean (empty unless with_mean), std_dev_t."""
    return _run_forward(model_output, sample, sigma, sigma_prev, None, noise, seed, offset, noise_level, sde_type,
                        sigma_max, guidance_scale, out_dtype, with_mean)


@_flow_step_op.register_fake
def _(model_output, sample, sigma, sigma_prev, noise, seed, offset, noise_level, sde_type, sigma_max,
      guidance_scale, out_dtype, with_mean):
    mean = sample.new_empty(sample.shape, dtype=sigma.dtype) if with_mean else sigma.new_empty(0)
    return (sample.new_empty(sample.shape, dtype=out_dtype), sigma.new_empty(sample.shape[0]), mean,
            sigma.new_empty(sample.shape[0]))


@torch.library.custom_op("ddpo_fast::flow_sde_log_prob", mutates_args=())
def _flow_log_prob_op(
    model_output: Tensor, sample: Tensor, prev_sample: Tensor, sigma: Tensor, sigma_prev: Tensor,
    noise_level: float, sde_type: int, sigma_max: float, guidance_scale: Optional[float], with_mean: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs: log_prob, prev_sample_mean (empty unless with_mean), std_dev_t."""
    _, log_prob, mean, std = _run_forward(model_output, sample, sigma, sigma_prev, prev_sample, None, 0, 0,
                                          noise_level, sde_type, sigma_max, guidance_scale, prev_sample.dtype,
                                          with_mean)
    return log_prob, mean, std


@_flow_log_prob_op.register_fake
def _(model_output, sample, prev_sample, sigma, sigma_prev, noise_level, sde_type, sigma_max, guidance_scale,
      with_mean):
    mean = sample.new_empty(sample.shape, dtype=sigma.dtype) if with_mean else sigma.new_empty(0)
    return sigma.new_empty(sample.shape[0]), mean, sigma.new_empty(sample.shape[0])


@torch.library.custom_op("ddpo_fast::flow_sde_backward", mutates_args=())
def _flow_backward_op(
    grad_prev_sample: Optional[Tensor], grad_prev_sample_mean: Optional[Tensor], grad_log_prob: Tensor,
    model_output: Tensor, sample: Tensor, prev_sample: Tensor, sigma: Tensor, sigma_prev: Tensor,
    noise_level: float, sde_type: int, sigma_max: float, guidance_scale: Optional[float],
    reference_output: Optional[Tensor] = None, grad_kl: Optional[Tensor] = None,
) -> Tensor:
    """d loss / d model_output from the upstream gradients, plus with grad_kl (B,) the KL penalty's."""
    batch, rows = sample.shape[0], model_output.shape[0]
    grad = torch.empty_like(model_output)
    call = FlowCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), sigma=sigma, sigma_prev=sigma_prev,
        prev_sample=_flat(prev_sample, batch), sde_type=sde_type, noise_level=noise_level, sigma_max=sigma_max,
        guidance_scale=guidance_scale,
        grad_prev_sample=None if grad_prev_sample is None else _flat(grad_prev_sample.contiguous(), batch),
        grad_prev_sample_mean=None if grad_prev_sample_mean is None else _flat(grad_prev_sample_mean.contiguous(), batch),
        grad_log_prob=grad_log_prob.to(sigma.dtype).contiguous(), grad_model_output=_flat(grad, rows),
        **_kl_grad_inputs(reference_output, grad_kl, rows, sigma.dtype))
    _dispatch(call, "backward")
    return grad


@_flow_backward_op.register_fake
def _(grad_prev_sample, grad_prev_sample_mean, grad_log_prob, model_output, sample, prev_sample, sigma, sigma_prev,
      noise_level, sde_type, sigma_max, guidance_scale, reference_output=None, grad_kl=None):
    return torch.empty_like(model_output)


_POLICY = ("noise_level", "sde_type", "sigma_max", "guidance_scale")


def _grad_model_output(ctx, grad_prev, grad_mean, grad_log_prob):
    model_output, sample, prev_sample, sigma, sigma_prev = ctx.saved_tensors
    if grad_prev is None and grad_mean is None and grad_log_prob is None:
        return None
    if grad_log_prob is None:
        grad_log_prob = torch.zeros_like(sigma)
    if grad_mean is not None and grad_mean.numel() == 0:  # the empty placeholder when with_mean is off
        grad_mean = None
    return _flow_backward_op(grad_prev, grad_mean, grad_log_prob, model_output, sample, prev_sample, sigma,
                             sigma_prev, **ctx.policy)


def _setup_step(ctx, inputs, output):
    args = dict(zip(("model_output", "sample", "sigma", "sigma_prev", "noise", "seed", "offset", *_POLICY,
                     "out_dtype", "with_mean"), inputs))
    ctx.save_for_backward(args["model_output"], args["sample"], output[0], args["sigma"], args["sigma_prev"])
    ctx.policy = {n: args[n] for n in _POLICY}
    ctx.set_materialize_grads(False)


def _backward_step(ctx, grad_prev, grad_log_prob, grad_mean, _grad_std):
    return (_grad_model_output(ctx, grad_prev, grad_mean, grad_log_prob),) + (None,) * 12


_flow_step_op.register_autograd(_backward_step, setup_context=_setup_step)


def _setup_log_prob(ctx, inputs, output):
    args = dict(zip(("model_output", "sample", "prev_sample", "sigma", "sigma_prev", *_POLICY, "with_mean"), inputs))
    ctx.save_for_backward(args["model_output"], args["sample"], args["prev_sample"], args["sigma"], args["sigma_prev"])
    ctx.policy = {n: args[n] for n in _POLICY}
    ctx.set_materialize_grads(False)


def _backward_log_prob(ctx, grad_log_prob, grad_mean, _grad_std):
    return (_grad_model_output(ctx, None, grad_mean, grad_log_prob),) + (None,) * 9


_flow_log_prob_op.register_autograd(_backward_log_prob, setup_context=_setup_log_prob)


@torch.library.custom_op("ddpo_fast::flow_sde_ppo_loss", mutates_args=())
def _flow_ppo_loss_op(
    model_output: Tensor, sample: Tensor, prev_sample: Tensor, sigma: Tensor, sigma_prev: Tensor,
    old_log_prob: Tensor, advantages: Tensor, noise_level: float, sde_type: int, sigma_max: float,
    guidance_scale: Optional[float], clip_range: float, adv_clip_max: float, with_grad: bool,
    reference_output: Optional[Tensor] = None, kl_beta: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Outputs: loss, log_prob, approx_kl, clipfrac, dloss_dlogp, with `with_grad` (CPU backend)
    d loss / d model_output for a unit upstream gradient, made in the same pass (else empty), and with
    reference_output the batch mean of the KL to the reference step (else empty; the loss then
    includes kl_beta times it)."""
    batch, rows = sample.shape[0], model_output.shape[0]
    stats = {name: sigma.new_empty(()) for name in ("loss", "approx_kl", "clipfrac")}
    kl = _kl_outputs(batch, sigma, reference_output)
    dloss_dlogp = sigma.new_empty(batch)
    grad = torch.empty_like(model_output) if with_grad else model_output.new_empty(0)
    _, log_prob, _, _ = _run_forward(
        model_output, sample, sigma, sigma_prev, prev_sample, None, 0, 0, noise_level, sde_type, sigma_max,
        guidance_scale, prev_sample.dtype, False, old_log_prob=old_log_prob, advantages=advantages,
        ppo_clip_range=clip_range, adv_clip_max=adv_clip_max, dloss_dlogp=dloss_dlogp,
        grad_model_output=_flat(grad, rows) if with_grad else None, reference_output=_flat(reference_output, rows),
        kl_beta=kl_beta, **kl, **stats)
    return (stats["loss"], log_prob, stats["approx_kl"], stats["clipfrac"], dloss_dlogp, grad,
            kl.get("kl_mean", sigma.new_empty(0)))


@_flow_ppo_loss_op.register_fake
def _(model_output, sample, prev_sample, sigma, sigma_prev, old_log_prob, advantages, noise_level, sde_type,
      sigma_max, guidance_scale, clip_range, adv_clip_max, with_grad, reference_output=None, kl_beta=0.0):
    batch = sample.shape[0]
    grad = torch.empty_like(model_output) if with_grad else model_output.new_empty(0)
    kl_mean = sigma.new_empty(() if reference_output is not None else 0)
    return (sigma.new_empty(()), sigma.new_empty(batch), sigma.new_empty(()), sigma.new_empty(()),
            sigma.new_empty(batch), grad, kl_mean)


_PPO_INPUTS = ("model_output", "sample", "prev_sample", "sigma", "sigma_prev", "old_log_prob", "advantages", *_POLICY,
               "clip_range", "adv_clip_max", "with_grad", "reference_output", "kl_beta")


def _setup_ppo(ctx, inputs, output):
    args = dict(zip(_PPO_INPUTS, inputs))
    ctx.save_for_backward(args["model_output"], args["sample"], args["prev_sample"], args["sigma"],
                          args["sigma_prev"], output[4], output[5], args["reference_output"])
    ctx.policy = {n: args[n] for n in _POLICY}
    ctx.kl_beta = args["kl_beta"]
    ctx.set_materialize_grads(False)


def _backward_ppo(ctx, grad_loss, *_unused_stat_grads):
    none = (None,) * (len(_PPO_INPUTS) - 1)
    if grad_loss is None:  # only the statistics were used
        return (None,) + none
    model_output, sample, prev_sample, sigma, sigma_prev, dloss_dlogp, unit_grad, reference_output = ctx.saved_tensors
    if unit_grad.numel():  # made in the forward pass (CPU); scaled unless the upstream gradient is 1
        unit = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and grad_loss.item() == 1.0
        return (unit_grad if unit else unit_grad * grad_loss,) + none
    grad_kl = None
    if reference_output is not None and ctx.kl_beta > 0:
        grad_kl = _unit_kl_grad(ctx.kl_beta, sigma, grad_loss)
    grad = _flow_backward_op(None, None, dloss_dlogp * grad_loss, model_output, sample, prev_sample, sigma,
                             sigma_prev, **ctx.policy, reference_output=reference_output, grad_kl=grad_kl)
    return (grad,) + none


_flow_ppo_loss_op.register_autograd(_backward_ppo, setup_context=_setup_ppo)


# ---- Validation --------------------------------------------------------------------------------


def _check_flow_policy(noise_level, sde_type, sigma_max, guidance_scale) -> tuple:
    if sde_type not in _SDE_CODES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    # cps: std = sigma' sin(noise_level pi / 2) must not exceed sigma' (a real square root).
    noise_level = _check_number("noise_level", noise_level, low=0.0, high=1.0 if sde_type == "cps" else None)
    if sigma_max is not None:
        sigma_max = _check_number("sigma_max", sigma_max, low=0.0)
        if sigma_max >= 1.0:
            raise ValueError(f"sigma_max must be < 1 (it replaces sigma == 1 in 1 - sigma), got {sigma_max}")
    if guidance_scale is not None:
        guidance_scale = _check_number("guidance_scale", guidance_scale)
    return noise_level, sde_type, sigma_max, guidance_scale


def _check_sigma_values(sigma: Tensor, sigma_prev: Tensor, sde_type: str, sigma_max) -> None:
    """0 < sigma <= 1 and 0 <= sigma_prev < sigma (a denoising step); sigma == 1 needs sigma_max for
    sde. Eager CPU: checked here; on an accelerator or under torch.compile with device-side asserts."""
    needs_max = sde_type == "sde" and sigma_max is None
    if sigma.device.type == "cpu" and not torch.compiler.is_compiling():
        values, prev_values = sigma.tolist(), sigma_prev.tolist()
        if not all(0 < s <= 1 for s in values):
            raise ValueError(f"sigma must lie in (0, 1], got {values}")
        if not all(0 <= p < s for s, p in zip(values, prev_values)):
            raise ValueError(f"sigma_prev must lie in [0, sigma), got {prev_values} (sigma {values})")
        if needs_max and any(s == 1 for s in values):
            raise ValueError("sigma_max must be given where sigma == 1 (sde_type='sde' divides by 1 - sigma): "
                             "pass the scheduler's sigmas[1]")
        return
    torch._assert_async(((sigma > 0) & (sigma <= 1)).all(), "sigma must lie in (0, 1]")
    torch._assert_async(((sigma_prev >= 0) & (sigma_prev < sigma)).all(), "sigma_prev must lie in [0, sigma)")
    if needs_max:
        torch._assert_async((sigma < 1).all(), "sigma_max must be given where sigma == 1 (sde_type='sde')")


# ---- Public API --------------------------------------------------------------------------------


class FlowSdeStepOutput(NamedTuple):
    """(prev_sample, log_prob, prev_sample_mean, std_dev_t), unpacking like flow_grpo's tuple."""

    prev_sample: Tensor
    log_prob: Tensor
    prev_sample_mean: Optional[Tensor]
    std_dev_t: Tensor


def flow_sde_step_logprob(
    model_output: Tensor,
    sample: Tensor,
    sigma,
    sigma_prev,
    *,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    sigma_max: Optional[float] = None,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    prev_sample: Optional[Tensor] = None,
    guidance_scale: Optional[float] = None,
    out_dtype: Optional[torch.dtype] = None,
    return_mean: bool = False,
) -> FlowSdeStepOutput:
    """One flow SDE step x_t -> x' with the log-probability of x', per sample.

    model_output: (B, ...) velocity, or (2B, ...) [uncond; cond] halves when `guidance_scale` is set.
    sample: (B, ...) x_t. sigma / sigma_prev: floats or (B,) tensors, sigmas[i] and sigmas[i + 1].
    sigma_max: the scheduler's sigmas[1], used for sigma == 1 in sde's 1 - sigma (needed there).
    noise / seed+offset: the noise as a tensor, or the in-kernel Philox stream of (seed, offset);
        with neither, a seed is drawn from torch's CPU generator.
    prev_sample: if given, nothing is sampled: its log-probability is returned.
    out_dtype: dtype of the returned x' (default sample.dtype); log_prob is that of the rounded value.
    return_mean: also return prev_sample_mean (compute dtype; else None, saving its memory traffic).
    Returns FlowSdeStepOutput with log_prob and std_dev_t (B,) in float32 (float64 for float64 inputs).
    Differentiable with respect to model_output through prev_sample, log_prob and prev_sample_mean.
    """
    noise_level, sde_type, sigma_max, guidance_scale = _check_flow_policy(noise_level, sde_type, sigma_max,
                                                                          guidance_scale)
    batch, _ = _check_latents(model_output, sample, guidance_scale)
    seed, offset, out_dtype = _check_step_sources(sample, prev_sample, noise, seed, offset, out_dtype)
    sigma_t = _per_sample_alphas("sigma", sigma, batch, sample)
    sigma_p = _per_sample_alphas("sigma_prev", sigma_prev, batch, sample)
    _check_float64_consistency(model_output=model_output, sample=sample, prev_sample=prev_sample, noise=noise)
    dtype = reference.compute_dtype(model_output, sample, prev_sample)
    sigma_t, sigma_p = sigma_t.to(dtype).contiguous(), sigma_p.to(dtype).contiguous()
    _check_sigma_values(sigma_t, sigma_p, sde_type, sigma_max)
    _reject_grad("flow_sde_step_logprob", sample=sample, noise=noise, sigma=sigma_t, sigma_prev=sigma_p)

    if resolve_backend(sample.device) == "reference":
        prev, log_prob, mean, std = flow_reference.flow_sde_step(
            model_output, sample, sigma_t, sigma_p, noise_level=noise_level, sde_type=sde_type, sigma_max=sigma_max,
            noise=noise, seed=seed, offset=offset, prev_sample=prev_sample, guidance_scale=guidance_scale,
            out_dtype=out_dtype)
        return FlowSdeStepOutput(prev, log_prob, mean if return_mean else None, std)
    policy = dict(noise_level=noise_level, sde_type=_SDE_CODES[sde_type], sigma_max=sigma_max or 0.0,
                  guidance_scale=guidance_scale)
    if prev_sample is not None:
        log_prob, mean, std = _flow_log_prob_op(model_output, sample, prev_sample.detach(), sigma_t, sigma_p,
                                                with_mean=return_mean, **policy)
        return FlowSdeStepOutput(prev_sample, log_prob, mean if return_mean else None, std)
    seed = seed or 0
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and model_output.requires_grad):
        prev, log_prob, mean, std = _flow_step_op(model_output, sample, sigma_t, sigma_p, noise, seed, offset,
                                                  out_dtype=out_dtype, with_mean=return_mean, **policy)
    else:  # sampling without gradients: the kernel directly, skipping the op dispatch
        prev, log_prob, mean, std = _run_forward(model_output, sample, sigma_t, sigma_p, None, noise, seed, offset,
                                                 out_dtype=out_dtype, with_mean=return_mean, **policy)
    return FlowSdeStepOutput(prev, log_prob, mean if return_mean else None, std)


def flow_sde_ppo_loss(
    model_output: Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    sigma,
    sigma_prev,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    sigma_max: Optional[float] = None,
    guidance_scale: Optional[float] = None,
    reference_output: Optional[Tensor] = None,
    kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-GRPO's clipped policy loss of one step in one fused pass: the log-probability of the
    stored x' (`prev_sample`) under the current `model_output`, then ddpo_fast.ops.ppo_clip_loss's
    objective on it. Differentiable with respect to model_output (both CFG halves); returns
    (loss, {"approx_kl", "clipfrac", "log_prob"}, plus "kl" with reference_output), stats detached.

    KL penalty (Flow-GRPO's beta): with `reference_output` (the reference model's velocity for the
    same inputs, laid out as model_output; must not require grad), the same pass computes per sample
    KL_b = mean over the latent's elements of (mean - mean_ref)^2 / (2 std^2), std = std_t sqrt(-dt)
    for "sde" and std_t for "cps" (0 for a deterministic step), and the loss becomes PPO loss +
    kl_beta * mean_b KL_b, with its gradient; stats["kl"] = mean_b KL_b. kl_beta (finite, >= 0) > 0
    needs reference_output."""
    noise_level, sde_type, sigma_max, guidance_scale = _check_flow_policy(noise_level, sde_type, sigma_max,
                                                                          guidance_scale)
    batch, _ = _check_latents(model_output, sample, guidance_scale)
    _check_prev_sample(prev_sample, sample)
    clip_range, adv_clip_max = _check_ppo_inputs(sample, old_log_prob, advantages, clip_range, adv_clip_max, batch)
    kl_beta = _check_kl_penalty(reference_output, kl_beta, model_output, sample)
    sigma_t = _per_sample_alphas("sigma", sigma, batch, sample)
    sigma_p = _per_sample_alphas("sigma_prev", sigma_prev, batch, sample)
    _check_float64_consistency(model_output=model_output, sample=sample, prev_sample=prev_sample,
                               reference_output=reference_output)
    _reject_grad("flow_sde_ppo_loss", sample=sample, prev_sample=prev_sample, old_log_prob=old_log_prob,
                 advantages=advantages, sigma=sigma_t, sigma_prev=sigma_p, reference_output=reference_output)
    dtype = reference.compute_dtype(model_output, sample, prev_sample)
    sigma_t, sigma_p = sigma_t.to(dtype).contiguous(), sigma_p.to(dtype).contiguous()
    _check_sigma_values(sigma_t, sigma_p, sde_type, sigma_max)
    if resolve_backend(sample.device) == "reference":
        return flow_reference.flow_sde_ppo_loss(
            model_output, sample, prev_sample, sigma_t, sigma_p, old_log_prob, advantages, clip_range=clip_range,
            adv_clip_max=adv_clip_max, noise_level=noise_level, sde_type=sde_type, sigma_max=sigma_max,
            guidance_scale=guidance_scale, reference_output=reference_output, kl_beta=kl_beta)
    # On CPU the forward pass also makes the gradient while the data is in cache (eager only: a
    # traced graph keeps the separate backward kernel).
    with_grad = (resolve_backend(sample.device) == "cpu" and not torch.compiler.is_compiling()
                 and torch.is_grad_enabled() and model_output.requires_grad)
    loss, log_prob, approx_kl, clipfrac, _, _, kl_mean = _flow_ppo_loss_op(
        model_output, sample, prev_sample, sigma_t, sigma_p, old_log_prob.to(dtype).contiguous(),
        advantages.to(dtype).contiguous(), noise_level=noise_level, sde_type=_SDE_CODES[sde_type],
        sigma_max=sigma_max or 0.0, guidance_scale=guidance_scale, clip_range=clip_range, adv_clip_max=adv_clip_max,
        with_grad=with_grad, reference_output=reference_output, kl_beta=kl_beta)
    return loss, _loss_stats(approx_kl, clipfrac, log_prob, [kl_mean] if reference_output is not None else [])


# ---- diffusers FlowMatchEulerDiscreteScheduler adapter -----------------------------------------

# id(tensor) -> (weak reference to it, {key: value}): per-schedule values derived once (device
# copies, sigmas[1] as a float), so that a step on a GPU neither copies nor synchronises.
_schedule_cache: dict[int, tuple] = {}


def _derived(source: Tensor, key, make):
    entry = _schedule_cache.get(id(source))
    if entry is None or entry[0]() is not source:
        ref = weakref.ref(source, lambda _, k=id(source), cache=_schedule_cache: cache.pop(k, None))
        entry = (ref, {})
        _schedule_cache[id(source)] = entry
    if key not in entry[1]:
        entry[1][key] = make()
    return entry[1][key]


def scheduler_sigmas(scheduler, timestep, batch_size: int, device) -> tuple[Tensor, Tensor, float]:
    """(sigma, sigma_prev, sigma_max) of a FlowMatchEulerDiscreteScheduler step at `timestep` (a
    number, or a tensor with one value or one per sample): sigmas[i], sigmas[i + 1] as (B,) float32
    on `device`, and sigmas[1]. i is found as diffusers' index_for_timestep finds it: the position
    of the timestep in scheduler.timesteps, the second one where it occurs twice."""
    for attribute in ("sigmas", "timesteps"):
        if getattr(scheduler, attribute, None) is None:
            raise TypeError(f"scheduler must be a diffusers FlowMatchEulerDiscreteScheduler after set_timesteps "
                            f"(no {attribute!r}), got {type(scheduler).__name__}")
    device = torch.device(device)
    source = scheduler.sigmas
    sigmas = _derived(source, device, lambda: source.to(device=device, dtype=torch.float32))
    sigma_max = _derived(source, "sigma_max", lambda: float(source[1]) if source.numel() > 1 else 0.0)
    timesteps = _derived(scheduler.timesteps, device, lambda: scheduler.timesteps.to(device))
    if isinstance(timestep, Tensor):
        t = timestep.to(device=device, dtype=timesteps.dtype).reshape(-1)
    elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        t = torch.tensor([timestep], dtype=timesteps.dtype, device=device)
    else:
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
    if t.numel() not in (1, batch_size):
        raise ValueError(f"timestep must be one value or {batch_size} (one per sample), got shape {tuple(t.shape)}")
    matches = t[:, None] == timesteps[None, :]
    count = matches.sum(dim=1)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool((count > 0).all()):
            raise ValueError(f"timestep must be one of scheduler.timesteps, got {t.tolist()}")
    else:
        torch._assert_async((count > 0).all(), "timestep must be one of scheduler.timesteps")
    wanted = torch.where(count > 1, 2, 1)
    index = (matches & (matches.cumsum(dim=1) == wanted[:, None])).to(torch.int8).argmax(dim=1)
    sigma, sigma_prev = sigmas[index], sigmas[index + 1]
    return sigma.expand(batch_size).contiguous(), sigma_prev.expand(batch_size).contiguous(), sigma_max


def flow_sde_step_with_logprob(
    scheduler,
    model_output: Tensor,
    timestep,
    sample: Tensor,
    noise_level: float = 0.7,
    prev_sample: Optional[Tensor] = None,
    generator=None,
    sde_type: str = "sde",
    *,
    guidance_scale: Optional[float] = None,
) -> FlowSdeStepOutput:
    """Drop-in for flow_grpo's `sde_step_with_logprob(scheduler, model_output, timestep, sample,
    noise_level, prev_sample, generator, sde_type)` on a FlowMatchEulerDiscreteScheduler after
    set_timesteps (any shift): the same four results within float32 rounding, for sde_type "sde"
    and "cps". prev_sample, prev_sample_mean and log_prob are float32 (float64 for float64 inputs);
    std_dev_t has shape (B, 1, ..., 1) as there.

    Differences, on purpose: with `guidance_scale`, model_output holds the [uncond; cond] halves
    and CFG is fused; a deterministic sde step (noise_level 0) has log_prob 0, not NaN; without
    `generator` the noise is the in-kernel Philox stream seeded from torch's CPU generator (with
    one, it is drawn as diffusers' randn_tensor draws it). Non-contiguous inputs are copied.
    """
    if prev_sample is not None and generator is not None:
        raise ValueError("give either prev_sample or generator, not both: nothing is sampled when prev_sample is given")
    _check_tensor("sample", sample, contiguous=False)
    _check_tensor("model_output", model_output, contiguous=False)
    sigma, sigma_prev, sigma_max = scheduler_sigmas(scheduler, timestep, sample.shape[0], sample.device)
    dtype = reference.compute_dtype(model_output, sample, prev_sample)
    noise = None
    if prev_sample is None and generator is not None:
        noise = _randn_like_diffusers(sample.shape, generator, sample.device, dtype)
    elif prev_sample is not None:
        _check_tensor("prev_sample", prev_sample, contiguous=False)
        prev_sample = prev_sample.to(dtype).contiguous()  # flow_grpo computes on prev_sample.float()
    out = flow_sde_step_logprob(
        model_output.contiguous(), sample.contiguous(), sigma, sigma_prev, noise_level=noise_level, sde_type=sde_type,
        sigma_max=sigma_max, noise=noise, prev_sample=prev_sample, guidance_scale=guidance_scale,
        out_dtype=None if prev_sample is not None else dtype, return_mean=True)
    std = out.std_dev_t.reshape((-1,) + (1,) * (sample.dim() - 1))
    return FlowSdeStepOutput(out.prev_sample, out.log_prob, out.prev_sample_mean, std)
