"""The CUDA backend (csrc/cuda/ddim_cuda.cu), and the Triton backend on a GPU, through the public API
of ddpo_fast.ops, against the float64 reference (ddpo_fast.reference). GPU only: every test skips
cleanly without a CUDA device (and the "cuda" cases skip when ddpo_fast._C was built without its
CUDA kernels, unless DDPO_FAST_REQUIRE_CUDA=1, as benchmarks/gpu_suite.sh sets, makes that a failure).

Tolerances (DESIGN.md section 6), as in tests/test_triton.py: the float64 reference on the same
(upcast) inputs is exact; results must satisfy
    max |ours - exact| <= 2 max |plain - exact| + 1e-5 max(1, max |exact|)
where `plain` is plain PyTorch (the reference run on the inputs as they are: float32 compute, outputs
rounded to their storage dtype). For fp32 this is ~1e-5 relative; for bf16 / fp16 it allows twice
plain PyTorch's rounding error. Gradients with x0 clipping skip the elements whose exact x0 lies within
1e-5 of the clip boundary, where the derivative jumps (0 or not) with the last bit of x0.
"""
from __future__ import annotations

import os
import zlib

import pytest

torch = pytest.importorskip("torch")

from ddpo_fast import backends, ops  # noqa: E402
from ddpo_fast import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
F64 = torch.float64
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL = (4, 17, 23)  # C, H, W: numel % 8 == 4, the kernels' scalar path
BIG = (4, 64, 64)  # the SD latent: the vectorised path, 4 reduction chunks per sample
SHAPES = (SMALL, BIG)
BATCHES = (1, 3, 7)
BACKENDS = ("cuda", "triton")

# Stable Diffusion's scaled-linear schedule; DDIM with 50 of 1000 steps.
_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
ALPHAS = torch.cumprod(1.0 - _BETAS, 0)
# (t, t_prev); t_prev = -1: the last step, alpha_prev = final_alpha_cumprod = 1.0 (sigma == 0);
# t_prev = -2: the last step with set_alpha_to_one=False (alpha_prev = alphas_cumprod[0]).
STEPS = {"first": (981, 961), "second": (961, 941), "mid": (501, 481), "late": (21, 1), "last": (1, -1),
         "last_a0": (1, -2)}
# Per-sample step mixes; "last" includes alpha_prev = 1.0 next to a stochastic last step.
TIMESTEPS = {"first": ("first", "second"), "last": ("last", "last_a0"), "mixed": ("first", "mid", "late", "last")}

# (prediction, guidance_scale, clip_sample_range, use_clipped_model_output)
CASES = [(pred, w, clip, uc) for pred in ("epsilon", "sample", "v_prediction") for w in (None, 7.5)
         for clip, uc in ((None, False), (1.0, False), (1.0, True))]


def case_id(case) -> str:
    pred, w, clip, uc = case
    return f"{pred}-cfg{w}-clip{clip}{'-uc' if uc else ''}"


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test with ops.use_backend(name)."""
    name = request.param
    if name == "cuda" and not backends.cuda_kernels_built():
        if os.environ.get("DDPO_FAST_REQUIRE_CUDA") == "1":
            pytest.fail("ddpo_fast._C was built without its CUDA kernels (DDPO_FAST_REQUIRE_CUDA=1)")
        pytest.skip("ddpo_fast._C was built without its CUDA kernels")
    if name == "triton":
        pytest.importorskip("triton")
        pytest.importorskip("ddpo_fast.kernels.ddim")
    with ops.use_backend(name):
        yield name


@pytest.fixture
def cuda_backend():
    """The compiled CUDA backend alone (tests of its launch mechanics)."""
    if not backends.cuda_kernels_built():
        if os.environ.get("DDPO_FAST_REQUIRE_CUDA") == "1":
            pytest.fail("ddpo_fast._C was built without its CUDA kernels (DDPO_FAST_REQUIRE_CUDA=1)")
        pytest.skip("ddpo_fast._C was built without its CUDA kernels")
    with ops.use_backend("cuda"):
        yield "cuda"


# ---- Inputs and the oracle -----------------------------------------------------------------------


def make_gen(*key) -> torch.Generator:
    """A CPU generator seeded from `key` (reproducible across runs, unlike hash())."""
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, dtype, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype).to(DEVICE)


def alphas(timesteps: str, batch: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (alpha_prod_t, alpha_prod_t_prev), cycling through TIMESTEPS[timesteps]."""
    kinds = [TIMESTEPS[timesteps][i % len(TIMESTEPS[timesteps])] for i in range(batch)]
    a, p = [], []
    for kind in kinds:
        t, prev = STEPS[kind]
        a.append(ALPHAS[t].item())
        p.append(1.0 if prev == -1 else ALPHAS[0].item() if prev == -2 else ALPHAS[prev].item())
    return torch.tensor(a, dtype=dtype, device=DEVICE), torch.tensor(p, dtype=dtype, device=DEVICE)


