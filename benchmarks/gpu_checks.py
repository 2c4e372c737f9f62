"""The Python parts of benchmarks/gpu_suite.sh, one subcommand per job (each prints a last line
`SUMMARY ...` that the suite's table shows):

    python benchmarks/gpu_checks.py env --env-file F       # versions, GPU, which optional packages import
    python benchmarks/gpu_checks.py sanitize-probe         # every entry point once, small shapes
    python benchmarks/gpu_checks.py graph                  # a sampling step in a CUDA graph == eager, bit for bit
    python benchmarks/gpu_checks.py kernelbw CSV           # kernel bandwidth against a device-to-device copy
    python benchmarks/gpu_checks.py dropin                 # the drop-in against trl and torch.compile, per call
    python benchmarks/gpu_checks.py train-summary CSV      # one line from benchmarks/train.py's CSV
    python benchmarks/gpu_checks.py phase RUN_DIR...       # approx_kl / clipfrac of runs with frozen weights
    python benchmarks/gpu_checks.py triton-variants        # CPU only: Triton compiles of the suite's tests

`env`, `phase`, `train-summary` and `triton-variants` run without a GPU; `sanitize-probe`, `graph`,
`kernelbw` and `dropin` take --cpu-smoke (the suite's dry run): their op calls on the CPU, without the GPU parts.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Packages that some steps need and the GPU image may lack (carried as wheels in .whl/): module -> wheel.
OPTIONAL_MODULES = {"diffusers": "diffusers", "deepspeed": "deepspeed", "transformers": "transformers",
                    "peft": "peft", "bert_score": "bert-score"}


def device_backends(args):
    """The device and the fused backends a GPU subcommand runs. With --cpu-smoke (the suite's dry
    run, no GPU): the CPU, with the C++ CPU backend and, under TRITON_INTERPRET=1, Triton's
    interpreter, so that the subcommand's calls are checked without a GPU."""
    import torch

    from ddpo_fast.backends import _C, cuda_kernels_built, triton_available

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.cpu_smoke:
        names = [n for n, ok in (("cpu", _C is not None), ("triton", triton_available() and interpret)) if ok]
        return torch.device("cpu"), names
    return torch.device("cuda"), [n for n, ok in (("cuda", cuda_kernels_built()), ("triton", triton_available())) if ok]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_graph_time(fns, reps=20) -> float:
    """Seconds per call of fns (one call each) replayed from a CUDA graph (warmed up on a side
    stream first, as capture needs)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(fns)))
    return sorted(times)[len(times) // 2]


# ---- env -----------------------------------------------------------------------------------------


def cmd_env(args) -> int:
    """Versions and the device; which optional packages import. With --env-file, writes `fact KEY
    VALUE` and `module NAME ok VERSION` / `module NAME missing ERROR` lines, which the suite reads to
    head its table and to skip the steps that need a missing package."""
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    print("python", sys.version.split()[0], sys.executable)
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", torch.cuda.device_count())
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        facts["triton"] = f"not importable ({type(e).__name__})"
    print("triton", facts["triton"])
    facts["gpu"] = "no GPU"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["gpu"] = p.name
        print("device", p.name, "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count, "memory GiB",
              round(p.total_memory / 2**30, 1), "L2 MiB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
              "devices", torch.cuda.device_count())
    lines, missing = [f"fact {k} {v}" for k, v in facts.items()], []
    for module, dist in OPTIONAL_MODULES.items():
        start = time.perf_counter()
        try:
            mod = importlib.import_module(module)
            status = f"ok {getattr(mod, '__version__', '?')}"
        except Exception as e:  # noqa: BLE001  (an import may fail with anything, not only ImportError)
            first = str(e).splitlines()[0][:120] if str(e) else ""
            status = f"missing {type(e).__name__}: {first}"
            missing.append(dist)
        lines.append(f"module {module} {status}")
        print(f"import {module:12s} {status} ({time.perf_counter() - start:.1f} s)")
    if args.env_file:
        Path(args.env_file).write_text("\n".join(lines) + "\n")
    print(f"SUMMARY {facts['gpu']}; torch {facts['torch']}; triton {facts['triton']}"
          + (f"; missing: {', '.join(missing)}" if missing else "; all optional packages import"))
    return 0 if torch.cuda.is_available() or args.no_gpu_ok else 1


# ---- sanitize-probe ------------------------------------------------------------------------------


def cmd_sanitize_probe(args) -> int:
    """Every entry point of each backend once, on small shapes: both load paths (vectorised and
    scalar), CFG, clipping, Philox and noise tensors, the PPO stage, float64. Run under
    compute-sanitizer (the suite's sanitize step): seconds of work, not minutes."""
    import torch

    from ddpo_fast import ops

    dev, names = device_backends(args)
    names = args.backends.split(",") if args.backends else names
    for name in names:
        torch.manual_seed(0)
        with ops.use_backend(name):
            for dtype, chw, cfg in ((torch.bfloat16, (4, 16, 16), True), (torch.float32, (3, 7, 5), False),
                                    (torch.float64, (2, 4, 8), True)):
                B = 3
                m = torch.randn((2 * B if cfg else B, *chw), dtype=dtype, device=dev, requires_grad=True)
                x = torch.randn((B, *chw), dtype=dtype, device=dev)
                cdt = torch.float64 if dtype == torch.float64 else torch.float32
                a = torch.tensor([0.005, 0.5, 0.9983], dtype=cdt, device=dev)
                p = torch.tensor([0.007, 0.6, 1.0], dtype=cdt, device=dev)
                kw = dict(guidance_scale=7.5 if cfg else None, clip_sample_range=1.0, use_clipped_model_output=cfg)
                prev, lp = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **kw)  # forward, Philox
                (prev.float().sum() + lp.sum()).backward()  # backward
                ops.ddim_step_logprob(m, x, a, p, noise=torch.randn_like(x), **kw)  # forward, noise tensor
                lp2 = ops.ddim_step_logprob(m, x, a, p, prev_sample=prev.detach(), **kw)[1]  # log-prob only
                old = lp2.detach() + 0.01
                adv = torch.randn(B, dtype=cdt, device=dev)
                loss, _ = ops.ddim_ppo_loss(m, x, prev.detach(), a, p, old, adv, clip_range=1e-4, adv_clip_max=5.0,
                                            **kw)
                loss.backward()  # forward + PPO, backward
                lpl = lp2.detach().clone().requires_grad_(True)
                loss2, _ = ops.ppo_clip_loss(lpl, old, adv, 0.2, 5.0)  # PPO alone
                loss2.backward()
            # A misaligned sample (the CUDA kernels' scalar path) with a partial last chunk.
            x = torch.randn(2 * 4100 + 1, device=dev)[1:].view(2, 4100)
            m = torch.randn(2, 4100, device=dev)
            ops.ddim_step_logprob(m, x, 0.3, 0.4, seed=3)
        synchronize(dev)
    print(f"SUMMARY probe: {' + '.join(names) or 'no backend'} on {dev}")
    return 0 if names else 1


