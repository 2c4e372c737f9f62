"""Fused DDPO ops: the DDIM step with its Gaussian log-probability and the clipped PPO loss.

Public functions (all accept CPU or CUDA tensors and dispatch to a backend, see
ddpo_fast.backends):

- ddim_step_with_logprob(scheduler, ...): drop-in for ddpo-pytorch's / trl's function of that name.
- ddim_step_logprob(...): the same step on per-sample alpha products, noise from a tensor or from
  the in-kernel counter-based Philox stream, and a chosen output dtype.
- ppo_clip_loss(...): the clipped PPO (DDPO-IS) objective on per-sample log-probabilities.
- ddim_ppo_loss(...): log-probability of stored x_{t-1} plus the PPO loss in one fused pass,
  differentiable with respect to model_output (both CFG halves).

The math is specified in ddpo_fast/reference.py. The compiled backends are registered as
torch.library custom ops (namespace `ddpo_fast`) with fake implementations and autograd, so they
work under torch.compile; on CUDA they never synchronise with the host.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ddpo_fast import reference
from ddpo_fast.backends import (
    _C,
    backend_info,
    core_args,
    PREDICTION_CODES,
    DdimCall,
    resolve_backend,
    runner,
    set_backend,
    use_backend,
)

__all__ = [
    "ddim_step_with_logprob",
    "ddim_step_logprob",
    "ppo_clip_loss",
    "ddim_ppo_loss",
    "scheduler_alphas",
    "DdimStepOutput",
    "set_backend",
    "use_backend",
    "backend_info",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_INT64 = 2**63 - 1


# ---- Validation: every bad input is a ValueError/TypeError that names the argument --------------


def _check_tensor(name: str, t, *, contiguous: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}")
    return t


def _check_same_device(reference_name: str, reference_tensor: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference_tensor.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference_tensor.device}")


def _check_float64_consistency(**tensors: Optional[Tensor]) -> None:
    """float64 inputs select float64 compute; mixing them with narrower floats is refused."""
    present = {n: t for n, t in tensors.items() if t is not None}
    wide = [n for n, t in present.items() if t.dtype == torch.float64]
    if wide and len(wide) != len(present):
        narrow = [n for n in present if n not in wide]
        raise TypeError(f"{', '.join(wide)} are float64 but {', '.join(narrow)} are not: use float64 for all or none")


def _check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _check_policy(eta, guidance_scale, prediction_type, clip_sample_range) -> tuple:
    eta = _check_number("eta", eta, low=0.0, high=1.0)
    if guidance_scale is not None:
        guidance_scale = _check_number("guidance_scale", guidance_scale)
    if prediction_type not in PREDICTION_CODES:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTION_CODES)}, got {prediction_type!r}")
    if clip_sample_range is not None:
        clip_sample_range = _check_number("clip_sample_range", clip_sample_range, low=0.0, low_open=True)
    return eta, guidance_scale, prediction_type, clip_sample_range


def _check_latents(model_output: Tensor, sample: Tensor, guidance_scale) -> tuple[int, int]:
    """(B, N) of a step: sample is (B, ...), model_output (B, ...) or, with CFG, (2B, ...)."""
    _check_tensor("sample", sample)
    _check_tensor("model_output", model_output)
    if sample.dim() < 2:
        raise ValueError(f"sample must have a batch dimension and at least one more, got shape {tuple(sample.shape)}")
    batch, numel = sample.shape[0], math.prod(sample.shape[1:])
    if batch == 0 or numel == 0:
        raise ValueError(f"sample is empty (shape {tuple(sample.shape)})")
    rows = 2 * batch if guidance_scale is not None else batch
    if model_output.shape[1:] != sample.shape[1:] or model_output.shape[0] != rows:
        detail = " ([uncond; cond] halves, because guidance_scale is set)" if guidance_scale is not None else ""
        raise ValueError(
            f"model_output must have shape {(rows,) + tuple(sample.shape[1:])}{detail}, got {tuple(model_output.shape)}"
        )
    _check_same_device("sample", sample, model_output=model_output)
    return batch, numel


def _per_sample_alphas(name: str, value, batch: int, like: Tensor) -> Tensor:
    """A float or a (B,) tensor of alpha products -> a (B,) tensor on like's device."""
    if isinstance(value, Tensor):
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.dim() > 1 or value.numel() not in (1, batch):
            raise ValueError(f"{name} must be a number or have {batch} elements (one per sample), got shape {tuple(value.shape)}")
        _check_same_device("sample", like, **{name: value})
        return value.reshape(-1).expand(batch)
    value = _check_number(name, value)
    return torch.full((batch,), value, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                      device=like.device)


def _check_alpha_values(alpha_t: Tensor, alpha_prev: Tensor) -> None:
    """0 < alpha_prod_t < 1, alpha_prod_t <= alpha_prod_t_prev <= 1: in eager CPU code checked here;
    on an accelerator or under torch.compile with a device-side assert, so that no host
    synchronisation (or graph break) is needed."""
    if alpha_t.device.type == "cpu" and not torch.compiler.is_compiling():
        values_t, values_prev = alpha_t.tolist(), alpha_prev.tolist()  # (B,): cheaper than tensor ops
        if not all(0 < a < 1 for a in values_t):
            raise ValueError(f"alpha_prod_t must lie in (0, 1), got {values_t}")
        if not all(a <= p <= 1 for a, p in zip(values_t, values_prev)):
            raise ValueError(f"alpha_prod_t_prev must lie in (0, 1] and be >= alpha_prod_t, got {values_prev} "
                             f"(alpha_prod_t {values_t})")
        return
    ok_t = ((alpha_t > 0) & (alpha_t < 1)).all()
    ok_prev = ((alpha_prev > 0) & (alpha_prev <= 1) & (alpha_prev >= alpha_t)).all()
    torch._assert_async(ok_t, "alpha_prod_t must lie in (0, 1)")
    torch._assert_async(ok_prev, "alpha_prod_t_prev must lie in (0, 1] and be >= alpha_prod_t")


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _MAX_INT64:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def _check_prev_sample(prev_sample: Tensor, sample: Tensor, *, contiguous: bool = True) -> None:
    _check_tensor("prev_sample", prev_sample, contiguous=contiguous)
    if prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample must have sample's shape {tuple(sample.shape)}, got {tuple(prev_sample.shape)}")
    _check_same_device("sample", sample, prev_sample=prev_sample)


