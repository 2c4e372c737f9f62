"""Builds ddpo_fast, with the compiled core ddpo_fast._C made by CMake (CMakeLists.txt).

Environment:
  DDPO_FAST_CUDA=0|1        skip the CUDA kernels / require them (default: when nvcc is found)
  DDPO_FAST_CUDA_ARCHS=...  CUDA architectures, e.g. "90" or "80;90" (default "80;90")
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: all cores)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cuda_switch() -> str:
    value = os.environ.get("DDPO_FAST_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "AUTO"
    if value in ("1", "on", "true", "yes"):
        return "ON"
    if value in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"DDPO_FAST_CUDA must be 0, 1 or auto, got {value!r}")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDDPO_FAST_CUDA={_cuda_switch()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("DDPO_FAST_CUDA_ARCHS"):
            configure.append(f"-DDDPO_FAST_CUDA_ARCHS={os.environ['DDPO_FAST_CUDA_ARCHS']}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    packages=find_packages(include=["ddpo_fast", "ddpo_fast.*"]) + ["ddpo_fast.kernels"],
    package_dir={"ddpo_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("ddpo_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
