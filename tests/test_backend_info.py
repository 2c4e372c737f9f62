"""backend_info() says which backend and CPU variant each device gets, and a device that falls back
to the reference ops without being asked to warns once (e.g. a source checkout without the compiled
module, which a non-editable `pip install .` run from the repository's folder imports)."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ddpo_fast import ops
from ddpo_fast.backends import _C

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_C = r"""
import importlib.abc, json, sys, warnings

class BlockCompiledModule(importlib.abc.MetaPathFinder):  # as if _C had never been built
    def find_spec(self, name, path, target=None):
        if name == "ddpo_fast._C":
            raise ImportError("blocked by the test")

sys.meta_path.insert(0, BlockCompiledModule())
import torch
from ddpo_fast import ops

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x = torch.randn(2, 4, 5, 6)
    for _ in range(3):
        ops.ddim_step_logprob(x, x, 0.3, 0.5, seed=0)
        ops.ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.1, 5.0)
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(json.dumps({"warnings": messages, "info": ops.backend_info()}))
"""


def test_missing_compiled_module_warns_once_and_backend_info_says_reference():
    env = dict(os.environ, PYTHONPATH=str(ROOT), DDPO_FAST_BACKEND="auto")
    done = subprocess.run([sys.executable, "-c", WITHOUT_C], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "reference" in result["warnings"][0] and "ddpo_fast._C" in result["warnings"][0]
    info = result["info"]
    assert info["compiled_module"] is None and "blocked by the test" in info["import_error"]
    assert info["devices"]["cpu"]["backend"] == "reference"
    assert "missing" in info["devices"]["cpu"]["reason"]


@pytest.mark.skipif(_C is None, reason="ddpo_fast._C is not built")
def test_backend_info_names_the_cpu_variant_and_the_fast_path_is_silent(monkeypatch):
    monkeypatch.delenv("DDPO_FAST_BACKEND", raising=False)
    info = ops.backend_info()
    cpu = info["devices"]["cpu"]
    assert info["compiled_module"] == _C.__file__ and info["import_error"] is None
    assert cpu["backend"] == "cpu" and cpu["reason"] is None
    assert cpu["cpu_isa"] == _C.cpu_isa() and cpu["cpu_isa"] in cpu["supported_cpu_isas"]
    assert info["built_with_cuda"] == _C.built_with_cuda()
    x = torch.randn(2, 4, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.ddim_step_logprob(x, x, 0.3, 0.5, seed=0)
        monkeypatch.setenv("DDPO_FAST_BACKEND", "reference")  # asked for: no warning either
        ops.ddim_step_logprob(x, x, 0.3, 0.5, seed=0)
    assert ops.backend_info()["devices"]["cpu"]["backend"] == "reference"
