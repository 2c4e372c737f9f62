"""The flow SDE Triton kernels compile for a Hopper GPU (sm_90), checked without a GPU: the
interpreter (tests/test_flow_triton.py) never compiles them. tests/flow_triton_aot.py compiles a
covering set of launches down to cubins in a subprocess without TRITON_INTERPRET (~20 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HELPER = Path(__file__).resolve().parent / "flow_triton_aot.py"


def test_flow_kernels_compile_to_sm90_cubins(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # fresh: every variant really compiles
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(HELPER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"AOT compile for sm_90 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    compiled = json.loads(out.read_text())
    assert all(c["sm"] == "sm_90" and c["cubin_bytes"] > 0 and c["cubin_has_name"] for c in compiled)
    seen: dict[str, dict[str, set]] = {}
    for c in compiled:
        for name, value in c["constexprs"].items():
            seen.setdefault(c["kernel"], {}).setdefault(name, set()).add(str(value))
    both = {"False", "True"}
    for name in ("CFG", "SAMPLE", "PHILOX", "PREV_BF16", "WRITE_MEAN", "KL"):
        assert seen["_flow_forward_kernel"][name] == both, name
    for name in ("CFG", "HAS_GPREV", "HAS_GMEAN", "GRAD_BF16", "KL"):
        assert seen["_flow_backward_kernel"][name] == both, name
    assert seen["_flow_finalize_kernel"]["KL"] == both
    assert seen["_finalize_kernel"]["KL"] == both  # the PPO stage with and without the KL penalty
    for kernel in ("_flow_forward_kernel", "_flow_finalize_kernel", "_flow_backward_kernel"):
        assert seen[kernel]["SDE"] == {"0", "1"} and seen[kernel]["CT"] == {"fp32", "fp64"}, kernel
    assert "_finalize_kernel" in seen  # the DDIM kernels' PPO stage, as the flow loss launches it
    assert not [c for c in compiled if c.get("spill_stores")], "register spills"
