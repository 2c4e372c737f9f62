"""The flow SDE ops (Flow-GRPO's step, ddpo_fast.flow_ops) on CPU: the C++ kernels under every
compiled instruction-set variant against the float64 reference, the drop-in against Flow-GRPO's
formula on a diffusers FlowMatchEulerDiscreteScheduler, gradients, the rounding property,
torch.library registration, torch.compile and bad-input errors."""
import math

import pytest
import torch

from ddpo_fast import flow_ops, ops, reference  # flow_ops registers the torch.ops.ddpo_fast.flow_sde_* ops
from ddpo_fast import flow_reference as fref
from ddpo_fast.backends import _C, use_backend
from flow_cases import HALF, SHAPES, SIGMA_MAX, flow_grpo_step, make_inputs, reference64, rel_err, sigmas

pytestmark = pytest.mark.skipif(_C is None, reason="ddpo_fast._C is not built")

ISAS = _C.supported_cpu_isas() if _C is not None else []
SDE_TYPES = ["sde", "cps"]


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    previous = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    with use_backend("cpu"):
        yield request.param
    _C.set_cpu_isa(previous)


@pytest.fixture
def cpu_backend():
    with use_backend("cpu"):
        yield


_ref = reference64


# ---- Against the float64 reference ---------------------------------------------------------------


@pytest.mark.parametrize("batch,shape", [(1, SHAPES[1]), (3, SHAPES[0]), (7, SHAPES[0])])
@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("cfg", [None, 4.5])
def test_step_matches_reference_fp32(cpu_isa, batch, shape, sde_type, cfg):
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg is not None, seed=batch)
    s, sp = sigmas(batch, start=batch)
    kwargs = dict(noise_level=0.7, sde_type=sde_type, guidance_scale=cfg)
    for noise_kwargs in (dict(noise=noise), dict(seed=123, offset=4)):
        out = ops.flow_sde_step_logprob(model_output, sample, s, sp, sigma_max=SIGMA_MAX, return_mean=True,
                                        **kwargs, **noise_kwargs)
        ref_prev, ref_lp, ref_mean, ref_std = _ref(model_output, sample, s, sp, **kwargs, **noise_kwargs)
        assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32
        assert rel_err(out.prev_sample, ref_prev) < 1e-6
        assert rel_err(out.prev_sample_mean, ref_mean) < 1e-6
        assert rel_err(out.std_dev_t, ref_std) < 1e-6
        # log_prob of the returned value (the fp32 x'), judged against the reference on it.
        _, ref_lp_of_returned, _, _ = _ref(model_output, sample, s, sp, prev_sample=out.prev_sample, **kwargs)
        assert torch.allclose(out.log_prob.double(), ref_lp_of_returned, rtol=1e-5, atol=1e-5)
        assert torch.allclose(out.log_prob.double(), ref_lp, rtol=1e-4, atol=1e-4)


def test_kernel_noise_is_the_ddim_philox_stream(cpu_backend):
    """The in-kernel noise is reference.philox_normal (the DDIM ops' stream) at element b*N + i."""
    batch, shape = 3, (3, 5, 7)  # N = 105, not a multiple of 4: samples start inside Philox blocks
    model_output, sample, _ = make_inputs(batch, shape, torch.float64, cfg=False)
    s, sp = sigmas(batch, start=1, dtype=torch.float64)
    out = ops.flow_sde_step_logprob(model_output, sample, s, sp, sigma_max=SIGMA_MAX, seed=7, offset=3,
                                    return_mean=True)
    std = fref.flow_sde_std(s, sp, 0.7, "sde", SIGMA_MAX)
    scale = (std * torch.sqrt(s - sp)).reshape(-1, 1, 1, 1)
    z = (out.prev_sample - out.prev_sample_mean) / scale
    expected = reference.philox_normal(z.numel(), 7, 3).reshape(z.shape)
    assert torch.allclose(z, expected, atol=2e-5)  # the kernels' float32 Box-Muller polynomials


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_step_half_inputs(cpu_isa, dtype, sde_type):
    batch, shape = 3, SHAPES[0]
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg=True)
    s, sp = sigmas(batch)
    kwargs = dict(sde_type=sde_type, guidance_scale=3.0)
    out = ops.flow_sde_step_logprob(model_output, sample, s, sp, sigma_max=SIGMA_MAX, noise=noise, **kwargs)
    ref_prev, _, _, _ = _ref(model_output, sample, s, sp, noise=noise, **kwargs)
    # Plain PyTorch in the inputs' precision (what eager code without the fp32 upcast would do).
    plain_prev = _plain_in_dtype(model_output, sample, s, sp, noise, dtype, **kwargs)
    assert out.prev_sample.dtype == dtype
    assert rel_err(out.prev_sample, ref_prev) <= 2 * rel_err(plain_prev, ref_prev) + 1e-6
    _, ref_lp, _, _ = _ref(model_output, sample, s, sp, prev_sample=out.prev_sample, **kwargs)
    assert out.log_prob.dtype == torch.float32
    assert torch.allclose(out.log_prob.double(), ref_lp, rtol=1e-5, atol=1e-5)


