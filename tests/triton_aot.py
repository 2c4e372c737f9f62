"""Compiles the Triton kernels of ddpo_fast.kernels.ddim ahead of time for a Hopper GPU (sm_90),
without a GPU: the kernel variants a GPU run would compile, down to a cubin (ptxas comes with the
triton wheel).

    python tests/triton_aot.py OUT.json [--jobs N]

Run by tests/test_triton_aot.py in a subprocess whose environment has no TRITON_INTERPRET: with it
set when Triton is imported, @triton.jit makes interpreted functions, which cannot be compiled.

How. Each launch is compiled the way a GPU launch compiles it: `kernel.warmup(grid, **arguments)`
with the arguments the entry points pass, so Triton's JIT itself binds them (by keyword, as
kernels/ddim.py launches), picks the argument types and value specializations (i32 / i64 scalars,
16-byte aligned pointers, sizes divisible by 16, values equal to 1 made constants) and compiles;
warmup stops before the launch. A compile-only driver stands in for the CUDA driver: the JIT asks
it for the current device, stream and target (sm_90) and nothing else. The tensors live on the
meta device: the JIT reads only their dtype and address (0: aligned), so Stable Diffusion's latent
shape (B = 2, 4x64x64) costs no memory and the specializations are those of a training run.
Works with Triton 3.6 and 3.9 alike.

Variants. The launch builders of kernels/ddim.py (forward_launches, ppo_launches,
backward_launches) turn a DdimCall into launches, so the constexprs and arguments compiled here
are the ones their rules give, with GPU_CONFIG's tile sizes and num_warps. A seeded random pool of
DdimCalls over every option the launchers read (compute dtype, prediction type, CFG, clipping,
use_clipped_model_output, sampling with given noise / Philox / none, the PPO stage, the KL penalty,
grad_prev_sample, eta = 0, and the dtype of each tensor: fp32, bf16, fp16, fp64) gives the
reachable variants of each kernel. From those a greedy covering picks a few that cover every pair
of features (a constexpr's value or an argument's type) and every triple of constexpr values that
occur together in the pool. See tests/test_triton_aot.py for the counts and times.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from ddpo_fast.backends import DdimCall
from ddpo_fast.kernels import ddim as tk

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: compute capability 9.0, 32-thread warps
POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
STORAGE_DTYPES = list(POINTER_TYPES)
BATCH, NUMEL = 2, 4 * 64 * 64  # Stable Diffusion's latents
POOL_SIZE = 1500  # random calls per entry point; a quarter of them already reach every combination
SEED = 20240


# ---- The pool of calls ---------------------------------------------------------------------------


def random_call(rng: random.Random, entry: str) -> DdimCall:
    """A DdimCall for `entry` ("forward", "ppo" or "backward") with every option drawn at random."""
    B, N = BATCH, NUMEL
    ct = rng.choice([torch.float32, torch.float64])
    cfg = rng.random() < 0.5
    rows = 2 * B if cfg else B

    def tensor(*shape, dtype=None):
        return torch.empty(shape, dtype=dtype or rng.choice(STORAGE_DTYPES), device="meta")

    per_sample = lambda: tensor(B, dtype=ct)  # noqa: E731
    scalar = lambda: tensor(dtype=ct)  # noqa: E731
    common = dict(eta=rng.choice([1.0, 0.0]), prediction=rng.choice([0, 1, 2]),
                  guidance_scale=7.5 if cfg else None, clip_sample_range=rng.choice([None, 1.0]),
                  use_clipped_model_output=rng.random() < 0.5)
    # The KL penalty to a reference output (a given prev_sample only). The reference model runs in the
    # policy's precision (a frozen copy or LoRA's base), so its output has model_output's dtype: the
    # pool draws it so, which keeps the covering small (the load is the same code for either tensor).
    kl = rng.random() < 0.5
    if entry == "ppo":  # as ddpo_fast.ops.ppo_clip_loss makes it, or the flow loss's PPO stage with its KL
        empty = tensor(B, 1, dtype=ct)
        lp = per_sample()
        kl_args = dict(kl=per_sample(), kl_mean=scalar(), kl_beta=0.1) if kl else {}
        return DdimCall(empty, empty, lp, lp, empty, log_prob=lp, old_log_prob=per_sample(), advantages=per_sample(),
                        loss=scalar(), approx_kl=scalar(), clipfrac=scalar(), dloss_dlogp=per_sample(), **kl_args)
    model_output, sample, prev = tensor(rows, N), tensor(B, N), tensor(B, N)
    if entry == "backward":
        gprev = tensor(B, N) if rng.random() < 0.5 else None
        kl_args = dict(reference_output=torch.empty_like(model_output), grad_kl=per_sample()) if kl else {}
        return DdimCall(model_output, sample, per_sample(), per_sample(), prev, grad_prev_sample=gprev,
                        grad_log_prob=per_sample(), grad_model_output=torch.empty_like(model_output), **common,
                        **kl_args)
    sampling = rng.choice(["given", "noise", "philox"])
    ppo = {}
    if rng.random() < 0.5:
        ppo = dict(old_log_prob=per_sample(), advantages=per_sample(), loss=scalar(), approx_kl=scalar(),
                   clipfrac=scalar(), dloss_dlogp=per_sample())
    kl_args = {}
    if kl and sampling == "given":
        kl_args = dict(reference_output=torch.empty_like(model_output), kl=per_sample(), kl_beta=0.1,
                       kl_mean=scalar() if ppo else None)
    return DdimCall(model_output, sample, per_sample(), per_sample(), prev, log_prob=per_sample(),
                    sample_noise=sampling != "given", noise=tensor(B, N) if sampling == "noise" else None,
                    seed=rng.getrandbits(64), offset=rng.getrandbits(64), **common, **ppo, **kl_args)


LAUNCHERS = {"forward": tk.forward_launches, "ppo": tk.ppo_launches, "backward": tk.backward_launches}


def describe(value) -> str | int | bool:
    """A constexpr value as JSON: tl dtypes by name."""
    return value if isinstance(value, (bool, int)) else str(value)


def arg_type(name: str, value) -> str:
    """An argument's type for the coverage bookkeeping (the JIT makes its own, see compile_launch)."""
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, int) and not isinstance(value, bool):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    raise TypeError(f"no type for argument {name} = {value!r}")


