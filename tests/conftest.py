import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. It must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- The GPU suite's selection (benchmarks/gpu_suite.sh); without these variables nothing changes -----
# DDPO_FAST_GPU_FOCUS=1: tests/test_cuda.py parametrizes every case x dtype x shape x batch for both
# backends (~1,700 items); on a GPU every distinct Triton specialization compiles from a cold cache
# (0.2 - 3 s each), which does not fit one device call. The focus keeps every kernel variant (every
# case x dtype) on representative shapes, the odd (scalar-path) shape once per backend and test, and
# the launch-mechanics tests (~450 items, ~280 Triton variants).
# DDPO_FAST_GPU_SHARD=I/N: keeps shard I of N (0-based) of the collected items, so N processes share
# the cold Triton compiles. The Triton tests of one (case, dtype) share kernel variants (sampling,
# scoring, PPO, backward), so they stay in one shard and each variant compiles once; families and
# the other items go round-robin in collection order (the same in every process).

_BIG, _SMALL = (4, 64, 64), (4, 17, 23)  # the SD latent; numel % 8 == 4 (the kernels' scalar path)
_FOCUS_BATCH = 3
# The odd shape's one representative: every option of the step on (CFG, clipping, the clipped model
# output) in the training dtype.
_SMALL_CASE, _SMALL_DTYPE = ("v_prediction", 7.5, 1.0, True), torch.bfloat16
_GRADCHECK_CASES = {("epsilon", None, None, False), ("v_prediction", 7.5, 1.0, True)}
_TEST_CUDA = Path(__file__).resolve().parent / "test_cuda.py"
_FOCUS_KEY = pytest.StashKey[tuple]()  # ((kept, deselected), shard, in the shard): the report lines


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


def _triton_family(item) -> tuple | None:
    """The (dtype, case) family of a Triton test of tests/test_cuda.py, else None."""
    params = item.callspec.params if item.path == _TEST_CUDA and hasattr(item, "callspec") else {}
    if params.get("backend") != "triton" or "case" not in params:
        return None
    return str(params.get("dtype")), params["case"]


def pytest_collection_modifyitems(config, items):
    focus = os.environ.get("DDPO_FAST_GPU_FOCUS") == "1"
    shard = os.environ.get("DDPO_FAST_GPU_SHARD", "")
    if not focus and not shard:
        return
    keep, drop = [], []
    for item in items:
        params = item.callspec.params if item.path == _TEST_CUDA and hasattr(item, "callspec") else None
        if focus and params is not None and not _focus_keeps(getattr(item, "originalname", item.name), params):
            drop.append(item)
        else:
            keep.append(item)
    focused = (len(keep), len(drop))
    if shard:
        try:
            index, count = (int(v) for v in shard.split("/"))
        except ValueError:
            index, count = -1, 0
        if not 0 <= index < count:
            raise pytest.UsageError(f"DDPO_FAST_GPU_SHARD must be I/N with 0 <= I < N, got {shard!r}")
        families: dict[tuple, int] = {}
        others = 0
        mine = []
        for item in keep:
            family = _triton_family(item)
            if family is None:
                slot, others = others, others + 1
            else:
                slot = families.setdefault(family, len(families))
            (mine if slot % count == index else drop).append(item)
        keep = mine
    config.stash[_FOCUS_KEY] = (focused, shard, len(keep))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_collectionfinish(config, start_path, items):
    state = config.stash.get(_FOCUS_KEY, None)
    if state is None:
        return []
    (kept, deselected), shard, in_shard = state
    lines = []
    if os.environ.get("DDPO_FAST_GPU_FOCUS") == "1":
        lines.append(f"DDPO_FAST_GPU_FOCUS=1: {deselected} parametrizations of tests/test_cuda.py deselected, "
                     f"{kept} tests kept")
    if shard:
        lines.append(f"DDPO_FAST_GPU_SHARD={shard}: {in_shard} of the {kept} tests")
    return lines
