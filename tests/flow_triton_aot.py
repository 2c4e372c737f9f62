"""Compiles the flow SDE Triton kernels (kernels/flow_sde.py) ahead of time for sm_90 without a GPU,
as tests/triton_aot.py does for the DDIM kernels (whose compile-only driver and compile step it
reuses): a covering set of launches on meta tensors, each down to a cubin. Run by
tests/test_flow_triton_aot.py in a subprocess without TRITON_INTERPRET; writes a JSON report."""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch
from triton.runtime import driver

import triton_aot  # tests/ is the script's folder
from ddpo_fast.flow_ops import FlowCall
from ddpo_fast.kernels import ddim as tk
from ddpo_fast.kernels import flow_sde

B, N = 2, 16 * 64 * 64  # SD3 latents


def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def launches() -> list[tuple[dict, tk.Launch]]:
    """Forward: every (compute dtype, sde type, sampling kind) with CFG, mean, bf16 storage and the
    PPO stage alternating, and the KL penalty on two of the given-prev_sample launches (one with the
    PPO stage); backward: every (compute dtype, sde type) with the optional inputs (the KL penalty's
    too) alternating. Every constexpr takes each of its values at least once."""
    out = []
    for n, (ct, sde, kind) in enumerate(itertools.product([torch.float32, torch.float64], [0, 1],
                                                           ["given", "noise", "philox"])):
        store = [torch.float32, torch.bfloat16, torch.float16][n % 3]
        cfg = n % 2 == 0
        ppo = {}
        if n % 4 == 1:
            ppo = dict(old_log_prob=_t(B, dtype=ct), advantages=_t(B, dtype=ct), loss=_t(dtype=ct),
                       approx_kl=_t(dtype=ct), clipfrac=_t(dtype=ct), dloss_dlogp=_t(B, dtype=ct))
        mo = _t(2 * B if cfg else B, N, dtype=store)
        kl = {}
        if n in (0, 9):  # given prev_samples; n = 9 with the PPO stage
            kl = dict(reference_output=torch.empty_like(mo), kl=_t(B, dtype=ct), kl_beta=0.1,
                      kl_mean=_t(dtype=ct) if ppo else None)
        call = FlowCall(model_output=mo, sample=_t(B, N, dtype=store),
                        sigma=_t(B, dtype=ct), sigma_prev=_t(B, dtype=ct), prev_sample=_t(B, N, dtype=store),
                        sde_type=sde, guidance_scale=4.5 if cfg else None, log_prob=_t(B, dtype=ct),
                        std_dev_t=_t(B, dtype=ct), prev_sample_mean=_t(B, N, dtype=ct) if n % 3 != 2 else None,
                        sample_noise=kind != "given", noise=_t(B, N, dtype=store) if kind == "noise" else None,
                        seed=2**63 + n, offset=n, **ppo, **kl)
        out += flow_sde.forward_launches(call, tk.GPU_CONFIG)
    for n, (ct, sde) in enumerate(itertools.product([torch.float32, torch.float64], [0, 1])):
        store = [torch.bfloat16, torch.float32, torch.float16, torch.float64][n]
        cfg = n % 2 == 1
        mo = _t(2 * B if cfg else B, N, dtype=store)
        kl = dict(reference_output=torch.empty_like(mo), grad_kl=_t(B, dtype=ct)) if n in (1, 2) else {}
        call = FlowCall(model_output=mo, sample=_t(B, N, dtype=store), sigma=_t(B, dtype=ct), sigma_prev=_t(B, dtype=ct),
                        prev_sample=_t(B, N, dtype=store), sde_type=sde, guidance_scale=4.5 if cfg else None,
                        grad_prev_sample=_t(B, N) if n % 2 == 0 else None,
                        grad_prev_sample_mean=_t(B, N, dtype=ct) if n >= 2 else None,
                        grad_log_prob=_t(B, dtype=ct), grad_model_output=torch.empty_like(mo), **kl)
        out += flow_sde.backward_launches(call, tk.GPU_CONFIG)
    unique = {}
    for launch in out:  # the PPO and finalize launches repeat: compile each variant once
        v = triton_aot.variant(launch)
        unique.setdefault(json.dumps(v, sort_keys=True, default=str), (v, launch))
    return list(unique.values())


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    driver.set_active(triton_aot.CompileOnlyDriver())
    triton_aot._TODO.extend(launches())
    compiled = [triton_aot.compile_launch(i) for i in range(len(triton_aot._TODO))]
    Path(sys.argv[1]).write_text(json.dumps(compiled, indent=1, default=str))
    for c in compiled:
        print(f"{c['kernel']:24s} {c['seconds']:5.2f} s  registers {c.get('registers')}  spills {c.get('spill_stores')}")


if __name__ == "__main__":
    main()
