"""The fused ops on CPU (C++ kernels, every compiled instruction-set variant) against the float64
reference, plus the public API's contracts: drop-in equality with trl / diffusers, gradients,
torch.library registration, torch.compile, reproducibility and bad-input errors."""
import itertools
import math
import multiprocessing

import pytest
import torch

from ddpo_fast import ops, reference
from ddpo_fast.backends import _C, use_backend

pytestmark = pytest.mark.skipif(_C is None, reason="ddpo_fast._C is not built")

ISAS = _C.supported_cpu_isas() if _C is not None else []
SHAPES = [(4, 17, 23), (4, 64, 64)]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test under each compiled CPU variant (avx512 / avx2 / baseline)."""
    previous = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    with use_backend("cpu"):
        yield request.param
    _C.set_cpu_isa(previous)


@pytest.fixture
def cpu_backend():
    with use_backend("cpu"):
        yield


def random_alphas(batch, *, last_step=False, generator=None):
    """alpha_prod_t in (0.004, 0.999), alpha_prod_t_prev in [alpha_prod_t, 1) (or 1 at the last step)."""
    a = 0.004 + 0.995 * torch.rand(batch, generator=generator, dtype=torch.float64)
    p = a + (1 - a) * torch.rand(batch, generator=generator, dtype=torch.float64)
    if last_step:
        p = torch.ones(batch, dtype=torch.float64)
    return a.float(), p.float()


def make_inputs(batch, shape, dtype, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch if cfg else batch
    model_output = torch.randn((rows,) + shape, generator=g).to(dtype)
    sample = torch.randn((batch,) + shape, generator=g).to(dtype)
    noise = torch.randn((batch,) + shape, generator=g).to(dtype)
    return model_output, sample, noise


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def ulp(dtype):
    """Relative spacing of `dtype` just above 1."""
    return torch.finfo(dtype).eps


def spacing(values, dtype):
    """Distance between neighbouring `dtype` numbers around each value (subnormal floor included)."""
    _, exponent = torch.frexp(values.double())
    return torch.maximum(torch.ldexp(torch.ones_like(values.double()), exponent - 1) * ulp(dtype),
                         torch.full_like(values.double(), torch.finfo(dtype).smallest_normal * ulp(dtype)))


# ---- Philox noise stream -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123's published known-answer vectors for Philox4x32-10.
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_reference_philox_known_answers(counter, key, expected):
    block = counter[0] | (counter[1] << 32)
    block -= 2**64 if block >= 2**63 else 0  # the same bits as a signed int64
    out = reference.philox4x32(torch.tensor([block]), counter[2] | (counter[3] << 32), key[0] | (key[1] << 32))
    assert tuple(int(x) for x in out) == expected


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 17, 23)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 7), (2**40 + 3, 2**35 + 1)])
def test_kernel_noise_is_the_reference_philox_stream(cpu_isa, shape, seed, offset):
    # float64 everywhere, so z = (x' - mu) / sigma recovers the kernel's noise exactly enough.
    batch = shape[0]
    model_output, sample, _ = make_inputs(batch, shape[1:], torch.float64, cfg=False, seed=seed % 1000)
    a = torch.full((batch,), 0.3, dtype=torch.float64)
    p = torch.full((batch,), 0.5, dtype=torch.float64)
    prev, _ = ops.ddim_step_logprob(model_output, sample, a, p, seed=seed, offset=offset)
    mu, sigma = reference.ddim_mean(model_output, sample, a, p, 1.0)
    z = ((prev - mu) / sigma).reshape(-1)
    expected = reference.philox_normal(z.numel(), seed, offset)
    assert (z - expected).abs().max().item() < 1e-5


def test_noise_is_standard_normal(cpu_backend):
    batch, shape = 16, (4, 64, 64)
    model_output, sample, _ = make_inputs(batch, shape, torch.float64, cfg=False)
    a = torch.full((batch,), 0.3, dtype=torch.float64)
    p = torch.full((batch,), 0.5, dtype=torch.float64)
    prev, _ = ops.ddim_step_logprob(model_output, sample, a, p, seed=99)
    mu, sigma = reference.ddim_mean(model_output, sample, a, p, 1.0)
    z = ((prev - mu) / sigma).reshape(-1)
    n = z.numel()
    # Moments of N(0, 1) within 6 standard errors; tail mass beyond 3 sigma near 0.27%.
    assert abs(z.mean().item()) < 6 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 6 * math.sqrt(15 / n)
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 0.0006


def test_same_seed_same_noise_other_offset_other_noise(cpu_backend):
    model_output, sample, _ = make_inputs(3, (4, 17, 23), torch.float32, cfg=False)
    a, p = random_alphas(3)
    first = ops.ddim_step_logprob(model_output, sample, a, p, seed=5, offset=2)
    again = ops.ddim_step_logprob(model_output, sample, a, p, seed=5, offset=2)
    other = ops.ddim_step_logprob(model_output, sample, a, p, seed=5, offset=3)
    assert torch.equal(first.prev_sample, again.prev_sample) and torch.equal(first.log_prob, again.log_prob)
    assert (first.prev_sample != other.prev_sample).float().mean() > 0.99


def test_sampling_without_grad_equals_the_custom_op(cpu_backend):
    """Sampling under no_grad calls the kernel directly; with gradients it goes through the op."""
    model_output, sample, _ = make_inputs(3, (4, 17, 23), torch.float32, cfg=True)
    a, p = random_alphas(3)
    with torch.no_grad():
        direct = ops.ddim_step_logprob(model_output, sample, a, p, seed=8, guidance_scale=2.0, out_dtype=torch.bfloat16)
    through_op = ops.ddim_step_logprob(model_output.clone().requires_grad_(), sample, a, p, seed=8,
                                       guidance_scale=2.0, out_dtype=torch.bfloat16)
    assert through_op.log_prob.grad_fn is not None
    assert torch.equal(direct.prev_sample, through_op.prev_sample)
    assert torch.equal(direct.log_prob, through_op.log_prob.detach())


def test_results_do_not_depend_on_thread_count(cpu_backend):
    model_output, sample, _ = make_inputs(7, (4, 64, 64), torch.float32, cfg=True)
    a, p = random_alphas(7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.ddim_step_logprob(model_output, sample, a, p, seed=3, guidance_scale=4.0)
        assert _C.num_threads() == 1
        torch.set_num_threads(3)
        three = ops.ddim_step_logprob(model_output, sample, a, p, seed=3, guidance_scale=4.0)
        assert _C.num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.prev_sample, three.prev_sample) and torch.equal(one.log_prob, three.log_prob)


def _step_in_child(queue, model_output, sample, a, p):
    with use_backend("cpu"):
        queue.put(ops.ddim_step_logprob(model_output, sample, a, p, seed=1).log_prob.tolist())


def test_thread_pool_survives_fork(cpu_backend):
    # Large enough (>= 2**16 elements) to run on the thread pool, in the parent and in the child.
    model_output, sample, _ = make_inputs(7, (4, 64, 64), torch.float32, cfg=False)
    a, p = random_alphas(7)
    parent = ops.ddim_step_logprob(model_output, sample, a, p, seed=1).log_prob  # pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_step_in_child, args=(queue, model_output, sample, a, p))
    child.start()
    child_result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert child_result == parent.tolist()


# ---- Forward against the float64 reference -------------------------------------------------------


STEP_CASES = [
    (batch, shape, prediction, cfg, clip, step)
    for batch, shape, prediction, cfg, clip, step in itertools.product(
        [1, 3, 7], SHAPES, PREDICTIONS, [None, 7.5], [None, 1.0], ["first", "middle", "last"])
    if shape == SHAPES[0] or (batch == 3 and step == "middle")
]


def step_alphas(batch, step, generator):
    if step == "first":  # t = 981 of SD's schedule: alpha_prod_t ~ 0.0047
        return torch.full((batch,), 0.0047), torch.full((batch,), 0.0064)
    return random_alphas(batch, last_step=step == "last", generator=generator)


@pytest.mark.parametrize("batch,shape,prediction,cfg,clip,step", STEP_CASES)
def test_step_matches_reference_fp32(cpu_isa, batch, shape, prediction, cfg, clip, step):
    g = torch.Generator().manual_seed(batch * 100 + len(prediction))
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg is not None, seed=batch)
    a, p = step_alphas(batch, step, g)
    kwargs = dict(guidance_scale=cfg, prediction_type=prediction, clip_sample_range=clip)
    prev, log_prob = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise, **kwargs)
    ref_prev, ref_log_prob = reference.ddim_step(model_output.double(), sample.double(), a.double(), p.double(),
                                                 noise=noise.double(), **kwargs)
    assert prev.dtype == torch.float32 and log_prob.dtype == torch.float32
    assert rel_err(prev, ref_prev) < 1e-5
    assert rel_err(log_prob, ref_log_prob) < 1e-5 or (log_prob - ref_log_prob).abs().max() < 1e-5
    # Given prev_sample: the log-probability alone.
    _, given_log_prob = ops.ddim_step_logprob(model_output, sample, a, p, prev_sample=prev, **kwargs)
    assert torch.allclose(given_log_prob, log_prob, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cfg", [None, 5.0])
def test_step_half_inputs(cpu_isa, dtype, prediction, cfg):
    batch, shape = 3, (4, 17, 23)
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg is not None)
    a, p = random_alphas(batch)
    kwargs = dict(guidance_scale=cfg, prediction_type=prediction)
    prev, log_prob = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise, **kwargs)
    ref_prev, _ = reference.ddim_step(model_output.double(), sample.double(), a.double(), p.double(),
                                      noise=noise.double(), **kwargs)
    # Accumulating in fp32 leaves only the final rounding: within one spacing of the exact result
    # (plus fp32 error where mu and sigma z cancel), far inside the error of computing the step in
    # `dtype` as plain PyTorch code does.
    assert prev.dtype == dtype
    assert ((prev.double() - ref_prev).abs() <= spacing(ref_prev, dtype) + 1e-5).all()
    # log_prob is fp32 and is that of the value returned.
    _, ref_log_prob = reference.ddim_step(model_output.double(), sample.double(), a.double(), p.double(),
                                          prev_sample=prev.double(), **kwargs)
    assert log_prob.dtype == torch.float32
    assert rel_err(log_prob, ref_log_prob) < 1e-5


@pytest.mark.parametrize("out_dtype", HALF)
def test_log_prob_is_of_the_rounded_prev_sample(cpu_isa, out_dtype):
    batch, shape = 7, (4, 17, 23)
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=False)
    a, p = torch.full((batch,), 0.998), torch.full((batch,), 0.999)  # a late step: sigma ~ 0.02
    prev, log_prob = ops.ddim_step_logprob(model_output, sample, a, p, seed=11, out_dtype=out_dtype)
    assert prev.dtype == out_dtype
    # The log-probability that training will recompute from the stored value: the first PPO ratio is 1.
    _, recomputed = ops.ddim_step_logprob(model_output, sample, a, p, prev_sample=prev)
    assert torch.allclose(log_prob, recomputed, rtol=0, atol=2e-6)
    _, ref = reference.ddim_step(model_output.double(), sample.double(), a.double(), p.double(),
                                 prev_sample=prev.double())
    assert rel_err(log_prob, ref) < 1e-5
    unrounded, unrounded_log_prob = ops.ddim_step_logprob(model_output, sample, a, p, seed=11)
    assert torch.equal(unrounded.to(out_dtype), prev)
    # It differs from the log-probability of the unrounded value by more than a PPO clip range (1e-4).
    assert (unrounded_log_prob - log_prob).abs().max() > {torch.bfloat16: 1e-3, torch.float16: 1e-5}[out_dtype]


def test_deterministic_steps_have_log_prob_zero(cpu_backend):
    batch, shape = 3, (4, 17, 23)
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=False)
    a, p = random_alphas(batch)
    for eta, alpha_prev in ((0.0, p), (1.0, torch.ones(batch))):
        m = model_output.clone().requires_grad_()
        prev, log_prob = ops.ddim_step_logprob(m, sample, a, alpha_prev, eta=eta, seed=1)
        mu, sigma = reference.ddim_mean(model_output.double(), sample.double(), a.double(), alpha_prev.double(), eta)
        assert torch.equal(log_prob, torch.zeros(batch))
        assert rel_err(prev, mu) < 1e-6
        log_prob.sum().backward()
        assert torch.equal(m.grad, torch.zeros_like(m))


def test_mixed_sigma_zero_and_nonzero_in_one_batch(cpu_backend):
    model_output, sample, noise = make_inputs(3, (4, 17, 23), torch.float32, cfg=False)
    a = torch.tensor([0.2, 0.5, 0.7])
    p = torch.tensor([0.3, 1.0, 0.8])
    _, log_prob = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise)
    _, ref = reference.ddim_step(model_output.double(), sample.double(), a.double(), p.double(), noise=noise.double())
    assert log_prob[1] == 0 and log_prob[0] != 0 and log_prob[2] != 0
    assert rel_err(log_prob, ref) < 1e-5


# ---- Gradients ------------------------------------------------------------------------------------


GRAD_CASES = list(itertools.product([1, 3], PREDICTIONS, [None, 4.0], [None, 1.0]))


@pytest.mark.parametrize("batch,prediction,cfg,clip", GRAD_CASES)
def test_ddim_ppo_loss_matches_reference(cpu_isa, batch, prediction, cfg, clip):
    shape = (4, 17, 23)
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg is not None, seed=batch + 1)
    a, p = random_alphas(batch, generator=torch.Generator().manual_seed(batch))
    policy = dict(guidance_scale=cfg, prediction_type=prediction, clip_sample_range=clip)
    prev, old = reference.ddim_step(model_output, sample, a, p, noise=noise, **policy)
    # Perturb the policy so ratios spread around 1, some beyond the clip range.
    new_output = model_output + 0.02 * torch.randn_like(model_output)
    advantages = torch.randn(batch) * 3
    m = new_output.clone().requires_grad_()
    loss, stats = ops.ddim_ppo_loss(m, sample, prev, a, p, old, advantages, clip_range=0.01, adv_clip_max=2.0, **policy)
    loss.backward()
    m_ref = new_output.double().requires_grad_()
    ref_loss, ref_stats = reference.ddim_ppo_loss(m_ref, sample.double(), prev.double(), a.double(), p.double(),
                                                  old.double(), advantages.double(), clip_range=0.01,
                                                  adv_clip_max=2.0, **policy)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert rel_err(stats["log_prob"], ref_stats["log_prob"]) < 1e-5
    assert abs(stats["approx_kl"].item() - ref_stats["approx_kl"].item()) <= 1e-5 * max(1e-3, ref_stats["approx_kl"].item())
    assert abs(stats["clipfrac"].item() - ref_stats["clipfrac"].item()) < 1e-6
    assert m.grad.dtype == torch.float32
    assert rel_err(m.grad, m_ref.grad) < 1e-4 or m_ref.grad.abs().max() == 0


@pytest.mark.parametrize("dtype", HALF)
def test_ddim_ppo_loss_half_gradients(cpu_backend, dtype):
    batch, shape = 3, (4, 17, 23)
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg=True)
    a, p = random_alphas(batch)
    prev, old = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise, guidance_scale=3.0)
    advantages = torch.randn(batch)
    m = model_output.clone().requires_grad_()
    loss, _ = ops.ddim_ppo_loss(m, sample, prev, a, p, old, advantages, clip_range=1e-4, adv_clip_max=5.0,
                                guidance_scale=3.0)
    loss.backward()
    m_ref = model_output.double().requires_grad_()
    ref_loss, _ = reference.ddim_ppo_loss(m_ref, sample.double(), prev.double(), a.double(), p.double(), old.double(),
                                          advantages.double(), clip_range=1e-4, adv_clip_max=5.0, guidance_scale=3.0)
    ref_loss.backward()
    # Plain PyTorch computing this gradient in `dtype` would err by many ulps; we round once.
    assert m.grad.dtype == dtype
    assert rel_err(m.grad, m_ref.grad) < 2 * ulp(dtype)


@pytest.mark.parametrize("cfg", [None, 2.0])
def test_step_gradients_match_reference(cpu_isa, cfg):
    """Gradients of a sampled step through prev_sample and log_prob together, as in
    backpropagation through sampling."""
    batch, shape = 3, (4, 17, 23)
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg is not None)
    a, p = random_alphas(batch)
    weights = torch.randn((batch,) + shape)
    m = model_output.clone().requires_grad_()
    prev, log_prob = ops.ddim_step_logprob(m, sample, a, p, noise=noise, guidance_scale=cfg)
    ((prev * weights).sum() + 3 * log_prob.sum()).backward()
    m_ref = model_output.double().requires_grad_()
    ref_prev, ref_log_prob = reference.ddim_step(m_ref, sample.double(), a.double(), p.double(), noise=noise.double(),
                                                 guidance_scale=cfg)
    ((ref_prev * weights.double()).sum() + 3 * ref_log_prob.sum()).backward()
    assert rel_err(m.grad, m_ref.grad) < 1e-5


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_gradcheck_float64(cpu_backend, prediction):
    batch, shape = 2, (2, 3, 5)
    model_output, sample, noise = make_inputs(batch, shape, torch.float64, cfg=True)
    a = torch.tensor([0.3, 0.6], dtype=torch.float64)
    p = torch.tensor([0.4, 0.7], dtype=torch.float64)
    policy = dict(guidance_scale=2.0, prediction_type=prediction, clip_sample_range=1.5)
    prev, old = reference.ddim_step(model_output, sample, a, p, noise=noise, **policy)
    advantages = torch.tensor([1.5, -0.7], dtype=torch.float64)

    # The sampled x_{t-1}; its log_prob is differentiated with x_{t-1} detached (ddpo-pytorch's
    # convention), which is not the derivative gradcheck measures: test_step_gradients covers it.
    def step(m):
        return ops.ddim_step_logprob(m, sample, a, p, noise=noise, **policy).prev_sample

    def log_prob_of(m):
        return ops.ddim_step_logprob(m, sample, a, p, prev_sample=prev, **policy).log_prob

    def loss(m):
        return ops.ddim_ppo_loss(m, sample, prev, a, p, old, advantages, clip_range=0.5, adv_clip_max=5.0, **policy)[0]

    m = (model_output + 0.01 * torch.randn_like(model_output)).requires_grad_()
    for fn in (step, log_prob_of, loss):
        assert torch.autograd.gradcheck(fn, (m,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_ppo_clip_loss_matches_reference(cpu_backend):
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3, 7, 64):
        old = torch.randn(batch, generator=g)
        log_prob = (old + 0.05 * torch.randn(batch, generator=g)).requires_grad_()
        advantages = 4 * torch.randn(batch, generator=g)
        loss, stats = ops.ppo_clip_loss(log_prob, old, advantages, 0.02, 3.0)
        loss.backward()
        ref_log_prob = log_prob.detach().double().requires_grad_()
        ref_loss, ref_stats = reference.ppo_clip_loss(ref_log_prob, old.double(), advantages.double(), 0.02, 3.0)
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) < 1e-6
        assert abs(stats["approx_kl"].item() - ref_stats["approx_kl"].item()) < 1e-7
        assert abs(stats["clipfrac"].item() - ref_stats["clipfrac"].item()) < 1e-6
        assert torch.allclose(log_prob.grad.double(), ref_log_prob.grad, atol=1e-6)


def test_ppo_clip_loss_tie_rule_matches_torch_maximum(cpu_backend):
    # Ratios exactly at the clip boundary and inside it: torch.maximum splits ties, which sums to -A.
    old = torch.zeros(4, dtype=torch.float64)
    log_prob = torch.tensor([0.0, math.log(1.25), math.log(0.75), 0.1], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.float64)
    loss, _ = ops.ppo_clip_loss(log_prob, old, advantages, 0.25, 10.0)
    loss.backward()
    ref = log_prob.detach().clone().requires_grad_()
    reference.ppo_clip_loss(ref, old, advantages, 0.25, 10.0)[0].backward()
    assert torch.allclose(log_prob.grad, ref.grad, atol=1e-12)


# ---- torch.library registration, torch.compile ---------------------------------------------------


def _op_samples():
    batch, shape = 3, (4, 5, 7)
    model_output, sample, noise = make_inputs(batch, shape, torch.float32, cfg=True)
    a, p = random_alphas(batch)
    prev, old = reference.ddim_step(model_output, sample, a, p, noise=noise, guidance_scale=2.0)
    m = model_output.clone().requires_grad_()
    return {
        "ddim_step": (m, sample, a, p, noise, 0, 0, 1.0, 2.0, 0, None, False, torch.float32),
        "ddim_log_prob": (m, sample, prev, a, p, 1.0, 2.0, 1, 1.0, True),
        "ddim_ppo_loss": (m, sample, prev, a, p, old, torch.randn(batch), 1.0, 2.0, 2, None, False, 0.01, 5.0, False),
        "ddim_ppo_loss_with_grad": (m, sample, prev, a, p, old, torch.randn(batch), 1.0, 2.0, 2, None, False, 0.01,
                                    5.0, True),
        "ppo_clip_loss": (old.clone().requires_grad_(), old + 0.01, torch.randn(batch), 0.01, 5.0),
        "ddim_step_backward": (None, torch.randn(batch), model_output, sample, prev, a, p, 1.0, 2.0, 0, None, False),
        # The KL penalty: the loss op (its autograd through the backward op's KL term) and that op.
        "ddim_ppo_loss_kl": (m, sample, prev, a, p, old, torch.randn(batch), 1.0, 2.0, 2, 1.0, True, 0.01, 5.0, False,
                             model_output + 0.1, 0.5),
        "ddim_step_backward_kl": (None, torch.randn(batch), model_output, sample, prev, a, p, 1.0, 2.0, 0, None, False,
                                  model_output - 0.1, torch.rand(batch)),
    }


@pytest.mark.parametrize("name", ["ddim_step", "ddim_log_prob", "ddim_ppo_loss", "ddim_ppo_loss_with_grad",
                                  "ppo_clip_loss", "ddim_step_backward", "ddim_ppo_loss_kl", "ddim_step_backward_kl"])
def test_opcheck(cpu_backend, name):
    op = getattr(torch.ops.ddpo_fast, name.removesuffix("_kl").removesuffix("_with_grad")).default
    torch.library.opcheck(op, _op_samples()[name])


@pytest.mark.parametrize("cfg,clip", [(None, None), (3.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_loss_gradient_equals_the_two_pass_one(cpu_isa, cfg, clip, dtype):
    """On CPU the loss's forward pass also makes the gradient (for a unit upstream gradient). It is
    bit-identical to the separate backward kernel fed the same d loss / d log_prob; a non-unit
    upstream gradient (loss / accumulation steps in the trainers) scales it."""
    batch = 7
    model_output, sample, noise = make_inputs(batch, (4, 64, 64), dtype, cfg is not None)
    a, p = random_alphas(batch)
    prev, old = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise, guidance_scale=cfg,
                                      clip_sample_range=clip)
    advantages = torch.randn(batch)
    new_output = (model_output.float() + 0.05 * torch.randn(model_output.shape)).to(dtype)
    policy = (1.0, cfg, 0, clip, False)
    outputs = torch.ops.ddpo_fast.ddim_ppo_loss(new_output, sample, prev, a, p, old, advantages, *policy, 0.05, 2.0, True)
    dloss_dlogp, one_pass = outputs[4], outputs[5]
    two_pass = torch.ops.ddpo_fast.ddim_step_backward(None, dloss_dlogp, new_output, sample, prev, a, p, *policy)
    assert one_pass.abs().max() > 0
    assert torch.equal(one_pass, two_pass)
    # Through autograd, with upstream gradients 1 and 0.125.
    grads = []
    for upstream in (1.0, 0.125):
        m = new_output.clone().requires_grad_()
        loss, _ = ops.ddim_ppo_loss(m, sample, prev, a, p, old, advantages, clip_range=0.05, adv_clip_max=2.0,
                                    guidance_scale=cfg, clip_sample_range=clip)
        (upstream * loss).backward()
        grads.append(m.grad)
    assert torch.equal(grads[0], one_pass)
    assert torch.equal(grads[1], one_pass * 0.125)  # a power of two: exact in every dtype


def test_torch_compile_fullgraph(cpu_backend):
    batch, shape = 3, (4, 17, 23)
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=True)
    a, p = random_alphas(batch)
    advantages = torch.randn(batch)

    reference_output = model_output + 0.1 * torch.randn(model_output.shape)

    def train_step(m):
        prev, old = ops.ddim_step_logprob(m.detach(), sample, a, p, seed=3, offset=1, guidance_scale=2.0)
        loss, stats = ops.ddim_ppo_loss(m * 1.01, sample, prev, a, p, old, advantages, clip_range=0.01,
                                        adv_clip_max=5.0, guidance_scale=2.0)
        # With the KL penalty (its gradient through the separate backward kernel's KL term).
        kl_loss, kl_stats = ops.ddim_ppo_loss(m * 1.01, sample, prev, a, p, old, advantages, clip_range=0.01,
                                              adv_clip_max=5.0, guidance_scale=2.0,
                                              reference_output=reference_output, kl_beta=0.5)
        return loss + 3 * kl_loss, stats["approx_kl"], kl_stats["kl"]

    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    m_eager = model_output.clone().requires_grad_()
    m_compiled = model_output.clone().requires_grad_()
    eager_loss, eager_kl, eager_kl_ref = train_step(m_eager)
    compiled_loss, compiled_kl, compiled_kl_ref = compiled(m_compiled)
    eager_loss.backward()
    compiled_loss.backward()
    assert torch.allclose(eager_loss, compiled_loss) and torch.allclose(eager_kl, compiled_kl)
    assert eager_kl_ref > 0 and torch.allclose(eager_kl_ref, compiled_kl_ref)
    assert torch.allclose(m_eager.grad, m_compiled.grad)


# ---- The KL penalty to a reference model (reference_output, kl_beta) -------------------------------

KL_CASES = [  # batch, prediction, cfg, clip, dtype
    (1, "epsilon", None, None, torch.float32),
    (3, "v_prediction", 4.0, 1.0, torch.float32),
    (7, "sample", None, 1.0, torch.bfloat16),
    (3, "epsilon", 2.0, None, torch.float16),
]


def kl_inputs(batch, prediction, cfg, clip, dtype, shape=(4, 17, 23), seed=0):
    """A stored step, a policy moved away from the one that sampled it and a reference output near it."""
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg is not None, seed=seed)
    a, p = random_alphas(batch, generator=torch.Generator().manual_seed(seed))
    policy = dict(guidance_scale=cfg, prediction_type=prediction, clip_sample_range=clip)
    prev, old = reference.ddim_step(model_output, sample, a, p, noise=noise, **policy)
    g = torch.Generator().manual_seed(seed + 1)
    new_output = (model_output.float() + 0.02 * torch.randn(model_output.shape, generator=g)).to(dtype)
    reference_output = (model_output.float() + 0.1 * torch.randn(model_output.shape, generator=g)).to(dtype)
    advantages = 3 * torch.randn(batch, generator=g)
    return new_output, (sample, prev, a, p, old, advantages), reference_output, policy


@pytest.mark.parametrize("batch,prediction,cfg,clip,dtype", KL_CASES)
def test_kl_penalty_matches_reference(cpu_isa, batch, prediction, cfg, clip, dtype):
    """loss = PPO + kl_beta mean KL, stats["kl"] and the gradient (the KL's included) against float64."""
    new_output, args, reference_output, policy = kl_inputs(batch, prediction, cfg, clip, dtype)
    kwargs = dict(clip_range=0.01, adv_clip_max=2.0, reference_output=reference_output, kl_beta=0.7, **policy)
    m = new_output.clone().requires_grad_()
    loss, stats = ops.ddim_ppo_loss(m, *args, **kwargs)
    (0.5 * loss).backward()  # a non-unit upstream gradient
    m_ref = new_output.double().requires_grad_()
    ref_loss, ref_stats = reference.ddim_ppo_loss(m_ref, *(t.double() for t in args),
                                                  **{**kwargs, "reference_output": reference_output.double()})
    (0.5 * ref_loss).backward()
    assert stats["kl"].dtype == torch.float32 and not stats["kl"].requires_grad
    assert ref_stats["kl"] > 1e-3  # the penalty is not negligible: the gradient check below sees it
    assert abs(stats["kl"].item() - ref_stats["kl"].item()) <= 1e-5 * ref_stats["kl"].item()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert rel_err(stats["log_prob"], ref_stats["log_prob"]) < 1e-5
    assert m.grad.dtype == dtype
    assert rel_err(m.grad, m_ref.grad) < (1e-5 if dtype == torch.float32 else 2 * ulp(dtype))


def test_kl_penalty_one_pass_gradient_equals_the_two_pass_one(cpu_isa):
    """The CPU forward that makes the gradient (KL term included) gives the bits of the separate
    backward kernel fed d loss / d log_prob and d loss / d kl_b = kl_beta / B."""
    new_output, (sample, prev, a, p, old, advantages), reference_output, _ = kl_inputs(
        3, "v_prediction", 3.0, 1.0, torch.bfloat16)
    policy = (1.0, 3.0, 2, 1.0, False)
    outputs = torch.ops.ddpo_fast.ddim_ppo_loss(new_output, sample, prev, a, p, old, advantages, *policy, 0.05, 2.0,
                                                True, reference_output, 0.3)
    dloss_dlogp, one_pass = outputs[4], outputs[5]
    grad_kl = torch.full((3,), 0.3 / 3)
    two_pass = torch.ops.ddpo_fast.ddim_step_backward(None, dloss_dlogp, new_output, sample, prev, a, p, *policy,
                                                      reference_output, grad_kl)
    without_kl = torch.ops.ddpo_fast.ddim_step_backward(None, dloss_dlogp, new_output, sample, prev, a, p, *policy)
    assert torch.equal(one_pass, two_pass) and not torch.equal(one_pass, without_kl)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_kl_penalty_is_zero_for_the_reference_itself(backend):
    """reference_output == model_output: kl is exactly 0, and the loss and its gradient are those
    without the penalty."""
    for case in [(3, "epsilon", 2.0, 1.0, torch.float32), (7, "v_prediction", 7.5, 1.0, torch.bfloat16)]:
        new_output, args, _, policy = kl_inputs(*case)
        kwargs = dict(clip_range=0.01, adv_clip_max=2.0, **policy)
        results = []
        with use_backend(backend):
            for penalty in ({}, dict(reference_output=new_output.clone(), kl_beta=2.0)):
                m = new_output.clone().requires_grad_()
                loss, stats = ops.ddim_ppo_loss(m, *args, **kwargs, **penalty)
                loss.backward()
                results.append((loss, stats, m.grad))
        (loss, stats, grad), (kl_loss, kl_stats, kl_grad) = results
        assert "kl" not in stats and kl_stats["kl"] == 0
        assert torch.equal(loss, kl_loss) and torch.equal(grad, kl_grad)


def test_kl_penalty_without_beta_reports_kl_only(cpu_backend):
    new_output, args, reference_output, policy = kl_inputs(3, "epsilon", None, None, torch.float32)
    kwargs = dict(clip_range=0.01, adv_clip_max=2.0, **policy)
    loss, _ = ops.ddim_ppo_loss(new_output, *args, **kwargs)
    kl_loss, stats = ops.ddim_ppo_loss(new_output, *args, reference_output=reference_output, **kwargs)
    assert stats["kl"] > 0 and torch.equal(loss, kl_loss)


def test_kl_penalty_gradcheck_float64(cpu_backend):
    batch, shape = 2, (2, 3, 5)
    model_output, sample, noise = make_inputs(batch, shape, torch.float64, cfg=True)
    a = torch.tensor([0.3, 0.6], dtype=torch.float64)
    p = torch.tensor([0.4, 0.7], dtype=torch.float64)
    policy = dict(guidance_scale=2.0, prediction_type="v_prediction", clip_sample_range=1.5)
    prev, old = reference.ddim_step(model_output, sample, a, p, noise=noise, **policy)
    advantages = torch.tensor([1.5, -0.7], dtype=torch.float64)
    reference_output = model_output + 0.2 * torch.randn_like(model_output)

    def loss(m):
        return ops.ddim_ppo_loss(m, sample, prev, a, p, old, advantages, clip_range=0.5, adv_clip_max=5.0,
                                 reference_output=reference_output, kl_beta=3.0, **policy)[0]

    m = (model_output + 0.01 * torch.randn_like(model_output)).requires_grad_()
    assert torch.autograd.gradcheck(loss, (m,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_kl_penalty_matches_a_monte_carlo_estimate(cpu_backend):
    """stats["kl"] against E over x_{t-1} ~ policy of log p(x_{t-1}) - log p_ref(x_{t-1}), both
    log-probabilities of steps sampled with the fused step op (v-prediction, CFG and clipping: the
    reference's mean through the same mean function)."""
    batch, draws, shape = 3, 2000, (4, 5, 7)
    g = torch.Generator().manual_seed(3)
    out = torch.randn((2 * batch,) + shape, generator=g, dtype=torch.float64)
    ref = out + 0.3 * torch.randn(out.shape, generator=g, dtype=torch.float64)
    x = torch.randn((batch,) + shape, generator=g, dtype=torch.float64)
    a = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    p = torch.tensor([0.5, 0.6, 0.95], dtype=torch.float64)
    policy = dict(eta=0.8, guidance_scale=3.0, prediction_type="v_prediction", clip_sample_range=1.0)
    zeros = torch.zeros(batch, dtype=torch.float64)
    _, stats = ops.ddim_ppo_loss(out, x, x, a, p, zeros, zeros, clip_range=0.1, adv_clip_max=1.0,
                                 reference_output=ref, **policy)

    def repeat(t):  # `draws` copies of the batch, as one batch (CFG halves kept apart)
        halves = t.chunk(2) if t.shape[0] == 2 * batch else (t,)
        return torch.cat([h.repeat((draws,) + (1,) * (t.dim() - 1)) for h in halves])

    out_r, ref_r, x_r, a_r, p_r = map(repeat, (out, ref, x, a, p))
    prev, log_prob = ops.ddim_step_logprob(out_r, x_r, a_r, p_r, seed=11, **policy)
    _, log_prob_ref = ops.ddim_step_logprob(ref_r, x_r, a_r, p_r, prev_sample=prev, **policy)
    # Standard error ~ sqrt(2 KL / (elements draws batch)): about 0.6% here.
    estimate = (log_prob - log_prob_ref).mean()
    assert stats["kl"] > 0.05
    assert abs(stats["kl"].item() - estimate.item()) < 0.03 * stats["kl"].item()


# ---- Drop-in for trl's scheduler_step / ddpo-pytorch's ddim_step_with_logprob, and diffusers ------

diffusers = pytest.importorskip("diffusers")

SCHEDULER_CONFIGS = [
    dict(prediction_type="epsilon"),
    dict(prediction_type="epsilon", clip_sample=True, steps_offset=0),
    dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5),
    dict(prediction_type="sample", timestep_spacing="trailing"),
    dict(prediction_type="epsilon", set_alpha_to_one=True),
]


def make_scheduler(num_steps=20, **overrides):
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    scheduler = diffusers.DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS)
@pytest.mark.parametrize("position", [0, 9, -1])
def test_drop_in_matches_diffusers_step(cpu_backend, config, position):
    scheduler = make_scheduler(**config)
    model_output, sample, _ = make_inputs(3, (4, 17, 23), torch.float32, cfg=False)
    t = scheduler.timesteps[position]
    # The same noise through a generator, as diffusers' randn_tensor draws it.
    generator = torch.Generator().manual_seed(0)
    drawn = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
    expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=drawn).prev_sample
    prev, log_prob = ops.ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, generator=generator)
    assert rel_err(prev, expected) < 1e-5
    assert log_prob.shape == (3,) and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS[:4])