def _check_step_sources(sample: Tensor, prev_sample, noise, seed, offset, out_dtype):
    """What a low-level step samples from or scores (shared by the DDIM and flow SDE steps): a given
    prev_sample, or noise from a tensor or from (seed, offset); returns (seed, offset, out_dtype), a
    fresh seed when none is given."""
    if prev_sample is not None:
        _check_prev_sample(prev_sample, sample)
        for name, value in (("noise", noise), ("seed", seed), ("out_dtype", out_dtype)):
            if value is not None:
                raise ValueError(f"{name} cannot be combined with prev_sample (nothing is sampled)")
    if noise is not None:
        _check_tensor("noise", noise)
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
        _check_same_device("sample", sample, noise=noise)
        if seed is not None:
            raise ValueError("give either noise or seed, not both")
    offset = _check_seed("offset", offset)
    if seed is not None:
        seed = _check_seed("seed", seed)
    elif prev_sample is None and noise is None:
        seed = int(torch.randint(0, _MAX_INT64, (), dtype=torch.int64))
    if out_dtype is None:
        out_dtype = sample.dtype
    elif out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16, bfloat16 or float64, got {out_dtype}")
    return seed, offset, out_dtype


def _check_kl_penalty(reference_output, kl_beta, model_output: Tensor, sample: Tensor) -> float:
    """The KL penalty's arguments of a loss op (DDIM and flow SDE alike): kl_beta finite and >= 0, > 0
    only with reference_output, which is laid out as model_output (its shape, CFG halves too) on
    sample's device. Returns kl_beta as a float; the caller adds reference_output to its float64 and
    requires-grad checks."""
    kl_beta = _check_number("kl_beta", kl_beta, low=0.0)
    if reference_output is None:
        if kl_beta > 0:
            raise ValueError(f"kl_beta = {kl_beta} > 0 needs reference_output (the reference model's output)")
        return kl_beta
    _check_tensor("reference_output", reference_output)
    if reference_output.shape != model_output.shape:
        raise ValueError(f"reference_output must have model_output's shape {tuple(model_output.shape)}, "
                         f"got {tuple(reference_output.shape)}")
    _check_same_device("sample", sample, reference_output=reference_output)
    return kl_beta


def _kl_outputs(batch: int, like: Tensor, reference_output: Optional[Tensor]) -> dict:
    """The KL penalty's outputs of a loss call: per-sample kl (B,) and kl_mean (0-d); none without
    a reference output."""
    if reference_output is None:
        return {}
    return {"kl": like.new_empty(batch), "kl_mean": like.new_empty(())}