def _plain_in_dtype(model_output, sample, s, sp, noise, dtype, sde_type, guidance_scale):
    """The step computed entirely in `dtype` (what the formula gives without the fp32 upcast)."""
    v = reference.apply_guidance(model_output, guidance_scale)
    view = (-1, 1, 1, 1)
    s, sp = s.to(dtype).view(view), sp.to(dtype).view(view)
    dt = sp - s
    if sde_type == "sde":
        std = torch.sqrt(s / (1 - torch.where(s == 1, torch.tensor(SIGMA_MAX, dtype=dtype), s))) * 0.7
        mean = sample * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        return mean + std * torch.sqrt(-dt) * noise
    std = sp * math.sin(0.7 * math.pi / 2)
    mean = (sample - s * v) * (1 - sp) + (sample + v * (1 - s)) * torch.sqrt((sp**2 - std**2).clamp(min=0))
    return mean + std * noise


@pytest.mark.parametrize("out_dtype", HALF)
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_is_of_the_rounded_prev_sample(cpu_isa, out_dtype, sde_type):
    batch, shape = 7, SHAPES[0]
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=False)
    s, sp = torch.full((batch,), 0.06), torch.full((batch,), 0.04)  # a late step: small noise
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type)
    out = ops.flow_sde_step_logprob(model_output, sample, s, sp, seed=11, out_dtype=out_dtype, **kwargs)
    assert out.prev_sample.dtype == out_dtype
    # What training recomputes from the stored value: the first PPO ratio is exactly 1.
    again = ops.flow_sde_step_logprob(model_output, sample, s, sp, prev_sample=out.prev_sample, **kwargs)
    assert torch.equal(out.log_prob, again.log_prob)
    loss, stats = ops.flow_sde_ppo_loss(model_output, sample, out.prev_sample, s, sp, out.log_prob,
                                        torch.ones(batch), clip_range=1e-4, adv_clip_max=5.0, **kwargs)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0 and loss.item() == -1.0
    unrounded = ops.flow_sde_step_logprob(model_output, sample, s, sp, seed=11, **kwargs)
    assert torch.equal(unrounded.prev_sample.to(out_dtype), out.prev_sample)
    # ... and differs from the log-prob of the unrounded value: for sde by more than a PPO clip range
    # (cps's log-prob has no 1 / std^2 scale, so the difference is small but there).
    assert (unrounded.log_prob - out.log_prob).abs().max() > (1e-4 if sde_type == "sde" else 1e-7)


def test_deterministic_steps(cpu_backend):
    """sde with noise_level 0: x' = mean and log_prob 0 (flow_grpo: NaN); cps at the last step
    (sigma' = 0): x' = mean = x0 and log_prob 0."""
    batch, shape = 3, SHAPES[0]
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=False)
    s, sp = sigmas(batch)
    out = ops.flow_sde_step_logprob(model_output, sample, s, sp, sigma_max=SIGMA_MAX, noise_level=0.0, seed=1,
                                    return_mean=True)
    assert torch.equal(out.prev_sample, out.prev_sample_mean) and torch.equal(out.log_prob, torch.zeros(batch))
    last = torch.full((batch,), 0.05), torch.zeros(batch)
    out = ops.flow_sde_step_logprob(model_output, sample, *last, sde_type="cps", seed=1, return_mean=True)
    x0 = sample - 0.05 * model_output
    assert torch.allclose(out.prev_sample, x0, atol=1e-6) and torch.equal(out.log_prob, torch.zeros(batch))


# ---- The drop-in against Flow-GRPO's formula -----------------------------------------------------