def variant(launch: tk.Launch) -> dict:
    """What a launch compiles: kernel name, argument types, constexpr values, num_warps."""
    names = launch.kernel.arg_names
    assert set(launch.args) | set(launch.constexprs) == set(names), f"{launch.kernel.__name__}: arguments != parameters"
    return dict(kernel=launch.kernel.__name__,
                signature={name: arg_type(name, value) for name, value in launch.args.items()},
                constexprs={name: describe(value) for name, value in launch.constexprs.items()},
                num_warps=launch.num_warps)


def features(v: dict) -> list[str]:
    """What a variant fixes: each constexpr's value and each runtime argument's type."""
    return [f"{k}={val}" for k, val in v["constexprs"].items()] + [f"{k}:{t}" for k, t in v["signature"].items()]


def coverage(v: dict) -> set[tuple[str, ...]]:
    """What a variant covers: every pair of its features and every triple of its constexpr values."""
    values = sorted(f"{k}={val}" for k, val in v["constexprs"].items())
    return set(itertools.combinations(sorted(features(v)), 2)) | set(itertools.combinations(values, 3))


def pool() -> dict[str, list[tuple[dict, tk.Launch]]]:
    """Distinct variants of each kernel reached by the random calls (with a launch of each), in
    first-seen order."""
    rng = random.Random(SEED)
    found: dict[str, dict[str, tuple[dict, tk.Launch]]] = {}
    for entry, build in LAUNCHERS.items():
        for _ in range(POOL_SIZE):
            for launch in build(random_call(rng, entry), tk.GPU_CONFIG):
                v = variant(launch)
                found.setdefault(v["kernel"], {}).setdefault(json.dumps(v, sort_keys=True), (v, launch))
    return {kernel: list(vs.values()) for kernel, vs in found.items()}