def _reject_grad(op: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{op} is differentiable only with respect to model_output: detach {name}")


# ---- Custom ops (compiled backends) ------------------------------------------------------------


def _flat(t: Optional[Tensor], rows: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(rows, -1)


def _run_step(model_output, sample, alpha_t, alpha_prev, prev_sample, noise, seed, offset, eta,
              guidance_scale, prediction, clip_sample_range, use_clipped_model_output, out_dtype):
    batch = sample.shape[0]
    rows = model_output.shape[0]
    sampling = prev_sample is None
    prev = torch.empty(sample.shape, dtype=out_dtype, device=sample.device) if sampling else prev_sample
    call = DdimCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t,
        alpha_prev=alpha_prev, prev_sample=_flat(prev, batch),
        log_prob=torch.empty(batch, dtype=alpha_t.dtype, device=sample.device),
        eta=eta, guidance_scale=guidance_scale, prediction=prediction,
        clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output,
        sample_noise=sampling, noise=_flat(noise, batch), seed=seed, offset=offset,
    )
    runner(resolve_backend(sample.device)).forward(call)
    return prev, call.log_prob


@torch.library.custom_op("ddpo_fast::ddim_step", mutates_args=())
def _ddim_step_op(
    model_output: Tensor, sample: Tensor, alpha_t: Tensor, alpha_prev: Tensor, noise: Optional[Tensor],
    seed: int, offset: int, eta: float, guidance_scale: Optional[float], prediction: int,
    clip_sample_range: Optional[float], use_clipped_model_output: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    return _run_step(model_output, sample, alpha_t, alpha_prev, None, noise, seed, offset, eta,
                     guidance_scale, prediction, clip_sample_range, use_clipped_model_output, out_dtype)


@_ddim_step_op.register_fake
def _(model_output, sample, alpha_t, alpha_prev, noise, seed, offset, eta, guidance_scale, prediction,
      clip_sample_range, use_clipped_model_output, out_dtype):
    return sample.new_empty(sample.shape, dtype=out_dtype), alpha_t.new_empty(sample.shape[0])


@torch.library.custom_op("ddpo_fast::ddim_log_prob", mutates_args=())
def _ddim_log_prob_op(
    model_output: Tensor, sample: Tensor, prev_sample: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
    eta: float, guidance_scale: Optional[float], prediction: int, clip_sample_range: Optional[float],
    use_clipped_model_output: bool,
) -> Tensor:
    _, log_prob = _run_step(model_output, sample, alpha_t, alpha_prev, prev_sample, None, 0, 0, eta,
                            guidance_scale, prediction, clip_sample_range, use_clipped_model_output, prev_sample.dtype)
    return log_prob


@_ddim_log_prob_op.register_fake
def _(model_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale, prediction,
      clip_sample_range, use_clipped_model_output):
    return alpha_t.new_empty(sample.shape[0])


@torch.library.custom_op("ddpo_fast::ddim_step_backward", mutates_args=())
def _ddim_step_backward_op(
    grad_prev_sample: Optional[Tensor], grad_log_prob: Tensor, model_output: Tensor, sample: Tensor,
    prev_sample: Tensor, alpha_t: Tensor, alpha_prev: Tensor, eta: float, guidance_scale: Optional[float],
    prediction: int, clip_sample_range: Optional[float], use_clipped_model_output: bool,
    reference_output: Optional[Tensor] = None, grad_kl: Optional[Tensor] = None,
) -> Tensor:
    """d loss / d model_output from d loss / d log_prob (and d loss / d x_{t-1}), plus with grad_kl
    (B,) the KL penalty's term, d loss / d kl_b times d kl_b / d model_output."""
    batch, rows = sample.shape[0], model_output.shape[0]
    grad = torch.empty_like(model_output)
    if grad_prev_sample is not None:
        grad_prev_sample = grad_prev_sample.contiguous()
    call = DdimCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t,
        alpha_prev=alpha_prev, prev_sample=_flat(prev_sample, batch), eta=eta,
        guidance_scale=guidance_scale, prediction=prediction, clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output,
        grad_prev_sample=_flat(grad_prev_sample, batch),
        grad_log_prob=grad_log_prob.to(alpha_t.dtype).contiguous(), grad_model_output=_flat(grad, rows),
        **_kl_grad_inputs(reference_output, grad_kl, rows, alpha_t.dtype),
    )
    runner(resolve_backend(sample.device)).backward(call)
    return grad


@_ddim_step_backward_op.register_fake
def _(grad_prev_sample, grad_log_prob, model_output, sample, prev_sample, alpha_t, alpha_prev, eta,
      guidance_scale, prediction, clip_sample_range, use_clipped_model_output, reference_output=None, grad_kl=None):
    return torch.empty_like(model_output)


def _kl_grad_inputs(reference_output: Optional[Tensor], grad_kl: Optional[Tensor], rows: int, dtype) -> dict:
    """The KL penalty's inputs of a backward call: none unless both are given."""
    if reference_output is None or grad_kl is None:
        return {}
    return {"reference_output": _flat(reference_output, rows), "grad_kl": grad_kl.to(dtype).contiguous()}


def _unit_kl_grad(kl_beta: float, like: Tensor, grad_loss: Tensor) -> Tensor:
    """d loss / d kl_b = kl_beta / B times the upstream gradient, (B,) like `like`. kl_beta / B is
    rounded once from a Python float, as the CPU kernels' one-pass gradient forms it."""
    return like.new_full(like.shape, kl_beta / like.shape[0]) * grad_loss


def _policy_args(inputs) -> dict:
    """The non-tensor policy arguments of a step op, by name, from its saved inputs."""
    names = ("eta", "guidance_scale", "prediction", "clip_sample_range", "use_clipped_model_output")
    return {n: inputs[n] for n in names}


def _step_backward(ctx, grad_prev_sample, grad_log_prob):
    model_output, sample, prev_sample, alpha_t, alpha_prev = ctx.saved_tensors
    if grad_prev_sample is None and grad_log_prob is None:
        return None
    if grad_log_prob is None:
        grad_log_prob = torch.zeros_like(alpha_t)
    return _ddim_step_backward_op(grad_prev_sample, grad_log_prob, model_output, sample, prev_sample,
                                  alpha_t, alpha_prev, **ctx.policy)


def _setup_step(ctx, inputs, output):
    args = dict(zip(("model_output", "sample", "alpha_t", "alpha_prev", "noise", "seed", "offset", "eta",
                     "guidance_scale", "prediction", "clip_sample_range", "use_clipped_model_output",
                     "out_dtype"), inputs))
    ctx.save_for_backward(args["model_output"], args["sample"], output[0], args["alpha_t"], args["alpha_prev"])
    ctx.policy = _policy_args(args)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs


def _backward_step(ctx, grad_prev_sample, grad_log_prob):
    grad = _step_backward(ctx, grad_prev_sample, grad_log_prob)
    return (grad,) + (None,) * 12


_ddim_step_op.register_autograd(_backward_step, setup_context=_setup_step)


def _setup_log_prob(ctx, inputs, output):
    args = dict(zip(("model_output", "sample", "prev_sample", "alpha_t", "alpha_prev", "eta", "guidance_scale",
                     "prediction", "clip_sample_range", "use_clipped_model_output"), inputs))
    ctx.save_for_backward(args["model_output"], args["sample"], args["prev_sample"], args["alpha_t"],
                          args["alpha_prev"])
    ctx.policy = _policy_args(args)


def _backward_log_prob(ctx, grad_log_prob):
    grad = _step_backward(ctx, None, grad_log_prob)
    return (grad,) + (None,) * 9


_ddim_log_prob_op.register_autograd(_backward_log_prob, setup_context=_setup_log_prob)


def _ppo_outputs(batch: int, like: Tensor) -> dict:
    return {
        "loss": like.new_empty(()), "approx_kl": like.new_empty(()), "clipfrac": like.new_empty(()),
        "dloss_dlogp": like.new_empty(batch),
    }


@torch.library.custom_op("ddpo_fast::ddim_ppo_loss", mutates_args=())
def _ddim_ppo_loss_op(
    model_output: Tensor, sample: Tensor, prev_sample: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
    old_log_prob: Tensor, advantages: Tensor, eta: float, guidance_scale: Optional[float], prediction: int,
    clip_sample_range: Optional[float], use_clipped_model_output: bool, clip_range: float, adv_clip_max: float,
    with_grad: bool, reference_output: Optional[Tensor] = None, kl_beta: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Outputs: loss, log_prob, approx_kl, clipfrac, dloss_dlogp, with `with_grad` (CPU backend)
    d loss / d model_output for a unit upstream gradient, made in the same pass (else empty), and with
    reference_output the batch mean of the KL to the reference step (else empty; the loss then
    includes kl_beta times it)."""
    batch, rows = sample.shape[0], model_output.shape[0]
    outputs = _ppo_outputs(batch, alpha_t)
    kl = _kl_outputs(batch, alpha_t, reference_output)
    grad = torch.empty_like(model_output) if with_grad else model_output.new_empty(0)
    call = DdimCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t,
        alpha_prev=alpha_prev, prev_sample=_flat(prev_sample, batch), log_prob=alpha_t.new_empty(batch),
        eta=eta, guidance_scale=guidance_scale, prediction=prediction, clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output, old_log_prob=old_log_prob, advantages=advantages,
        ppo_clip_range=clip_range, adv_clip_max=adv_clip_max, grad_model_output=_flat(grad, rows) if with_grad else None,
        reference_output=_flat(reference_output, rows), kl_beta=kl_beta, **kl, **outputs,
    )
    runner(resolve_backend(sample.device)).forward(call)
    return (outputs["loss"], call.log_prob, outputs["approx_kl"], outputs["clipfrac"], outputs["dloss_dlogp"], grad,
            kl.get("kl_mean", alpha_t.new_empty(0)))


@_ddim_ppo_loss_op.register_fake
def _(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages, eta, guidance_scale,
      prediction, clip_sample_range, use_clipped_model_output, clip_range, adv_clip_max, with_grad,
      reference_output=None, kl_beta=0.0):
    batch = sample.shape[0]
    grad = torch.empty_like(model_output) if with_grad else model_output.new_empty(0)
    kl_mean = alpha_t.new_empty(() if reference_output is not None else 0)
    return (alpha_t.new_empty(()), alpha_t.new_empty(batch), alpha_t.new_empty(()), alpha_t.new_empty(()),
            alpha_t.new_empty(batch), grad, kl_mean)


_DDIM_PPO_INPUTS = ("model_output", "sample", "prev_sample", "alpha_t", "alpha_prev", "old_log_prob", "advantages",
                    "eta", "guidance_scale", "prediction", "clip_sample_range", "use_clipped_model_output",
                    "clip_range", "adv_clip_max", "with_grad", "reference_output", "kl_beta")


def _setup_ddim_ppo(ctx, inputs, output):
    args = dict(zip(_DDIM_PPO_INPUTS, inputs))
    ctx.save_for_backward(args["model_output"], args["sample"], args["prev_sample"], args["alpha_t"],
                          args["alpha_prev"], output[4], output[5], args["reference_output"])
    ctx.policy = _policy_args(args)
    ctx.kl_beta = args["kl_beta"]
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the stats and the unit gradient


def _backward_ddim_ppo(ctx, grad_loss, *_unused_stat_grads):
    none = (None,) * (len(_DDIM_PPO_INPUTS) - 1)
    if grad_loss is None:  # only the statistics were used
        return (None,) + none
    model_output, sample, prev_sample, alpha_t, alpha_prev, dloss_dlogp, unit_grad, reference_output = ctx.saved_tensors
    # The gradient made in the forward pass (CPU): as it is for an upstream gradient of exactly 1,
    # else scaled (the trainers backpropagate loss / accumulation steps); either way cheaper than
    # re-reading the inputs. The value is read only from a real CPU tensor (no device sync); a traced
    # backward (fake or functional tensors) always scales.
    if unit_grad.numel():
        unit = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and grad_loss.item() == 1.0
        return (unit_grad if unit else unit_grad * grad_loss,) + none
    grad_kl = None
    if reference_output is not None and ctx.kl_beta > 0:
        grad_kl = _unit_kl_grad(ctx.kl_beta, alpha_t, grad_loss)
    grad = _ddim_step_backward_op(None, dloss_dlogp * grad_loss, model_output, sample, prev_sample, alpha_t,
                                  alpha_prev, **ctx.policy, reference_output=reference_output, grad_kl=grad_kl)
    return (grad,) + none


_ddim_ppo_loss_op.register_autograd(_backward_ddim_ppo, setup_context=_setup_ddim_ppo)


def _run_ppo(log_prob, old_log_prob, advantages, clip_range, adv_clip_max, backend) -> dict:
    """The PPO stage alone on a backend: {"loss", "approx_kl", "clipfrac", "dloss_dlogp"}."""
    batch = log_prob.shape[0]
    outputs = _ppo_outputs(batch, log_prob)
    empty = log_prob.new_empty(batch, 1)
    call = DdimCall(
        model_output=empty, sample=empty, alpha_t=log_prob, alpha_prev=log_prob, prev_sample=empty,
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, ppo_clip_range=clip_range,
        adv_clip_max=adv_clip_max, **outputs)
    runner(backend).ppo(call)
    return outputs


@torch.library.custom_op("ddpo_fast::ppo_clip_loss", mutates_args=())
def _ppo_clip_loss_op(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, adv_clip_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outputs = _run_ppo(log_prob, old_log_prob, advantages, clip_range, adv_clip_max, resolve_backend(log_prob.device))
    return outputs["loss"], outputs["approx_kl"], outputs["clipfrac"], outputs["dloss_dlogp"]


@_ppo_clip_loss_op.register_fake
def _(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    batch = log_prob.shape[0]
    return log_prob.new_empty(()), log_prob.new_empty(()), log_prob.new_empty(()), log_prob.new_empty(batch)


def _setup_ppo(ctx, inputs, output):
    ctx.save_for_backward(output[3])
    ctx.set_materialize_grads(False)


def _backward_ppo(ctx, grad_loss, *_unused_stat_grads):
    if grad_loss is None:
        return None, None, None, None, None
    (dloss_dlogp,) = ctx.saved_tensors
    return dloss_dlogp * grad_loss, None, None, None, None


_ppo_clip_loss_op.register_autograd(_backward_ppo, setup_context=_setup_ppo)


# ---- Eager autograd (no torch.library dispatch) ------------------------------------------------
# In eager mode the public functions call the kernels through these autograd.Functions: the same
# kernels as the custom ops above, without ~50-100 us of custom-op dispatch per call. A traced
# graph (torch.compile) always goes through the custom ops.


def _eager(backend: str) -> bool:
    return backend != "reference" and not torch.compiler.is_compiling()


def _log_prob_backward(backend, policy, model_output, sample, prev_sample, alpha_t, alpha_prev, grad_log_prob,
                       direction=None, reference_output=None, grad_kl=None) -> Tensor:
    """d loss / d model_output from d loss / d log_prob (and d loss / d kl_b, the KL penalty's), by the
    backend's backward kernel (which only scales `direction` when the forward pass wrote one)."""
    batch, rows = sample.shape[0], model_output.shape[0]
    grad = torch.empty_like(model_output)
    call = DdimCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t, alpha_prev=alpha_prev,
        prev_sample=_flat(prev_sample, batch), grad_log_prob=grad_log_prob.to(alpha_t.dtype).contiguous(),
        grad_model_output=_flat(grad, rows), grad_direction=_flat(direction, batch),
        **_kl_grad_inputs(reference_output, grad_kl, rows, alpha_t.dtype), **policy)
    runner(backend).backward(call)
    return grad


_scratch = threading.local()


def _direction_buffer(shape, dtype, device) -> Tensor:
    """A (B, ...) buffer for the gradient direction: the previous call's when no one holds it any
    more (its backward has run), so that a training loop does not fault 2 bytes in per latent
    element on every step; a fresh one otherwise. One per thread."""
    key = (tuple(shape), dtype, device)
    pool = _scratch.__dict__.setdefault("directions", {})
    buffer = pool.get(key)
    # Held by the pool alone (no saved-for-backward reference, no view): free to reuse.
    if (buffer is not None and buffer._use_count() == 1
            and torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2):
        return buffer
    buffer = pool[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


class _LogProbOfGiven(torch.autograd.Function):
    """log_prob of a given x_{t-1}, differentiable w.r.t. model_output. On the CPU backend the
    forward pass also writes d log_prob / d m while the data is in cache (csrc/ddim_core.h,
    grad_direction), and the backward pass only scales it: one pass over the inputs instead of two."""

    @staticmethod
    def forward(ctx, model_output, sample, prev_sample, alpha_t, alpha_prev, backend, policy):
        batch, rows = sample.shape[0], model_output.shape[0]
        needs_grad = ctx.needs_input_grad[0]
        direction = None
        if needs_grad and backend == "cpu":
            direction = _direction_buffer(sample.shape, alpha_t.dtype, sample.device)
        call = DdimCall(
            model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t,
            alpha_prev=alpha_prev, prev_sample=_flat(prev_sample, batch),
            log_prob=torch.empty(batch, dtype=alpha_t.dtype, device=sample.device),
            grad_direction=_flat(direction, batch), **policy)
        runner(backend).forward(call)
        if needs_grad:
            ctx.save_for_backward(model_output, sample, prev_sample, alpha_t, alpha_prev, direction)
            ctx.backend, ctx.policy = backend, policy
        return call.log_prob

    @staticmethod
    def backward(ctx, grad_log_prob):
        *inputs, direction = ctx.saved_tensors
        grad = _log_prob_backward(ctx.backend, ctx.policy, *inputs, grad_log_prob, direction)
        return grad, None, None, None, None, None, None


class _PpoClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, clip_range, adv_clip_max, backend):
        outputs = _run_ppo(log_prob, old_log_prob, advantages, clip_range, adv_clip_max, backend)
        ctx.save_for_backward(outputs["dloss_dlogp"])
        ctx.mark_non_differentiable(outputs["approx_kl"], outputs["clipfrac"])
        return outputs["loss"], outputs["approx_kl"], outputs["clipfrac"]

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_clipfrac):
        (dloss_dlogp,) = ctx.saved_tensors
        return dloss_dlogp * grad_loss, None, None, None, None, None


class _DdimPpoLoss(torch.autograd.Function):
    """ddim_ppo_loss in eager mode, without the custom-op dispatch. On the CPU backend the forward
    pass also writes the gradient for a unit upstream gradient (one pass over the data); the first
    backward hands it over (scaled in place for another upstream gradient) and keeps no reference.
    With reference_output the loss includes kl_beta times the mean KL, which is returned last."""

    @staticmethod
    def forward(ctx, model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages, clip_range,
                adv_clip_max, backend, policy, reference_output, kl_beta):
        batch, rows = sample.shape[0], model_output.shape[0]
        with_grad = ctx.needs_input_grad[0] and backend == "cpu"
        outputs = _ppo_outputs(batch, alpha_t)
        kl = _kl_outputs(batch, alpha_t, reference_output)
        grad = torch.empty_like(model_output) if with_grad else None
        call = DdimCall(
            model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t,
            alpha_prev=alpha_prev, prev_sample=_flat(prev_sample, batch), log_prob=alpha_t.new_empty(batch),
            old_log_prob=old_log_prob, advantages=advantages, ppo_clip_range=clip_range, adv_clip_max=adv_clip_max,
            grad_model_output=_flat(grad, rows), reference_output=_flat(reference_output, rows), kl_beta=kl_beta,
            **kl, **outputs, **policy)
        runner(backend).forward(call)
        ctx.unit_grad = grad
        if ctx.needs_input_grad[0]:  # also for a second backward (retain_graph) after the first took grad
            ctx.save_for_backward(model_output, sample, prev_sample, alpha_t, alpha_prev, outputs["dloss_dlogp"],
                                  reference_output)
            ctx.backend, ctx.policy, ctx.kl_beta = backend, policy, kl_beta
        stats = (call.log_prob, outputs["approx_kl"], outputs["clipfrac"]) + ((kl["kl_mean"],) if kl else ())
        ctx.mark_non_differentiable(*stats)
        return (outputs["loss"],) + stats

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        none = (None,) * 12
        grad, ctx.unit_grad = ctx.unit_grad, None
        if grad is not None:  # made by the forward pass, for the first backward; ours alone: scaled in place
            if grad_loss.item() != 1.0:  # a CPU tensor: no device synchronisation
                grad.mul_(grad_loss.to(grad.dtype))
            return (grad,) + none
        *inputs, dloss_dlogp, reference_output = ctx.saved_tensors
        grad_kl = None
        if reference_output is not None and ctx.kl_beta > 0:
            grad_kl = _unit_kl_grad(ctx.kl_beta, inputs[3], grad_loss)
        return (_log_prob_backward(ctx.backend, ctx.policy, *inputs, dloss_dlogp * grad_loss,
                                   reference_output=reference_output, grad_kl=grad_kl),) + none


# ---- Public API --------------------------------------------------------------------------------


class DdimStepOutput(NamedTuple):
    """(prev_sample, log_prob); unpacks like ddpo-pytorch's tuple, and `.latents` / `.log_probs`
    read like trl's DDPOSchedulerOutput."""

    prev_sample: Tensor
    log_prob: Tensor

    @property
    def latents(self) -> Tensor:
        return self.prev_sample

    @property
    def log_probs(self) -> Tensor:
        return self.log_prob


def ddim_step_logprob(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta: float = 1.0,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    prev_sample: Optional[Tensor] = None,
    guidance_scale: Optional[float] = None,
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
    use_clipped_model_output: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> DdimStepOutput:
    """One DDIM step x_t -> x_{t-1} with the log-probability of x_{t-1}, per sample.

    model_output: (B, ...) model prediction, or (2B, ...) [uncond; cond] halves when
        `guidance_scale` is set (classifier-free guidance is fused).
    sample: (B, ...) x_t. alpha_prod_t / alpha_prod_t_prev: floats or (B,) tensors.
    noise / seed+offset: the Gaussian noise as a tensor, or generated in the kernel from the
        counter-based Philox stream of (seed, offset) (reproducible; use offset for the step index).
        With neither, a seed is drawn from torch's CPU generator.
    prev_sample: if given, x_{t-1} is not sampled: its log-probability is returned with it.
    out_dtype: dtype of the returned x_{t-1} (default sample.dtype); log_prob is computed from the
        value as rounded to it.
    Returns DdimStepOutput(prev_sample, log_prob) with log_prob (B,) in float32 (float64 for
    float64 inputs): the mean over the non-batch dims; 0 for a deterministic step (sigma == 0).
    """
    eta, guidance_scale, prediction_type, clip_sample_range = _check_policy(
        eta, guidance_scale, prediction_type, clip_sample_range)
    batch, _ = _check_latents(model_output, sample, guidance_scale)
    seed, offset, out_dtype = _check_step_sources(sample, prev_sample, noise, seed, offset, out_dtype)
    alpha_t = _per_sample_alphas("alpha_prod_t", alpha_prod_t, batch, sample)
    alpha_prev = _per_sample_alphas("alpha_prod_t_prev", alpha_prod_t_prev, batch, sample)
    _check_float64_consistency(model_output=model_output, sample=sample, prev_sample=prev_sample, noise=noise)
    dtype = reference.compute_dtype(model_output, sample, prev_sample)
    alpha_t, alpha_prev = alpha_t.to(dtype).contiguous(), alpha_prev.to(dtype).contiguous()
    _check_alpha_values(alpha_t, alpha_prev)
    _reject_grad("ddim_step_logprob", sample=sample, noise=noise, alpha_prod_t=alpha_t, alpha_prod_t_prev=alpha_prev)

    policy = dict(eta=eta, guidance_scale=guidance_scale, clip_sample_range=clip_sample_range,
                  use_clipped_model_output=use_clipped_model_output)
    return _dispatch_step(model_output, sample, alpha_t, alpha_prev, prev_sample, noise, seed, offset, out_dtype,
                          prediction_type, policy, resolve_backend(sample.device))


def _dispatch_step(model_output, sample, alpha_t, alpha_prev, prev_sample, noise, seed, offset, out_dtype,
                   prediction_type, policy, backend) -> DdimStepOutput:
    """One validated step (alphas in the compute dtype, contiguous) on `backend`."""
    if backend == "reference":
        step = reference.ddim_step(model_output, sample, alpha_t, alpha_prev, noise=noise, seed=seed, offset=offset,
                                   prev_sample=prev_sample, prediction_type=prediction_type, out_dtype=out_dtype,
                                   **policy)
        return DdimStepOutput(*step)
    policy = dict(policy, prediction=PREDICTION_CODES[prediction_type])
    if prev_sample is not None:
        prev_sample = prev_sample.detach()
        if _eager(backend):
            log_prob = _LogProbOfGiven.apply(model_output, sample, prev_sample, alpha_t, alpha_prev, backend, policy)
        else:
            log_prob = _ddim_log_prob_op(model_output, sample, prev_sample, alpha_t, alpha_prev, **policy)
        return DdimStepOutput(prev_sample, log_prob)
    seed = seed or 0
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and model_output.requires_grad):
        prev, log_prob = _ddim_step_op(model_output, sample, alpha_t, alpha_prev, noise, seed, offset,
                                       out_dtype=out_dtype, **policy)
    else:  # sampling without gradients: the kernel directly, skipping ~40 us of op dispatch
        prev, log_prob = _run_step(model_output, sample, alpha_t, alpha_prev, None, noise, seed, offset,
                                   out_dtype=out_dtype, **policy)
    return DdimStepOutput(prev, log_prob)


def _check_ppo_inputs(log_prob_like: Tensor, old_log_prob, advantages, clip_range, adv_clip_max, batch: int):
    clip_range = _check_number("clip_range", clip_range, low=0.0, low_open=True)
    adv_clip_max = _check_number("adv_clip_max", adv_clip_max, low=0.0, low_open=True)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        _check_tensor(name, t, contiguous=False)
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},) (one value per sample), got {tuple(t.shape)}")
        _check_same_device("sample" if log_prob_like.dim() else "log_prob", log_prob_like, **{name: t})
    return clip_range, adv_clip_max


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                  adv_clip_max: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO loss: mean over the batch of max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)),
    r = exp(log_prob - old_log_prob), A = advantages clamped to +-adv_clip_max.

    Returns (loss, {"approx_kl", "clipfrac"}), 0-d tensors, differentiable w.r.t. log_prob only.
    """
    _check_tensor("log_prob", log_prob, contiguous=False)
    if log_prob.dim() != 1 or log_prob.shape[0] == 0:
        raise ValueError(f"log_prob must have shape (B,) with B >= 1, got {tuple(log_prob.shape)}")
    batch = log_prob.shape[0]
    clip_range, adv_clip_max = _check_ppo_inputs(log_prob, old_log_prob, advantages, clip_range, adv_clip_max, batch)
    _reject_grad("ppo_clip_loss", old_log_prob=old_log_prob, advantages=advantages)
    backend = resolve_backend(log_prob.device)
    if backend == "reference":
        return reference.ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    dtype = reference.compute_dtype(log_prob, old_log_prob, advantages)
    log_prob, old_log_prob, advantages = (t.to(dtype).contiguous() for t in (log_prob, old_log_prob, advantages))
    if _eager(backend):
        loss, approx_kl, clipfrac = _PpoClipLoss.apply(log_prob, old_log_prob, advantages, clip_range, adv_clip_max,
                                                       backend)
        return loss, {"approx_kl": approx_kl, "clipfrac": clipfrac}
    loss, approx_kl, clipfrac, _ = _ppo_clip_loss_op(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    return loss, {"approx_kl": approx_kl.detach(), "clipfrac": clipfrac.detach()}


def ddim_ppo_loss(
    model_output: Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    eta: float = 1.0,
    guidance_scale: Optional[float] = None,
    prediction_type: str = "epsilon",
    clip_sample_range: Optional[float] = None,
    use_clipped_model_output: bool = False,
    reference_output: Optional[Tensor] = None,
    kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DDPO-IS training loss of one timestep in one fused pass: the log-probability of the stored
    x_{t-1} (`prev_sample`) under the current `model_output`, then `ppo_clip_loss` on it.

    KL penalty: with `reference_output` (the reference model's output for the same inputs, laid out
    as model_output, CFG halves too; must not require grad), the same pass computes per sample the KL
    between the policy's step and the reference's, both Gaussians with the step's sigma: KL_b = mean
    over the latent's elements of (mu - mu_ref)^2 / (2 sigma^2) (0 where sigma == 0), mu_ref from the
    same mean function. The loss is then PPO loss + kl_beta * mean_b KL_b, its gradient includes the
    KL's, and stats["kl"] is mean_b KL_b. kl_beta (finite, >= 0) > 0 needs reference_output.

    Differentiable with respect to model_output (both CFG halves); the stored latents, old
    log-probabilities, advantages and the reference output must not require grad. Returns (loss,
    {"approx_kl", "clipfrac", "log_prob"}, plus "kl" with reference_output); the stats are detached.
    """
    eta, guidance_scale, prediction_type, clip_sample_range = _check_policy(
        eta, guidance_scale, prediction_type, clip_sample_range)
    batch, _ = _check_latents(model_output, sample, guidance_scale)
    _check_prev_sample(prev_sample, sample)
    clip_range, adv_clip_max = _check_ppo_inputs(sample, old_log_prob, advantages, clip_range, adv_clip_max, batch)
    kl_beta = _check_kl_penalty(reference_output, kl_beta, model_output, sample)
    alpha_t = _per_sample_alphas("alpha_prod_t", alpha_prod_t, batch, sample)
    alpha_prev = _per_sample_alphas("alpha_prod_t_prev", alpha_prod_t_prev, batch, sample)
    _check_float64_consistency(model_output=model_output, sample=sample, prev_sample=prev_sample,
                               reference_output=reference_output)
    _reject_grad("ddim_ppo_loss", sample=sample, prev_sample=prev_sample, old_log_prob=old_log_prob,
                 advantages=advantages, alpha_prod_t=alpha_t, alpha_prod_t_prev=alpha_prev,
                 reference_output=reference_output)
    dtype = reference.compute_dtype(model_output, sample, prev_sample)
    alpha_t, alpha_prev = alpha_t.to(dtype).contiguous(), alpha_prev.to(dtype).contiguous()
    _check_alpha_values(alpha_t, alpha_prev)
    policy = dict(eta=eta, guidance_scale=guidance_scale, clip_sample_range=clip_sample_range,
                  use_clipped_model_output=use_clipped_model_output)
    if resolve_backend(sample.device) == "reference":
        return reference.ddim_ppo_loss(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob,
                                       advantages, clip_range=clip_range, adv_clip_max=adv_clip_max,
                                       prediction_type=prediction_type, reference_output=reference_output,
                                       kl_beta=kl_beta, **policy)
    backend = resolve_backend(sample.device)
    old_log_prob, advantages = old_log_prob.to(dtype).contiguous(), advantages.to(dtype).contiguous()
    if _eager(backend):
        policy["prediction"] = PREDICTION_CODES[prediction_type]
        loss, log_prob, approx_kl, clipfrac, *kl = _DdimPpoLoss.apply(
            model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages, clip_range,
            adv_clip_max, backend, policy, reference_output, kl_beta)
        stats = {"approx_kl": approx_kl, "clipfrac": clipfrac, "log_prob": log_prob}  # non-differentiable outputs
        if kl:
            stats["kl"] = kl[0]
        return loss, stats
    # A traced graph: the custom op, with the separate backward kernel.
    with_grad = False
    loss, log_prob, approx_kl, clipfrac, _, _, kl_mean = _ddim_ppo_loss_op(
        model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
        prediction=PREDICTION_CODES[prediction_type], clip_range=clip_range, adv_clip_max=adv_clip_max,
        with_grad=with_grad, reference_output=reference_output, kl_beta=kl_beta, **policy)
    return loss, _loss_stats(approx_kl, clipfrac, log_prob, [kl_mean] if reference_output is not None else [])


