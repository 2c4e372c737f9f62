"""The Triton entry points launch their kernels on the device of their tensors.

Triton launches on the *current* CUDA device (and its current stream), so with tensors on cuda:1
while cuda:0 is current a kernel would run on the wrong GPU; kernels/ddim.py makes the tensors'
device current around every launch (`_on_device`, used by `_run`).

On the CPU (Triton's interpreter) the guard is checked by recording: every kernel launch of
forward / ppo / backward must happen inside it, for the device of that launch's tensors. With two
GPUs the same calls on cuda:1 while cuda:0 is current must give what they give on cuda:0, with
Triton's kernels compiled for (so launched on) cuda:1.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

# Helpers of the Triton backend's tests (importing test_triton sets TRITON_INTERPRET without a GPU).
from test_triton import (  # noqa: E402
    DEVICE, SMALL, DdimCall, call_kwargs, flat, make_gen, make_inputs, policy, ppo_inputs, randn, ref, tk,
    triton_grad, triton_step, up,
)

KERNELS = ("_ddim_forward_kernel", "_finalize_kernel", "_ddim_backward_kernel")


def ppo_call(m, x, a, p, prev, pol, old, adv) -> DdimCall:
    """A forward call of the log-prob of `prev` with the PPO stage (both forward kernels)."""
    batch, dev = x.shape[0], x.device
    scalar = lambda: torch.empty((), device=dev)  # noqa: E731
    return DdimCall(flat(m), flat(x), a, p, flat(prev), log_prob=torch.empty(batch, device=dev),
                    old_log_prob=old, advantages=adv, ppo_clip_range=0.2, adv_clip_max=5.0, loss=scalar(),
                    approx_kl=scalar(), clipfrac=scalar(), dloss_dlogp=torch.empty(batch, device=dev),
                    **call_kwargs(pol))


# ---- The guard itself ----------------------------------------------------------------------------


def test_guard_makes_the_tensors_device_current(monkeypatch):
    """For CUDA tensors the guard is torch.cuda.device(their device); for CPU tensors it does nothing."""
    events = []

    class RecordingDevice:  # stands in for torch.cuda.device (no GPU here)
        def __init__(self, device):
            self.device = device
            events.append(("made", device))

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    second = torch.device("cuda", 1)
    with tk._on_device(second):
        assert events == [("made", second), ("enter", second)]
    assert events[-1] == ("exit", second)
    events.clear()
    with tk._on_device(torch.device("cpu")):
        pass
    assert events == []


# ---- Every launch is inside the guard ----------------------------------------------------------


class GuardRecorder:
    """Replaces kernels/ddim.py's guard: runs the real one and keeps the stack of guarded devices."""

    def __init__(self, real):
        self.real = real
        self.active: list[torch.device] = []

    @contextlib.contextmanager
    def __call__(self, device):
        with self.real(device):
            self.active.append(torch.device(device))
            try:
                yield
            finally:
                self.active.pop()


class CheckedKernel:
    """Replaces a kernel of kernels/ddim.py: its [grid] launch asserts it is inside the guard, for
    the device of every tensor it is given, then launches the real kernel."""

    def __init__(self, name, kernel, guard: GuardRecorder, launched: list[str]):
        self.name, self.kernel, self.guard, self.launched = name, kernel, guard, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            assert self.guard.active, f"{self.name} launched outside the device guard"
            assert devices == {self.guard.active[-1]}, (
                f"{self.name}: tensors on {devices}, guard on {self.guard.active[-1]}")
            self.launched.append(self.name)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def checked(monkeypatch) -> list[str]:
    """Guard recorder and checked kernels in place; yields the names of the kernels launched."""
    # raising=False: on code without the guard every launch then fails "outside the device guard".
    guard = GuardRecorder(getattr(tk, "_on_device", None) or (lambda device: contextlib.nullcontext()))
    monkeypatch.setattr(tk, "_on_device", guard, raising=False)
    launched: list[str] = []
    for name in KERNELS:
        monkeypatch.setattr(tk, name, CheckedKernel(name, getattr(tk, name), guard, launched))
    return launched


