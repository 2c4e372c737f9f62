"""The Triton backend (ddpo_fast.kernels.ddim) against the float64 reference (ddpo_fast.reference).

Without CUDA the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
here before Triton is imported); with CUDA they run on the GPU. The kernels are called through
`DdimCall` directly (the same path ddpo_fast.ops takes) so that every option is reachable; a few
tests at the end go through the public API with `use_backend("triton")`.

Tolerances (DESIGN.md section 6): the float64 reference on the same (upcast) inputs is exact;
fp32 results must be within ~1e-5 relative of it; results from bf16 / fp16 inputs or outputs are
judged against plain PyTorch's own error (the reference run in the inputs' precision): at most
twice that error plus a small floor.
"""
from __future__ import annotations

import math
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported (kernels are defined at import)

import pytest

pytest.importorskip("triton")

from ddpo_fast import reference as ref  # noqa: E402
from ddpo_fast.backends import PREDICTION_CODES, DdimCall  # noqa: E402
from ddpo_fast.kernels import ddim as tk  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
HALF = (torch.bfloat16, torch.float16)
SMALL = (4, 17, 23)  # C, H, W
BIG = (4, 64, 64)

# Stable Diffusion's scaled-linear schedule; DDIM with 50 of 1000 steps.
_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
ALPHAS = torch.cumprod(1.0 - _BETAS, 0)
# (t, t_prev); t_prev < 0 is the last step, p = final_alpha_cumprod = 1 (set_alpha_to_one): sigma == 0.
STEPS = {"first": (981, 961), "mid": (501, 481), "late": (21, 1), "last": (1, -1)}


def alphas(kinds: list[str], dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    a = [ALPHAS[STEPS[k][0]].item() for k in kinds]
    p = [ALPHAS[STEPS[k][1]].item() if STEPS[k][1] >= 0 else 1.0 for k in kinds]
    return (torch.tensor(a, dtype=dtype, device=DEVICE), torch.tensor(p, dtype=dtype, device=DEVICE))


def step_kinds(batch: int, start: int = 0) -> list[str]:
    order = ["first", "mid", "late", "last"]
    return [order[(start + i) % 4] for i in range(batch)]


def make_gen(*key) -> torch.Generator:
    """A CPU generator seeded from `key` (reproducible across runs, unlike hash())."""
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, dtype, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype).to(DEVICE)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().to(F64) - b.detach().to(F64)).abs().max().item()


def assert_close_to_exact(ours, exact, plain, *, rtol: float, what: str) -> None:
    """max |ours - exact| <= 2 max |plain - exact| + rtol * max(1, max |exact|)."""
    ours_err, plain_err = err(ours, exact), err(plain, exact)
    floor = rtol * max(1.0, exact.detach().abs().max().item())
    assert ours_err <= 2 * plain_err + floor, (
        f"{what}: error {ours_err:.3g} > 2 x plain-PyTorch error {plain_err:.3g} + floor {floor:.3g}")


# The floor of every tolerance: ~1e-5 relative (fp32 rounding of a handful of operations). Results
# from bf16 / fp16 inputs or outputs pass through the 2x rule: the kernels round x' and the
# gradient to the storage dtype to nearest even, as plain PyTorch does.
RTOL = 1e-5


# ---- Calling the kernels -------------------------------------------------------------------------


def policy(prediction="epsilon", guidance_scale=None, clip_sample_range=None, use_clipped_model_output=False,
           eta=1.0) -> dict:
    return dict(eta=eta, guidance_scale=guidance_scale, prediction_type=prediction,
                clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output)


def call_kwargs(pol: dict) -> dict:
    return dict(eta=pol["eta"], guidance_scale=pol["guidance_scale"],
                prediction=PREDICTION_CODES[pol["prediction_type"]],
                clip_sample_range=pol["clip_sample_range"],
                use_clipped_model_output=pol["use_clipped_model_output"])


def flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(t.shape[0], -1)


def triton_step(m, x, a, p, pol, *, noise=None, seed=None, offset=0, prev_sample=None, out_dtype=None):
    """(prev_sample, log_prob) from the Triton forward kernel."""
    sampling = prev_sample is None
    prev = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device) if sampling else prev_sample
    call = DdimCall(flat(m), flat(x), a, p, flat(prev), log_prob=torch.empty(x.shape[0], dtype=a.dtype, device=x.device),
                    sample_noise=sampling, noise=flat(noise), seed=seed or 0, offset=offset, **call_kwargs(pol))
    tk.forward(call)
    return prev, call.log_prob


def triton_grad(m, x, a, p, prev, pol, grad_log_prob, grad_prev_sample=None):
    gm = torch.empty_like(m)
    call = DdimCall(flat(m), flat(x), a, p, flat(prev), grad_prev_sample=flat(grad_prev_sample),
                    grad_log_prob=grad_log_prob, grad_model_output=flat(gm), **call_kwargs(pol))
    tk.backward(call)
    return gm