def policy(prediction="epsilon", guidance_scale=None, clip_sample_range=None, use_clipped_model_output=False,
           eta=1.0) -> dict:
    return dict(eta=eta, guidance_scale=guidance_scale, prediction_type=prediction,
                clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output)


def make_inputs(batch, chw, dtype, gen, *, cfg):
    m = randn(((2 * batch if cfg else batch), *chw), dtype, gen)
    x = randn((batch, *chw), dtype, gen)
    return m, x


def up(*ts):
    return [None if t is None else t.detach().to(F64) for t in ts]


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().to(F64) - b.detach().to(F64)).abs().max().item()


def assert_close_to_exact(ours, exact, plain, *, what: str, rtol: float = 1e-5) -> None:
    """max |ours - exact| <= 2 max |plain - exact| + rtol max(1, max |exact|)."""
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(ours.detach().to(F64)).all(), f"{what}: not finite"
    if ours.numel() == 0:
        return
    ours_err, plain_err = err(ours, exact), err(plain, exact)
    floor = rtol * max(1.0, exact.detach().abs().max().item())
    assert ours_err <= 2 * plain_err + floor, (
        f"{what}: error {ours_err:.3g} > 2 x plain-PyTorch error {plain_err:.3g} + floor {floor:.3g}")


def exact_sample(m, x, a, p, pol, gen, dtype):
    """x' = mu + sigma z from the exact mean, rounded to dtype: a stored sample to score."""
    m64, x64, a64, p64 = up(m, x, a, p)
    mu, sigma = ref.ddim_mean(m64, x64, a64, p64, pol["eta"], **mean_kwargs(pol))
    return (mu + sigma * randn(x.shape, F64, gen)).to(dtype)


def mean_kwargs(pol: dict) -> dict:
    return {k: v for k, v in pol.items() if k != "eta"}


def reference_grad(m, x, a, p, prev, pol, grad_log_prob, grad_prev_sample=None, *, dtype):
    """d/dm of sum(g_lp log_prob(x')) + sum(g_prev x'(m)), with the log-prob's x' held fixed (as
    stored): the semantics of the ops' autograd. dtype=float64: exact (inputs upcast); otherwise plain
    PyTorch on the inputs as they are."""
    cast = (lambda t: t.detach().to(F64)) if dtype == F64 else (lambda t: t.detach())
    leaf = cast(m).requires_grad_(True)
    mu, sigma = ref.ddim_mean(leaf, cast(x), cast(a), cast(p), pol["eta"], **mean_kwargs(pol))
    log_prob = ref.gaussian_log_prob(cast(prev), mu, sigma)
    total = (cast(grad_log_prob).to(log_prob.dtype) * log_prob).sum()
    if grad_prev_sample is not None:
        total = total + (cast(grad_prev_sample).to(mu.dtype) * mu).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return grad


def smooth_mask(m, x, a, p, pol) -> torch.Tensor:
    """Elements of model_output whose exact x0 is not within 1e-5 of the clip boundary (all of them
    without clipping)."""
    if pol["clip_sample_range"] is None:
        return torch.ones(m.shape, dtype=torch.bool, device=m.device)
    m64, x64, a64, p64 = up(m, x, a, p)
    mg = ref.apply_guidance(m64, pol["guidance_scale"])
    shape = (-1,) + (1,) * (x.dim() - 1)
    sa, s1 = a64.sqrt().reshape(shape), (1 - a64).sqrt().reshape(shape)
    pred = pol["prediction_type"]
    x0 = (x64 - s1 * mg) / sa if pred == "epsilon" else mg if pred == "sample" else sa * x64 - s1 * mg
    keep = (x0.abs() - pol["clip_sample_range"]).abs() > 1e-5
    return torch.cat([keep, keep]) if pol["guidance_scale"] is not None else keep


def seed_offset(*key) -> tuple[int, int]:
    h = zlib.crc32(repr(key).encode())
    return h * 7919 + 2**33, h % 1000