@pytest.mark.parametrize("timestep_kind", ["int", "scalar_tensor", "per_sample"])
def test_drop_in_matches_trl(cpu_backend, config, timestep_kind):
    trl_sd = pytest.importorskip("trl.models.modeling_sd_base")
    scheduler = make_scheduler(**config)
    batch = 3
    model_output, sample, _ = make_inputs(batch, (4, 17, 23), torch.float32, cfg=False)
    per_sample = scheduler.timesteps[[2, 7, 13]]
    timestep = {"int": int(scheduler.timesteps[5]), "scalar_tensor": scheduler.timesteps[5],
                "per_sample": per_sample}[timestep_kind]
    trl_timestep = per_sample if timestep_kind == "per_sample" else scheduler.timesteps[5].expand(batch)
    ours = ops.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0,
                                      generator=torch.Generator().manual_seed(1))
    theirs = trl_sd.scheduler_step(scheduler, model_output, trl_timestep, sample, eta=1.0,
                                   generator=torch.Generator().manual_seed(1))
    assert rel_err(ours.latents, theirs.latents) < 1e-6
    assert rel_err(ours.log_probs, theirs.log_probs) < 1e-5
    # Training-time use: the log-probability of a given prev_sample and its gradient.
    m_ours = model_output.clone().requires_grad_()
    m_theirs = model_output.clone().requires_grad_()
    ours = ops.ddim_step_with_logprob(scheduler, m_ours, timestep, sample, eta=1.0, prev_sample=theirs.latents)
    theirs = trl_sd.scheduler_step(scheduler, m_theirs, trl_timestep, sample, eta=1.0, prev_sample=theirs.latents)
    assert rel_err(ours.log_probs, theirs.log_probs) < 1e-5
    ours.log_probs.sum().backward()
    theirs.log_probs.sum().backward()
    assert rel_err(m_ours.grad, m_theirs.grad) < 1e-4