def reference_grad(m, x, a, p, prev, pol, grad_log_prob, grad_prev_sample=None, *, dtype):
    """d/dm of sum(g_lp log_prob(x')) + sum(g_prev mu), x' held fixed: the kernels' backward, in autograd.
    dtype=float64: exact (inputs upcast); otherwise plain PyTorch on the inputs as they are."""
    leaf = (m.detach().to(F64) if dtype == F64 else m.detach()).requires_grad_(True)
    cast = (lambda t: t.to(F64)) if dtype == F64 else (lambda t: t)
    mu, sigma = ref.ddim_mean(leaf, cast(x), cast(a), cast(p), pol["eta"], guidance_scale=pol["guidance_scale"],
                              prediction_type=pol["prediction_type"], clip_sample_range=pol["clip_sample_range"],
                              use_clipped_model_output=pol["use_clipped_model_output"])
    log_prob = ref.gaussian_log_prob(cast(prev), mu, sigma)
    total = (cast(grad_log_prob).to(log_prob.dtype) * log_prob).sum()
    if grad_prev_sample is not None:
        total = total + (cast(grad_prev_sample).to(mu.dtype) * mu).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return grad


def make_inputs(batch, chw, dtype, *, cfg, gen, kinds=None):
    rows = 2 * batch if cfg else batch
    m = randn((rows, *chw), dtype, gen)
    x = randn((batch, *chw), dtype, gen)
    a, p = alphas(kinds or step_kinds(batch))
    return m, x, a, p


def up(*ts):
    return [None if t is None else t.to(F64) for t in ts]


# ---- Forward: sampling with given noise ----------------------------------------------------------

CASES = [  # (prediction, guidance_scale, clip_sample_range, use_clipped_model_output)
    ("epsilon", None, None, False),
    ("epsilon", 7.5, 1.0, True),
    ("sample", None, 1.0, False),
    ("sample", 3.0, None, False),
    ("v_prediction", None, None, False),
    ("v_prediction", 5.0, 1.0, True),
    ("v_prediction", 2.0, 1.5, False),
]


def case_id(case) -> str:
    return f"{case[0]}-cfg{case[1]}-clip{case[2]}-uc{int(case[3])}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# B = 7 with half-precision inputs only for the CFG cases, to keep the interpreter's time down.
SAMPLING_PARAMS = [
    pytest.param(batch, case, dtype, id=f"B{batch}-{case_id(case)}-{str(dtype)[6:]}")
    for batch in (1, 3, 7) for case in CASES for dtype in DTYPES
    if not (batch == 7 and dtype != torch.float32 and case[1] is None)
]


@pytest.mark.parametrize("batch,case,dtype", SAMPLING_PARAMS)
def test_forward_sampling(batch, case, dtype):
    prediction, w, clip, use_clipped = case
    gen = make_gen(batch, case, dtype)
    pol = policy(prediction, w, clip, use_clipped)
    m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=w is not None, gen=gen, kinds=step_kinds(batch, start=batch))
    noise = randn(x.shape, dtype, gen)
    prev, log_prob = triton_step(m, x, a, p, pol, noise=noise)
    assert prev.dtype == dtype and prev.shape == x.shape and log_prob.dtype == torch.float32

    m64, x64, a64, p64, n64 = up(m, x, a, p, noise)
    exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, noise=n64, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, noise=noise, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, rtol=RTOL, what="prev_sample")

    # The log-prob is that of x' as stored (rounded to its dtype), evaluated exactly.
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    _, plain_lp = ref.ddim_step(m.float(), x.float(), a, p, prev_sample=prev.float(), **pol)
    assert_close_to_exact(log_prob, exact_lp, plain_lp, rtol=1e-5, what="log_prob")
    sigma = ref.ddim_sigma(a64, p64, pol["eta"])
    assert torch.all(log_prob[sigma == 0] == 0)


# ---- Forward: log-prob of a given x_{t-1}, with and without the PPO stage ------------------------


def ppo_inputs(log_prob_exact: torch.Tensor, gen, clip_range: float):
    """old_log_prob around log_prob: ratios inside, just outside and far outside the clip range
    (both sides), and advantages beyond adv_clip_max on both sides."""
    B = log_prob_exact.shape[0]
    shifts = torch.tensor([0.0, 0.3, -0.3, 3.0, -3.0, 0.01, -0.01], dtype=F64)[torch.arange(B) % 7] * clip_range
    old = (log_prob_exact.to(F64) + shifts.to(DEVICE)).float()
    adv = torch.tensor([1.5, -0.7, 9.0, -8.0, 0.2, -2.0, 4.0], dtype=F64)[torch.arange(B) % 7]
    adv = (adv * torch.rand(B, generator=gen, dtype=F64).add(0.5)).float().to(DEVICE)
    return old, adv