# ---- Sampling: x', its log-prob, the rounding property --------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chw", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES)
def test_sampling_step(backend, batch, chw, dtype, case):
    pred, w, clip, uc = case
    pol = policy(pred, w, clip, uc)
    gen = make_gen("sample", batch, chw, dtype, case)
    m, x = make_inputs(batch, chw, dtype, gen, cfg=w is not None)
    for timesteps in TIMESTEPS:
        a, p = alphas(timesteps, batch)
        seed, offset = seed_offset(batch, chw, dtype, case, timesteps)
        prev, log_prob = ops.ddim_step_logprob(m, x, a, p, seed=seed, offset=offset, **pol)
        assert prev.dtype == dtype and prev.shape == x.shape and prev.device == x.device
        assert log_prob.dtype == torch.float32 and log_prob.shape == (batch,)
        what = f"{timesteps}: "

        m64, x64, a64, p64 = up(m, x, a, p)
        z = ref.philox_normal(x.numel(), seed, offset, device=DEVICE).reshape(x.shape)
        exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, noise=z, out_dtype=F64, **pol)
        plain_prev, _ = ref.ddim_step(m, x, a, p, noise=z.float(), **pol)
        assert_close_to_exact(prev, exact_prev, plain_prev, what=what + "prev_sample")

        # The log-prob is that of x' as stored (rounded to its dtype), evaluated exactly.
        _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
        _, plain_lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
        assert_close_to_exact(log_prob, exact_lp, plain_lp, what=what + "log_prob")
        sigma = ref.ddim_sigma(a64, p64, pol["eta"])
        assert torch.all(log_prob[sigma == 0] == 0), what + "log_prob of a deterministic step must be 0"

        # Scoring the returned sample under the same policy gives the same log-prob (PPO ratio 1).
        _, again = ops.ddim_step_logprob(m, x, a, p, prev_sample=prev, **pol)
        torch.testing.assert_close(again, log_prob, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chw", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES)
def test_gradients(backend, batch, chw, dtype, case):
    """Autograd through ddim_step_logprob: log-prob of a given x' (training), and a sampling step
    (gradient through x' = mu + sigma z and through the log-prob of the stored x')."""
    pred, w, clip, uc = case
    pol = policy(pred, w, clip, uc)
    gen = make_gen("grad", batch, chw, dtype, case)
    m, x = make_inputs(batch, chw, dtype, gen, cfg=w is not None)
    for timesteps in TIMESTEPS:
        a, p = alphas(timesteps, batch)
        keep = smooth_mask(m, x, a, p, pol)
        glp = randn((batch,), torch.float32, gen)

        prev = exact_sample(m, x, a, p, pol, gen, dtype)
        leaf = m.clone().requires_grad_(True)
        _, log_prob = ops.ddim_step_logprob(leaf, x, a, p, prev_sample=prev, **pol)
        torch.autograd.backward(log_prob, glp)
        assert leaf.grad.dtype == dtype and leaf.grad.shape == m.shape
        exact = reference_grad(m, x, a, p, prev, pol, glp, dtype=F64)
        plain = reference_grad(m, x, a, p, prev, pol, glp, dtype=dtype)
        assert_close_to_exact(leaf.grad[keep], exact[keep], plain[keep], what=f"{timesteps}: grad of log_prob")

        seed, offset = seed_offset("grad", batch, chw, dtype, case, timesteps)
        leaf = m.clone().requires_grad_(True)
        sampled, log_prob = ops.ddim_step_logprob(leaf, x, a, p, seed=seed, offset=offset, **pol)
        gprev = randn(x.shape, dtype, gen, scale=0.1)
        torch.autograd.backward([sampled, log_prob], [gprev, glp])
        exact = reference_grad(m, x, a, p, sampled, pol, glp, gprev, dtype=F64)
        plain = reference_grad(m, x, a, p, sampled, pol, glp, gprev, dtype=dtype)
        assert_close_to_exact(leaf.grad[keep], exact[keep], plain[keep], what=f"{timesteps}: grad of a sampling step")
        if w is not None:  # the CFG split: (1 - w) g to the unconditional half, w g to the conditional one
            g_u, g_c = leaf.grad.to(F64).chunk(2)
            tol = 4 * torch.finfo(dtype).eps if dtype in HALF else 1e-5
            torch.testing.assert_close(g_u * w, g_c * (1 - w), rtol=tol, atol=tol * abs(w) * g_u.abs().max().item())


# ---- The PPO loss ----------------------------------------------------------------------------------


def ppo_inputs(log_prob_exact: torch.Tensor, gen, clip_range: float):
    """old_log_prob around log_prob: ratios inside, just outside and far outside the clip range (both
    sides), and advantages beyond adv_clip_max on both sides."""
    batch = log_prob_exact.shape[0]
    shifts = torch.tensor([0.0, 0.3, -0.3, 3.0, -3.0, 0.01, -0.01], dtype=F64)[torch.arange(batch) % 7] * clip_range
    old = (log_prob_exact.to(F64) + shifts.to(DEVICE)).float()
    adv = torch.tensor([1.5, -0.7, 9.0, -8.0, 0.2, -2.0, 4.0], dtype=F64)[torch.arange(batch) % 7]
    adv = (adv * torch.rand(batch, generator=gen, dtype=F64).add(0.5)).float().to(DEVICE)
    return old, adv


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chw", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ddim_ppo_loss(backend, chw, dtype, case):
    pred, w, clip, uc = case
    pol = policy(pred, w, clip, uc)
    batch = 7
    gen = make_gen("ppo", chw, dtype, case)
    m, x = make_inputs(batch, chw, dtype, gen, cfg=w is not None)
    a, p = alphas("mixed", batch)
    prev = exact_sample(m, x, a, p, pol, gen, dtype)
    m64, x64, a64, p64, prev64 = up(m, x, a, p, prev)
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev64, **pol)
    clip_range, adv_clip_max = 1e-4, 5.0
    old, adv = ppo_inputs(exact_lp, gen, clip_range)
    kw = dict(clip_range=clip_range, adv_clip_max=adv_clip_max, **pol)

    leaf = m.clone().requires_grad_(True)
    loss, stats = ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, **kw)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    leaf64 = m64.clone().requires_grad_(True)
    exact_loss, exact_stats = ref.ddim_ppo_loss(leaf64, x64, prev64, a64, p64, old.to(F64), adv.to(F64), **kw)
    exact_loss.backward()
    plain_leaf = m.clone().requires_grad_(True)
    plain_loss, plain_stats = ref.ddim_ppo_loss(plain_leaf, x, prev, a, p, old, adv, **kw)
    plain_loss.backward()

    assert_close_to_exact(loss, exact_loss, plain_loss, what="loss")
    assert_close_to_exact(stats["log_prob"], exact_stats["log_prob"], plain_stats["log_prob"], what="log_prob")
    assert_close_to_exact(stats["approx_kl"], exact_stats["approx_kl"], plain_stats["approx_kl"], what="approx_kl")
    assert round(stats["clipfrac"].item() * batch) == round(exact_stats["clipfrac"].item() * batch)
    assert 0 < stats["clipfrac"].item() < 1  # a mix of clipped and unclipped ratios
    keep = smooth_mask(m, x, a, p, pol)
    assert_close_to_exact(leaf.grad[keep], leaf64.grad[keep], plain_leaf.grad[keep], what="grad")