def _scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    return scheduler


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_drop_in_matches_flow_grpo(backend, shift, sde_type):
    scheduler = _scheduler(shift)
    batch, shape = 4, SHAPES[0]
    velocity, sample, _ = make_inputs(batch, shape, torch.bfloat16, cfg=False, seed=3)
    timestep = scheduler.timesteps[[0, 3, 8, 9]]  # first (sigma == 1), middle, last steps
    with use_backend(backend):
        out = ops.flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, 0.7,
                                             generator=torch.Generator().manual_seed(5), sde_type=sde_type)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
    expected = flow_grpo_step(scheduler, velocity, timestep, sample, 0.7, noise=noise, sde_type=sde_type)
    assert out.std_dev_t.shape == expected[3].shape == (batch, 1, 1, 1)
    for actual, wanted in zip(out, expected):
        assert actual.dtype == torch.float32
        assert torch.allclose(actual, wanted, rtol=1e-5, atol=1e-5)
    # Training: the log-prob of the stored latent under the same velocity (prev_sample given).
    with use_backend(backend):
        again = ops.flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, 0.7, prev_sample=out[0],
                                               sde_type=sde_type)
    expected = flow_grpo_step(scheduler, velocity, timestep, sample, 0.7, prev_sample=out[0], sde_type=sde_type)
    for actual, wanted in zip(again, expected):
        assert torch.allclose(actual, wanted, rtol=1e-5, atol=1e-5)


def test_drop_in_fused_cfg_and_scalar_timestep(cpu_backend):
    scheduler = _scheduler(3.0)
    batch, shape = 2, SHAPES[0]
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=True)
    guided = reference.apply_guidance(model_output, 4.5)
    t = scheduler.timesteps[2]
    fused = ops.flow_sde_step_with_logprob(scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(1),
                                           guidance_scale=4.5)
    outside = ops.flow_sde_step_with_logprob(scheduler, guided, t.expand(batch), sample,
                                             generator=torch.Generator().manual_seed(1))
    for a, b in zip(fused, outside):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_drop_in_without_generator_is_reproducible_from_torch_seed(cpu_backend):
    scheduler = _scheduler(3.0)
    velocity, sample, _ = make_inputs(2, SHAPES[0], torch.float32, cfg=False)
    t = scheduler.timesteps[[1, 1]]
    torch.manual_seed(0)
    first = ops.flow_sde_step_with_logprob(scheduler, velocity, t, sample)
    torch.manual_seed(0)
    second = ops.flow_sde_step_with_logprob(scheduler, velocity, t, sample)
    third = ops.flow_sde_step_with_logprob(scheduler, velocity, t, sample)
    assert torch.equal(first.prev_sample, second.prev_sample)
    assert not torch.equal(first.prev_sample, third.prev_sample)