def check_ppo(call: DdimCall, log_prob: torch.Tensor, old, adv, clip_range, adv_clip_max):
    """The PPO outputs of `call` against the float64 reference evaluated on the call's own log_prob."""
    lp = log_prob.detach().to(F64).requires_grad_(True)
    loss, stats = ref.ppo_clip_loss(lp, old.to(F64), adv.to(F64), clip_range, adv_clip_max)
    (dloss,) = torch.autograd.grad(loss, lp)
    tol = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(call.loss.to(F64), loss.detach(), **tol)
    torch.testing.assert_close(call.approx_kl.to(F64), stats["approx_kl"], **tol)
    torch.testing.assert_close(call.clipfrac.to(F64), stats["clipfrac"], **tol)
    torch.testing.assert_close(call.dloss_dlogp.to(F64), dloss, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_log_prob_of_given_sample_and_ppo(case, dtype):
    prediction, w, clip, use_clipped = case
    batch = 7
    gen = make_gen(case, dtype, "lp")
    pol = policy(prediction, w, clip, use_clipped)
    m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=w is not None, gen=gen)
    m64, x64, a64, p64 = up(m, x, a, p)
    mu, sigma = ref.ddim_mean(m64, x64, a64, p64, 1.0, **{k: v for k, v in pol.items() if k != "eta"})
    prev = (mu + sigma * randn(x.shape, F64, gen)).to(dtype)

    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    _, plain_lp = ref.ddim_step(m, x, a, p, prev_sample=prev, **pol)
    clip_range, adv_clip_max = 1e-4, 5.0
    old, adv = ppo_inputs(exact_lp, gen, clip_range)
    scalar = lambda: torch.empty((), device=DEVICE)  # noqa: E731
    call = DdimCall(flat(m), flat(x), a, p, flat(prev), log_prob=torch.empty(batch, device=DEVICE),
                    old_log_prob=old, advantages=adv, ppo_clip_range=clip_range, adv_clip_max=adv_clip_max,
                    loss=scalar(), approx_kl=scalar(), clipfrac=scalar(),
                    dloss_dlogp=torch.empty(batch, device=DEVICE), **call_kwargs(pol))
    tk.forward(call)
    assert_close_to_exact(call.log_prob, exact_lp, plain_lp, rtol=1e-5, what="log_prob")
    check_ppo(call, call.log_prob, old, adv, clip_range, adv_clip_max)
    # The PPO stage saw a mix: clipped on both sides and unclipped.
    assert 0 < call.clipfrac.item() < 1


# ---- Backward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("with_grad_prev", [False, True])
def test_backward(with_grad_prev, case, dtype):
    prediction, w, clip, use_clipped = case
    batch = 3 if with_grad_prev else 7
    gen = make_gen(case, dtype, with_grad_prev, "bwd")
    pol = policy(prediction, w, clip, use_clipped)
    m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=w is not None, gen=gen, kinds=step_kinds(batch, start=1))
    m64, x64, a64, p64 = up(m, x, a, p)
    mu, sigma = ref.ddim_mean(m64, x64, a64, p64, 1.0, **{k: v for k, v in pol.items() if k != "eta"})
    prev = (mu + sigma * randn(x.shape, F64, gen)).to(dtype)
    glp = randn((batch,), torch.float32, gen)
    gprev = randn(x.shape, dtype, gen, scale=0.1) if with_grad_prev else None

    grad = triton_grad(m, x, a, p, prev, pol, glp, gprev)
    assert grad.dtype == m.dtype and grad.shape == m.shape
    exact = reference_grad(m, x, a, p, prev, pol, glp, gprev, dtype=F64)
    plain = reference_grad(m, x, a, p, prev, pol, glp, gprev, dtype=dtype)
    assert_close_to_exact(grad, exact, plain, rtol=RTOL, what="grad_model_output")
    if w is not None:  # the CFG split: (1 - w) g to the unconditional half, w g to the conditional one
        g_u, g_c = grad.to(F64).chunk(2)
        torch.testing.assert_close(g_u * w, g_c * (1 - w), rtol=1e-2 if dtype in HALF else 1e-5, atol=1e-6)


