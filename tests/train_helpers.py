"""Helpers for the trainer tests: small configs, user reward functions, running the trainer."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # the trainer's tests need it (on the GPU machine: a carried wheel)

from ddpo_fast.rewards import jpeg_compressibility  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# A run of a few seconds: 2 epochs of 8 samples, 4 DDIM steps, 2 trained per sample, a checkpoint
# every epoch (the default is every 10 and the last).
TINY = [
    "checkpoint_freq=1",
    "num_epochs=2", "sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
    "train.batch_size=4", "train.timestep_fraction=0.5", "sample.guidance_scale=3",
    "per_prompt_stat_tracking.min_count=2", "reward_workers=1",
]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), e.get("PYTHONPATH", "")])
    e["DDPO_FAST_NO_PROGRESS"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")  # two ranks on a small CPU: no oversubscription
    return e


def run_train(args: list[str], *, extra_env: dict | None = None, check: bool = True, timeout: int = 300):
    """`python -m ddpo_fast.train ARGS` in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "ddpo_fast.train", *args], cwd=REPO, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> str:
    """A port no process listens on now (tests run in parallel workers: no fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def one_rank_env() -> dict:
    """The launcher's variables for a single rank (DeepSpeed in one process)."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}


def run_deepspeed(args: list[str], ranks: int = 2, timeout: int = 300, *, check: bool = True,
                  extra_env: dict | None = None, script: Path = REPO / "ddpo_fast" / "train.py"):
    """`deepspeed --num_gpus RANKS ddpo_fast/train.py ARGS` (CPU ranks here; another user script with `script`).
    Skips on a GPU machine with fewer GPUs than ranks (DeepSpeed would ask for cuda:1 on one GPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < ranks:
        pytest.skip(f"{ranks} DeepSpeed ranks need {ranks} GPUs; this machine has {torch.cuda.device_count()}")
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port,
           str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed run failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm, i.e. RAM) must not outlive the run.
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left DeepSpeed's shared-memory buffers behind: {left}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


# ---- user reward functions (used as reward=train_helpers:NAME) --------------------------------
def nan_first_reward(images: torch.Tensor, prompts, metadata):
    """JPEG compressibility, except that the first image of every batch gets NaN."""
    rewards, info = jpeg_compressibility(images, prompts, metadata)
    rewards = rewards.clone()
    rewards[0] = float("nan")
    return rewards, info


def nan_reward(images: torch.Tensor, prompts, metadata):
    """NaN for every image."""
    return torch.full((len(images),), float("nan")), {}


def raising_reward(images: torch.Tensor, prompts, metadata):
    raise ValueError("bad pixels")


def string_prompt(rng):
    """A wrong prompt function: returns a string, not (prompt, metadata)."""
    return "a cat"


_calls = 0


def kill_once_reward(images: torch.Tensor, prompts, metadata):
    """JPEG compressibility; SIGKILLs its own process at call DDPO_TEST_KILL_AT (1-based), once:
    the marker file DDPO_TEST_KILL_MARKER records that the kill happened."""
    global _calls
    _calls += 1
    marker = os.environ.get("DDPO_TEST_KILL_MARKER")
    if marker and _calls == int(os.environ["DDPO_TEST_KILL_AT"]) and not os.path.exists(marker):
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return jpeg_compressibility(images, prompts, metadata)


def poisoned_main(argv: list[str]) -> None:
    """Runs the trainer with the loss of its first backward call made NaN (python -c entry point)."""
    import ddpo_fast.train as train

    original = train.Trainer.loss_fn
    calls = {"n": 0}

    def poisoned(self, *args):
        loss, stats = original(self, *args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), stats

    train.Trainer.loss_fn = poisoned
    train.main(argv)


_term_calls = 0


def term_once_reward(images: torch.Tensor, prompts, metadata):
    """JPEG compressibility; at call DDPO_TEST_TERM_AT (1-based) of rank DDPO_TEST_TERM_RANK (default 0)
    sends SIGTERM to its own process, as a scheduler preempting the job would."""
    global _term_calls
    _term_calls += 1
    if (_term_calls == int(os.environ.get("DDPO_TEST_TERM_AT", "0"))
            and os.environ.get("RANK", "0") == os.environ.get("DDPO_TEST_TERM_RANK", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    return jpeg_compressibility(images, prompts, metadata)


def term_in_training_main(argv: list[str], epoch: int) -> int:
    """The trainer, sent SIGTERM when the policy update of `epoch` starts (python -c entry point)."""
    import ddpo_fast.train as train

    original = train.Trainer.train_epoch

    def train_epoch(self, e, *args):
        if e == epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, e, *args)

    train.Trainer.train_epoch = train_epoch
    return train.cli(argv)
