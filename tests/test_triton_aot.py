"""The Triton kernels compile for a Hopper GPU (sm_90, H100 / H200), checked without a GPU.

The interpreter runs the kernels on the CPU (tests/test_triton.py) but never compiles them: a kernel
that would not compile for a GPU passes there. tests/triton_aot.py compiles them ahead of time, as
Triton's JIT compiles a GPU launch, for an sm_90 target, down to a cubin (ptxas ships with the
triton wheel), in a subprocess without TRITON_INTERPRET.

Which variants. The variants come from the launchers' own rules (kernels/ddim.py forward_launches
/ ppo_launches / backward_launches on a seeded random pool of DdimCalls, GPU_CONFIG's tiles and
num_warps); the pool reaches ~1400 distinct variants of each of the forward and backward kernels
(constexprs x pointer dtypes x scalar widths), far too many to compile. Measured on this 2-core
machine (Triton 3.9): 0.15 - 3 s per compile, 0.63 s on average, the Philox forward variants the
slowest; even the ~360 reachable constexpr combinations alone would take ~4 CPU-minutes. So a
greedy covering keeps every pair of features (a constexpr's value or an argument's type: fp32 /
bf16 / fp16 / fp64 pointers, i32 / i64 scalars) and every triple of constexpr values that the
pool reaches: 63 variants (30 forward, 6 finalize, 27 backward), ~40 CPU-seconds, 10 - 25 s wall
with 2 jobs. The triples cost nothing over pairs alone (the same 63). Triton 3.6 compiles the same
63 in about the same time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import triton_aot  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import)
from ddpo_fast.kernels import ddim as tk  # noqa: E402

HELPER = Path(__file__).resolve().parent / "triton_aot.py"
STORAGE = {"*fp32", "*bf16", "*fp16", "*fp64"}  # tensors the caller chooses the dtype of
COMPUTE = {"*fp32", "*fp64"}  # alpha, log-prob and PPO tensors: the compute dtype


def expected_values() -> dict[str, dict[str, set]]:
    """Per kernel, the values each constexpr and argument type must take at least once."""
    g = tk.GPU_CONFIG
    flag = {False, True}
    step = dict(CT={"fp32", "fp64"}, PRED={0, 1, 2}, CFG=flag, CLIP=flag, USE_CLIPPED=flag,
                mo_ptr=STORAGE, x_ptr=STORAGE, prev_ptr=STORAGE, at_ptr=COMPUTE, ap_ptr=COMPUTE,
                eta_bits={"i32", "i64"}, w_bits={"i32", "i64"})
    return {
        "_ddim_forward_kernel": dict(step, SAMPLE=flag, PHILOX=flag, PREV_BF16=flag, KL=flag, R={g.forward_block // 4},
                                     noise_ptr=STORAGE, partial_ptr=COMPUTE, ref_ptr=STORAGE),
        "_finalize_kernel": dict(CT={"fp32", "fp64"}, FROM_PARTIALS=flag, PPO=flag, KL=flag, BB={g.batch_tile},
                                 PC={g.partial_tile}, logp_ptr=COMPUTE, old_ptr=COMPUTE, dlogp_ptr=COMPUTE,
                                 klref_ptr=COMPUTE, eta_bits={"i32", "i64"}),
        "_ddim_backward_kernel": dict(step, HAS_GPREV=flag, GRAD_BF16=flag, KL=flag, BLOCK={g.backward_block},
                                      gprev_ptr=STORAGE, gmo_ptr=STORAGE, ref_ptr=STORAGE, gkl_ptr=COMPUTE),
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """Runs the compile once (a fresh Triton cache: every variant really compiles)."""
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(HELPER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"AOT compile for sm_90 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    print(proc.stdout)  # per variant: compile time, registers, spill stores (shown with pytest -s)
    return json.loads(out.read_text())


def test_every_variant_compiles_to_a_cubin(report):
    compiled = report["compiled"]
    assert {c["kernel"] for c in compiled} == set(expected_values())
    for c in compiled:
        assert c["sm"] == "sm_90" and c["name"] == c["kernel"], c
        assert c["cubin_bytes"] > 0 and c["cubin_has_name"], c
        assert c["num_warps"] == tk.GPU_CONFIG.num_warps
        # The JIT typed every argument as the coverage bookkeeping did, or made it a constant (== 1).
        for name, ours in c["signature"].items():
            jit = c["jit_signature"][name]
            assert jit in (ours, "constexpr"), (c["kernel"], name, ours, jit)
        assert "registers" in c, f"no ptxas log for {c['kernel']}"  # the log format changed: update triton_aot


def test_fp32_variants_do_not_spill(report):
    """The float32-compute variants (the ones training runs) keep everything in registers."""
    spilling = [c for c in report["compiled"] if c["constexprs"]["CT"] == "fp32" and c["spill_stores"]]
    assert not spilling, [(c["kernel"], c["registers"], c["spill_stores"], c["constexprs"]) for c in spilling]


def test_variants_cover_every_value_and_pair(report):
    for kernel, expected in expected_values().items():
        variants = [c for c in report["compiled"] if c["kernel"] == kernel]
        seen: dict[str, set] = {}
        for v in variants:
            for name, value in {**v["signature"], **v["constexprs"]}.items():
                seen.setdefault(name, set()).add(value)
        for name, values in expected.items():
            assert seen[name] >= values, f"{kernel}.{name}: compiled {sorted(map(str, seen[name]))}, needs {values}"
        # Every pair of features (and triple of constexpr values) the pool reaches is compiled.
        covered = set().union(*(triton_aot.coverage(v) for v in variants))
        missing = {tuple(c) for c in report["pool"][kernel]["covers"]} - covered
        assert not missing, f"{kernel}: {len(missing)} combinations not compiled, e.g. {sorted(missing)[:3]}"


def test_pool_is_large_enough(monkeypatch):
    """The random pool reaches every combination it can: a quarter of it already reaches as many."""
    full = triton_aot.pool()
    monkeypatch.setattr(triton_aot, "POOL_SIZE", triton_aot.POOL_SIZE // 4)
    small = triton_aot.pool()
    for kernel, found in full.items():
        reach = set().union(*(triton_aot.coverage(v) for v, _ in found))
        assert set().union(*(triton_aot.coverage(v) for v, _ in small[kernel])) == reach, kernel