# ---- Deterministic steps (sigma == 0) ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_sigma_zero(dtype):
    """alpha_prev = 1 (last step) and eta = 0: x' = mu, log_prob exactly 0, gradient from x' only."""
    gen = make_gen(7)
    batch = 3
    for kinds, eta in ((["last"] * batch, 1.0), (step_kinds(batch), 0.0)):
        pol = policy("epsilon", 4.0, None, False, eta=eta)
        m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=True, gen=gen, kinds=kinds)
        prev, log_prob = triton_step(m, x, a, p, pol, seed=1234)
        assert torch.all(log_prob == 0)
        m64, x64, a64, p64 = up(m, x, a, p)
        exact_mu, sigma = ref.ddim_mean(m64, x64, a64, p64, eta, guidance_scale=4.0)
        assert torch.all(sigma == 0)
        plain_mu, _ = ref.ddim_mean(m, x, a, p, eta, guidance_scale=4.0)
        assert_close_to_exact(prev, exact_mu, plain_mu.to(dtype), rtol=RTOL, what="mu")
        glp = randn((batch,), torch.float32, gen)
        gprev = randn(x.shape, dtype, gen)
        grad = triton_grad(m, x, a, p, prev, pol, glp, gprev)
        exact = reference_grad(m, x, a, p, prev, pol, glp, gprev, dtype=F64)
        plain = reference_grad(m, x, a, p, prev, pol, glp, gprev, dtype=dtype)
        assert_close_to_exact(grad, exact, plain, rtol=RTOL, what="grad")
        no_lp = triton_grad(m, x, a, p, prev, pol, torch.zeros_like(glp), gprev)
        assert torch.equal(grad, no_lp)  # grad_log_prob contributes nothing when sigma == 0


# ---- Storage rounding ----------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_log_prob_of_rounded_sample(out_dtype):
    """fp32 inputs, x' stored in half precision: the log-prob is that of the stored value (the first
    PPO ratio is 1), which differs from the log-prob of the unrounded x' by far more than the tolerance."""
    gen = make_gen(11)
    batch = 3
    pol = policy("epsilon", eta=0.1)  # small sigma: rounding x' moves it by a visible fraction of sigma
    m, x, a, p = make_inputs(batch, SMALL, torch.float32, cfg=False, gen=gen, kinds=["late", "late", "mid"])
    prev, log_prob = triton_step(m, x, a, p, pol, seed=99, offset=5, out_dtype=out_dtype)
    assert prev.dtype == out_dtype
    m64, x64, a64, p64 = up(m, x, a, p)
    _, of_stored = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    torch.testing.assert_close(log_prob.to(F64), of_stored, rtol=1e-5, atol=1e-5)
    _, of_unrounded = ref.ddim_step(m64, x64, a64, p64, seed=99, offset=5, out_dtype=F64, **pol)
    assert (of_unrounded - of_stored).abs().max() > 1e-3  # the property is not vacuous here
    # The PPO ratio of the stored sample under the same policy is 1.
    _, again = triton_step(m, x, a, p, pol, prev_sample=prev)
    torch.testing.assert_close(again, log_prob, rtol=1e-6, atol=1e-6)


def storage_cases(out_dtype) -> torch.Tensor:
    """float32 values whose rounding to out_dtype is delicate: exact ties (to even), overflow to
    inf, subnormals, signed zeros, inf, NaN; plus random ties."""
    if out_dtype == torch.bfloat16:
        # (no float32 subnormals: a GPU kernel may flush them to zero before rounding)
        special = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895314e38, -3.3895314e38, 3.3e38,
                   2**-126 * (1 + 2**-8), 2**-126 * (1 + 3 * 2**-8)]
        tie_bits, keep = 0x8000, 0xFFFF0000
    else:
        special = [1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 65519.0, 65520.0, -65520.0, 2**-25, 3 * 2**-25,
                   2**-26, 1e-8, 5.960464477539063e-08]
        tie_bits, keep = 0x1000, 0xFFFFE000
    special += [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -2.5, 12345.678]
    gen = make_gen("storage", out_dtype)
    bits = torch.randint(0, 2**31, (1000,), generator=gen, dtype=torch.int64)
    bits = (bits & 0x3FFFFFFF | 0x30000000) & keep | tie_bits  # |x| in ~[1e-9, 2], exactly halfway
    ties = bits.to(torch.int32).view(torch.float32)
    return torch.cat([torch.tensor(special, dtype=torch.float32), ties, -ties]).to(DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf and NaN
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_storage_rounding(out_dtype):
    """x' and the gradient are rounded to nearest even like torch's casts (the interpreter's own
    float32 -> bfloat16 cast truncates; the kernels round by hand). With sample prediction on the last
    step (p = 1: sigma = 0, x0 = m) the kernel's x' is m exactly before rounding."""
    values = storage_cases(out_dtype)
    m = values[None, :].contiguous()
    x = torch.zeros_like(m)
    a, p = alphas(["last"])
    pol = policy("sample")
    prev, _ = triton_step(m, x, a, p, pol, noise=torch.zeros_like(m), out_dtype=out_dtype)
    expected = m.to(out_dtype)

    def assert_same(ours):  # equal values (+0 == -0: the kernels add 0 terms) or both NaN
        same = (ours.float() == expected.float()) | (ours.isnan() & expected.isnan())
        assert same.all(), f"{values[~same[0]].tolist()} -> {ours[~same].tolist()}, torch: {expected[~same].tolist()}"

    assert_same(prev)
    # d x' / d m = 1 here, so the gradient is grad_prev_sample rounded to model_output's dtype.
    zeros = torch.zeros_like(m, dtype=out_dtype)
    assert_same(triton_grad(zeros, zeros, a, p, zeros, pol, torch.zeros(1, device=DEVICE), m))


# ---- The Philox noise stream ---------------------------------------------------------------------


def zero_mean_inputs(batch, numel, dtype):
    """m = x = 0 (epsilon): mu = 0, so x' = sigma z (sigma^2 = 1/3)."""
    m = torch.zeros(batch, numel, dtype=dtype, device=DEVICE)
    x = torch.zeros(batch, numel, dtype=dtype, device=DEVICE)
    a = torch.full((batch,), 0.25, dtype=dtype, device=DEVICE)
    p = torch.full((batch,), 0.5, dtype=dtype, device=DEVICE)
    sigma = ref.ddim_sigma(a.to(F64), p.to(F64), 1.0)[:, None]
    return m, x, a, p, sigma


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 123, 2**33 + 5), (2**64 - 1, 2**63 + 7), (12345, 1)])
def test_philox_noise_matches_reference(seed, offset):
    batch, numel = 3, 3 * 17 * 23  # numel odd: samples start inside Philox blocks
    m, x, a, p, sigma = zero_mean_inputs(batch, numel, torch.float32)
    pol = policy("epsilon")
    z, _ = triton_step(m, x, a, p, pol, seed=seed, offset=offset)
    expected = ref.philox_normal(batch * numel, seed, offset, device=DEVICE).reshape(batch, numel)
    torch.testing.assert_close(z.to(F64) / sigma, expected, rtol=0, atol=1e-5)
    z2, _ = triton_step(m, x, a, p, pol, seed=seed, offset=offset)
    assert torch.equal(z, z2)  # deterministic
    other, _ = triton_step(m, x, a, p, pol, seed=seed, offset=offset + 1)
    assert not torch.equal(z, other)


