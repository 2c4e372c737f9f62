"""The process group and every collective the trainer makes.

Collectives carry tensors on the rank's device (set by `init`): NCCL serves CUDA tensors
only ("No backend type associated with device type cpu"), while gloo, the CPU test backend, accepts
any, so a CPU tensor in a collective passes every CPU test and kills a multi-GPU run. Keeping all
collectives here keeps that rule in one place (tests/test_distributed.py checks it with a stand-in
that enforces NCCL's rule).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_device = torch.device("cpu")


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_device() -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK when there is a GPU, else the CPU."""
    return torch.device("cuda", world()[1]) if torch.cuda.is_available() else torch.device("cpu")


def process_group_timeout(reward_timeout: float, server_start_timeout: float) -> datetime.timedelta:
    """Longer than any wait of one rank for another: a reward request (sent, refused twice and
    retried, then answered) plus the reward server's start-up, with room for a slow epoch. NCCL's
    default (10 minutes) is shorter than one reward_timeout of 600 s plus its retries."""
    return datetime.timedelta(seconds=max(1800.0, 3 * reward_timeout + server_start_timeout + 600.0))


def init(device: torch.device, timeout: datetime.timedelta, *, use_deepspeed: bool) -> None:
    """Makes `device` the rank's device (current CUDA device of this thread too) and, with several
    ranks or DeepSpeed, joins the process group (NCCL on GPUs, gloo on CPUs) with `timeout`."""
    global _device
    _device = device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized() or not (use_deepspeed or world()[2] > 1):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        if device.type == "cpu":
            _unlink_deepspeed_shm()
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


def _unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU backend maps a 66 MB shared-memory buffer per rank (/dev/shm) for its
    all-reduce and never unlinks it: every run left 2 x 66 MB behind, and /dev/shm (RAM) filled up
    over a day of test runs until the machine swapped. Every rank maps every rank's buffer inside
    init_distributed; after a barrier each unlinks its own name (the mappings stay valid), so nothing
    is left even when a run is killed."""
    rank = world()[0]
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    dist.barrier()
    if os.path.exists(name):
        os.unlink(name)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on the rank's device."""
    tensor = tensor.to(_device).clone()
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on every rank) concatenated in rank order along dim 0, on
    the rank's device."""
    tensor = tensor.to(_device).contiguous()
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (one collective for the whole dict)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: v / dist.get_world_size() for k, v in zip(keys, total.cpu().tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int32)).cpu().item() > 0)


def all_gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_from_rank0(value):
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error_of_all_ranks(error: str | None) -> str | None:
    """The first rank's error, on every rank: all ranks stop together rather than some waiting forever."""
    return next((e for e in all_gather_objects(error) if e), None)


def log(message: str) -> None:
    if world()[0] == 0:
        print(message, flush=True)
