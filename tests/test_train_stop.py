"""Stopping on SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C) keeps the last finished epoch: a
checkpoint is written even between the default cadence's checkpoints, and resume continues exactly
as an uninterrupted run."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpo_fast import config as cfg
from train_helpers import REPO, TINY, env, metrics, run_deepspeed, run_train

# The default cadence (checkpoint_freq 10): no checkpoint before the last epoch unless a stop asks.
ARGS = [*TINY, "checkpoint_freq=10", "num_epochs=3", "reward=train_helpers:term_once_reward"]


def _weights(run):
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_default_cadence_suits_a_full_finetune():
    c = cfg.Config()
    assert c.checkpoint_freq == 10 and c.num_checkpoint_limit >= 1


def test_sigterm_while_sampling_saves_the_last_finished_epoch_and_resume_is_exact(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_train(["--run-dir", str(full), *ARGS])
    assert [p.name for p in (full / "checkpoints").iterdir()] == ["epoch-2"]  # the last epoch only
    # Reward call 3 is the first batch of epoch 1: the stop comes while epoch 1 samples.
    proc = run_train(["--run-dir", str(stopped), *ARGS], check=False, extra_env={"DDPO_TEST_TERM_AT": "3"})
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert "stopped by SIGTERM" in proc.stdout
    assert f"continue with: python -m ddpo_fast.train --resume {stopped} (one process)" in proc.stdout
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["epoch-0"]
    assert [r["epoch"] for r in metrics(stopped)] == [0]
    run_train(["--resume", str(stopped)])
    a, b = metrics(full), metrics(stopped)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        for key in ["reward_mean", "loss", "approx_kl", "clipfrac", "grad_norm"]:
            assert ra[key] == rb[key], (ra["epoch"], key)
    wa, wb = _weights(full), _weights(stopped)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_while_training_finishes_the_epoch_then_saves_it(tmp_path):
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), *TINY, "checkpoint_freq=10", "num_epochs=3"]
    proc = subprocess.run([sys.executable, "-c", f"import sys, train_helpers; sys.exit(train_helpers.term_in_training_main({argv!r}, 1))"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert [r["epoch"] for r in metrics(run)] == [0, 1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-1"]
    assert not (run / "unet").exists()  # not finished: no final model


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """Rank 0 alone receives SIGTERM; rank 1 learns of it at the next poll and both save and stop."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    proc = run_deepspeed(["--run-dir", str(run), *ARGS, "num_epochs=2"], check=False,
                         extra_env={"DDPO_TEST_TERM_AT": "3", "DDPO_TEST_TERM_RANK": "0"})
    assert proc.returncode != 0
    assert "stopped by a signal on another rank" in proc.stdout + proc.stderr or "stopped by SIGTERM" in proc.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-0"]  # resume: as tested above
    assert [r["epoch"] for r in metrics(run)] == [0]