def test_drop_in_accepts_non_contiguous_latents(cpu_backend):
    scheduler = make_scheduler()
    trajectory = torch.randn(3, 5, 4, 17, 23)  # (B, T, C, H, W): ddpo-pytorch slices [:, j]
    model_output = torch.randn(3, 4, 17, 23)
    prev, log_prob = ops.ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[3], trajectory[:, 1],
                                                prev_sample=trajectory[:, 2])
    _, expected = ops.ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[3],
                                             trajectory[:, 1].contiguous(), prev_sample=trajectory[:, 2].contiguous())
    assert torch.equal(log_prob, expected)


def test_drop_in_fused_cfg_equals_guidance_outside(cpu_backend):
    scheduler = make_scheduler()
    model_output, sample, _ = make_inputs(3, (4, 17, 23), torch.float32, cfg=True)
    uncond, cond = model_output.chunk(2)
    t = scheduler.timesteps[4]
    fused = ops.ddim_step_with_logprob(scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(2),
                                       guidance_scale=7.5)
    outside = ops.ddim_step_with_logprob(scheduler, uncond + 7.5 * (cond - uncond), t, sample,
                                         generator=torch.Generator().manual_seed(2))
    assert rel_err(fused.prev_sample, outside.prev_sample) < 1e-6
    assert rel_err(fused.log_prob, outside.log_prob) < 1e-6