def test_every_launch_is_inside_the_guard(checked):
    gen = make_gen("device-guard")
    batch = 3
    pol = policy("v_prediction", 5.0, 1.0, True)
    m, x, a, p = make_inputs(batch, SMALL, torch.bfloat16, cfg=True, gen=gen)
    forward_kernels = ["_ddim_forward_kernel", "_finalize_kernel"]

    prev, log_prob = triton_step(m, x, a, p, pol, seed=11, offset=2)  # Philox sampling
    assert checked == forward_kernels
    checked.clear()
    triton_step(m, x, a, p, pol, noise=randn(x.shape, torch.bfloat16, gen))  # given noise
    assert checked == forward_kernels
    checked.clear()
    old, adv = ppo_inputs(log_prob, gen, 0.2)
    call = ppo_call(m, x, a, p, prev, pol, old, adv)
    tk.forward(call)  # log-prob of a given sample, then the PPO stage
    assert checked == forward_kernels
    checked.clear()
    tk.ppo(call)
    assert checked == ["_finalize_kernel"]
    checked.clear()
    triton_grad(m, x, a, p, prev, pol, randn((batch,), torch.float32, gen), randn(x.shape, torch.bfloat16, gen))
    assert checked == ["_ddim_backward_kernel"]

    # The checked kernels ran for real: the results are still right.
    m64, x64, a64, p64 = up(m, x, a, p)
    _, exact_lp = ref.ddim_step(m64, x64, a64, p64, prev_sample=prev.to(torch.float64), **pol)
    torch.testing.assert_close(log_prob.double(), exact_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call.log_prob, log_prob)


# ---- Two GPUs ------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_first_is_current():
    """Every entry point on cuda:1 while cuda:0 is current gives, bit for bit, what it gives on cuda:0,
    and leaves cuda:0 current."""
    gen = make_gen("two-gpus")
    batch, dtype = 3, torch.bfloat16
    pol = policy("epsilon", 7.5, 1.0, True)
    m, x, a, p = make_inputs(batch, SMALL, dtype, cfg=True, gen=gen)
    glp = randn((batch,), torch.float32, gen)
    gprev = randn(x.shape, dtype, gen, scale=0.1)

    def run(device):
        m_, x_, a_, p_, glp_, gprev_ = (t.to(device) for t in (m, x, a, p, glp, gprev))
        prev, log_prob = triton_step(m_, x_, a_, p_, pol, seed=5, offset=7)
        old, adv = ppo_inputs(log_prob.to(DEVICE), make_gen("two-gpus-ppo"), 0.2)
        call = ppo_call(m_, x_, a_, p_, prev, pol, old.to(device), adv.to(device))
        tk.forward(call)
        stats = torch.stack([call.loss, call.approx_kl, call.clipfrac])
        tk.ppo(call)
        again = torch.stack([call.loss, call.approx_kl, call.clipfrac])
        grad = triton_grad(m_, x_, a_, p_, prev, pol, glp_, gprev_)
        torch.cuda.synchronize(device)
        assert all(t.device == torch.device(device) for t in (prev, log_prob, stats, again, grad))
        return [t.cpu() for t in (prev, log_prob, call.dloss_dlogp, stats, again, grad)]

    with torch.cuda.device(0):
        first = run("cuda:0")
        second = run("cuda:1")
        assert torch.cuda.current_device() == 0
    # Where Triton launched: it compiles and caches each kernel per current device. (Equal results
    # alone would not show it: with peer access a kernel on cuda:0 can read cuda:1's memory.)
    for name in KERNELS:
        kernel = getattr(tk, name)
        assert {d for d, caches in kernel.device_caches.items() if caches[0]} >= {0, 1}, name
    for name, a_, b_ in zip(["prev_sample", "log_prob", "dloss_dlogp", "ppo stats", "ppo alone", "grad"],
                            first, second):
        assert torch.equal(a_, b_), name
