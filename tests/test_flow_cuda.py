"""The CUDA and Triton backends of the flow SDE ops on a GPU against the float64 reference and the
CPU kernels (the same Philox stream). Skips without a GPU; on machines with nvcc and no GPU the
CUDA sources are still compiled (tests/test_build.py checks the extension was built with them)."""
import pytest
import torch

from ddpo_fast import flow_reference as fref
from ddpo_fast import ops
from ddpo_fast.backends import _C, cuda_kernels_built, use_backend
from flow_cases import HALF, SHAPES, SIGMA_MAX, make_inputs, rel_err, sigmas

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif(not cuda_kernels_built(), reason="built without CUDA")),
            "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("cfg", [None, 4.5])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", SHAPES)
def test_step_ppo_and_gradient(backend, sde_type, cfg, dtype, shape):
    batch = 3
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg is not None, device="cuda")
    s, sp = sigmas(batch, device="cuda")
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=cfg)
    with use_backend(backend):
        out = ops.flow_sde_step_logprob(model_output, sample, s, sp, seed=5, offset=1, return_mean=True, **kwargs)
        m = model_output.clone().requires_grad_()
        loss, stats = ops.flow_sde_ppo_loss(m, sample, out.prev_sample, s, sp, out.log_prob + 1e-4,
                                            torch.tensor([1.0, -2.0, 0.5], device="cuda"), clip_range=1e-4,
                                            adv_clip_max=5.0, **kwargs)
        loss.backward()
    assert out.prev_sample.dtype == dtype
    with use_backend("cpu"):  # the same Philox stream on the CPU kernels
        cpu = ops.flow_sde_step_logprob(model_output.cpu(), sample.cpu(), s.cpu(), sp.cpu(), seed=5, offset=1,
                                        return_mean=True, **kwargs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out.prev_sample.cpu(), cpu.prev_sample) < tol
    assert rel_err(out.prev_sample_mean.cpu(), cpu.prev_sample_mean) < 1e-5
    ref = fref.flow_sde_step(model_output.double(), sample.double(), s.double(), sp.double(),
                             prev_sample=out.prev_sample.double(), **kwargs)
    assert torch.allclose(out.log_prob.double(), ref[1], rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.std_dev_t.double(), ref[3], rtol=1e-6)
    m_ref = model_output.double().requires_grad_()
    ref_loss, _ = fref.flow_sde_ppo_loss(m_ref, sample.double(), out.prev_sample.double(), s.double(), sp.double(),
                                         out.log_prob.double() + 1e-4, torch.tensor([1.0, -2.0, 0.5], device="cuda",
                                         dtype=torch.float64), clip_range=1e-4, adv_clip_max=5.0, **kwargs)
    ref_loss.backward()
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(m.grad, m_ref.grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.isfinite(stats["approx_kl"]).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, SHAPES[1]), (torch.bfloat16, SHAPES[0])])
def test_kl_penalty(backend, sde_type, dtype, shape):
    """flow_sde_ppo_loss with reference_output against float64 (the batch's last step kind has cps
    std 0: KL 0); with the reference itself, kl exactly 0 and the gradient without the penalty."""
    batch = 4
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg=True, device="cuda")
    s, sp = sigmas(batch, device="cuda")
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=4.5)
    prev, old, _, _ = fref.flow_sde_step(model_output.double(), sample.double(), s.double(), sp.double(),
                                         noise=noise.double(), **kwargs)
    prev, old = prev.to(dtype), old.float()
    g = torch.Generator().manual_seed(2)
    reference_output = (model_output.float() + 0.1 * torch.randn(model_output.shape, generator=g).cuda()).to(dtype)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], device="cuda")
    loss_kwargs = dict(clip_range=1e-2, adv_clip_max=5.0, **kwargs)
    with use_backend(backend):
        m = model_output.clone().requires_grad_()
        loss, stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, reference_output=reference_output,
                                            kl_beta=0.7, **loss_kwargs)
        (0.5 * loss).backward()
        results = []
        for penalty in ({}, dict(reference_output=model_output.clone(), kl_beta=2.0)):
            m0 = model_output.clone().requires_grad_()
            loss0, stats0 = ops.flow_sde_ppo_loss(m0, sample, prev, s, sp, old, adv, **loss_kwargs, **penalty)
            loss0.backward()
            results.append((loss0, stats0, m0.grad))
    m_ref = model_output.double().requires_grad_()
    ref_loss, ref_stats = fref.flow_sde_ppo_loss(m_ref, sample.double(), prev.double(), s.double(), sp.double(),
                                                 old.double(), adv.double(), reference_output=reference_output.double(),
                                                 kl_beta=0.7, **loss_kwargs)
    (0.5 * ref_loss).backward()
    assert ref_stats["kl"] > 1e-4
    assert torch.allclose(stats["kl"].double(), ref_stats["kl"], rtol=1e-5, atol=1e-9)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(m.grad, m_ref.grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert results[1][1]["kl"].item() == 0
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_under_cuda_graph(backend):
    batch, shape = 2, SHAPES[1]
    model_output, sample, _ = make_inputs(batch, shape, torch.bfloat16, cfg=True, device="cuda")
    s, sp = sigmas(batch, device="cuda")
    with use_backend(backend):
        kwargs = dict(sigma_max=SIGMA_MAX, guidance_scale=4.5, seed=1)
        eager = ops.flow_sde_step_logprob(model_output, sample, s, sp, **kwargs)  # warm-up / compile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops.flow_sde_step_logprob(model_output, sample, s, sp, **kwargs)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(eager.prev_sample, captured.prev_sample) and torch.equal(eager.log_prob, captured.log_prob)


def test_cuda_entry_points_are_bound():
    if not cuda_kernels_built():
        pytest.skip("built without CUDA")
    assert hasattr(_C, "flow_forward_cuda") and hasattr(_C, "flow_backward_cuda")