KL_CASES = [  # (chw, dtype, case): the vector and scalar paths, with and without clipping and CFG
    (BIG, torch.float32, ("epsilon", 7.5, None, False)),
    (SMALL, torch.bfloat16, ("v_prediction", 7.5, 1.0, True)),
    (BIG, torch.float16, ("sample", None, 1.0, False)),
]


@pytest.mark.parametrize("chw,dtype,case", KL_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_kl_penalty(backend, chw, dtype, case):
    """ddim_ppo_loss with reference_output: loss (+ kl_beta mean KL), stats["kl"] and the gradient (the
    backward kernel's KL term) against float64; the "mixed" steps include the last (sigma == 0: KL
    0). With the reference itself: kl exactly 0 and the gradient without the penalty."""
    pol = policy(*case)
    batch = 7
    gen = make_gen("kl", chw, dtype, case)
    m, x = make_inputs(batch, chw, dtype, gen, cfg=case[1] is not None)
    a, p = alphas("mixed", batch)
    prev = exact_sample(m, x, a, p, pol, gen, dtype)
    reference_output = (m.to(F64) + randn(m.shape, F64, gen, 0.1)).to(dtype)
    m64, x64, a64, p64, prev64, r64 = up(m, x, a, p, prev, reference_output)
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev64, **pol)
    old, adv = ppo_inputs(exact_lp, gen, 1e-2)
    kw = dict(clip_range=1e-2, adv_clip_max=5.0, kl_beta=0.7, **pol)

    leaf = m.clone().requires_grad_(True)
    loss, stats = ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, reference_output=reference_output, **kw)
    (0.5 * loss).backward()
    leaf64 = m64.clone().requires_grad_(True)
    exact_loss, exact_stats = ref.ddim_ppo_loss(leaf64, x64, prev64, a64, p64, old.to(F64), adv.to(F64),
                                                reference_output=r64, **kw)
    (0.5 * exact_loss).backward()
    plain_leaf = m.clone().requires_grad_(True)
    plain_loss, plain_stats = ref.ddim_ppo_loss(plain_leaf, x, prev, a, p, old, adv, reference_output=reference_output,
                                                **kw)
    (0.5 * plain_loss).backward()
    assert exact_stats["kl"] > 1e-4
    assert_close_to_exact(stats["kl"], exact_stats["kl"], plain_stats["kl"], what="kl")
    assert_close_to_exact(loss, exact_loss, plain_loss, what="loss")
    keep = smooth_mask(m, x, a, p, pol)
    assert_close_to_exact(leaf.grad[keep], leaf64.grad[keep], plain_leaf.grad[keep], what="grad")

    results = []
    for penalty in ({}, dict(reference_output=m.clone(), kl_beta=2.0)):
        leaf = m.clone().requires_grad_(True)
        loss, stats = ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, clip_range=1e-2, adv_clip_max=5.0, **pol,
                                        **penalty)
        loss.backward()
        results.append((loss, stats, leaf.grad))
    assert results[1][1]["kl"].item() == 0
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("batch", [1, 3, 7, 300, 1000])
def test_ppo_clip_loss(backend, batch):
    """The PPO stage alone; batches past one finalize block's 256 threads."""
    gen = make_gen("ppo_clip", batch)
    log_prob = randn((batch,), torch.float32, gen, scale=3.0)
    deltas = torch.tensor([0.0, 0.05, -0.05, 0.5, -0.5, 2.0, -2.0], dtype=F64)[torch.arange(batch) % 7]
    old = (log_prob.to(F64) - deltas.to(DEVICE)).float()
    adv = randn((batch,), torch.float32, gen, scale=4.0)
    clip_range, adv_clip_max = 0.2, 5.0
    leaf = log_prob.clone().requires_grad_(True)
    loss, stats = ops.ppo_clip_loss(leaf, old, adv, clip_range, adv_clip_max)
    loss.backward()
    leaf64 = log_prob.to(F64).requires_grad_(True)
    exact, exact_stats = ref.ppo_clip_loss(leaf64, old.to(F64), adv.to(F64), clip_range, adv_clip_max)
    exact.backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.to(F64), exact.detach(), **tol)
    torch.testing.assert_close(stats["approx_kl"].to(F64), exact_stats["approx_kl"], **tol)
    torch.testing.assert_close(stats["clipfrac"].to(F64), exact_stats["clipfrac"], **tol)
    torch.testing.assert_close(leaf.grad.to(F64), leaf64.grad, **tol)