def test_philox_float64_and_small_tiles(monkeypatch):
    """float64 compute (noise generated in fp32, then widened), and tiles much smaller than a sample so
    that Philox blocks straddle tile and sample boundaries and every reduction loop runs many times."""
    batch, numel = 7, 1173
    m, x, a, p, sigma = zero_mean_inputs(batch, numel, F64)
    pol = policy("epsilon")
    seed, offset = 2**35 + 17, 3
    expected = ref.philox_normal(batch * numel, seed, offset, device=DEVICE).reshape(batch, numel)
    z, lp = triton_step(m, x, a, p, pol, seed=seed, offset=offset)
    torch.testing.assert_close(z / sigma, expected, rtol=0, atol=1e-5)
    _, exact_lp = ref.ddim_step(m, x, a, p, prev_sample=z, **pol)
    torch.testing.assert_close(lp, exact_lp, rtol=1e-12, atol=1e-12)

    # Same call, tiny tiles (chunks of 128 elements, finalize tiles of 4 x 4): identical noise,
    # log-probs equal up to summation order; fp32 with CFG and clipping too.
    tiny = tk.KernelConfig(forward_block=128, backward_block=128, batch_tile=4, partial_tile=4)
    z_tiny, lp_tiny = None, None
    with monkeypatch.context() as mp:
        mp.setattr(tk, "INTERPRETER_CONFIG", tiny)
        mp.setattr(tk, "GPU_CONFIG", tiny)
        z_tiny, lp_tiny = triton_step(m, x, a, p, pol, seed=seed, offset=offset)
        gen = make_gen(3)
        pol32 = policy("v_prediction", 3.0, 1.0, True)
        m32, x32, a32, p32 = make_inputs(batch, SMALL, torch.float32, cfg=True, gen=gen)  # N % 4 == 0
        small_prev, small_lp = triton_step(m32, x32, a32, p32, pol32, seed=5, offset=2**32)
        glp = randn((batch,), torch.float32, gen)
        small_grad = triton_grad(m32, x32, a32, p32, small_prev, pol32, glp)
    assert torch.equal(z_tiny, z)
    torch.testing.assert_close(lp_tiny, lp, rtol=1e-13, atol=1e-13)
    big_prev, big_lp = triton_step(m32, x32, a32, p32, pol32, seed=5, offset=2**32)
    assert torch.equal(small_prev, big_prev)
    torch.testing.assert_close(small_lp, big_lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(small_grad, triton_grad(m32, x32, a32, p32, small_prev, pol32, glp))
    m64, x64, a64, p64 = up(m32, x32, a32, p32)
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=small_prev.to(F64), **pol32)
    torch.testing.assert_close(small_lp.to(F64), exact_lp, rtol=1e-5, atol=1e-5)


# ---- The 4x64x64 latent shape ------------------------------------------------------------------