@pytest.mark.parametrize("generators", ["one", "per_sample"])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_in_generator_noise_is_diffusers_draw(cpu_backend, monkeypatch, generators, streamed, dtype):
    """With a generator the CPU step draws its noise piece by piece while the kernel runs
    (_C.NoiseStream); the numbers, the results and the generator's state afterwards are those of one
    torch.randn of the whole shape (per sample for a list of generators), as diffusers draws."""
    streams = []
    if streamed:  # small pieces on an odd shape: pieces end inside samples and inside kernel chunks
        monkeypatch.setattr(ops, "_STREAM_PIECE_ELEMENTS", 48)
        monkeypatch.setattr(ops, "_STREAM_MIN_ELEMENTS", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # a helper thread beside the caller
        real = _C.NoiseStream
        monkeypatch.setattr(_C, "NoiseStream", lambda args: streams.append(args) or real(args))
    batch, shape = 3, (4, 17, 23)
    scheduler = make_scheduler()
    model_output, sample, _ = make_inputs(batch, shape, torch.float32, cfg=True)
    model_output = model_output.to(dtype)  # the noise is drawn in model_output's dtype
    t = scheduler.timesteps[6]

    def make_generator():
        if generators == "one":
            return torch.Generator().manual_seed(7)
        return [torch.Generator().manual_seed(7 + b) for b in range(batch)]

    ours_generator, their_generator = make_generator(), make_generator()
    ours = ops.ddim_step_with_logprob(scheduler, model_output, t, sample, generator=ours_generator, guidance_scale=3.0)
    noise = ops._randn_like_diffusers(sample.shape, their_generator, sample.device, dtype)
    a, p = ops.scheduler_alphas(scheduler, t, batch, "cpu")
    expected = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise, guidance_scale=3.0)
    assert torch.equal(ours.prev_sample, expected.prev_sample)
    assert torch.equal(ours.log_prob, expected.log_prob)
    assert len(streams) == int(streamed)
    for g_ours, g_theirs in zip(*(g if isinstance(g, list) else [g] for g in (ours_generator, their_generator))):
        assert torch.equal(torch.randn(5, generator=g_ours), torch.randn(5, generator=g_theirs))


