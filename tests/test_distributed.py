"""Multi-GPU rules the CPU does not enforce, checked with emulations (tests/emulated_cuda.py):
collectives carry tensors on the rank's CUDA device (NCCL's rule), reward threads run on the rank's
device (CUDA's current device is per thread), model rewards are not called from two threads at once,
and the process group waits longer than any rank waits for another."""
import datetime
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpo_fast import distributed
from ddpo_fast.advantages import PerPromptStatTracker, compute_advantages
from ddpo_fast.rewards import RewardPool, build, options
from emulated_cuda import EmulatedCuda, NcclLikeDist, PerThreadCudaDevice, device_of

RANK_DEVICE = torch.device("cuda", 1)
PACKAGE = Path(distributed.__file__).resolve().parent


@pytest.fixture
def nccl(monkeypatch):
    """A two-rank NCCL-like process group on rank device cuda:1, with CUDA tensors emulated."""
    fake = NcclLikeDist(RANK_DEVICE)
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(distributed, "_device", RANK_DEVICE)
    with EmulatedCuda():
        yield fake


def test_the_stand_in_refuses_cpu_tensors(nccl):
    """The emulation can fail: a CPU tensor in a collective is refused, as NCCL refuses it."""
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        nccl.all_reduce(torch.ones(2))


def test_collectives_carry_tensors_on_the_rank_device(nccl):
    total = distributed.all_reduce_sum(torch.tensor([1.0, 2.0]))
    assert device_of(total) == RANK_DEVICE and total.tolist() == [2.0, 4.0]
    gathered = distributed.all_gather_cat(torch.tensor([1.0, 2.0]))
    assert device_of(gathered) == RANK_DEVICE and gathered.tolist() == [1.0, 2.0, 1.0, 2.0]
    assert distributed.mean_across_ranks({"loss": 0.5, "approx_kl": 2.0}) == {"loss": 0.5, "approx_kl": 2.0}
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.first_error_of_all_ranks("rank 0 failed") == "rank 0 failed"
    tensor_calls = [devices for name, devices in nccl.calls if devices]
    assert tensor_calls and all(d == RANK_DEVICE for devices in tensor_calls for d in devices)


def test_advantages_gather_rewards_on_the_rank_device(nccl):
    """The rewards come back from the reward pool on the CPU; the gather must move them first."""
    rewards = torch.tensor([1.0, 2.0, 4.0])  # on the CPU, as the pool returns them
    mine, all_rewards, all_adv, _ = compute_advantages(rewards, ["a", "b", "a"], PerPromptStatTracker(16, 1).update, rank=1,
                                                    device=RANK_DEVICE)
    np.testing.assert_array_equal(all_rewards, [1.0, 2.0, 4.0] * 2)
    assert len(all_adv) == 6 and device_of(mine) == RANK_DEVICE
    assert any(name == "all_gather" for name, _ in nccl.calls)


def test_every_collective_goes_through_the_distributed_module():
    """One place keeps the device rule: no other module of the package calls torch.distributed."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        text = path.read_text()
        if re.search(r"import torch\.distributed|from torch import distributed|torch\.distributed\.", text):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


# ---- reward threads -------------------------------------------------------------------------------
def test_reward_threads_run_on_the_rank_device(monkeypatch):
    cuda = PerThreadCudaDevice(count=2)
    cuda.install(monkeypatch)
    seen = []

    def reward(images, prompts, metadata):
        seen.append((threading.current_thread().name, torch.cuda.current_device()))
        return torch.zeros(len(images)), {}

    reward.thread_safe = True  # several threads at once: each must have been set up
    pool = RewardPool(reward, workers=2, device=RANK_DEVICE)
    try:
        for f in [pool.submit(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], [{}, {}]) for _ in range(6)]:
            f.result()
    finally:
        pool.close()
    assert len(seen) == 6 and all(index == 1 for _, index in seen)
    assert cuda.current_device() == 0  # the emulation: this thread never chose a device


def test_reward_device_defaults_to_the_current_device_never_a_bare_cuda(monkeypatch):
    cuda = PerThreadCudaDevice(count=2)
    cuda.install(monkeypatch)
    torch.cuda.set_device(1)  # what the trainer does for LOCAL_RANK=1
    assert options.device("aesthetic", None) == RANK_DEVICE
    assert options.device("aesthetic", "cuda") == RANK_DEVICE
    assert options.device("aesthetic", "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device='cuda:2' but only 2 CUDA device"):
        options.device("aesthetic", "cuda:2")


class _ModelReward:
    """A reward that notices being entered by a second thread while a first one is inside."""

    def __init__(self):
        self.inside = 0
        self.overlapped = False
        self.second_entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, images, prompts, metadata):
        with self.lock:
            self.inside += 1
            if self.inside > 1:
                self.overlapped = True
                self.second_entered.set()
        # The first call waits for a second one to come in: with serialised calls it never does.
        self.second_entered.wait(timeout=1.0)
        with self.lock:
            self.inside -= 1
        return torch.zeros(len(images)), {}


def test_a_model_reward_is_never_called_from_two_threads_at_once():
    reward = _ModelReward()
    pool = RewardPool(reward, workers=2)
    try:
        futures = [pool.submit(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"], [{}]) for _ in range(2)]
        for f in futures:
            f.result()
    finally:
        pool.close()
    assert not reward.overlapped


def test_thread_safe_rewards_still_run_concurrently():
    reward = _ModelReward()
    reward.thread_safe = True
    pool = RewardPool(reward, workers=2)
    try:
        for f in [pool.submit(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"], [{}]) for _ in range(2)]:
            f.result()
    finally:
        pool.close()
    assert reward.overlapped  # the detector works, and JPEG-like rewards keep their parallelism


def test_built_in_rewards_declare_thread_safety():
    assert build("jpeg_compressibility").thread_safe and build("jpeg_incompressibility").thread_safe
    assert build("jpeg_compressibility:1,jpeg_incompressibility:0.5").thread_safe
    assert not getattr(build("train_helpers:nan_first_reward"), "thread_safe", False)  # unknown: serialised


# ---- process-group timeout -----------------------------------------------------------------------
def test_process_group_waits_longer_than_any_rank_waits_for_another(monkeypatch, tmp_path):
    """A rank waits for another at most a reward request (timeout, retried twice) or the reward
    server's start-up; the process group's timeout must be longer, and be passed to init."""
    deepspeed = pytest.importorskip("deepspeed")
    pytest.importorskip("diffusers")
    from ddpo_fast import train
    from ddpo_fast.rewards.run import SERVER_STARTUP_TIMEOUT

    seen = {}

    class Joined(Exception):
        pass

    def fake_init(dist_backend=None, timeout=None, **kwargs):
        seen["backend"], seen["timeout"] = dist_backend, timeout
        raise Joined

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(Joined):
        train.main(["--run-dir", str(tmp_path / "run"), "engine=deepspeed", "reward_timeout=1000"])
    assert seen["backend"] == "gloo"
    assert seen["timeout"] > datetime.timedelta(seconds=3 * 1000 + SERVER_STARTUP_TIMEOUT)
    assert distributed.process_group_timeout(600, SERVER_STARTUP_TIMEOUT) > datetime.timedelta(minutes=10)
