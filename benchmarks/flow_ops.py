"""Benchmark of the fused flow SDE ops (Flow-GRPO's step) against the eager reference and
torch.compile of it, on SD3-shaped latents (16 channels; 64x64 at 512 px).

The eager baseline is Flow-GRPO's formula as plain PyTorch in float32 (ddpo_fast.flow_reference,
the same ops flow_grpo's sde_step_with_logprob runs) with CFG applied first and the noise drawn by
torch.randn; the fused step draws its noise in the kernel. Candidates run interleaved round by
round (benchmarks/ops.py's timing), so each sees the same machine load; quote the ratios.

    python benchmarks/flow_ops.py                  # CPU: C++ kernels vs baselines
    python benchmarks/flow_ops.py --device cuda    # GPU: CUDA and Triton kernels vs baselines
    python benchmarks/flow_ops.py --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ddpo_fast import flow_reference, ops
from ddpo_fast.backends import _C, use_backend
from ops import copy_bandwidth, fused_backends, time_interleaved  # benchmarks/ops.py, the script's folder
from results_csv import write_rows

GUIDANCE = 4.5  # Flow-GRPO's SD3.5 default
NOISE_LEVEL = 0.7
SIGMA_MAX = 0.9601  # sigmas[1] of FlowMatchEulerDiscreteScheduler(shift=3) with 10 steps (SD3.5, Flow-GRPO)
SIZES = [(1, (16, 64, 64)), (8, (16, 64, 64)), (24, (16, 64, 64)), (7, (16, 17, 23))]
QUICK_SIZES = [(8, (16, 64, 64)), (7, (16, 17, 23))]


def make_inputs(batch, shape, device):
    g = torch.Generator().manual_seed(0)
    model_output = torch.randn((2 * batch,) + shape, generator=g).to(device)
    sample = torch.randn((batch,) + shape, generator=g).to(device)
    sigma = torch.full((batch,), 0.6, device=device)
    sigma_prev = torch.full((batch,), 0.5, device=device)
    return model_output, sample, sigma, sigma_prev


def reference_step(model_output, sample, sigma, sigma_prev, noise):
    return flow_reference.flow_sde_step(model_output, sample, sigma, sigma_prev, noise_level=NOISE_LEVEL, noise=noise,
                                        sigma_max=SIGMA_MAX, guidance_scale=GUIDANCE)


def reference_loss(model_output, sample, prev_sample, sigma, sigma_prev, old_log_prob, advantages):
    loss, _ = flow_reference.flow_sde_ppo_loss(model_output, sample, prev_sample, sigma, sigma_prev, old_log_prob,
                                               advantages, clip_range=1e-4, adv_clip_max=5.0, noise_level=NOISE_LEVEL,
                                               sigma_max=SIGMA_MAX, guidance_scale=GUIDANCE)
    return loss


def bench_step(batch, shape, device, backends):
    model_output, sample, sigma, sigma_prev = make_inputs(batch, shape, device)
    compiled = torch.compile(reference_step)

    def baseline(step):
        return lambda: step(model_output, sample, sigma, sigma_prev, torch.randn(sample.shape, device=device))

    candidates = {"eager": baseline(reference_step), "compile": baseline(compiled)}
    for name in backends:
        def fused(name=name):
            with use_backend(name):
                return ops.flow_sde_step_logprob(model_output, sample, sigma, sigma_prev, noise_level=NOISE_LEVEL,
                                                 seed=1, offset=2, sigma_max=SIGMA_MAX,
                                                 guidance_scale=GUIDANCE)
        candidates[name] = fused
    numel = sample.numel()
    return candidates, 4 * (2 * numel + numel + numel)  # read both CFG halves and x_t, write x'


def bench_loss(batch, shape, device, backends):
    model_output, sample, sigma, sigma_prev = make_inputs(batch, shape, device)
    prev_sample, old_log_prob, _, _ = reference_step(model_output, sample, sigma, sigma_prev, torch.randn_like(sample))
    advantages = torch.randn(batch, device=device)
    leaf = model_output.clone().requires_grad_()
    compiled = torch.compile(reference_loss)

    def run(loss_fn):
        def step():
            leaf.grad = None
            loss_fn().backward()
        return step

    args = (sample, prev_sample, sigma, sigma_prev, old_log_prob, advantages)
    candidates = {"eager": run(lambda: reference_loss(leaf, *args)), "compile": run(lambda: compiled(leaf, *args))}
    for name in backends:
        def fused(name=name):
            with use_backend(name):
                return ops.flow_sde_ppo_loss(leaf, *args, clip_range=1e-4, adv_clip_max=5.0, noise_level=NOISE_LEVEL,
                                             sigma_max=SIGMA_MAX, guidance_scale=GUIDANCE)[0]
        candidates[name] = run(fused)
    numel = sample.numel()
    # forward reads both halves, x_t, x'; backward reads them again and writes both halves' grads
    return candidates, 4 * (4 * numel + 4 * numel + 2 * numel)


OPS = {"flow_sde_step (sampling, CFG)": bench_step, "flow_sde_ppo_loss fwd+bwd (CFG)": bench_loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (the fused CPU kernels use the same count); on a shared, "
                             "oversubscribed machine 1 keeps eager PyTorch's many parallel regions from "
                             "waiting on descheduled OpenMP threads")
    parser.add_argument("--csv", type=Path, default=None,
                        help="CSV output (default benchmarks/results/flow_ops_DEVICE.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    rounds = args.rounds or (15 if args.quick else 40)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backends = fused_backends(device)
    if not backends:
        print("no fused backend available on", device, file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    isa = f", CPU kernels: {_C.cpu_isa()}" if _C is not None and device.type == "cpu" else ""
    print(f"device: {name}{isa}; torch {torch.__version__}; measured copy bandwidth {bandwidth:.1f} GB/s\n")
    header = (f"{'op':32} {'size':>14} {'candidate':>9} {'median ms':>10} {'GB/s':>8} {'of copy':>8} "
              f"{'vs eager':>9} {'vs compile':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for op_name, build in OPS.items():
        for batch, shape in QUICK_SIZES if args.quick else SIZES:
            candidates, bytes_moved = build(batch, shape, device, backends)
            times = time_interleaved(candidates, device, rounds)
            size = f"{batch}x{'x'.join(map(str, shape))}"
            for candidate, seconds in times.items():
                gbps = bytes_moved / seconds / 1e9
                row = {"op": op_name, "size": size, "candidate": candidate, "median_ms": seconds * 1e3,
                       "gb_per_s": gbps, "fraction_of_copy": gbps / bandwidth,
                       "speedup_vs_eager": times["eager"] / seconds, "speedup_vs_compile": times["compile"] / seconds}
                rows.append(row)
                print(f"{op_name:32} {size:>14} {candidate:>9} {row['median_ms']:10.3f} {gbps:8.1f} "
                      f"{row['fraction_of_copy']:8.0%} {row['speedup_vs_eager']:9.2f} {row['speedup_vs_compile']:10.2f}")
            print()
    write_rows(args.csv or Path(__file__).parent / "results" / f"flow_ops_{device.type}.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