@pytest.mark.parametrize("dtype,case", [(torch.bfloat16, CASES[1]), (torch.float32, CASES[4])],
                         ids=["bfloat16-" + case_id(CASES[1]), "float32-" + case_id(CASES[4])])
def test_sd_latent_shape(dtype, case):
    prediction, w, clip, use_clipped = case
    batch = 3
    gen = make_gen(5)
    pol = policy(prediction, w, clip, use_clipped)
    m, x, a, p = make_inputs(batch, BIG, dtype, cfg=w is not None, gen=gen)
    seed, offset = 2**33 + 1, 49
    prev, log_prob = triton_step(m, x, a, p, pol, seed=seed, offset=offset)
    m64, x64, a64, p64 = up(m, x, a, p)
    exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, seed=seed, offset=offset, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, seed=seed, offset=offset, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, rtol=RTOL, what="prev_sample")
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    torch.testing.assert_close(log_prob.to(F64), exact_lp, rtol=1e-5, atol=1e-5)
    glp = randn((batch,), torch.float32, gen)
    gprev = randn(x.shape, dtype, gen, scale=0.1)
    grad = triton_grad(m, x, a, p, prev, pol, glp, gprev)
    exact = reference_grad(m, x, a, p, prev, pol, glp, gprev, dtype=F64)
    plain = reference_grad(m, x, a, p, prev, pol, glp, gprev, dtype=dtype)
    assert_close_to_exact(grad, exact, plain, rtol=RTOL, what="grad_model_output")


# ---- float64: exact agreement and gradcheck ------------------------------------------------------


@pytest.mark.parametrize("case", CASES[:2] + CASES[5:6], ids=case_id)
def test_float64_matches_reference(case):
    prediction, w, clip, use_clipped = case
    gen = make_gen(17)
    pol = policy(prediction, w, clip, use_clipped, eta=0.7)
    m, x, a, p = make_inputs(3, SMALL, F64, cfg=w is not None, gen=gen)
    a, p = a.to(F64), p.to(F64)
    noise = randn(x.shape, F64, gen)
    prev, log_prob = triton_step(m, x, a, p, pol, noise=noise)
    exact_prev, exact_lp = ref.ddim_step(m, x, a, p, noise=noise, **pol)
    torch.testing.assert_close(prev, exact_prev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_prob, exact_lp, rtol=1e-12, atol=1e-12)


class _TritonLogProb(torch.autograd.Function):
    """log_prob of a given x' as a differentiable function of model_output, through the kernels."""

    @staticmethod
    def forward(ctx, m, x, a, p, prev, pol):
        _, log_prob = triton_step(m.detach(), x, a, p, pol, prev_sample=prev)
        ctx.save_for_backward(m, x, a, p, prev)
        ctx.pol = pol
        return log_prob

    @staticmethod
    def backward(ctx, grad_log_prob):
        m, x, a, p, prev = ctx.saved_tensors
        return triton_grad(m, x, a, p, prev, ctx.pol, grad_log_prob.contiguous()), None, None, None, None, None


class _TritonSample(torch.autograd.Function):
    """x' = mu + sigma noise as a differentiable function of model_output, through the kernels."""

    @staticmethod
    def forward(ctx, m, x, a, p, noise, pol):
        prev, _ = triton_step(m.detach(), x, a, p, pol, noise=noise)
        ctx.save_for_backward(m, x, a, p, prev)
        ctx.pol = pol
        return prev

    @staticmethod
    def backward(ctx, grad_prev):
        m, x, a, p, prev = ctx.saved_tensors
        zero = torch.zeros(x.shape[0], dtype=a.dtype, device=a.device)
        return triton_grad(m, x, a, p, prev, ctx.pol, zero, grad_prev.contiguous()), None, None, None, None, None


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=case_id)
def test_float64_gradcheck(case):
    prediction, w, clip, use_clipped = case
    gen = make_gen(23)
    pol = policy(prediction, w, clip, use_clipped, eta=0.9)
    batch = 2
    m, x, a, p = make_inputs(batch, (1, 2, 3), F64, cfg=w is not None, gen=gen, kinds=["mid", "late"])
    m = (m * 0.5).requires_grad_(True)
    a, p = a.to(F64), p.to(F64)
    mu, sigma = ref.ddim_mean(m.detach(), x, a, p, 0.9, **{k: v for k, v in pol.items() if k != "eta"})
    prev = mu + sigma * randn(x.shape, F64, gen)
    noise = randn(x.shape, F64, gen)
    assert torch.autograd.gradcheck(lambda mm: _TritonLogProb.apply(mm, x, a, p, prev, pol), (m,))
    assert torch.autograd.gradcheck(lambda mm: _TritonSample.apply(mm, x, a, p, noise, pol), (m,))


