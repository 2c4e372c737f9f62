import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. It must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- DDPO_FAST_GPU_FOCUS=1: the GPU suite's selection of tests/test_cuda.py --------------------------
# tests/test_cuda.py parametrizes every case x dtype x shape x batch for both backends (~1,700 items);
# on a GPU every distinct Triton specialization compiles from a cold cache (0.2 - 3 s each), which
# does not fit one device call. benchmarks/gpu_suite.sh sets DDPO_FAST_GPU_FOCUS=1 to keep every
# kernel variant (every case x dtype) on representative shapes, the odd (scalar-path) shape once per
# backend, and the launch-mechanics tests. Unset (`make test`, CI): nothing changes.

_BIG, _SMALL = (4, 64, 64), (4, 17, 23)  # the SD latent; numel % 8 == 4 (the kernels' scalar path)
_FOCUS_BATCH = 3
# The odd shape's one representative: every option of the step on (CFG, clipping, the clipped model
# output) in the training dtype.
_SMALL_CASE, _SMALL_DTYPE = ("v_prediction", 7.5, 1.0, True), torch.bfloat16
_GRADCHECK_CASES = {("epsilon", None, None, False), ("v_prediction", 7.5, 1.0, True)}
_TEST_CUDA = Path(__file__).resolve().parent / "test_cuda.py"
_FOCUS_KEY = pytest.StashKey[tuple]()  # (kept, deselected), for the report line


def _focus_keeps(name: str, p: dict) -> bool:
    """Whether DDPO_FAST_GPU_FOCUS keeps the test_cuda.py item `name` with parameters `p`."""
    small_once = p.get("chw") == _SMALL and p.get("case") == _SMALL_CASE and p.get("dtype") == _SMALL_DTYPE
    if name in ("test_sampling_step", "test_gradients"):  # every case x dtype at batch 3 on the SD latent
        return p["batch"] == _FOCUS_BATCH and (p["chw"] == _BIG or small_once)
    if name == "test_ddim_ppo_loss":  # batch 7 inside the test
        return p["chw"] == _BIG or small_once
    if name in ("test_noise_tensor", "test_out_dtype_rounding"):  # each dtype on the SD latent
        return p["chw"] == _BIG
    if name == "test_float64":  # every case on the scalar path, one on the vectorised one
        return p["chw"] == (2, 3, 5) or (p["chw"] == _BIG and p["case"] == _SMALL_CASE)
    if name == "test_gradcheck_float64":  # slow (numerical Jacobians): two cases, the scalar path
        return p["chw"] == (2, 3, 5) and p["case"] in _GRADCHECK_CASES
    # The rest are cheap and each covers a distinct edge: Philox offsets inside a block, partial
    # chunks, eta, the PPO stage's batch tiles, and the launch mechanics (graph capture, no host
    # sync, side stream, second device, misaligned pointers, determinism, bad arguments).
    return True


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DDPO_FAST_GPU_FOCUS") != "1":
        return
    keep, drop = [], []
    for item in items:
        in_scope = item.path == _TEST_CUDA and hasattr(item, "callspec")
        if in_scope and not _focus_keeps(getattr(item, "originalname", item.name), item.callspec.params):
            drop.append(item)
        else:
            keep.append(item)
    config.stash[_FOCUS_KEY] = (len(keep), len(drop))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_collectionfinish(config, start_path, items):
    counts = config.stash.get(_FOCUS_KEY, None)
    if counts is not None:
        return [f"DDPO_FAST_GPU_FOCUS=1: {counts[1]} parametrizations of tests/test_cuda.py deselected, "
                f"{counts[0]} tests kept"]
    return []