# ---- graph ---------------------------------------------------------------------------------------


def cmd_graph(args) -> int:
    """Sampling steps as the trainer runs them (CFG batch of 2B rows through a bf16 model, the fused
    ddim_step_logprob with Philox noise and bf16 storage, the latents updated in place), captured in
    one CUDA graph and replayed; the replay's samples and log-probs must equal an eager run's bit for
    bit, for each backend. The model is a small convolutional stand-in (no diffusers needed): what is
    checked is that the op's launches capture and replay exactly, next to real model work.
    --cpu-smoke: the eager runs alone, on the CPU."""
    import torch

    from ddpo_fast import ops

    dev, names = device_backends(args)
    torch.backends.cudnn.deterministic = True  # the same convolution algorithm eager and in the graph
    torch.backends.cudnn.benchmark = False
    B, chw, steps, guidance = 8, (4, 64, 64), 4, 5.0
    if args.cpu_smoke:  # the calls, not the sizes, are what a CPU run checks
        B, chw = 2, (4, 16, 16)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 4, 3, padding=1)).to(dev, torch.bfloat16).eval()
    cond = torch.randn(2 * B, 4, 1, 1, generator=gen).to(dev, torch.bfloat16)  # [uncond; cond] rows differ
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    ts = [981, 741, 501, 261, 21][: steps + 1]
    a_t = [torch.full((B,), alphas[t].item(), device=dev) for t in ts[:-1]]
    a_p = [torch.full((B,), alphas[t].item(), device=dev) for t in ts[1:]]
    x0 = torch.randn(B, *chw, generator=gen).to(dev, torch.bfloat16)
    latents = torch.empty_like(x0)
    log_probs = torch.empty(steps, B, device=dev)
    trajectory = torch.empty(steps, B, *chw, device=dev, dtype=torch.bfloat16)
    seed = 2**40 + 17

    def run_steps():
        for i in range(steps):
            model_in = torch.cat([latents, latents]) + cond
            out = model(model_in)
            prev, lp = ops.ddim_step_logprob(out, latents, a_t[i], a_p[i], eta=1.0, seed=seed, offset=i,
                                             guidance_scale=guidance, out_dtype=torch.bfloat16)
            trajectory[i].copy_(prev)
            log_probs[i].copy_(lp)
            latents.copy_(prev)

    results, failed = [], not names
    for name in names:
        with ops.use_backend(name), torch.no_grad():
            latents.copy_(x0)
            run_steps()  # warm-up (Triton compiles here, not in the capture)
            synchronize(dev)
            eager_traj, eager_lp = [], []
            for _ in range(2):  # eager twice: the op itself must be deterministic
                latents.copy_(x0)
                run_steps()
                eager_traj.append(trajectory.clone())
                eager_lp.append(log_probs.clone())
            deterministic = torch.equal(eager_traj[0], eager_traj[1]) and torch.equal(eager_lp[0], eager_lp[1])
            nontrivial = bool(torch.isfinite(eager_lp[0]).all()) and bool((eager_lp[0] != 0).all()) and not torch.equal(
                eager_traj[0][-1], x0)
            if args.cpu_smoke:
                ok = deterministic and nontrivial
                print(f"{name} on the CPU: eager deterministic: {deterministic}; "
                      f"log-probs finite, non-zero: {nontrivial}")
                results.append(f"{name} eager {'ok' if ok else 'NOT OK'}")
                failed |= not ok
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                latents.copy_(x0)
                run_steps()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_steps()
            trajectory.zero_()
            log_probs.fill_(float("nan"))  # poisoned: the replay must write every element
            latents.copy_(x0)
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(trajectory, eager_traj[0]) and torch.equal(log_probs, eager_lp[0])
            diff = (trajectory.float() - eager_traj[0].float()).abs().max().item()
            # Time per step: eager against replay (launch overhead is what a graph removes).
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            timings = {}
            for label, fn in (("eager", run_steps), ("graph", graph.replay)):
                fn()
                torch.cuda.synchronize()
                start.record()
                for _ in range(10):
                    fn()
                end.record()
                torch.cuda.synchronize()
                timings[label] = start.elapsed_time(end) / (10 * steps) * 1e3  # us per step
            del graph
        ok = same and deterministic and nontrivial
        failed |= not ok
        print(f"{name}: replay == eager: {same} (max |diff| {diff:.3g}); eager deterministic: {deterministic}; "
              f"log-probs finite and non-zero: {nontrivial}; per step (model + op): eager {timings['eager']:.0f} us, "
              f"graph replay {timings['graph']:.0f} us")
        results.append(f"{name} {'bit-equal' if same else 'DIFFERENT'}" + ("" if ok else " (NOT OK)"))
    print(f"SUMMARY {', '.join(results) or 'no backend'} ({steps} CFG steps, Philox, bf16 storage)")
    return 1 if failed else 0