def select(candidates: list[dict]) -> list[int]:
    """Greedy covering: repeatedly take the candidate that covers the most not yet covered."""
    covers = [coverage(v) for v in candidates]
    todo = set().union(*covers)
    chosen = []
    while todo:
        best = max(range(len(candidates)), key=lambda i: len(covers[i] & todo))
        chosen.append(best)
        todo -= covers[best]
    return chosen


# ---- Compiling -----------------------------------------------------------------------------------


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: before it compiles, the JIT asks only for the current
    device, its stream and the target; warmup() returns before anything else is needed."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def __getattr__(self, name):
        raise AttributeError(f"compiling without a GPU: the JIT asked the driver for {name!r}")


def resource_usage(ptxas_log: str) -> dict:
    """Registers and spills from ptxas -v, as Triton runs it (its log is printed when
    TRITON_DUMP_PTXAS_LOG=1); {} if the log has not the expected lines."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if not (regs and frame):
        return {}
    return dict(registers=int(regs[1]), stack_bytes=int(frame[1]), spill_stores=int(frame[2]),
                spill_loads=int(frame[3]))


_TODO: list[tuple[dict, tk.Launch]] = []  # what the worker processes compile (inherited by fork)


def compile_launch(index: int) -> dict:
    """Compiles one launch of _TODO as its GPU launch would; returns what the test checks (a
    failure raises)."""
    v, launch = _TODO[index]
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # the ptxas log
        compiled = launch.kernel.warmup(**launch.args, **launch.constexprs, grid=launch.grid,
                                        num_warps=launch.num_warps)
    seconds = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    return dict(v, seconds=round(seconds, 3), name=compiled.name, cubin_bytes=len(cubin),
                cubin_has_name=v["kernel"].encode() in cubin, sm=f"sm_{compiled.metadata.target.arch}",
                jit_signature=dict(compiled.src.signature), **resource_usage(log.getvalue()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON report")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # read by Triton at each compile: registers, spills
    driver.set_active(CompileOnlyDriver())

    start = time.perf_counter()
    candidates = pool()
    for kernel, found in candidates.items():
        _TODO.extend(found[i] for i in select([v for v, _ in found]))
    select_seconds = time.perf_counter() - start
    # Processes, not threads: compiling holds the GIL for most of its time. Forked after the
    # launches are made, before anything is compiled.
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as workers:
        compiled = list(workers.map(compile_launch, range(len(_TODO))))
    report = dict(
        triton_version=triton.__version__, target=f"sm_{TARGET.arch}", jobs=args.jobs,
        select_seconds=round(select_seconds, 2), total_seconds=round(time.perf_counter() - start, 2),
        pool={kernel: dict(variants=len(found), covers=sorted(map(list, set().union(*(coverage(v) for v, _ in found)))))
              for kernel, found in candidates.items()},
        compiled=compiled,
    )
    Path(args.out).write_text(json.dumps(report, indent=1))
    for c in compiled:
        print(f"{c['kernel']:22s} {c['seconds']:5.2f} s  registers {c.get('registers')}  spill stores "
              f"{c.get('spill_stores')}  {c['constexprs']}")
    counts = {k: sum(c["kernel"] == k for c in compiled) for k in candidates}
    print(f"triton {triton.__version__}: {len(compiled)} variants for sm_{TARGET.arch} "
          f"({', '.join(f'{k} {n} of {len(candidates[k])}' for k, n in counts.items())}) "
          f"in {report['total_seconds']} s with {args.jobs} jobs")


if __name__ == "__main__":
    main()
