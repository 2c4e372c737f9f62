"""Benchmark of the fused ops against eager PyTorch, torch.compile and trl 0.23.1.

For each op and size it times every candidate interleaved round by round (so all see the same
machine load) and prints the median time, the achieved bandwidth against the bytes the op must move
(each input read once, each output written once), that bandwidth as a fraction of a measured
device copy, and the speedup of each fused backend over the eager reference, torch.compile of the
reference, and trl's scheduler_step.

    python benchmarks/ops.py                       # CPU: C++ kernels vs baselines
    python benchmarks/ops.py --device cuda         # GPU: CUDA and Triton kernels vs baselines
    python benchmarks/ops.py --quick               # fewer sizes and repetitions

The sampling-step baselines include their noise generation (torch.randn outside the compiled math);
the fused step draws its noise in the kernel from the Philox stream. Candidates run interleaved,
so each starts with caches disturbed by the others, as an op between UNet calls does.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ddpo_fast import ops, reference
from ddpo_fast.backends import _C, cuda_kernels_built, triton_available, use_backend
from results_csv import write_rows  # benchmarks/ is the script's folder

GUIDANCE = 5.0
SIZES = [(1, (4, 64, 64)), (8, (4, 64, 64)), (32, (4, 64, 64)), (7, (4, 17, 23))]
QUICK_SIZES = [(32, (4, 64, 64)), (7, (4, 17, 23))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """GB/s of a large device copy, counting bytes read plus bytes written."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


def time_interleaved(candidates: dict, device: torch.device, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate, run round-robin."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def fused_backends(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["cpu"] if _C is not None else []
    names = ["cuda"] if cuda_kernels_built() else []
    return names + (["triton"] if triton_available() else [])


def make_inputs(batch: int, shape: tuple, device: torch.device):
    g = torch.Generator().manual_seed(0)
    model_output = torch.randn((2 * batch,) + shape, generator=g).to(device)
    sample = torch.randn((batch,) + shape, generator=g).to(device)
    alpha_t = torch.full((batch,), 0.5, device=device)
    alpha_prev = torch.full((batch,), 0.6, device=device)
    return model_output, sample, alpha_t, alpha_prev


def reference_step(model_output, sample, alpha_t, alpha_prev, noise):
    return reference.ddim_step(model_output, sample, alpha_t, alpha_prev, noise=noise, guidance_scale=GUIDANCE)


def reference_loss(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages):
    loss, _ = reference.ddim_ppo_loss(model_output, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                                      clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)
    return loss


def trl_candidate(model_output, sample, device):
    """trl 0.23.1's scheduler_step with CFG applied outside, as trl's pipeline does; None if absent."""
    try:
        from diffusers import DDIMScheduler
        from trl.models.modeling_sd_base import scheduler_step
    except ImportError:
        return None
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    timestep = scheduler.timesteps[25].expand(sample.shape[0]).to(device)

    def step():
        uncond, cond = model_output.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        return scheduler_step(scheduler, guided, timestep, sample, eta=1.0)

    return step


def bench_step(batch, shape, device, rounds, backends):
    model_output, sample, alpha_t, alpha_prev = make_inputs(batch, shape, device)
    compiled = torch.compile(reference_step)  # the math; its noise comes from torch.randn, timed with it

    def baseline(step):
        return lambda: step(model_output, sample, alpha_t, alpha_prev, torch.randn(sample.shape, device=device))

    candidates = {"eager": baseline(reference_step), "compile": baseline(compiled)}
    trl = trl_candidate(model_output, sample, device)
    if trl is not None:
        candidates["trl"] = trl
    for name in backends:
        def fused(name=name):
            with use_backend(name):
                return ops.ddim_step_logprob(model_output, sample, alpha_t, alpha_prev, seed=1, offset=2,
                                             guidance_scale=GUIDANCE)
        candidates[name] = fused
    numel = sample.numel()
    bytes_moved = 4 * (2 * numel + numel + numel)  # read both CFG halves and x_t, write x_{t-1}
    return candidates, bytes_moved


def bench_loss(batch, shape, device, rounds, backends):
    model_output, sample, alpha_t, alpha_prev = make_inputs(batch, shape, device)
    prev_sample, old_log_prob = reference_step(model_output, sample, alpha_t, alpha_prev, torch.randn_like(sample))
    advantages = torch.randn(batch, device=device)
    leaf = model_output.clone().requires_grad_()
    compiled = torch.compile(reference_loss)

    def run(loss_fn):
        def step():
            leaf.grad = None
            loss_fn().backward()
        return step

    candidates = {
        "eager": run(lambda: reference_loss(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages)),
        "compile": run(lambda: compiled(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages)),
    }
    for name in backends:
        def fused(name=name):
            with use_backend(name):
                return ops.ddim_ppo_loss(leaf, sample, prev_sample, alpha_t, alpha_prev, old_log_prob, advantages,
                                         clip_range=1e-4, adv_clip_max=5.0, guidance_scale=GUIDANCE)[0]
        candidates[name] = run(fused)
    numel = sample.numel()
    # forward reads both halves, x_t, x_{t-1}; backward reads them again and writes both halves' grads
    bytes_moved = 4 * (4 * numel + 4 * numel + 2 * numel)
    return candidates, bytes_moved


OPS = {"ddim_step (sampling, CFG)": bench_step, "ddim_ppo_loss fwd+bwd (CFG)": bench_loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate")
    parser.add_argument("--csv", type=Path, default=None, help="CSV output (default benchmarks/results/ops_DEVICE.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    rounds = args.rounds or (15 if args.quick else 40)
    sizes = QUICK_SIZES if args.quick else SIZES
    backends = fused_backends(device)
    if not backends:
        print("no fused backend available on", device, file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    isa = f", CPU kernels: {_C.cpu_isa()}" if _C is not None and device.type == "cpu" else ""
    print(f"device: {name}{isa}; torch {torch.__version__}; measured copy bandwidth {bandwidth:.1f} GB/s\n")

    rows = []
    header = f"{'op':30} {'size':>14} {'candidate':>9} {'median ms':>10} {'GB/s':>8} {'of copy':>8} " \
             f"{'vs eager':>9} {'vs compile':>10} {'vs trl':>7}"
    print(header)
    print("-" * len(header))
    for op_name, build in OPS.items():
        for batch, shape in sizes:
            candidates, bytes_moved = build(batch, shape, device, rounds, backends)
            times = time_interleaved(candidates, device, rounds)
            size = f"{batch}x{'x'.join(map(str, shape))}"
            for candidate, seconds in times.items():
                gbps = bytes_moved / seconds / 1e9
                row = {
                    "op": op_name, "size": size, "candidate": candidate, "median_ms": seconds * 1e3,
                    "gb_per_s": gbps, "fraction_of_copy": gbps / bandwidth,
                    "speedup_vs_eager": times["eager"] / seconds, "speedup_vs_compile": times["compile"] / seconds,
                    "speedup_vs_trl": times["trl"] / seconds if "trl" in times else float("nan"),
                }
                rows.append(row)
                print(f"{op_name:30} {size:>14} {candidate:>9} {row['median_ms']:10.3f} {gbps:8.1f} "
                      f"{row['fraction_of_copy']:8.0%} {row['speedup_vs_eager']:9.2f} "
                      f"{row['speedup_vs_compile']:10.2f} {row['speedup_vs_trl']:7.2f}")
            print()
    path = args.csv or Path(__file__).parent / "results" / f"ops_{device.type}.csv"
    write_rows(path, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
