"""benchmarks/gpu_suite.sh without a GPU: its dry run finds every step's commands, scripts and imports
(and runs the GPU subcommands' calls on the CPU), and the GPU test selection of tests/conftest.py
(DDPO_FAST_GPU_FOCUS, DDPO_FAST_GPU_SHARD) keeps every kernel variant of tests/test_cuda.py, leaves
out most of its parametrizations, and splits into shards that keep each Triton (case, dtype) family
together. Collection only: nothing here needs a GPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "build", "test", "sanitize", "graph", "kernelbw", "dropin", "e2e"]
FAMILY_TESTS = ("test_sampling_step", "test_gradients", "test_ddim_ppo_loss")
MECHANICS = ("test_cuda_graph_capture", "test_no_host_sync", "test_side_stream", "test_second_device",
             "test_misaligned_pointers", "test_deterministic", "test_launcher_rejects_bad_arguments",
             "test_float64", "test_gradcheck_float64")


def collect(**env: str) -> list[str]:
    """The node ids pytest collects from tests/test_cuda.py with `env` set (and no other selection)."""
    base = {k: v for k, v in os.environ.items() if k not in ("DDPO_FAST_GPU_FOCUS", "DDPO_FAST_GPU_SHARD")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("tests/test_cuda.py::")]


def parse(nodeid: str) -> tuple[str, list[str]]:
    """(test name, its parameter ids) of a node id."""
    m = re.match(r"tests/test_cuda\.py::(\w+)(?:\[(.*)\])?$", nodeid)
    assert m, nodeid
    return m[1], (m[2] or "").split("-")


@pytest.fixture(scope="module")
def every() -> list[str]:
    return collect()


@pytest.fixture(scope="module")
def focused() -> list[str]:
    return collect(DDPO_FAST_GPU_FOCUS="1")


def test_dry_run_passes_and_lists_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^\| {step} \| ok \| \d+ \| ", summary, re.M), (step, summary)
    assert "all steps ok" in summary and "all steps ok" in proc.stdout
    test_row = next(line for line in summary.splitlines() if line.startswith("| test |"))
    assert re.search(r"selects \d+ of \d+ \(\d+ deselected\)", test_row), test_row


def test_dry_run_fails_on_an_unknown_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "no-such-step"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "| no-such-step | FAIL |" in proc.stdout


def test_focus_keeps_every_kernel_variant_and_deselects_most(every, focused):
    assert set(focused) < set(every)
    assert len(focused) < len(every) / 3, (len(focused), len(every))
    all_cases = {(p[3], "-".join(p[4:])) for name, p in map(parse, every) if name == "test_sampling_step"}
    assert len(all_cases) == 3 * 18  # dtypes x (prediction, CFG, clipping) cases
    kept = defaultdict(set)
    for name, p in map(parse, focused):
        if name in FAMILY_TESTS:
            backend, shape = p[0], p[2] if name != "test_ddim_ppo_loss" else p[1]
            dtype_case = (p[3], "-".join(p[4:])) if name != "test_ddim_ppo_loss" else (p[2], "-".join(p[3:]))
            kept[name, backend, shape].add(dtype_case)
            if name != "test_ddim_ppo_loss":
                assert p[1] == "3", name  # batch 3
    for name in FAMILY_TESTS:
        for backend in ("cuda", "triton"):
            assert kept[name, backend, "4x64x64"] == all_cases, (name, backend)  # every case x dtype
            assert len(kept[name, backend, "4x17x23"]) == 1, (name, backend)  # the odd shape once
    every_names = {parse(n)[0] for n in every}
    focused_names = {parse(n)[0] for n in focused}
    assert focused_names == every_names  # every test function still runs
    for name in MECHANICS:
        assert name in focused_names
    mechanics = [n for n in every if parse(n)[0] in MECHANICS[:7]]
    assert set(mechanics) <= set(focused)  # the launch-mechanics tests are all kept


def test_shards_partition_the_selection_and_keep_families_together(focused):
    shards = [collect(DDPO_FAST_GPU_FOCUS="1", DDPO_FAST_GPU_SHARD=f"{i}/2") for i in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(focused)
    assert abs(len(shards[0]) - len(shards[1])) < len(focused) / 5  # roughly balanced
    where = {}
    for i, shard in enumerate(shards):
        for nodeid in shard:
            name, p = parse(nodeid)
            if name in FAMILY_TESTS and p[0] == "triton":
                family = (p[3], "-".join(p[4:])) if name != "test_ddim_ppo_loss" else (p[2], "-".join(p[3:]))
                assert where.setdefault(family, i) == i, (family, nodeid)
    assert set(where.values()) == {0, 1}