# ---- Gradients and the PPO loss ------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("cfg", [None, 2.5])
def test_step_gradients_match_reference(cpu_isa, sde_type, cfg):
    batch, shape = 3, SHAPES[0]
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg is not None)
    s, sp = sigmas(batch)
    weights = [torch.randn(sample.shape, dtype=torch.float64), torch.randn(batch, dtype=torch.float64),
               torch.randn(sample.shape, dtype=torch.float64)]
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=cfg, noise=noise)

    def objective(step_fn, m):
        prev, log_prob, mean, _ = step_fn(m)
        return sum((w * t.double()).sum() for w, t in zip(weights, (prev, log_prob, mean)))

    m = model_output.clone().requires_grad_()
    objective(lambda m: ops.flow_sde_step_logprob(m, sample, s, sp, return_mean=True, **kwargs), m).backward()
    m_ref = model_output.double().requires_grad_()
    objective(lambda m: fref.flow_sde_step(m, sample.double(), s.double(), sp.double(),
                                           **{**kwargs, "noise": noise.double()}), m_ref).backward()
    assert rel_err(m.grad, m_ref.grad) < 1e-5


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_gradcheck_float64(cpu_backend, sde_type):
    batch, shape = 2, (2, 3, 5)
    model_output, sample, noise = make_inputs(batch, shape, torch.float64, cfg=True)
    s, sp = sigmas(batch, start=1, dtype=torch.float64)
    prev = fref.flow_sde_step(model_output, sample, s, sp, sigma_max=SIGMA_MAX, noise=noise, sde_type=sde_type,
                              guidance_scale=2.0)[0]
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=2.0)

    def fn(m):  # log_prob and mean of the stored x', the quantities training differentiates
        out = ops.flow_sde_step_logprob(m, sample, s, sp, prev_sample=prev, return_mean=True, **kwargs)
        return out.log_prob, out.prev_sample_mean

    reference_output = model_output + 0.2 * torch.randn_like(model_output)
    old = torch.zeros(batch, dtype=torch.float64)

    def loss_with_kl(m):  # the loss with the KL penalty (its gradient made in the forward pass on CPU)
        return ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, torch.tensor([1.5, -0.7], dtype=torch.float64),
                                     clip_range=10.0, adv_clip_max=5.0, reference_output=reference_output,
                                     kl_beta=3.0, **kwargs)[0]

    for f in (fn, loss_with_kl):
        assert torch.autograd.gradcheck(f, (model_output.clone().requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("batch,cfg", [(1, None), (7, 4.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_loss_matches_reference(cpu_isa, sde_type, batch, cfg, dtype):
    shape = SHAPES[0]
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg is not None, seed=batch)
    s, sp = sigmas(batch)
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=cfg)
    prev = ops.flow_sde_step_logprob(model_output, sample, s, sp, noise=noise, **kwargs).prev_sample
    g = torch.Generator().manual_seed(batch)
    old = fref.flow_sde_step(model_output, sample, s, sp, prev_sample=prev, **kwargs)[1]
    old = old + 1e-4 * torch.randn(batch, generator=g)  # some ratios inside, some outside the clip range
    adv = 3 * torch.randn(batch, generator=g)
    loss_kwargs = dict(clip_range=1e-4, adv_clip_max=5.0, **kwargs)
    m = model_output.clone().requires_grad_()
    loss, stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, **loss_kwargs)
    (2.0 * loss).backward()  # a non-unit upstream gradient
    m_ref = model_output.double().requires_grad_()
    ref_loss, ref_stats = fref.flow_sde_ppo_loss(m_ref, sample.double(), prev.double(), s.double(), sp.double(),
                                                 old.double(), adv.double(), **loss_kwargs)
    (2.0 * ref_loss).backward()
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for name in ("approx_kl", "log_prob"):
        assert torch.allclose(stats[name].double(), ref_stats[name], rtol=1e-4, atol=1e-6), name
    assert stats["clipfrac"].item() == pytest.approx(ref_stats["clipfrac"].item())
    # bf16 gradients: the ppo derivative is exact, the rounding of the stored gradient is the error.
    assert rel_err(m.grad, m_ref.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_loss_gradient_equals_the_two_pass_one(cpu_isa, sde_type, dtype):
    """The CPU forward that also makes the gradient (eager training) gives the bits of the separate
    backward kernel (what a traced graph runs)."""
    batch, shape = 3, SHAPES[0]
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg=True)
    s, sp = sigmas(batch)
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=3.0)
    prev = ops.flow_sde_step_logprob(model_output, sample, s, sp, noise=noise, **kwargs).prev_sample
    old = fref.flow_sde_step(model_output, sample, s, sp, prev_sample=prev, **kwargs)[1] + 1e-5
    args = (sample, prev, s, sp, old, torch.tensor([1.0, -3.0, 0.5]))
    ppo = dict(clip_range=1e-4, adv_clip_max=5.0, **kwargs)
    reference_output = (model_output.float() + 0.1 * torch.randn(model_output.shape)).to(dtype)
    grads = []
    for penalty in ({}, dict(reference_output=reference_output, kl_beta=0.3)):  # without and with the KL penalty
        m_one = model_output.clone().requires_grad_()
        loss_one, _ = ops.flow_sde_ppo_loss(m_one, *args, **ppo, **penalty)
        (0.5 * loss_one).backward()
        m_two = model_output.clone().requires_grad_()
        loss_two, *_ = flow_ops._flow_ppo_loss_op(
            m_two, *args[:4], args[4].float(), args[5], 0.7, {"sde": 0, "cps": 1}[sde_type], SIGMA_MAX, 3.0, 1e-4,
            5.0, False, **penalty)
        (0.5 * loss_two).backward()
        assert torch.equal(loss_one, loss_two) and torch.equal(m_one.grad, m_two.grad)
        grads.append(m_one.grad)
    assert not torch.equal(*grads)


# ---- torch.library registration, torch.compile ---------------------------------------------------


def _op_samples():
    batch, shape = 3, (4, 5, 7)
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg=True)
    s, sp = sigmas(batch)
    prev, old, _, _ = fref.flow_sde_step(model_output, sample, s, sp, sigma_max=SIGMA_MAX, noise=noise,
                                         guidance_scale=2.0)
    m = model_output.clone().requires_grad_()
    return {
        "flow_sde_step": (m, sample, s, sp, noise, 0, 0, 0.7, 0, SIGMA_MAX, 2.0, torch.float32, True),
        "flow_sde_step_philox_bf16": (m, sample, s, sp, None, 3, 1, 0.7, 1, 0.0, 2.0, torch.bfloat16, False),
        "flow_sde_log_prob": (m, sample, prev, s, sp, 0.7, 0, SIGMA_MAX, 2.0, True),
        "flow_sde_ppo_loss": (m, sample, prev, s, sp, old, torch.randn(batch), 0.7, 1, 0.0, 2.0, 0.01, 5.0, False),
        "flow_sde_ppo_loss_with_grad": (m, sample, prev, s, sp, old, torch.randn(batch), 0.7, 0, SIGMA_MAX, 2.0,
                                        0.01, 5.0, True),
        "flow_sde_backward": (torch.randn(sample.shape), None, torch.randn(batch), model_output, sample, prev, s, sp,
                              0.7, 0, SIGMA_MAX, 2.0),
        # The KL penalty: the loss op (its autograd through the backward op's KL term) and that op.
        "flow_sde_ppo_loss_kl": (m, sample, prev, s, sp, old, torch.randn(batch), 0.7, 0, SIGMA_MAX, 2.0, 0.01, 5.0,
                                 False, model_output + 0.1, 0.5),
        "flow_sde_backward_kl": (None, None, torch.randn(batch), model_output, sample, prev, s, sp, 0.7, 1, 0.0, 2.0,
                                 model_output - 0.1, torch.rand(batch)),
    }