# ---- Noise ---------------------------------------------------------------------------------------


def zero_mean_inputs(batch, chw, dtype=torch.float32):
    """m = x = 0 (epsilon): mu = 0, so x' = sigma z (sigma^2 = 1/3)."""
    m = torch.zeros((batch, *chw), dtype=dtype, device=DEVICE)
    x = torch.zeros((batch, *chw), dtype=dtype, device=DEVICE)
    a = torch.full((batch,), 0.25, dtype=dtype, device=DEVICE)
    p = torch.full((batch,), 0.5, dtype=dtype, device=DEVICE)
    sigma = ref.ddim_sigma(a.to(F64), p.to(F64), 1.0).reshape((-1,) + (1,) * len(chw))
    return m, x, a, p, sigma


@pytest.mark.parametrize("batch,chw", [(3, BIG), (3, SMALL), (3, (3, 17, 23)), (7, (5, 7)), (5, (1, 3)), (2, (1,))],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 123, 2**33 + 5), (2**63 - 1, 2**62 + 7), (12345, 1)])
def test_philox_noise_matches_reference(backend, batch, chw, seed, offset):
    """Element b*numel + i of the stream, whatever numel % 4 (samples may start inside a Philox block)."""
    m, x, a, p, sigma = zero_mean_inputs(batch, chw)
    z, _ = ops.ddim_step_logprob(m, x, a, p, seed=seed, offset=offset)
    expected = ref.philox_normal(x.numel(), seed, offset, device=DEVICE).reshape(x.shape)
    torch.testing.assert_close(z.to(F64) / sigma, expected, rtol=0, atol=1e-5)
    again, _ = ops.ddim_step_logprob(m, x, a, p, seed=seed, offset=offset)
    assert torch.equal(z, again)
    other, _ = ops.ddim_step_logprob(m, x, a, p, seed=seed, offset=offset + 1)
    assert not torch.equal(z, other)


