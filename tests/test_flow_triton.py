"""The Triton backend of the flow SDE ops (ddpo_fast.kernels.flow_sde) against the float64 reference,
through the public API with use_backend("triton"). Without CUDA the kernels run on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported), so the cases are
few and small: the interpreter costs per program, not per element."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from ddpo_fast import flow_reference as fref  # noqa: E402
from ddpo_fast import ops  # noqa: E402
from ddpo_fast.backends import _C  # noqa: E402
from ddpo_fast.backends import use_backend  # noqa: E402
from flow_cases import SIGMA_MAX, make_inputs, reference64, rel_err, sigmas  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def triton_backend():
    with use_backend("triton"):
        yield


_ref = reference64


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("cfg", [None, 4.5])
def test_step_matches_reference(sde_type, cfg):
    batch, shape = 3, (3, 5, 7)  # N = 105: samples start inside Philox blocks
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg is not None, device=DEVICE)
    s, sp = sigmas(batch, device=DEVICE)
    kwargs = dict(sde_type=sde_type, guidance_scale=cfg)
    for noise_kwargs in (dict(noise=noise), dict(seed=9, offset=2)):
        out = ops.flow_sde_step_logprob(model_output, sample, s, sp, sigma_max=SIGMA_MAX, return_mean=True,
                                        **kwargs, **noise_kwargs)
        ref_prev, _, ref_mean, ref_std = _ref(model_output, sample, s, sp, **kwargs, **noise_kwargs)
        assert rel_err(out.prev_sample, ref_prev) < 1e-6
        assert rel_err(out.prev_sample_mean, ref_mean) < 1e-6
        assert rel_err(out.std_dev_t, ref_std) < 1e-6
        _, ref_lp, _, _ = _ref(model_output, sample, s, sp, prev_sample=out.prev_sample, **kwargs)
        assert torch.allclose(out.log_prob.double(), ref_lp, rtol=1e-5, atol=1e-5)


def test_same_noise_as_the_cpu_kernels():
    """The Triton and C++ kernels draw the same Philox stream (both the DDIM kernels')."""
    batch, shape = 2, (3, 5, 7)
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=False)
    s, sp = sigmas(batch, start=1)
    triton_out = ops.flow_sde_step_logprob(model_output.to(DEVICE), sample.to(DEVICE), s.to(DEVICE), sp.to(DEVICE),
                                           seed=4, offset=1, sigma_max=SIGMA_MAX)
    with use_backend("reference"):
        ref_out = ops.flow_sde_step_logprob(model_output, sample, s, sp, seed=4, offset=1, sigma_max=SIGMA_MAX)
    assert torch.allclose(triton_out.prev_sample.cpu(), ref_out.prev_sample, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_log_prob_is_of_the_rounded_prev_sample(out_dtype):
    batch, shape = 3, (4, 8, 8)
    model_output, sample, _ = make_inputs(batch, shape, out_dtype, cfg=False, device=DEVICE)
    s, sp = torch.full((batch,), 0.06, device=DEVICE), torch.full((batch,), 0.04, device=DEVICE)
    out = ops.flow_sde_step_logprob(model_output, sample, s, sp, seed=11)
    assert out.prev_sample.dtype == out_dtype
    again = ops.flow_sde_step_logprob(model_output, sample, s, sp, prev_sample=out.prev_sample)
    assert torch.equal(out.log_prob, again.log_prob)
    _, ref_lp, _, _ = _ref(model_output, sample, s, sp, prev_sample=out.prev_sample)
    assert torch.allclose(out.log_prob.double(), ref_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_ppo_loss_and_gradients(sde_type):
    batch, shape = 3, (4, 5, 6)
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg=True, device=DEVICE)
    s, sp = sigmas(batch, device=DEVICE)
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=2.0)
    prev, old, _, _ = fref.flow_sde_step(model_output, sample, s, sp, noise=noise, **kwargs)
    old = old + torch.tensor([2e-4, -5e-5, 0.0], device=DEVICE)
    adv = torch.tensor([1.5, -0.7, 6.0], device=DEVICE)
    loss_kwargs = dict(clip_range=1e-4, adv_clip_max=5.0, **kwargs)
    m = model_output.clone().requires_grad_()
    loss, stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, **loss_kwargs)
    loss.backward()
    m_ref = model_output.double().requires_grad_()
    ref_loss, ref_stats = fref.flow_sde_ppo_loss(m_ref, sample.double(), prev.double(), s.double(), sp.double(),
                                                 old.double(), adv.double(), **loss_kwargs)
    ref_loss.backward()
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats["approx_kl"].double(), ref_stats["approx_kl"], rtol=1e-4, atol=1e-9)
    assert stats["clipfrac"].item() == pytest.approx(ref_stats["clipfrac"].item())
    assert rel_err(m.grad, m_ref.grad) < 1e-5
    # The step's gradient through prev_sample, log_prob and the mean.
    w = [torch.randn(sample.shape, device=DEVICE), torch.randn(batch, device=DEVICE),
         torch.randn(sample.shape, device=DEVICE)]
    m = model_output.clone().requires_grad_()
    out = ops.flow_sde_step_logprob(m, sample, s, sp, noise=noise, return_mean=True, **kwargs)
    sum((wi * t).sum() for wi, t in zip(w, out[:3])).backward()
    m_ref = model_output.double().requires_grad_()
    ref = fref.flow_sde_step(m_ref, sample.double(), s.double(), sp.double(), noise=noise.double(), **kwargs)
    sum((wi.double() * t).sum() for wi, t in zip(w, ref[:3])).backward()
    assert rel_err(m.grad, m_ref.grad) < 1e-5


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_kl_penalty(sde_type):
    """flow_sde_ppo_loss with reference_output: loss (+ kl_beta mean KL), stats["kl"] and the gradient
    (the backward kernel's KL term) against float64; the batch has every step kind (cps' last step has
    std 0: KL 0). With the reference itself: kl exactly 0 and the gradient without the penalty."""
    batch, shape = 4, (4, 5, 6)
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg=True, device=DEVICE)
    s, sp = sigmas(batch, device=DEVICE)
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=2.0)
    prev, old, _, _ = fref.flow_sde_step(model_output, sample, s, sp, noise=noise, **kwargs)
    g = torch.Generator().manual_seed(3)
    reference_output = model_output + 0.1 * torch.randn(model_output.shape, generator=g).to(DEVICE)
    new = model_output + 0.02 * torch.randn(model_output.shape, generator=g).to(DEVICE)
    adv = torch.tensor([1.5, -0.7, 6.0, 0.3], device=DEVICE)
    loss_kwargs = dict(clip_range=1e-2, adv_clip_max=5.0, **kwargs)
    m = new.clone().requires_grad_()
    loss, stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, reference_output=reference_output,
                                        kl_beta=0.7, **loss_kwargs)
    (0.5 * loss).backward()
    m_ref = new.double().requires_grad_()
    ref_loss, ref_stats = fref.flow_sde_ppo_loss(m_ref, sample.double(), prev.double(), s.double(), sp.double(),
                                                 old.double(), adv.double(), reference_output=reference_output.double(),
                                                 kl_beta=0.7, **loss_kwargs)
    (0.5 * ref_loss).backward()
    assert ref_stats["kl"] > 1e-4
    assert torch.allclose(stats["kl"].double(), ref_stats["kl"], rtol=1e-5, atol=1e-9)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(m.grad, m_ref.grad) < 1e-5
    results = []
    for penalty in ({}, dict(reference_output=new.clone(), kl_beta=2.0)):
        m = new.clone().requires_grad_()
        loss, stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, **loss_kwargs, **penalty)
        loss.backward()
        results.append((loss, stats, m.grad))
    assert results[1][1]["kl"] == 0
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])


@pytest.mark.skipif(_C is None or torch.cuda.is_available(), reason="compares with the C++ CPU kernels on CPU tensors")
def test_bf16_gradient_is_rounded_like_the_cpu_kernels():
    batch, shape = 2, (4, 5, 6)
    model_output, sample, noise = make_inputs(batch, shape, torch.bfloat16, cfg=False)
    s, sp = sigmas(batch)
    prev = fref.flow_sde_step(model_output, sample, s, sp, noise=noise, sigma_max=SIGMA_MAX)[0]
    grads = {}
    for backend in ("triton", "cpu"):
        with use_backend(backend):
            m = model_output.clone().requires_grad_()
            ops.flow_sde_step_logprob(m, sample, s, sp, prev_sample=prev, sigma_max=SIGMA_MAX).log_prob.sum().backward()
            grads[backend] = m.grad
    assert grads["triton"].dtype == torch.bfloat16
    assert (grads["triton"].float() - grads["cpu"].float()).abs().max() <= 1e-2 * grads["cpu"].float().abs().max()
