"""The compiled core is built as configured: CUDA kernels whenever nvcc is available (so a CUDA
compile error cannot pass unnoticed on machines without a GPU), every CPU variant the CPU runs."""
import os
import shutil

import pytest

from ddpo_fast.backends import _C


def test_extension_is_built():
    assert _C is not None, "ddpo_fast._C is missing: run `pip install -e .` (or `make build`)"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
@pytest.mark.skipif(os.environ.get("DDPO_FAST_CUDA", "").lower() in ("0", "off", "false", "no"),
                    reason="DDPO_FAST_CUDA=0")
def test_cuda_kernels_compiled_when_nvcc_is_present():
    assert _C.built_with_cuda()


def test_cpu_variants_cover_this_cpu():
    supported = _C.supported_cpu_isas()
    assert "baseline" in supported
    assert _C.cpu_isa() == supported[0] or os.environ.get("DDPO_FAST_CPU_ISA")