@pytest.mark.parametrize("name", ["flow_sde_step", "flow_sde_step_philox_bf16", "flow_sde_log_prob",
                                  "flow_sde_ppo_loss", "flow_sde_ppo_loss_with_grad", "flow_sde_backward",
                                  "flow_sde_ppo_loss_kl", "flow_sde_backward_kl"])
def test_opcheck(cpu_backend, name):
    name = name.removesuffix("_kl").removesuffix("_philox_bf16").removesuffix("_with_grad")
    torch.library.opcheck(getattr(torch.ops.ddpo_fast, name).default, _op_samples()[name])


def test_torch_compile_fullgraph(cpu_backend):
    batch, shape = 2, SHAPES[0]
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg=True)
    s, sp = sigmas(batch)
    kwargs = dict(sigma_max=SIGMA_MAX, guidance_scale=3.0)
    prev, old, _, _ = fref.flow_sde_step(model_output, sample, s, sp, noise=noise, **kwargs)
    adv = torch.tensor([1.0, -2.0])

    reference_output = model_output + 0.1 * torch.randn(model_output.shape)

    def train_step(m):
        step = ops.flow_sde_step_logprob(m, sample, s, sp, seed=3, return_mean=True, **kwargs)
        loss, stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, clip_range=1e-4, adv_clip_max=5.0,
                                            **kwargs)
        kl_loss, kl_stats = ops.flow_sde_ppo_loss(m, sample, prev, s, sp, old, adv, clip_range=1e-4, adv_clip_max=5.0,
                                                  reference_output=reference_output, kl_beta=0.5, **kwargs)
        return (loss + 3 * kl_loss + step.log_prob.sum() + step.prev_sample_mean.mean(), stats["approx_kl"],
                kl_stats["kl"])

    m_eager = model_output.clone().requires_grad_()
    eager_loss, eager_kl, eager_kl_ref = train_step(m_eager)
    eager_loss.backward()
    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    m_compiled = model_output.clone().requires_grad_()
    compiled_loss, compiled_kl, compiled_kl_ref = compiled(m_compiled)
    compiled_loss.backward()
    assert torch.allclose(eager_loss, compiled_loss) and torch.allclose(eager_kl, compiled_kl)
    assert eager_kl_ref > 0 and torch.allclose(eager_kl_ref, compiled_kl_ref)
    assert torch.allclose(m_eager.grad, m_compiled.grad)


# ---- The KL penalty to a reference model (reference_output, kl_beta) -------------------------------


