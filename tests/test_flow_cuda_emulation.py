"""The per-thread code of the flow SDE CUDA kernels (csrc/cuda/flow_cuda_units.cuh), run on the CPU by
csrc/cuda/flow_emulate.cpp against an independent element loop: Philox lanes across chunk and
sample boundaries, CFG rows, storage dtypes, the optional mean, the log-prob and the backward. How
the CUDA kernels' indexing is tested on machines without a GPU."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_flow_cuda_units_match_the_element_loop(tmp_path):
    binary = tmp_path / "flow_emulate"
    subprocess.run([COMPILER, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", "-o",
                    str(binary), str(ROOT / "csrc/cuda/flow_emulate.cpp")], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "configurations, 0 failures" in result.stdout