# ---- The PPO stage alone -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("batch", [1, 5, 70])
def test_ppo_entry(batch, dtype):
    gen = make_gen(batch)
    clip_range, adv_clip_max = 0.2, 2.0
    log_prob = randn((batch,), dtype, gen)
    old = log_prob + randn((batch,), dtype, gen, scale=0.3)
    old[::4] = log_prob[::4]  # ratio exactly 1: unclipped == clipped, the tie rule
    adv = randn((batch,), dtype, gen, scale=2.0)
    scalar = lambda: torch.empty((), dtype=dtype, device=DEVICE)  # noqa: E731
    alpha = torch.full((batch,), 0.5, dtype=dtype, device=DEVICE)
    dummy = torch.zeros(batch, 1, dtype=dtype, device=DEVICE)
    call = DdimCall(dummy, dummy, alpha, alpha, dummy, log_prob=log_prob, old_log_prob=old, advantages=adv,
                    ppo_clip_range=clip_range, adv_clip_max=adv_clip_max, loss=scalar(), approx_kl=scalar(),
                    clipfrac=scalar(), dloss_dlogp=torch.empty(batch, dtype=dtype, device=DEVICE))
    tk.ppo(call)
    check_ppo(call, log_prob, old, adv, clip_range, adv_clip_max)
    if batch > 1:
        assert 0 < call.clipfrac.item() < 1


