"""The per-thread code of the CUDA kernels (csrc/cuda/ddim_cuda_units.cuh), run on the CPU by
csrc/cuda/emulate_units.cpp against an independent element-by-element loop over ddim_math.h:
vector and scalar paths, dtype packing, Philox units, CFG rows and the backward. This is how the
CUDA indexing logic is tested on machines without a GPU."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_cuda_units_match_elementwise_math(tmp_path):
    binary = tmp_path / "emulate_units"
    subprocess.run([COMPILER, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
                    f"-I{ROOT / 'csrc'}", "-o", str(binary), str(ROOT / "csrc/cuda/emulate_units.cpp")], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "configurations, 0 failures" in result.stdout