def _loss_stats(approx_kl: Tensor, clipfrac: Tensor, log_prob: Tensor, kl: list) -> dict[str, Tensor]:
    """The stats dict of a loss op (DDIM and flow SDE), detached; "kl" with the KL penalty."""
    stats = {"approx_kl": approx_kl.detach(), "clipfrac": clipfrac.detach(), "log_prob": log_prob.detach()}
    if kl:
        stats["kl"] = kl[0].detach()
    return stats


# ---- diffusers DDIMScheduler adapter -----------------------------------------------------------


def _check_scheduler(scheduler) -> None:
    for attribute in ("alphas_cumprod", "final_alpha_cumprod", "config", "num_inference_steps"):
        if not hasattr(scheduler, attribute):
            raise TypeError(f"scheduler must be a diffusers DDIMScheduler (missing {attribute!r}), got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps(...) first")
    if getattr(scheduler.config, "thresholding", False):
        raise NotImplementedError("scheduler.config.thresholding=True (dynamic thresholding) is not supported")


class _SchedulerTables:
    """What a DDIMScheduler step needs, built once per scheduler configuration (set_timesteps, the
    config, the alphas tensors) instead of on every call: alpha_prod_t and alpha_prod_t_prev of
    every training timestep as a (2, num_train_timesteps) table per device and dtype, and, for one
    timestep for the whole batch, the (B,) tensors themselves, so that a step makes no tensor on the
    host and copies nothing to the device."""

    _MAX_PAIRS = 4096  # cached (device, dtype, timestep, batch) pairs before the cache starts over

    def __init__(self, scheduler, key):
        _check_scheduler(scheduler)
        config = scheduler.config
        self.key = key
        self.num_train = int(config.num_train_timesteps)
        stride = self.num_train // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        final = float(scheduler.final_alpha_cumprod)
        steps = torch.arange(self.num_train)
        prev = steps - stride
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
        self.host = torch.stack([alphas, alpha_prev])  # float64, (2, num_train)
        a, p = self.host
        # Timesteps whose alphas the kernels accept: checked here once, not on every call.
        self.valid = ((a > 0) & (a < 1) & (p >= a) & (p <= 1)).tolist()
        self.prediction_type = config.prediction_type
        self.clip_sample_range = config.clip_sample_range if config.clip_sample else None
        self._tables: dict = {}
        self._pairs: dict = {}

    def table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self.host.to(device=device, dtype=dtype)
        return table

    def check_timestep(self, timestep: int) -> None:
        if not 0 <= timestep < self.num_train:
            raise ValueError(f"timestep must lie in [0, {self.num_train}), got {timestep}")

    def alphas(self, timestep, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
        """(alpha_prod_t, alpha_prod_t_prev, checked): contiguous (B,) tensors in `dtype` on
        `device`; checked says whether their values are known to be valid (else check them). For
        one timestep the tensors are cached: read them, never write them."""
        if isinstance(timestep, Tensor):
            if timestep.numel() == 1 and timestep.device.type == "cpu":
                timestep = int(timestep)  # a host value: no device work at all
            else:
                return self._per_sample(timestep, batch, device, dtype)
        elif isinstance(timestep, bool) or not isinstance(timestep, int):
            raise TypeError(f"timestep must be an int or a tensor, got {type(timestep).__name__}")
        key = (device, dtype, timestep, batch)
        pair = self._pairs.get(key)
        if pair is None:
            self.check_timestep(timestep)
            if len(self._pairs) >= self._MAX_PAIRS:
                self._pairs.clear()
            row = self.table(device, dtype)[:, timestep:timestep + 1].expand(2, batch).contiguous()
            pair = self._pairs[key] = (row[0], row[1], self.valid[timestep])
        return pair

    def _per_sample(self, timestep: Tensor, batch: int, device, dtype) -> tuple[Tensor, Tensor, bool]:
        t = timestep.reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"timestep must be one value or {batch} (one per sample), got shape {tuple(timestep.shape)}")
        t = t.to(device=device, dtype=torch.long)
        if t.device.type == "cpu":
            values = t.tolist()
            for value in values:
                self.check_timestep(value)
            checked = all(self.valid[v] for v in values)
        else:  # an out-of-range index is a device-side assert: no host synchronisation
            checked = all(self.valid)
        rows = self.table(device, dtype).index_select(1, t)
        if rows.shape[1] != batch:
            rows = rows.expand(2, batch).contiguous()
        return rows[0], rows[1], checked