# ---- dropin --------------------------------------------------------------------------------------


def cmd_dropin(args) -> int:
    """Per-call time of the drop-in `ddim_step_with_logprob(scheduler, ...)` as other DDPO code calls
    it, at B = 1, 8 and 32 (CFG, 4x64x64, fp32), against trl's `scheduler_step` (CFG outside, as trl's
    pipeline does) and `torch.compile` of the same math with the same `torch.randn`: the sampling step
    eager and replayed from a CUDA graph (a candidate that cannot be captured says why), and the
    training path (log-prob of a given prev_sample -> PPO loss -> backward) eager, with the fused
    `ddim_ppo_loss` beside it. --cpu-smoke: each candidate's calls once on the CPU, without
    torch.compile and timing."""
    import torch

    from ddpo_fast import ops, reference

    try:
        from diffusers import DDIMScheduler
    except ImportError as error:
        print(f"SUMMARY SKIP: diffusers does not import ({error})")
        return 77
    try:
        from trl.models.modeling_sd_base import scheduler_step
    except ImportError:
        scheduler_step = None
    dev, _ = device_backends(args)
    W, chw, batches = 5.0, (4, 64, 64), (1, 8, 32)
    if args.cpu_smoke:
        chw, batches = (4, 8, 8), (1, 2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[25]

    def ppo(log_prob, old, adv):  # trl's DDPOTrainer.loss
        ratio = torch.exp(log_prob - old)
        adv = adv.clamp(-5.0, 5.0)
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()

    def per_call_us(fn, reps):
        for _ in range(3):
            fn()
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize(dev)
        return (time.perf_counter() - start) / reps * 1e6

    rows, failed = [], False
    for B in batches:
        gen = torch.Generator().manual_seed(B)
        m = torch.randn((2 * B,) + chw, generator=gen).to(dev)
        x = torch.randn((B,) + chw, generator=gen).to(dev)
        a, p = ops.scheduler_alphas(scheduler, t, B, dev)
        t_dev = t.expand(B).to(dev)
        with torch.no_grad():
            prev, old = ops.ddim_step_with_logprob(scheduler, m, t, x, guidance_scale=W)
        adv = torch.randn(B, generator=gen).to(dev)
        leaf = m.clone().requires_grad_()

        def guided(mo):
            u, c = mo.chunk(2)
            return u + W * (c - u)

        def math_step(mo, noise):
            return reference.ddim_step(mo, x, a, p, noise=noise, guidance_scale=W)

        def math_loss(mo):
            loss, _ = reference.ddim_ppo_loss(mo, x, prev, a, p, old, adv, clip_range=1e-4, adv_clip_max=5.0,
                                              guidance_scale=W)
            return loss

        sampling = {"drop-in": lambda: ops.ddim_step_with_logprob(scheduler, m, t, x, eta=1.0, guidance_scale=W)}
        training = {
            "drop-in": lambda: ops.ppo_clip_loss(ops.ddim_step_with_logprob(
                scheduler, leaf, t, x, eta=1.0, prev_sample=prev, guidance_scale=W).log_prob, old, adv, 1e-4, 5.0)[0],
            "fused ddim_ppo_loss": lambda: ops.ddim_ppo_loss(leaf, x, prev, a, p, old, adv, clip_range=1e-4,
                                                             adv_clip_max=5.0, guidance_scale=W)[0],
        }
        if scheduler_step is not None:
            sampling["trl"] = lambda: scheduler_step(scheduler, guided(m), t_dev, x, eta=1.0)
            training["trl"] = lambda: ppo(scheduler_step(scheduler, guided(leaf), t_dev, x, eta=1.0,
                                                         prev_sample=prev).log_probs, old, adv)
        if not args.cpu_smoke:
            compiled_step, compiled_loss = torch.compile(math_step), torch.compile(math_loss)
            sampling["compile"] = lambda: compiled_step(m, torch.randn(x.shape, device=dev))
            training["compile"] = lambda: compiled_loss(leaf)

        def backward(loss_fn):
            def run():
                leaf.grad = None
                loss_fn().backward()
            return run

        for name, fn in sampling.items():
            with torch.no_grad():
                if args.cpu_smoke:
                    fn()
                    rows.append((B, "sampling", name, "ran", "-"))
                    continue
                eager = per_call_us(fn, 50)
                if name == "trl":  # a failed capture can leave the CUDA context unusable: not attempted
                    rows.append((B, "sampling", name, f"{eager:.1f}", "not capturable (timestep.cpu() inside)"))
                    continue
                try:
                    graphed = f"{cuda_graph_time([fn], 50) * 1e6:.1f}"
                except Exception as error:  # e.g. a host synchronisation inside the candidate
                    graphed = f"not capturable ({type(error).__name__}: {str(error).splitlines()[0][:60]})"
                    torch.cuda.synchronize()
            rows.append((B, "sampling", name, f"{eager:.1f}", graphed))
        for name, fn in training.items():
            if args.cpu_smoke:
                backward(fn)()
                rows.append((B, "training", name, "ran", "-"))
                continue
            rows.append((B, "training", name, f"{per_call_us(backward(fn), 30):.1f}", "-"))

    print("| B | path | candidate | eager us/call | CUDA graph us/call |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    if args.cpu_smoke:
        print(f"SUMMARY {len(rows)} candidate calls ran on the CPU (timing needs a GPU)")
        return 0
    at32 = {(r[1], r[2]): r[3] for r in rows if r[0] == batches[-1]}
    summary = ", ".join(f"{path} {name} {value} us" for (path, name), value in at32.items())
    print(f"SUMMARY B={batches[-1]} eager: {summary}")
    return 1 if failed else 0


# ---- kernelbw ------------------------------------------------------------------------------------


def cmd_kernelbw(args) -> int:
    """Bandwidth of the fused kernels against a device-to-device copy of the same bytes.

    Each case runs the kernels through the backend runner (no Python-side validation), rotating over
    enough buffer sets that the data does not stay in L2. Times: 'kernel' is the main kernel's device
    time (torch.profiler), 'step' the whole entry point (main kernel + finalize) per call from CUDA-graph
    replay. Bytes: every input read once and every output written once. Copy: torch copy_ of half
    those bytes (read + write), same rotation, same timing methods. Target: kernel >= 0.80 of copy."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ddpo_fast import backends
    from ddpo_fast.backends import DdimCall

    dev, names = device_backends(args)
    size_of = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

    def make_case(runner, kind, B, N, dtype, cfg):
        rows = 2 * B if cfg else B
        m = torch.randn(rows, N, device=dev).to(dtype)
        x = torch.randn(B, N, device=dev).to(dtype)
        a = torch.full((B,), 0.3, device=dev)
        p = torch.full((B,), 0.4, device=dev)
        prev = torch.randn(B, N, device=dev).to(dtype)
        common = dict(model_output=m, sample=x, alpha_t=a, alpha_prev=p, prev_sample=prev, eta=1.0,
                      guidance_scale=7.5 if cfg else None)
        s = size_of[dtype]
        if kind == "sample":
            call = DdimCall(log_prob=torch.empty(B, device=dev), sample_noise=True, seed=1, offset=2, **common)
            return call, runner.forward, (rows * N + B * N + B * N) * s
        if kind == "logprob":
            call = DdimCall(log_prob=torch.empty(B, device=dev), **common)
            return call, runner.forward, (rows * N + 2 * B * N) * s
        call = DdimCall(grad_log_prob=torch.randn(B, device=dev), grad_model_output=torch.empty_like(m), **common)
        return call, runner.backward, (rows * N + 2 * B * N + rows * N) * s

    def profiled_us(fns, pattern, reps=10):
        """Median device time (us) of the kernels whose name contains `pattern`."""
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                for fn in fns:
                    fn()
            torch.cuda.synchronize()
        durs = sorted(e.time_range.elapsed_us() for e in prof.events()
                      if pattern in e.name and str(getattr(e, "device_type", "CUDA")).endswith("CUDA"))
        return durs[len(durs) // 2] if durs else float("nan")

    def make_row(backend, label, nbytes, k_us, fin_us, step_s, copy_k_us, copy_s):
        """One CSV row: times (kernel and copy from the profiler, step and copy step from graph replay)
        and the bandwidths they give for `nbytes`."""
        row = dict(backend=backend, case=label, bytes=nbytes, kernel_us=k_us, finalize_us=fin_us,
                   step_us=step_s * 1e6, kernel_GBps=nbytes / (k_us * 1e-6) / 1e9 if k_us == k_us else float("nan"),
                   step_GBps=nbytes / step_s / 1e9, copy_us=copy_k_us, copy_step_us=copy_s * 1e6,
                   copy_GBps=nbytes / (copy_k_us * 1e-6) / 1e9 if copy_k_us == copy_k_us else nbytes / copy_s / 1e9)
        row["kernel_vs_copy"] = row["kernel_GBps"] / row["copy_GBps"]
        row["step_vs_copy"] = row["step_GBps"] / (nbytes / copy_s / 1e9)
        return row

    def rotation(nbytes):
        return max(2, math.ceil(3 * l2 / nbytes))

    def measure(backend, label, kind, B, N, dtype, cfg):
        runner = backends.runner(backend)
        nbytes = make_case(runner, kind, B, N, dtype, cfg)[2]
        sets = [make_case(runner, kind, B, N, dtype, cfg) for _ in range(rotation(nbytes))]
        fns = [(lambda c=c, f=f: f(c)) for c, f, _ in sets]
        # Kernel names: CUDA ddim_forward_kernel / ddim_backward_kernel / finalize_kernel, Triton the
        # same with a leading underscore.
        kernel = "ddim_backward_kernel" if kind == "backward" else "ddim_forward_kernel"
        k_us = profiled_us(fns, kernel)
        fin_us = profiled_us(fns, "finalize_kernel") if kind != "backward" else 0.0
        step_s = cuda_graph_time(fns)
        half = nbytes // 2
        copies = [(torch.empty(half, dtype=torch.uint8, device=dev), torch.empty(half, dtype=torch.uint8, device=dev))
                  for _ in range(rotation(nbytes))]
        cfns = [(lambda d=d, s=s: d.copy_(s)) for d, s in copies]
        copy_s = cuda_graph_time(cfns)
        copy_k_us = profiled_us(cfns, "Memcpy")
        if math.isnan(copy_k_us):
            copy_k_us = profiled_us(cfns, "copy")
        del sets, copies
        torch.cuda.empty_cache()
        return make_row(backend, label, nbytes, k_us, fin_us, step_s, copy_k_us, copy_s)

    def big_copy_GBps(megabytes=1024):
        src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return 2 * src.numel() / cuda_graph_time([lambda: dst.copy_(src)], reps=10) / 1e9

    N = 4 * 64 * 64
    cases = [
        ("sample fp32 B32", "sample", 32, N, torch.float32, False),
        ("sample fp32 cfg B32", "sample", 32, N, torch.float32, True),
        ("sample bf16 cfg B32", "sample", 32, N, torch.bfloat16, True),
        ("logprob fp32 cfg B32", "logprob", 32, N, torch.float32, True),
        ("backward fp32 cfg B32", "backward", 32, N, torch.float32, True),
        ("backward bf16 cfg B32", "backward", 32, N, torch.bfloat16, True),
        ("sample fp32 cfg B32 4x128x128", "sample", 32, 4 * N, torch.float32, True),
        ("sample fp32 B256", "sample", 256, N, torch.float32, False),
    ]
    # Triton: the training dtype's cases only (each new case is a cold compile).
    plan = [(name, c) for name in names for c in cases if name != "triton" or (args.triton and c[4] == torch.bfloat16)]
    rows = []
    if args.cpu_smoke:  # each case's calls once, small, on the CPU; made-up times for the report below
        for backend, (label, kind, B, N, dtype, cfg) in plan:
            call, fn, nbytes = make_case(backends.runner(backend), kind, 2, 4 * 8 * 8, dtype, cfg)
            fn(call)
            out = {"sample": call.prev_sample, "logprob": call.log_prob}.get(kind, call.grad_model_output)
            assert torch.isfinite(out.float()).all(), (backend, label)
            rows.append(make_row(backend, label, nbytes, 1.0, 1.0, 2e-6, 1.0, 2e-6))
        print(f"{len(plan)} cases ran once on the CPU ({', '.join(names)}); the report has made-up times")
    else:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        print(f"device: {torch.cuda.get_device_name(0)}; large copy (1 GiB, read+write): {big_copy_GBps():.0f} GB/s")
        for backend, case in plan:
            try:
                rows.append(measure(backend, *case))
            except Exception as e:  # noqa: BLE001
                print(f"{backend} {case[0]}: FAILED {type(e).__name__}: {e}")
    cols = ["backend", "case", "bytes", "kernel_us", "finalize_us", "step_us", "kernel_GBps", "copy_us", "copy_GBps",
            "kernel_vs_copy", "step_GBps", "copy_step_us", "step_vs_copy"]
    print(" | ".join(f"{c:>12}" if i > 1 else f"{c:<30}" if i else f"{c:<7}" for i, c in enumerate(cols)))
    for r in rows:
        print(" | ".join(
            (f"{r[c]:<7}" if i == 0 else f"{r[c]:<30}" if i == 1 else
             f"{r[c]:>12.3f}" if isinstance(r[c], float) else f"{r[c]:>12}") for i, c in enumerate(cols)))
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    parts = []
    for backend in names:
        mine = [r for r in rows if r["backend"] == backend and r["kernel_vs_copy"] == r["kernel_vs_copy"]]
        if not mine:
            continue
        key = next((r for r in mine if r["case"] == "sample bf16 cfg B32"), mine[0])
        low = min(mine, key=lambda r: r["kernel_vs_copy"])
        below = sum(r["kernel_vs_copy"] < 0.8 for r in mine)
        parts.append(f"{backend}: {key['case']} {key['kernel_GBps']:.0f} GB/s = {key['kernel_vs_copy']:.2f} of copy "
                     f"(step {key['step_vs_copy']:.2f}); min {low['kernel_vs_copy']:.2f} ({low['case']}); "
                     f"{len(mine) - below}/{len(mine)} >= 0.80")
    print("SUMMARY " + ("; ".join(parts) or "no measurement"))
    return 0 if len(rows) == len(plan) and plan else 1


# ---- train-summary, phase ------------------------------------------------------------------------


def cmd_train_summary(args) -> int:
    """One line from benchmarks/train.py's CSV: samples/s, peak memory, MFU."""
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        first = f", first (warm-up) epoch {float(r['first_epoch_s']):.0f} s" if r.get("first_epoch_s") else ""
        print(f"{r['trainer']} model={r.get('model')} epochs={r.get('epochs')}: {float(r['samples_per_s']):.2f} "
              f"samples/s, peak {float(r['peak_memory_mb']) / 1024:.1f} GiB, MFU {float(r['mfu']):.1%}{first}")
    r = rows[0]
    print(f"SUMMARY {float(r['samples_per_s']):.2f} samples/s, peak {float(r['peak_memory_mb']) / 1024:.1f} GiB, "
          f"MFU {float(r['mfu']):.1%}")
    return 0


def cmd_phase(args) -> int:
    """approx_kl and clipfrac of runs whose weights do not move (learning rate 1e-30, no clipping):
    the training phase's log-probs against the sampling phase's, so any difference is the two
    phases computing differently (0 on the CPU)."""
    parts = []
    for run in args.runs:
        label = Path(run).name
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            print(f"{label}: no metrics.jsonl")
            parts.append(f"{label}: no metrics")
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not records:
            parts.append(f"{label}: no epochs")
            continue
        nan = float("nan")
        for r in records:
            print(f"{label} epoch {r.get('epoch')}: approx_kl {r.get('approx_kl', nan):.3g} "
                  f"clipfrac {r.get('clipfrac', nan):.3g} loss {r.get('loss', nan):.3g} "
                  f"samples/s {r.get('samples_per_s', nan):.2f}")
        kl = max(r.get("approx_kl", nan) for r in records)
        clip = max(r.get("clipfrac", nan) for r in records)
        parts.append(f"{label}: approx_kl {kl:.2g}, clipfrac {clip:.2g}")
    print("SUMMARY max over epochs: " + "; ".join(parts))
    return 0


# ---- triton-variants (CPU only) ------------------------------------------------------------------

_RECORDER = '''
"""pytest plugin (written by benchmarks/gpu_checks.py triton-variants): the Triton backend's entry
points record what each launch would compile on a GPU, then compute with the C++ CPU backend."""
import atexit, json, os
import pytest
import torch
from ddpo_fast import backends
from ddpo_fast.kernels import ddim as tk

NO_SPECIALIZE = set(tk._SCALAR_ARGS) | {"clip_bits", "advmax_bits"}  # the kernels' do_not_specialize
cpu = backends.runner("cpu")
keys_of = {}  # test -> the variant keys its launches need
slot_of = {}  # test -> its slot in the suite's sharding (tests/conftest.py, DDPO_FAST_GPU_SHARD)
current = ["?"]


def spec(name, value):
    """Triton's key for an argument: type, 16-byte alignment / divisibility, value 1 made a constant."""
    if isinstance(value, torch.Tensor):
        return f"*{value.dtype}" + (":16" if value.data_ptr() % 16 == 0 else "")
    width = "i32" if -2**31 <= value < 2**31 else "i64"
    if name in NO_SPECIALIZE:
        return width
    return "=1" if value == 1 else width + (":16" if value % 16 == 0 else "")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Slots as the suite's sharding gives them (over every focused item), then the Triton items only."""
    families, others = {}, 0
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params or {}
        if params.get("backend") == "triton" and "case" in params:
            slot = families.setdefault((str(params.get("dtype")), params["case"]), len(families))
        else:
            slot, others = others, others + 1
        slot_of[item.nodeid] = slot
    items[:] = [i for i in items if "[triton" in i.nodeid]


def pytest_runtest_setup(item):
    current[0] = item.nodeid
    keys_of.setdefault(item.nodeid, [])


def patched(entry, build):
    def run(call):
        for launch in build(call, tk.GPU_CONFIG):
            key = json.dumps([launch.kernel.__name__, {k: spec(k, v) for k, v in launch.args.items()},
                              {k: str(v) for k, v in launch.constexprs.items()}, launch.num_warps], sort_keys=True)
            keys_of.setdefault(current[0], []).append(key)
        getattr(cpu, entry)(call)
    return run


tk.forward = patched("forward", tk.forward_launches)
tk.backward = patched("backward", tk.backward_launches)
tk.ppo = patched("ppo", tk.ppo_launches)


@atexit.register
def dump():
    with open(os.environ["VARIANTS_OUT"], "w") as f:
        json.dump({"keys": {t: sorted(set(k)) for t, k in keys_of.items()}, "slots": slot_of}, f)
'''


def cmd_triton_variants(args) -> int:
    """How many Triton kernels the suite's test step compiles from a cold cache, counted on the CPU:
    the DDPO_FAST_GPU_FOCUS selection of tests/test_cuda.py (triton items), run on a copy whose tensors
    live on the CPU, with the Triton entry points replaced by a recorder of each launch's
    specialization key (kernel, argument types, 16-byte divisibility, values 1, constexprs, warps) that
    then computes with the C++ CPU backend; and how they fall on the suite's DDPO_FAST_GPU_SHARD
    processes (each compiles what its tests need that no other process has cached yet). An
    estimate: Triton's own key has the same parts. The time uses --seconds-per-variant, the mean
    measured by tests/test_triton_aot.py for these kernels on a 2-core machine (Triton 3.9)."""
    src = (REPO / "tests" / "test_cuda.py").read_text()
    edits = {'DEVICE = torch.device("cuda")': 'DEVICE = torch.device("cpu")',
             'pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")':
                 "pytestmark = []"}
    for old, new in edits.items():
        if old not in src:
            print(f"tests/test_cuda.py changed: cannot find {old!r}; update gpu_checks.py triton-variants")
            return 1
        src = src.replace(old, new)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_cuda.py").write_text(src)
        Path(tmp, "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
        Path(tmp, "record_triton_variants.py").write_text(_RECORDER)
        out = Path(tmp, "variants.json")
        env = {k: v for k, v in os.environ.items() if k != "DDPO_FAST_GPU_SHARD"}
        env.update({"DDPO_FAST_GPU_FOCUS": "1", "TRITON_INTERPRET": "1", "VARIANTS_OUT": str(out),
                    "PYTHONPATH": os.pathsep.join([tmp, str(REPO), os.environ.get("PYTHONPATH", "")])})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "record_triton_variants",
               "--rootdir", tmp, "-c", os.devnull, str(Path(tmp, "test_cuda.py"))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        if not out.is_file():
            print("no variants recorded")
            return 1
        recorded = json.loads(out.read_text())
    keys_of, slots = recorded["keys"], recorded["slots"]
    every = set().union(*keys_of.values()) if keys_of else set()
    by_kernel: dict[str, int] = {}
    for key in every:
        kernel = json.loads(key)[0]
        by_kernel[kernel] = by_kernel.get(kernel, 0) + 1
    print(f"{len(keys_of)} triton tests; {len(every)} distinct variants "
          f"({', '.join(f'{k} {n}' for k, n in sorted(by_kernel.items()))})")
    per = args.seconds_per_variant
    print(f"one process: {len(every)} compiles, ~{len(every) * per:.0f} s at {per} s each")
    for n in args.shards:
        shards = [set() for _ in range(n)]
        for test, keys in keys_of.items():
            shards[slots[test] % n].update(keys)
        sizes = sorted(len(s) for s in shards)
        print(f"{n} processes: compiles per process {sizes[0]}-{sizes[-1]} (sum {sum(sizes)}: "
              f"{sum(sizes) / max(len(every), 1):.2f}x the distinct variants at most, less where a process finds "
              f"one already in the shared cache); the busiest ~{sizes[-1] * per:.0f} s")
    tests = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"
    print(f"SUMMARY {len(every)} Triton variants for {len(keys_of)} focused triton tests ({tests}; "
          f"{time.perf_counter() - start:.0f} s on the CPU)")
    return 0 if every else 1


# ---- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help=cmd_env.__doc__.split("\n")[0])
    p.add_argument("--env-file", help="where to write `fact KEY VALUE` and `module NAME ok|missing ...` lines")
    p.add_argument("--no-gpu-ok", action="store_true", help="exit 0 without a GPU (the dry run)")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("sanitize-probe", help="every entry point of each backend once, small shapes")
    p.add_argument("--backends", default="", help="comma-separated (default: cuda and triton when available)")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the calls on the CPU (dry run)")
    p.set_defaults(fn=cmd_sanitize_probe)
    p = sub.add_parser("graph", help="a sampling step captured in a CUDA graph == eager, bit for bit")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the calls on the CPU (dry run)")
    p.set_defaults(fn=cmd_graph)
    p = sub.add_parser("dropin", help="the drop-in against trl and torch.compile at B = 1, 8, 32")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the calls on the CPU (dry run)")
    p.set_defaults(fn=cmd_dropin)
    p = sub.add_parser("kernelbw", help="kernel bandwidth against a device-to-device copy")
    p.add_argument("csv", help="CSV output")
    p.add_argument("--no-triton", dest="triton", action="store_false", help="the CUDA kernels alone")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the calls on the CPU (dry run)")
    p.set_defaults(fn=cmd_kernelbw)
    p = sub.add_parser("train-summary", help="one line from benchmarks/train.py's CSV")
    p.add_argument("csv")
    p.set_defaults(fn=cmd_train_summary)
    p = sub.add_parser("phase", help="approx_kl / clipfrac of runs with frozen weights")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(fn=cmd_phase)
    p = sub.add_parser("triton-variants", help="CPU only: Triton variants the suite's tests compile")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--shards", type=int, nargs="*", default=[4, 8, 12], help="process counts to show")
    p.add_argument("--seconds-per-variant", type=float, default=0.63)
    p.set_defaults(fn=cmd_triton_variants)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