def test_noise_stream_failure_mid_draw_cancels_cleanly(cpu_backend, monkeypatch):
    """A draw that fails half way cancels the running kernel (no dangling helper thread); the next
    step works."""
    monkeypatch.setattr(ops, "_STREAM_PIECE_ELEMENTS", 1024)
    monkeypatch.setattr(ops, "_STREAM_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pieces = ops._noise_pieces

    def failing_pieces(generator, noise):
        good = pieces(generator, noise)
        return good[:2] + [(object(), good[2][1], good[2][2])] + good[3:]  # not a generator: normal_ raises

    scheduler = make_scheduler()
    model_output, sample, _ = make_inputs(3, (4, 17, 23), torch.float32, cfg=False)
    monkeypatch.setattr(ops, "_noise_pieces", failing_pieces)
    with pytest.raises(TypeError):
        ops.ddim_step_with_logprob(scheduler, model_output, 501, sample, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ops, "_noise_pieces", pieces)
    prev, log_prob = ops.ddim_step_with_logprob(scheduler, model_output, 501, sample,
                                                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("cfg,clip", [(None, None), (3.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_prob_gradient_from_the_forward_direction(cpu_isa, cfg, clip, dtype):
    """The log-probability of a given prev_sample writes d log_prob / d m in its forward pass on
    CPU, and its backward only scales it: the gradient matches the float64 reference and the
    separate backward kernel that re-reads the inputs."""
    batch, shape = 3, (4, 17, 23)
    model_output, sample, noise = make_inputs(batch, shape, dtype, cfg is not None)
    a, p = random_alphas(batch)
    policy = dict(guidance_scale=cfg, clip_sample_range=clip, prediction_type="v_prediction",
                  use_clipped_model_output=clip is not None)
    prev, _ = ops.ddim_step_logprob(model_output, sample, a, p, noise=noise, **policy)
    weights = torch.randn(batch)
    m = model_output.clone().requires_grad_()
    log_prob = ops.ddim_step_logprob(m, sample, a, p, prev_sample=prev, **policy).log_prob
    (log_prob * weights).sum().backward()
    m_ref = model_output.double().requires_grad_()
    ref = reference.ddim_step(m_ref, sample.double(), a.double(), p.double(), prev_sample=prev.double(), **policy)
    (ref[1] * weights.double()).sum().backward()
    codes = (1.0, cfg, 2, clip, clip is not None)
    two_pass = torch.ops.ddpo_fast.ddim_step_backward(None, weights, model_output, sample, prev, a, p, *codes)
    assert m.grad.abs().max() > 0
    tolerance = 1e-5 if dtype == torch.float32 else 2 * ulp(dtype)
    assert rel_err(m.grad, m_ref.grad) < tolerance
    assert rel_err(m.grad, two_pass) < tolerance


def test_drop_in_follows_set_timesteps_and_keeps_its_tables(cpu_backend):
    """The scheduler's alpha tables are cached per scheduler: a later set_timesteps rebuilds them,
    and scheduler_alphas hands out copies, never the cached tensors."""
    scheduler = make_scheduler(num_steps=20)
    model_output, sample, _ = make_inputs(2, (4, 5, 6), torch.float32, cfg=False)
    drawn = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    for steps in (20, 50):
        scheduler.set_timesteps(steps)
        t = scheduler.timesteps[-1]
        expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=drawn).prev_sample
        ours = ops.ddim_step_with_logprob(scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(3))
        assert rel_err(ours.prev_sample, expected) < 1e-5
    a, _ = ops.scheduler_alphas(scheduler, 101, 2, "cpu")
    a.fill_(0.5)
    assert ops.scheduler_alphas(scheduler, 101, 2, "cpu")[0][0] == scheduler.alphas_cumprod[101]


# ---- Bad input --------------------------------------------------------------------------------------


def _good():
    model_output, sample, noise = make_inputs(2, (4, 5, 6), torch.float32, cfg=False)
    a, p = torch.tensor([0.3, 0.4]), torch.tensor([0.5, 0.6])
    return model_output, sample, a, p, noise


def _step_error(**changes):
    model_output, sample, a, p, _ = _good()
    args = dict(model_output=model_output, sample=sample, alpha_prod_t=a, alpha_prod_t_prev=p)
    args.update(changes)
    positional = [args.pop(k) for k in ("model_output", "sample", "alpha_prod_t", "alpha_prod_t_prev")]
    return lambda: ops.ddim_step_logprob(*positional, **args)


BAD_STEP_INPUTS = {
    "model_output shape": (dict(model_output=torch.randn(2, 4, 5, 7)), ValueError, "model_output"),
    "batch mismatch": (dict(model_output=torch.randn(3, 4, 5, 6)), ValueError, "model_output"),
    "odd batch with cfg": (dict(model_output=torch.randn(3, 4, 5, 6), guidance_scale=5.0), ValueError, "model_output"),
    "alpha batch": (dict(alpha_prod_t=torch.tensor([0.3, 0.4, 0.5])), ValueError, "alpha_prod_t"),
    "int dtype": (dict(sample=torch.ones(2, 4, 5, 6, dtype=torch.int32)), TypeError, "sample"),
    "device": (dict(sample=torch.randn(2, 4, 5, 6, device="meta")), ValueError, "sample"),
    "non-contiguous": (dict(sample=torch.randn(2, 6, 5, 4).transpose(1, 3)), ValueError, "sample"),
    "eta negative": (dict(eta=-0.1), ValueError, "eta"),
    "eta above one": (dict(eta=1.5), ValueError, "eta"),
    "eta nan": (dict(eta=float("nan")), ValueError, "eta"),
    "alpha_t zero": (dict(alpha_prod_t=torch.tensor([0.0, 0.4])), ValueError, "alpha_prod_t"),
    "alpha_t one": (dict(alpha_prod_t=1.0), ValueError, "alpha_prod_t"),
    "alpha_prev above one": (dict(alpha_prod_t_prev=torch.tensor([0.5, 1.5])), ValueError, "alpha_prod_t_prev"),
    "alpha_prev below alpha_t": (dict(alpha_prod_t_prev=torch.tensor([0.2, 0.6])), ValueError, "alpha_prod_t_prev"),
    "alpha nan": (dict(alpha_prod_t=float("nan")), ValueError, "alpha_prod_t"),
    "empty batch": (dict(model_output=torch.randn(0, 4, 5, 6), sample=torch.randn(0, 4, 5, 6),
                         alpha_prod_t=0.3, alpha_prod_t_prev=0.5), ValueError, "sample"),
    "no batch dim": (dict(model_output=torch.randn(4), sample=torch.randn(4)), ValueError, "sample"),
    "noise shape": (dict(noise=torch.randn(2, 4, 5)), ValueError, "noise"),
    "noise and seed": (dict(noise=torch.randn(2, 4, 5, 6), seed=1), ValueError, "seed"),
    "noise and prev_sample": (dict(noise=torch.randn(2, 4, 5, 6), prev_sample=torch.randn(2, 4, 5, 6)),
                              ValueError, "noise"),
    "seed negative": (dict(seed=-1), ValueError, "seed"),
    "seed too large": (dict(seed=2**64), ValueError, "seed"),
    "seed float": (dict(seed=1.5), TypeError, "seed"),
    "prediction type": (dict(prediction_type="x0"), ValueError, "prediction_type"),
    "guidance inf": (dict(guidance_scale=float("inf"), model_output=torch.randn(4, 4, 5, 6)), ValueError, "guidance_scale"),
    "clip range": (dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
    "out_dtype int": (dict(out_dtype=torch.int64), TypeError, "out_dtype"),
    "float64 mixed": (dict(model_output=torch.randn(2, 4, 5, 6, dtype=torch.float64)), TypeError, "float64"),
    "sample requires grad": (dict(sample=torch.randn(2, 4, 5, 6, requires_grad=True)), ValueError, "sample"),
}


@pytest.mark.parametrize("case", list(BAD_STEP_INPUTS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_step_input_names_the_argument(case, backend):
    changes, error, name = BAD_STEP_INPUTS[case]
    with use_backend(backend), pytest.raises(error, match=name):
        _step_error(**changes)()


def _loss_error(**changes):
    model_output, sample, a, p, noise = _good()
    args = dict(model_output=model_output, sample=sample, prev_sample=noise, alpha_prod_t=a, alpha_prod_t_prev=p,
                old_log_prob=torch.zeros(2), advantages=torch.ones(2), clip_range=1e-4, adv_clip_max=5.0)
    args.update(changes)
    return lambda: ops.ddim_ppo_loss(**args)


BAD_LOSS_INPUTS = {
    "old_log_prob shape": (dict(old_log_prob=torch.zeros(3)), ValueError, "old_log_prob"),
    "advantages shape": (dict(advantages=torch.zeros(2, 1)), ValueError, "advantages"),
    "advantages dtype": (dict(advantages=torch.zeros(2, dtype=torch.int64)), TypeError, "advantages"),
    "clip_range zero": (dict(clip_range=0.0), ValueError, "clip_range"),
    "adv_clip_max negative": (dict(adv_clip_max=-1.0), ValueError, "adv_clip_max"),
    "prev_sample shape": (dict(prev_sample=torch.randn(2, 4, 5, 7)), ValueError, "prev_sample"),
    "prev_sample non-contiguous": (dict(prev_sample=torch.randn(2, 6, 5, 4).transpose(1, 3)), ValueError, "prev_sample"),
    "prev_sample requires grad": (dict(prev_sample=torch.randn(2, 4, 5, 6, requires_grad=True)), ValueError, "prev_sample"),
    "advantages requires grad": (dict(advantages=torch.ones(2, requires_grad=True)), ValueError, "advantages"),
    "odd batch with cfg": (dict(model_output=torch.randn(3, 4, 5, 6), guidance_scale=2.0), ValueError, "model_output"),
    # The KL penalty.
    "reference_output shape": (dict(reference_output=torch.randn(2, 4, 5, 7)), ValueError, "reference_output"),
    "reference_output without the cfg halves": (dict(model_output=torch.randn(4, 4, 5, 6), guidance_scale=2.0,
                                                     reference_output=torch.randn(2, 4, 5, 6)),
                                                ValueError, "reference_output"),
    "reference_output dtype": (dict(reference_output=torch.ones(2, 4, 5, 6, dtype=torch.int32)), TypeError,
                               "reference_output"),
    "reference_output device": (dict(reference_output=torch.randn(2, 4, 5, 6, device="meta")), ValueError,
                                "reference_output"),
    "reference_output non-contiguous": (dict(reference_output=torch.randn(2, 6, 5, 4).transpose(1, 3)), ValueError,
                                        "reference_output"),
    "reference_output float64 mixed": (dict(reference_output=torch.randn(2, 4, 5, 6, dtype=torch.float64)),
                                       TypeError, "reference_output"),
    "reference_output requires grad": (dict(reference_output=torch.randn(2, 4, 5, 6, requires_grad=True)),
                                       ValueError, "reference_output"),
    "kl_beta negative": (dict(reference_output=torch.randn(2, 4, 5, 6), kl_beta=-0.1), ValueError, "kl_beta"),
    "kl_beta nan": (dict(reference_output=torch.randn(2, 4, 5, 6), kl_beta=float("nan")), ValueError, "kl_beta"),
    "kl_beta inf": (dict(reference_output=torch.randn(2, 4, 5, 6), kl_beta=float("inf")), ValueError, "kl_beta"),
    "kl_beta not a number": (dict(reference_output=torch.randn(2, 4, 5, 6), kl_beta="0.1"), TypeError, "kl_beta"),
    "kl_beta without reference_output": (dict(kl_beta=0.1), ValueError, "kl_beta.*reference_output"),
}


@pytest.mark.parametrize("case", list(BAD_LOSS_INPUTS))
def test_bad_loss_input_names_the_argument(cpu_backend, case):
    changes, error, name = BAD_LOSS_INPUTS[case]
    with pytest.raises(error, match=name):
        _loss_error(**changes)()


def test_bad_ppo_clip_loss_input(cpu_backend):
    with pytest.raises(ValueError, match="log_prob"):
        ops.ppo_clip_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.1, 5.0)
    with pytest.raises(ValueError, match="old_log_prob"):
        ops.ppo_clip_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 0.1, 5.0)
    with pytest.raises(ValueError, match="clip_range"):
        ops.ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), -0.1, 5.0)


def test_scheduler_errors(cpu_backend):
    model_output, sample, _, _, _ = _good()
    unset = diffusers.DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ops.ddim_step_with_logprob(unset, model_output, 981, sample)
    with pytest.raises(TypeError, match="scheduler"):
        ops.ddim_step_with_logprob(object(), model_output, 981, sample)
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="timestep"):
        ops.ddim_step_with_logprob(scheduler, model_output, 1000, sample)
    with pytest.raises(ValueError, match="timestep"):
        ops.ddim_step_with_logprob(scheduler, model_output, torch.tensor([1, 2, 3]), sample)
    with pytest.raises(ValueError, match="generator"):
        ops.ddim_step_with_logprob(scheduler, model_output, 981, sample, prev_sample=sample,
                                   generator=torch.Generator())
    with pytest.raises(NotImplementedError, match="thresholding"):
        ops.ddim_step_with_logprob(make_scheduler(thresholding=True), model_output, 981, sample)


def test_backend_selection_errors(monkeypatch):
    model_output, sample, a, p, _ = _good()
    monkeypatch.setenv("DDPO_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="DDPO_FAST_BACKEND"):
        ops.ddim_step_logprob(model_output, sample, a, p, seed=0)
    monkeypatch.setenv("DDPO_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.ddim_step_logprob(model_output, sample, a, p, seed=0)
    monkeypatch.setenv("DDPO_FAST_BACKEND", "reference")
    ref = ops.ddim_step_logprob(model_output, sample, a, p, seed=4)
    monkeypatch.setenv("DDPO_FAST_BACKEND", "cpu")
    fused = ops.ddim_step_logprob(model_output, sample, a, p, seed=4)
    assert rel_err(fused.prev_sample, ref.prev_sample) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("fastest")


def test_core_rejects_null_pointers_instead_of_crashing():
    args = _C.DdimArgs()
    args.batch, args.numel = 2, 10
    with pytest.raises(ValueError, match="model_output"):
        _C.ddim_forward_cpu(args)
    with pytest.raises(ValueError, match="log_prob"):
        _C.ppo_forward_cpu(args)
    args.batch = 0
    with pytest.raises(ValueError, match="batch"):
        _C.ddim_backward_cpu(args)
    with pytest.raises(ValueError, match="instruction set"):
        _C.set_cpu_isa("sse9")
    # The forward-pass gradient direction belongs to the log-probability of a given prev_sample.
    model_output, sample, a, p, noise = _good()
    direction, log_prob = torch.empty(2, 120), torch.empty(2)
    args = _C.DdimArgs()
    args.batch, args.numel = 2, 120
    args.model_output, args.sample, args.prev_sample = model_output.data_ptr(), sample.data_ptr(), noise.data_ptr()
    args.alpha_t, args.alpha_prev, args.log_prob = a.data_ptr(), p.data_ptr(), log_prob.data_ptr()
    args.grad_direction, args.sample_noise = direction.data_ptr(), True
    with pytest.raises(ValueError, match="grad_direction"):
        _C.ddim_forward_cpu(args)
    args.grad_direction = 0  # a sampling step without a noise tensor has nothing to stream
    with pytest.raises(ValueError, match="NoiseStream"):
        _C.NoiseStream(args)
    # The KL penalty: a given prev_sample, and its per-sample output; its backward term needs it.
    args.reference_output = model_output.data_ptr()
    with pytest.raises(ValueError, match="reference_output"):
        _C.ddim_forward_cpu(args)  # sampling
    args.sample_noise = False
    with pytest.raises(ValueError, match="kl"):
        _C.ddim_forward_cpu(args)
    args.reference_output, args.kl = 0, log_prob.data_ptr()
    with pytest.raises(ValueError, match="reference_output"):
        _C.ddim_forward_cpu(args)
    args.kl, args.grad_kl, args.grad_log_prob, args.grad_model_output = 0, a.data_ptr(), a.data_ptr(), direction.data_ptr()
    with pytest.raises(ValueError, match="grad_kl"):
        _C.ddim_backward_cpu(args)