@pytest.mark.parametrize("noise_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chw", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_noise_tensor(backend, chw, noise_dtype):
    pol = policy("v_prediction", 5.0, 1.0, False)
    batch = 3
    gen = make_gen("noise", chw, noise_dtype)
    m, x = make_inputs(batch, chw, torch.float32, gen, cfg=True)
    a, p = alphas("mixed", batch)
    noise = randn(x.shape, noise_dtype, gen)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, noise=noise, **pol)
    m64, x64, a64, p64, n64 = up(m, x, a, p, noise)
    exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, noise=n64, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, noise=noise, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, what="prev_sample")
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    _, plain_lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    assert_close_to_exact(log_prob, exact_lp, plain_lp, what="log_prob")


# ---- Storage dtypes, eta, odd sizes, float64 -------------------------------------------------------


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                (torch.float32, F64), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("chw", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_out_dtype_rounding(backend, chw, in_dtype, out_dtype):
    """x' stored in another dtype than the inputs: the log-prob is that of the stored value (the first
    PPO ratio is 1); with a small sigma that differs from the unrounded x's by far more than the
    tolerance when the storage is narrower."""
    pol = policy("epsilon", 3.0, eta=0.1)
    batch = 3
    gen = make_gen("out", chw, in_dtype, out_dtype)
    m, x = make_inputs(batch, chw, in_dtype, gen, cfg=True)
    a, p = alphas("mixed", batch)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, seed=99, offset=5, out_dtype=out_dtype, **pol)
    assert prev.dtype == out_dtype
    m64, x64, a64, p64 = up(m, x, a, p)
    _, of_stored = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    _, plain = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    assert_close_to_exact(log_prob, of_stored, plain, what="log_prob of the stored sample")
    exact_prev, of_unrounded = ref.ddim_step(m64, x64, a64, p64, seed=99, offset=5, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, seed=99, offset=5, out_dtype=out_dtype, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, what="prev_sample")
    if out_dtype in HALF and in_dtype == torch.float32:
        stochastic = ref.ddim_sigma(a64, p64, pol["eta"]) > 0
        assert (of_unrounded - of_stored)[stochastic].abs().max() > 1e-3  # the property is not vacuous


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_eta(backend, eta):
    """eta = 0: deterministic (x' = mu, log_prob 0); eta = 0.5: a narrower policy."""
    pol = policy("epsilon", 7.5, 1.0, False, eta=eta)
    batch = 3
    gen = make_gen("eta", eta)
    m, x = make_inputs(batch, BIG, torch.bfloat16, gen, cfg=True)
    a, p = alphas("mixed", batch)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, seed=3, offset=4, **pol)
    m64, x64, a64, p64 = up(m, x, a, p)
    exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, seed=3, offset=4, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, seed=3, offset=4, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, what="prev_sample")
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    _, plain_lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    assert_close_to_exact(log_prob, exact_lp, plain_lp, what="log_prob")
    if eta == 0.0:
        assert torch.all(log_prob == 0)


@pytest.mark.parametrize("batch,chw", [(2, (4, 65, 65)), (3, (8, 40, 41)), (4, (1,)), (2, (2, 2, 2)),
                                       (1, (4, 128, 128))], ids=lambda v: str(v))