# scheduler -> its tables; entries die with their scheduler.
_scheduler_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tables_of(scheduler) -> _SchedulerTables:
    """The scheduler's tables, rebuilt when set_timesteps, the config or the alphas tensors change.
    (Changing alphas_cumprod in place is not noticed: assign a new tensor.)"""
    key = (getattr(scheduler, "num_inference_steps", None), id(getattr(scheduler, "config", None)),
           id(getattr(scheduler, "alphas_cumprod", None)), id(getattr(scheduler, "final_alpha_cumprod", None)))
    try:
        tables = _scheduler_tables.get(scheduler)
    except TypeError:  # not weak-referenceable or not hashable: no cache
        return _SchedulerTables(scheduler, key)
    if tables is None or tables.key != key:
        tables = _SchedulerTables(scheduler, key)
        # The ids in the key stay unique while the entry keeps the objects alive.
        tables.keep = (scheduler.config, scheduler.alphas_cumprod, scheduler.final_alpha_cumprod)
        _scheduler_tables[scheduler] = tables
    return tables


def scheduler_alphas(scheduler, timestep, batch_size: int, device) -> tuple[Tensor, Tensor]:
    """(alpha_prod_t, alpha_prod_t_prev), (B,) float32 on `device`, for a DDIMScheduler step at
    `timestep` (an int, a 0-d tensor or one per sample).

    Follows diffusers' DDIMScheduler.step: prev = t - num_train_timesteps // num_inference_steps,
    and final_alpha_cumprod when prev < 0. (ddpo-pytorch and trl clamp prev to >= 0 first, which
    differs from diffusers only when set_alpha_to_one=True.)
    """
    alpha_t, alpha_prev, _ = _tables_of(scheduler).alphas(timestep, batch_size, torch.device(device), torch.float32)
    return alpha_t.clone(), alpha_prev.clone()