def kl_inputs(batch, sde_type, cfg, dtype, seed=0):
    """A stored step, a policy moved away from the one that sampled it and a reference output near it;
    the batch cycles through the step kinds (sigma == 1, the last step with its cps std 0, ...)."""
    model_output, sample, noise = make_inputs(batch, SHAPES[0], dtype, cfg is not None, seed=seed)
    s, sp = sigmas(batch, start=seed)
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=cfg)
    prev, old, _, _ = fref.flow_sde_step(model_output, sample, s, sp, noise=noise, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    new_output = (model_output.float() + 0.02 * torch.randn(model_output.shape, generator=g)).to(dtype)
    reference_output = (model_output.float() + 0.1 * torch.randn(model_output.shape, generator=g)).to(dtype)
    return new_output, (sample, prev, s, sp, old, 3 * torch.randn(batch, generator=g)), reference_output, kwargs


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("batch,cfg,dtype", [(1, None, torch.float32), (7, 4.5, torch.bfloat16)])
def test_kl_penalty_matches_reference(cpu_isa, sde_type, batch, cfg, dtype):
    """loss = PPO + kl_beta mean KL, stats["kl"] and the gradient (the KL's included) against float64."""
    new_output, args, reference_output, kwargs = kl_inputs(batch, sde_type, cfg, dtype, seed=batch)
    kwargs = dict(clip_range=0.01, adv_clip_max=2.0, reference_output=reference_output, kl_beta=0.7, **kwargs)
    m = new_output.clone().requires_grad_()
    loss, stats = ops.flow_sde_ppo_loss(m, *args, **kwargs)
    (0.5 * loss).backward()
    m_ref = new_output.double().requires_grad_()
    ref_loss, ref_stats = fref.flow_sde_ppo_loss(m_ref, *(t.double() for t in args),
                                                 **{**kwargs, "reference_output": reference_output.double()})
    (0.5 * ref_loss).backward()
    assert ref_stats["kl"] > 1e-4 and not stats["kl"].requires_grad
    assert abs(stats["kl"].item() - ref_stats["kl"].item()) <= 1e-5 * ref_stats["kl"].item()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert rel_err(m.grad, m_ref.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_kl_penalty_is_zero_for_the_reference_itself(cpu_backend):
    """reference_output == model_output: kl is exactly 0, the loss and its gradient those without it."""
    for sde_type, dtype in [("sde", torch.float32), ("cps", torch.float32), ("sde", torch.bfloat16)]:
        new_output, args, _, kwargs = kl_inputs(5, sde_type, 2.0, dtype)
        results = []
        for penalty in ({}, dict(reference_output=new_output.clone(), kl_beta=2.0)):
            m = new_output.clone().requires_grad_()
            loss, stats = ops.flow_sde_ppo_loss(m, *args, clip_range=0.01, adv_clip_max=2.0, **kwargs, **penalty)
            loss.backward()
            results.append((loss, stats, m.grad))
        (loss, stats, grad), (kl_loss, kl_stats, kl_grad) = results
        assert "kl" not in stats and kl_stats["kl"] == 0
        assert torch.equal(loss, kl_loss) and torch.equal(grad, kl_grad)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_kl_penalty_matches_a_monte_carlo_estimate(cpu_backend, sde_type):
    """stats["kl"] against E over x' ~ policy of log p(x') - log p_ref(x'), from steps sampled with the
    fused step op. The cps log_prob is -mean (x' - mean)^2 (no 1 / (2 std^2)): its difference is
    divided by 2 std^2 per sample."""
    batch, draws, shape = 3, 2000, (4, 5, 7)
    g = torch.Generator().manual_seed(5)
    out = torch.randn((2 * batch,) + shape, generator=g, dtype=torch.float64)
    ref = out + 0.3 * torch.randn(out.shape, generator=g, dtype=torch.float64)
    x = torch.randn((batch,) + shape, generator=g, dtype=torch.float64)
    s, sp = sigmas(batch, dtype=torch.float64)  # the first three step kinds: no cps step with std 0
    kwargs = dict(sigma_max=SIGMA_MAX, sde_type=sde_type, guidance_scale=3.0, noise_level=0.7)
    zeros = torch.zeros(batch, dtype=torch.float64)
    _, stats = ops.flow_sde_ppo_loss(out, x, x, s, sp, zeros, zeros, clip_range=0.1, adv_clip_max=1.0,
                                     reference_output=ref, **kwargs)

    def repeat(t):  # `draws` copies of the batch, as one batch (CFG halves kept apart)
        halves = t.chunk(2) if t.shape[0] == 2 * batch else (t,)
        return torch.cat([h.repeat((draws,) + (1,) * (t.dim() - 1)) for h in halves])

    out_r, ref_r, x_r, s_r, sp_r = map(repeat, (out, ref, x, s, sp))
    step = ops.flow_sde_step_logprob(out_r, x_r, s_r, sp_r, seed=7, **kwargs)
    log_prob_ref = ops.flow_sde_step_logprob(ref_r, x_r, s_r, sp_r, prev_sample=step.prev_sample, **kwargs).log_prob
    difference = step.log_prob - log_prob_ref
    if sde_type == "cps":
        difference = difference / (2 * step.std_dev_t**2)
    estimate = difference.mean()  # standard error ~0.6% of the KL here
    assert stats["kl"] > 0.05
    assert abs(stats["kl"].item() - estimate.item()) < 0.03 * stats["kl"].item()


# ---- Bad inputs ------------------------------------------------------------------------------------


def _good():
    model_output, sample, noise = make_inputs(2, (4, 5, 6), torch.float32, cfg=False)
    return model_output, sample, torch.tensor([0.6, 0.3]), torch.tensor([0.5, 0.2]), noise


def _step_error(**changes):
    model_output, sample, s, sp, _ = _good()
    args = dict(model_output=model_output, sample=sample, sigma=s, sigma_prev=sp)
    args.update(changes)
    positional = [args.pop(k) for k in ("model_output", "sample", "sigma", "sigma_prev")]
    return lambda: ops.flow_sde_step_logprob(*positional, **args)


BAD_STEP_INPUTS = {
    "model_output shape": (dict(model_output=torch.randn(2, 4, 5, 7)), ValueError, "model_output"),
    "odd batch with cfg": (dict(model_output=torch.randn(3, 4, 5, 6), guidance_scale=5.0), ValueError, "model_output"),
    "int dtype": (dict(sample=torch.ones(2, 4, 5, 6, dtype=torch.int32)), TypeError, "sample"),
    "non-contiguous": (dict(sample=torch.randn(2, 6, 5, 4).transpose(1, 3)), ValueError, "sample"),
    "sde_type": (dict(sde_type="ode"), ValueError, "sde_type"),
    "noise_level negative": (dict(noise_level=-0.1), ValueError, "noise_level"),
    "noise_level nan": (dict(noise_level=float("nan")), ValueError, "noise_level"),
    "noise_level above one for cps": (dict(noise_level=1.5, sde_type="cps"), ValueError, "noise_level"),
    "sigma batch": (dict(sigma=torch.tensor([0.3, 0.4, 0.5])), ValueError, "sigma"),
    "sigma zero": (dict(sigma=torch.tensor([0.0, 0.4]), sigma_prev=0.0), ValueError, "sigma"),
    "sigma above one": (dict(sigma=1.5), ValueError, "sigma"),
    "sigma_prev not below sigma": (dict(sigma_prev=torch.tensor([0.6, 0.1])), ValueError, "sigma_prev"),
    "sigma_prev negative": (dict(sigma_prev=-0.1), ValueError, "sigma_prev"),
    "sigma one without sigma_max": (dict(sigma=torch.tensor([1.0, 0.3])), ValueError, "sigma_max"),
    "sigma_max one": (dict(sigma_max=1.0), ValueError, "sigma_max"),
    "sigma int tensor": (dict(sigma=torch.tensor([1, 1])), TypeError, "sigma"),
    "noise shape": (dict(noise=torch.randn(2, 4, 5)), ValueError, "noise"),
    "noise and seed": (dict(noise=torch.randn(2, 4, 5, 6), seed=1), ValueError, "seed"),
    "seed and prev_sample": (dict(seed=1, prev_sample=torch.randn(2, 4, 5, 6)), ValueError, "seed"),
    "prev_sample shape": (dict(prev_sample=torch.randn(2, 4, 5, 7)), ValueError, "prev_sample"),
    "offset negative": (dict(offset=-1), ValueError, "offset"),
    "out_dtype int": (dict(out_dtype=torch.int64), TypeError, "out_dtype"),
    "guidance nan": (dict(guidance_scale=float("nan"), model_output=torch.randn(4, 4, 5, 6)), ValueError,
                     "guidance_scale"),
    "float64 mixed": (dict(model_output=torch.randn(2, 4, 5, 6, dtype=torch.float64)), TypeError, "float64"),
    "sample requires grad": (dict(sample=torch.randn(2, 4, 5, 6, requires_grad=True)), ValueError, "sample"),
    "sigma requires grad": (dict(sigma=torch.tensor([0.6, 0.3], requires_grad=True)), ValueError, "sigma"),
}


@pytest.mark.parametrize("case", list(BAD_STEP_INPUTS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_step_input_names_the_argument(case, backend):
    changes, error, name = BAD_STEP_INPUTS[case]
    with use_backend(backend), pytest.raises(error, match=name):
        _step_error(**changes)()


BAD_LOSS_INPUTS = {
    "old_log_prob shape": (dict(old_log_prob=torch.zeros(3)), ValueError, "old_log_prob"),
    "advantages dtype": (dict(advantages=torch.zeros(2, dtype=torch.int64)), TypeError, "advantages"),
    "clip_range zero": (dict(clip_range=0.0), ValueError, "clip_range"),
    "adv_clip_max negative": (dict(adv_clip_max=-1.0), ValueError, "adv_clip_max"),
    "prev_sample shape": (dict(prev_sample=torch.randn(2, 4, 5, 7)), ValueError, "prev_sample"),
    "prev_sample requires grad": (dict(prev_sample=torch.randn(2, 4, 5, 6, requires_grad=True)), ValueError,
                                  "prev_sample"),
    "sde_type": (dict(sde_type="SDE"), ValueError, "sde_type"),
    "sigma_prev above sigma": (dict(sigma_prev=0.9), ValueError, "sigma_prev"),
    # The KL penalty (the checks are the DDIM loss's, tests/test_ops.py has them all).
    "reference_output shape": (dict(reference_output=torch.randn(2, 4, 5, 7)), ValueError, "reference_output"),
    "reference_output requires grad": (dict(reference_output=torch.randn(2, 4, 5, 6, requires_grad=True)),
                                       ValueError, "reference_output"),
    "reference_output float64 mixed": (dict(reference_output=torch.randn(2, 4, 5, 6, dtype=torch.float64)),
                                       TypeError, "reference_output"),
    "kl_beta negative": (dict(reference_output=torch.randn(2, 4, 5, 6), kl_beta=-1.0), ValueError, "kl_beta"),
    "kl_beta without reference_output": (dict(kl_beta=0.1), ValueError, "kl_beta.*reference_output"),
}


@pytest.mark.parametrize("case", list(BAD_LOSS_INPUTS))
def test_bad_loss_input_names_the_argument(cpu_backend, case):
    changes, error, name = BAD_LOSS_INPUTS[case]
    model_output, sample, s, sp, noise = _good()
    args = dict(model_output=model_output, sample=sample, prev_sample=noise, sigma=s, sigma_prev=sp,
                old_log_prob=torch.zeros(2), advantages=torch.ones(2), clip_range=1e-4, adv_clip_max=5.0)
    args.update(changes)
    with pytest.raises(error, match=name):
        ops.flow_sde_ppo_loss(**args)


def test_scheduler_errors(cpu_backend):
    scheduler = _scheduler(3.0)
    velocity, sample, _ = make_inputs(2, (4, 5, 6), torch.float32, cfg=False)
    with pytest.raises(ValueError, match="timestep"):
        ops.flow_sde_step_with_logprob(scheduler, velocity, torch.tensor([123.4, 500.0]), sample)
    with pytest.raises(ValueError, match="timestep"):
        ops.flow_sde_step_with_logprob(scheduler, velocity, scheduler.timesteps[:3], sample)
    with pytest.raises(TypeError, match="timestep"):
        ops.flow_sde_step_with_logprob(scheduler, velocity, "t", sample)
    with pytest.raises(ValueError, match="generator"):
        ops.flow_sde_step_with_logprob(scheduler, velocity, scheduler.timesteps[:2], sample, prev_sample=sample,
                                       generator=torch.Generator())
    with pytest.raises(TypeError, match="scheduler"):
        ops.flow_sde_step_with_logprob(object(), velocity, scheduler.timesteps[:2], sample)


def test_core_rejects_null_pointers_instead_of_crashing():
    args = _C.FlowArgs()
    args.batch, args.numel = 1, 4
    with pytest.raises(ValueError, match="model_output"):
        _C.flow_forward_cpu(args)
    args.sde_type = 5
    with pytest.raises(ValueError, match="sde_type"):
        _C.flow_backward_cpu(args)


def test_either_module_can_be_imported_first():
    """ddpo_fast.flow_ops imports ddpo_fast.ops' checks and ops re-exports flow_ops' functions: a
    circular import unless one side is lazy. A fresh interpreter."""
    import subprocess
    import sys

    # flow_ops first (ops first is what every other test here does).
    code = "import ddpo_fast.flow_ops; from ddpo_fast.ops import flow_sde_step_with_logprob, flow_sde_ppo_loss"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_extension_without_flow_kernels_says_rebuild(cpu_backend, monkeypatch):
    """A _C built before the flow kernels existed: a clear error, not an AttributeError deep inside."""
    class OldExtension:
        __file__ = "old/_C.so"

    monkeypatch.setattr(flow_ops, "_C", OldExtension())
    model_output, sample, s, sp, _ = _good()
    with pytest.raises(RuntimeError, match="rebuild"):
        ops.flow_sde_step_logprob(model_output, sample, s, sp, seed=1)


def test_new_schedule_is_picked_up(cpu_backend):
    """Values derived per schedule (device copies, sigmas[1]) follow a new set_timesteps."""
    from ddpo_fast.flow_ops import scheduler_sigmas

    scheduler = _scheduler(3.0)
    for steps in (10, 4, 10):
        scheduler.set_timesteps(steps)
        sigma, sigma_prev, sigma_max = scheduler_sigmas(scheduler, scheduler.timesteps[1], 2, "cpu")
        assert torch.equal(sigma, scheduler.sigmas[[1, 1]]) and torch.equal(sigma_prev, scheduler.sigmas[[2, 2]])
        assert sigma_max == scheduler.sigmas[1].item()