def test_odd_sizes(backend, batch, chw):
    """Partial last reduction chunk on either path (numel 16900 = 4 x 4096 + 516, 13120 = 3 x 4096 +
    832), one element per sample, one 8-element unit per sample, 16 chunks per sample."""
    pol = policy("sample", 2.0, 1.5, True)
    gen = make_gen("odd", batch, chw)
    m, x = make_inputs(batch, chw, torch.float32, gen, cfg=True)
    a, p = alphas("mixed", batch)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, seed=17, offset=2**32 + 1, **pol)
    m64, x64, a64, p64 = up(m, x, a, p)
    exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, seed=17, offset=2**32 + 1, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, seed=17, offset=2**32 + 1, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, what="prev_sample")
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    _, plain_lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    assert_close_to_exact(log_prob, exact_lp, plain_lp, what="log_prob")
    glp = randn((batch,), torch.float32, gen)
    leaf = m.clone().requires_grad_(True)
    _, lp = ops.ddim_step_logprob(leaf, x, a, p, prev_sample=prev, **pol)
    torch.autograd.backward(lp, glp)
    keep = smooth_mask(m, x, a, p, pol)
    exact = reference_grad(m, x, a, p, prev, pol, glp, dtype=F64)
    plain = reference_grad(m, x, a, p, prev, pol, glp, dtype=torch.float32)
    assert_close_to_exact(leaf.grad[keep], exact[keep], plain[keep], what="grad")


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8], CASES[11], CASES[17]], ids=case_id)
@pytest.mark.parametrize("chw", [(2, 3, 5), (1, 2, 4), (4, 64, 64)], ids=lambda s: "x".join(map(str, s)))
def test_float64(backend, chw, case):
    """float64 inputs compute in float64: x' from a noise tensor and the log-prob match the reference
    to float64 rounding; Philox noise (generated in float32) to ~1e-6."""
    pred, w, clip, uc = case
    pol = policy(pred, w, clip, uc)
    batch = 3
    gen = make_gen("f64", chw, case)
    m, x = make_inputs(batch, chw, F64, gen, cfg=w is not None)
    a, p = alphas("mixed", batch, dtype=F64)
    noise = randn(x.shape, F64, gen)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, noise=noise, **pol)
    assert prev.dtype == F64 and log_prob.dtype == F64
    exact_prev, exact_lp = ref.ddim_step(m, x, a, p, noise=noise, **pol)
    torch.testing.assert_close(prev, exact_prev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_prob, exact_lp, rtol=1e-10, atol=1e-10)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, seed=8, offset=9, **pol)
    exact_prev, _ = ref.ddim_step(m, x, a, p, seed=8, offset=9, **pol)
    torch.testing.assert_close(prev, exact_prev, rtol=0, atol=1e-5)
    _, exact_lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    torch.testing.assert_close(log_prob, exact_lp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8], CASES[11], CASES[17]], ids=case_id)