def _randn_like_diffusers(shape, generator, device, dtype) -> Tensor:
    """Noise drawn exactly as diffusers' randn_tensor draws it (per-sample for a list of generators,
    on the generator's device, then moved), so that a fixed generator gives the same numbers."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} generators but the batch has {shape[0]} samples")
        parts = [_randn_like_diffusers((1,) + tuple(shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(parts)
    draw_device = generator.device if generator.device.type == "cpu" else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


# The CPU sampling step with a generator overlaps the noise draw with the kernel (_C.NoiseStream):
# the calling thread fills the noise piece by piece with the generator while the kernel computes
# the samples whose noise is ready on a helper thread. Pieces are multiples of 16 elements, the
# blocks in which torch's CPU normal_ transforms its uniforms, so the numbers are those of one
# torch.randn of the whole shape. Below _STREAM_MIN_ELEMENTS a plain draw then the kernel is cheaper.
_STREAM_PIECE_ELEMENTS = 1 << 16
_STREAM_MIN_ELEMENTS = 1 << 17


def _noise_pieces(generator, noise: Tensor, whole: bool = False):
    """(generator, view of noise, elements filled once it is) in fill order, as diffusers draws;
    with `whole`, a single generator fills all of it in one piece."""
    numel = noise[0].numel()
    if isinstance(generator, (list, tuple)):  # one draw of shape (1, ...) per sample
        return [(g, noise[b:b + 1], (b + 1) * numel) for b, g in enumerate(generator)]
    flat, total = noise.view(-1), noise.numel()
    if whole:
        return [(generator, noise, total)]
    piece = _STREAM_PIECE_ELEMENTS
    ends = list(range(piece, total - piece + 1, piece))[:-1] if total >= 2 * piece else []
    ends.append(total)  # the last piece holds the remainder: >= 16 elements, as torch needs
    starts = [0] + ends[:-1]
    return [(generator, flat[a:b], b) for a, b in zip(starts, ends)]


def _cpu_generators(generator, batch: int) -> bool:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} generators but the batch has {batch} samples")
        return all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in generator)
    return isinstance(generator, torch.Generator) and generator.device.type == "cpu"


def _sample_with_generator_cpu(model_output, sample, alpha_t, alpha_prev, generator, policy) -> DdimStepOutput:
    """The CPU sampling step with diffusers' noise: x_{t-1} written over the noise it was made from
    (when their dtypes agree), the draw overlapped with the kernel."""
    batch, rows = sample.shape[0], model_output.shape[0]
    prev = torch.empty(sample.shape, dtype=sample.dtype)
    noise = prev if model_output.dtype == sample.dtype else torch.empty(sample.shape, dtype=model_output.dtype)
    call = DdimCall(
        model_output=_flat(model_output, rows), sample=_flat(sample, batch), alpha_t=alpha_t, alpha_prev=alpha_prev,
        prev_sample=_flat(prev, batch), log_prob=torch.empty(batch, dtype=alpha_t.dtype), sample_noise=True,
        noise=_flat(noise, batch), **policy)
    if noise.numel() < _STREAM_MIN_ELEMENTS or torch.get_num_threads() < 2:  # the draw, then the kernel
        for g, view, _ in _noise_pieces(generator, noise, whole=True):
            view.normal_(generator=g)
        runner("cpu").forward(call)
        return DdimStepOutput(prev, call.log_prob)
    pieces = _noise_pieces(generator, noise)
    stream = _C.NoiseStream(core_args(call))
    try:
        for g, view, ready in pieces:
            view.normal_(generator=g)
            stream.publish(ready)
    except BaseException:
        stream.cancel()
        stream.finish()
        raise
    stream.finish()
    return DdimStepOutput(prev, call.log_prob)


def ddim_step_with_logprob(
    scheduler,
    model_output: Tensor,
    timestep,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Optional[Tensor] = None,
    generator=None,
    *,
    guidance_scale: Optional[float] = None,
    use_clipped_model_output: bool = False,
) -> DdimStepOutput:
    """Drop-in for ddpo-pytorch's `ddim_step_with_logprob` and trl's `scheduler_step`: one step of
    a diffusers DDIMScheduler (after set_timesteps) with the log-probability of x_{t-1}.

    Same arguments and results (within float32 rounding) for every DDIMScheduler configuration:
    epsilon / sample / v_prediction, clip_sample, steps_offset, set_alpha_to_one, `timestep` an int
    or one per sample. Differences, on purpose: the last step uses final_alpha_cumprod as diffusers
    does (see scheduler_alphas); a step with sigma == 0 returns log_prob 0 instead of NaN;
    log_prob is float32 and, for a narrower sample dtype, computed from the returned (rounded)
    prev_sample. With `guidance_scale`, model_output holds the [uncond; cond] halves and CFG is
    fused. Without `generator` the noise comes from the in-kernel Philox stream seeded from torch's
    CPU generator; with one, it is drawn as diffusers draws it. Non-contiguous inputs are copied.
    """
    tables = _tables_of(scheduler)
    if prev_sample is not None and generator is not None:
        raise ValueError("give either prev_sample or generator, not both: nothing is sampled when prev_sample is given")
    _check_tensor("sample", sample, contiguous=False)
    _check_tensor("model_output", model_output, contiguous=False)
    model_output, sample = model_output.contiguous(), sample.contiguous()
    eta, guidance_scale, prediction_type, clip_sample_range = _check_policy(
        eta, guidance_scale, tables.prediction_type, tables.clip_sample_range)
    batch, _ = _check_latents(model_output, sample, guidance_scale)
    if prev_sample is not None:
        _check_prev_sample(prev_sample, sample, contiguous=False)
        prev_sample = prev_sample.contiguous()
    _check_float64_consistency(model_output=model_output, sample=sample, prev_sample=prev_sample)
    _reject_grad("ddim_step_with_logprob", sample=sample)
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    alpha_t, alpha_prev, checked = tables.alphas(timestep, batch, sample.device, dtype)
    if not checked:
        _check_alpha_values(alpha_t, alpha_prev)
    backend = resolve_backend(sample.device)
    policy = dict(eta=eta, guidance_scale=guidance_scale, clip_sample_range=clip_sample_range,
                  use_clipped_model_output=use_clipped_model_output)
    noise = None
    if prev_sample is None and generator is not None:
        if (backend == "cpu" and not torch.compiler.is_compiling() and _cpu_generators(generator, batch)
                and not (torch.is_grad_enabled() and model_output.requires_grad)):
            policy["prediction"] = PREDICTION_CODES[prediction_type]
            return _sample_with_generator_cpu(model_output, sample, alpha_t, alpha_prev, generator, policy)
        noise = _randn_like_diffusers(sample.shape, generator, sample.device, model_output.dtype)
    seed = None
    if prev_sample is None and noise is None:
        seed = int(torch.randint(0, _MAX_INT64, (), dtype=torch.int64))
    return _dispatch_step(model_output, sample, alpha_t, alpha_prev, prev_sample, noise, seed, 0, sample.dtype,
                          prediction_type, policy, backend)


# The flow-matching SDE step (Flow-GRPO) lives in ddpo_fast.flow_ops, which imports this module's
# checks; its public functions are attributes of this module too, loaded on first use (PEP 562), so
# that importing either module first works.
_FLOW_OPS = ("flow_sde_step_with_logprob", "flow_sde_step_logprob", "flow_sde_ppo_loss")


def __getattr__(name: str):
    if name in _FLOW_OPS:
        from ddpo_fast import flow_ops

        return getattr(flow_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
