"""One precision policy for sampling and training: with unchanged weights, training recomputes
exactly the log-probabilities sampling stored (the first PPO ratio is 1), for the torch engine and
DeepSpeed, in fp32 and bf16. The checks run with CPU autocast following CUDA autocast's rule
(group_norm, layer_norm and softmax in fp32: tests/emulated_cuda.py): plain CPU autocast runs them in
bf16 with or without autocast, which hid a sampling phase under autocast and a DeepSpeed training
phase without it."""
import json
import subprocess
import sys

import pytest

from train_helpers import REPO, TESTS, TINY, env, metrics, one_rank_env, run_deepspeed

pytest.importorskip("deepspeed")
WITH_CUDA_AUTOCAST = TESTS / "train_with_cuda_autocast.py"
# A learning rate too small to move any weight: every recomputed log-probability must equal the stored one.
FROZEN = [*TINY, "train.learning_rate=1e-30", "train.max_grad_norm=0"]


def test_sampling_and_training_forwards_are_identical():
    combos = ["torch:no", "torch:bf16", "deepspeed:bf16"]
    proc = subprocess.run([sys.executable, str(TESTS / "phase_forwards.py"), *combos], cwd=REPO,
                          env={**env(), **one_rank_env()}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [f"{r['engine']}:{r['mixed_precision']}" for r in results] == combos
    for r in results:
        assert r["identical"], r


def _assert_first_ratio_is_one(run):
    records = metrics(run)
    assert len(records) == 2
    for r in records:
        assert r["approx_kl"] == 0 and r["clipfrac"] == 0, r


@pytest.mark.parametrize("mode", ["no", "bf16"])
def test_unchanged_weights_give_ratio_one_in_one_process(tmp_path, mode):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(WITH_CUDA_AUTOCAST), "--run-dir", str(run), *FROZEN,
                           f"mixed_precision={mode}"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_first_ratio_is_one(run)


def test_unchanged_weights_give_ratio_one_with_two_deepspeed_ranks(tmp_path):
    run = tmp_path / "run"
    run_deepspeed(["--run-dir", str(run), *FROZEN, "mixed_precision=bf16"], script=WITH_CUDA_AUTOCAST)
    _assert_first_ratio_is_one(run)