# ---- CUDA graphs (GPU only) --------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """forward + backward capture into one CUDA graph (no host synchronisation, nothing baked in):
    replays after changing the inputs in place match eager calls."""
    gen = make_gen("graph")
    batch, dtype = 3, torch.bfloat16
    pol = policy("epsilon", 7.5, 1.0, True)
    m, x, a, p = make_inputs(batch, BIG, dtype, cfg=True, gen=gen)
    glp = randn((batch,), torch.float32, gen)

    def eager():
        prev, lp = triton_step(m, x, a, p, pol, seed=7, offset=2)
        return prev, lp, triton_grad(m, x, a, p, prev, pol, glp)

    expected = eager()  # also compiles the kernels outside the capture
    prev, lp = torch.empty_like(x), torch.empty(batch, device=DEVICE)
    grad = torch.empty_like(m)
    fwd = DdimCall(flat(m), flat(x), a, p, flat(prev), log_prob=lp, sample_noise=True, seed=7, offset=2,
                   **call_kwargs(pol))
    bwd = DdimCall(flat(m), flat(x), a, p, flat(prev), grad_log_prob=glp, grad_model_output=flat(grad),
                   **call_kwargs(pol))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk.forward(fwd)
        tk.backward(bwd)
    for step in range(2):
        if step:
            m.copy_(randn(m.shape, dtype, gen))
            a.copy_(alphas(step_kinds(batch, start=2))[0].clamp(max=0.999) * 0.5)
            expected = eager()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(prev, expected[0])
        assert torch.equal(lp, expected[1])
        assert torch.equal(grad, expected[2])


# ---- Through the public API --------------------------------------------------------------------


@pytest.fixture
def ops():
    ops = pytest.importorskip("ddpo_fast.ops")
    with ops.use_backend("triton"):
        yield ops


def test_api_step_and_ppo_loss(ops):
    gen = make_gen(31)
    batch, dtype = 3, torch.bfloat16
    pol = policy("epsilon", 7.5, None, False)
    m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=True, gen=gen)
    prev, log_prob = ops.ddim_step_logprob(m, x, a, p, seed=2**40 + 1, offset=3, **pol)
    m64, x64, a64, p64 = up(m, x, a, p)
    exact_prev, _ = ref.ddim_step(m64, x64, a64, p64, seed=2**40 + 1, offset=3, out_dtype=F64, **pol)
    plain_prev, _ = ref.ddim_step(m, x, a, p, seed=2**40 + 1, offset=3, **pol)
    assert_close_to_exact(prev, exact_prev, plain_prev, rtol=RTOL, what="prev_sample")
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(F64), **pol)
    torch.testing.assert_close(log_prob.to(F64), exact_lp, rtol=1e-5, atol=1e-5)

    clip_range, adv_clip_max = 1e-4, 5.0
    old, adv = ppo_inputs(exact_lp, gen, clip_range)
    leaf = m.detach().requires_grad_(True)
    loss, stats = ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, clip_range=clip_range,
                                    adv_clip_max=adv_clip_max, **pol)
    loss.backward()
    leaf64 = m64.detach().requires_grad_(True)
    exact_loss, _ = ref.ddim_ppo_loss(leaf64, x64, prev.to(F64), a64, p64, old.to(F64), adv.to(F64),
                                      clip_range=clip_range, adv_clip_max=adv_clip_max, **pol)
    exact_loss.backward()
    torch.testing.assert_close(stats["log_prob"].to(F64), exact_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.to(F64), exact_loss.detach(), rtol=1e-4, atol=1e-6)
    leaf32 = m.detach().requires_grad_(True)
    plain_loss, _ = ref.ddim_ppo_loss(leaf32, x, prev, a, p, old, adv, clip_range=clip_range,
                                      adv_clip_max=adv_clip_max, **pol)
    plain_loss.backward()
    assert_close_to_exact(leaf.grad, leaf64.grad, leaf32.grad, rtol=RTOL, what="d loss / d model_output")

    lp = log_prob.detach().requires_grad_(True)
    loss2, stats2 = ops.ppo_clip_loss(lp, old, adv, clip_range, adv_clip_max)
    loss2.backward()
    lp64 = log_prob.detach().to(F64).requires_grad_(True)
    exact2, exact_stats2 = ref.ppo_clip_loss(lp64, old.to(F64), adv.to(F64), clip_range, adv_clip_max)
    exact2.backward()
    torch.testing.assert_close(loss2.to(F64), exact2.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp.grad.to(F64), lp64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats2["clipfrac"].to(F64), exact_stats2["clipfrac"])


@pytest.mark.parametrize("case,dtype", [(CASES[5], torch.float32), (CASES[2], torch.bfloat16)],
                         ids=["v_prediction-cfg-clip-uc-float32", "sample-clip-bfloat16"])
def test_api_kl_penalty(ops, case, dtype):
    """ddim_ppo_loss with reference_output: loss (+ kl_beta mean KL), stats["kl"] and the gradient (the
    backward kernel's KL term) against float64; the batch has every step kind, the last one with
    sigma == 0 (KL 0). With the reference itself: kl exactly 0 and the gradient without the penalty."""
    gen = make_gen(37, case, str(dtype))
    batch, pol = 4, policy(*case)
    m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=case[1] is not None, gen=gen)
    reference_output = (m.to(F64) + randn(m.shape, F64, gen, 0.1)).to(dtype)
    new = (m.to(F64) + randn(m.shape, F64, gen, 0.02)).to(dtype)
    prev, _ = ops.ddim_step_logprob(m, x, a, p, seed=5, **pol)
    m64, x64, a64, p64, prev64, r64 = up(m, x, a, p, prev, reference_output)
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev64, **pol)
    old, adv = ppo_inputs(exact_lp, gen, 0.05)
    loss_kwargs = dict(clip_range=0.05, adv_clip_max=5.0, kl_beta=0.7, **pol)

    leaf = new.detach().requires_grad_(True)
    loss, stats = ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, reference_output=reference_output, **loss_kwargs)
    (0.5 * loss).backward()
    leaf64 = new.detach().to(F64).requires_grad_(True)
    exact_loss, exact_stats = ref.ddim_ppo_loss(leaf64, x64, prev64, a64, p64, old.to(F64), adv.to(F64),
                                                reference_output=r64, **loss_kwargs)
    (0.5 * exact_loss).backward()
    leaf32 = new.detach().requires_grad_(True)
    plain_loss, _ = ref.ddim_ppo_loss(leaf32, x, prev, a, p, old, adv, reference_output=reference_output,
                                      **loss_kwargs)
    (0.5 * plain_loss).backward()
    assert exact_stats["kl"] > 1e-4
    torch.testing.assert_close(stats["kl"].to(F64), exact_stats["kl"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss.to(F64), exact_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_close_to_exact(leaf.grad, leaf64.grad, leaf32.grad, rtol=RTOL, what="d loss / d model_output")

    grads = []
    for penalty in ({}, dict(reference_output=new.clone(), kl_beta=2.0)):
        leaf = new.detach().requires_grad_(True)
        loss, stats = ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, clip_range=0.05, adv_clip_max=5.0,
                                        **pol, **penalty)
        loss.backward()
        grads.append((loss, stats, leaf.grad))
    assert grads[1][1]["kl"] == 0 and torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][2], grads[1][2])

    if dtype == torch.float32:  # the kernel entry alone: the per-sample KL without the PPO stage
        kl = torch.empty(batch, device=DEVICE)
        call = DdimCall(flat(new), flat(x), a, p, flat(prev), log_prob=torch.empty(batch, device=DEVICE),
                        reference_output=flat(reference_output), kl=kl, **call_kwargs(pol))
        tk.forward(call)
        mu, sigma = ref.ddim_mean(new.to(F64), x64, a64, p64, pol["eta"], **{k: pol[k] for k in list(pol)[1:]})
        mu_ref, _ = ref.ddim_mean(r64, x64, a64, p64, pol["eta"], **{k: pol[k] for k in list(pol)[1:]})
        exact_kl = ref.gaussian_kl(mu, mu_ref, sigma)
        assert exact_kl[-1] == 0 and kl[-1] == 0  # the last step: sigma == 0
        torch.testing.assert_close(kl.to(F64), exact_kl, rtol=1e-5, atol=1e-9)