@pytest.mark.parametrize("chw", [(2, 3, 5), (1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_float64(backend, chw, case):
    """torch.autograd.gradcheck of the three differentiable entry points, in float64 on small shapes
    (numel 30: the scalar path; numel 8: the vectorised path)."""
    pred, w, clip, uc = case
    pol = policy(pred, w, clip, uc)
    batch = 2
    gen = make_gen("gradcheck", chw, case)
    m, x = make_inputs(batch, chw, F64, gen, cfg=w is not None)
    a, p = alphas("mixed", batch, dtype=F64)
    prev = exact_sample(m, x, a, p, pol, gen, F64)
    noise = randn(x.shape, F64, gen)
    _, lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    old = lp + torch.tensor([0.05, 0.5], dtype=F64, device=DEVICE)  # ratios inside / outside clip 0.2
    adv = torch.tensor([1.5, -0.8], dtype=F64, device=DEVICE)
    kw = dict(check_batched_grad=False, eps=1e-6, atol=1e-6, rtol=1e-4)
    leaf = m.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda mo: ops.ddim_step_logprob(mo, x, a, p, prev_sample=prev, **pol)[1],
                                    (leaf,), **kw)
    assert torch.autograd.gradcheck(lambda mo: ops.ddim_step_logprob(mo, x, a, p, noise=noise, **pol)[0],
                                    (leaf,), **kw)
    assert torch.autograd.gradcheck(lambda mo: ops.ddim_ppo_loss(mo, x, prev, a, p, old, adv, clip_range=0.2,
                                                                 adv_clip_max=5.0, **pol)[0], (leaf,), **kw)


# ---- Launch mechanics: graphs, no host sync, streams, devices, alignment, determinism ---------------


def _sampling_inputs(dtype=torch.bfloat16, batch=4, chw=BIG):
    gen = make_gen("mechanics", dtype, batch, chw)
    m, x = make_inputs(batch, chw, dtype, gen, cfg=True)
    a, p = alphas("mixed", batch)
    return m, x, a, p, gen


def test_cuda_graph_capture(backend):
    """A sampling step (and a PPO loss) captured in a CUDA graph and replayed on new input values
    gives what eager execution gives with the same seed and offset."""
    pol = policy("epsilon", 7.5, 1.0, False)
    m, x, a, p, gen = _sampling_inputs()
    seed, offset = 2**35 + 3, 11
    old = torch.zeros(x.shape[0], device=DEVICE)
    adv = torch.ones(x.shape[0], device=DEVICE)

    def step():
        prev, lp = ops.ddim_step_logprob(m, x, a, p, seed=seed, offset=offset, **pol)
        loss, stats = ops.ddim_ppo_loss(m, x, prev, a, p, old, adv, clip_range=1e-4, adv_clip_max=5.0, **pol)
        return prev, lp, loss, stats["log_prob"]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        m.copy_(randn(m.shape, m.dtype, gen))
        x.copy_(randn(x.shape, x.dtype, gen))
        a.copy_(alphas("first", x.shape[0])[0])
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want)


def test_no_host_sync(backend):
    """A sampling step, a training step (forward + backward) and the PPO loss never synchronise with
    the host (torch.cuda.set_sync_debug_mode("error") raises on any synchronising call)."""
    pol = policy("v_prediction", 7.5, 1.0, True)
    m, x, a, p, gen = _sampling_inputs()
    old = torch.zeros(x.shape[0], device=DEVICE)
    adv = torch.ones(x.shape[0], device=DEVICE)

    def run():
        leaf = m.clone().requires_grad_(True)
        prev, lp = ops.ddim_step_logprob(leaf, x, a, p, seed=5, offset=6, **pol)
        torch.autograd.backward([prev, lp], [torch.ones_like(prev), torch.ones_like(lp)])
        loss, _ = ops.ddim_ppo_loss(leaf, x, prev.detach(), a, p, old, adv, clip_range=1e-4, adv_clip_max=5.0, **pol)
        loss.backward()
        lp_leaf = lp.detach().clone().requires_grad_(True)
        loss2, _ = ops.ppo_clip_loss(lp_leaf, old, adv, 0.2, 5.0)
        loss2.backward()

    run()  # warm up (lazy initialisation may synchronise once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_side_stream(backend):
    """The kernels run on the current stream: results on a side stream equal the default stream's."""
    pol = policy("epsilon", 7.5)
    m, x, a, p, _ = _sampling_inputs(torch.float32)
    want = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **pol)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **pol)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the right device runs them, the current one stays."""
    pol = policy("epsilon", 7.5)
    m, x, a, p, _ = _sampling_inputs(torch.float32)
    want = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **pol)
    dev1 = torch.device("cuda", 1)
    with torch.cuda.device(0):
        got = ops.ddim_step_logprob(m.to(dev1), x.to(dev1), a.to(dev1), p.to(dev1), seed=1, offset=2, **pol)
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), rtol=1e-6, atol=1e-6)


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_pointers(cuda_backend, dtype):
    """Tensors not 16-byte aligned take the scalar path, with the same results as the vectorised one."""
    pol = policy("v_prediction", 7.5, 1.0, True)
    m, x, a, p, gen = _sampling_inputs(dtype)
    want_prev, want_lp = ops.ddim_step_logprob(m, x, a, p, seed=7, offset=8, **pol)
    got_prev, got_lp = ops.ddim_step_logprob(_misaligned_copy(m), _misaligned_copy(x), a, p, seed=7, offset=8, **pol)
    torch.testing.assert_close(got_prev, want_prev, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    glp = randn((x.shape[0],), torch.float32, gen)
    grads = []
    for mo in (m, _misaligned_copy(m)):
        leaf = mo.clone().requires_grad_(True) if mo.data_ptr() % 16 == 0 else mo.detach().requires_grad_(True)
        _, lp = ops.ddim_step_logprob(leaf, _misaligned_copy(x), a, p, prev_sample=_misaligned_copy(want_prev), **pol)
        torch.autograd.backward(lp, glp)
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_deterministic(cuda_backend):
    """No atomics: the same call gives bitwise the same results."""
    pol = policy("epsilon", 7.5)
    m, x, a, p, _ = _sampling_inputs(torch.float32, batch=7, chw=(4, 128, 128))
    first = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **pol)
    for _ in range(3):
        again = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **pol)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_launcher_rejects_bad_arguments(cuda_backend):
    """The C++ launcher checks what would crash a kernel: no workspace, no log_prob, a bad dtype code."""
    m, x, a, p, _ = _sampling_inputs(torch.float32)
    batch = x.shape[0]
    call = backends.DdimCall(model_output=m.reshape(2 * batch, -1), sample=x.reshape(batch, -1), alpha_t=a,
                             alpha_prev=p, prev_sample=torch.empty_like(x).reshape(batch, -1),
                             log_prob=torch.empty(batch, device=DEVICE), guidance_scale=7.5, sample_noise=True, seed=1)
    runner = backends.runner("cuda")
    runner.forward(call)  # well-formed: runs
    args = runner._args(call, with_workspace=False)
    with pytest.raises(ValueError, match="workspace"):
        backends._C.ddim_forward_cuda(args)
    args = runner._args(call, with_workspace=True)
    args.model_output_dtype = 7
    with pytest.raises(ValueError):
        backends._C.ddim_forward_cuda(args)
    torch.cuda.synchronize()
