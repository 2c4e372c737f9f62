"""CUDA's rules that a CPU machine does not enforce, emulated for tests.

- `EmulatedCuda`: tensors "on cuda:N" that live on the CPU. A tensor moved to (or created on) a CUDA
  device is a CPU tensor tagged with that device; what is computed from tagged tensors inherits the
  tag; `.cpu()` or `.to("cpu")` drops it; `.numpy()` of a tagged tensor fails as on a GPU.
- `NcclLikeDist`: a stand-in for torch.distributed (two ranks, this one rank 0, the other holding
  the same tensors) that refuses, as NCCL does, any tensor not on the rank's CUDA device, and records
  every collective.
- `PerThreadCudaDevice`: torch.cuda.set_device / current_device with CUDA's rule that the current
  device belongs to the calling thread (a new thread starts on device 0).
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

TAG = "_emulated_device"


def device_of(t: torch.Tensor) -> torch.device:
    return getattr(t, TAG, t.device)


def _target_device(func, args, kwargs) -> torch.device | None:
    """The device a call asks for (a `device=` keyword, or `Tensor.to`'s device argument)."""
    if "device" in kwargs and kwargs["device"] is not None:
        return torch.device(kwargs["device"])
    if func is torch.Tensor.to:
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                return torch.device(a)
            if isinstance(a, torch.Tensor):
                return device_of(a)
    return None


class EmulatedCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.numpy and hasattr(args[0], TAG):
            raise TypeError(f"can't convert {getattr(args[0], TAG)} device type tensor to numpy. "
                            "Use Tensor.cpu() to copy the tensor to host memory first.")
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _target_device(func, args, kwargs) == torch.device("cpu")):
            out = func(*args, **kwargs)
            return torch.Tensor.clone(out) if hasattr(out, TAG) else out  # the host copy is untagged
        if func is torch.Tensor.cuda:
            out = torch.Tensor.clone(args[0])
            setattr(out, TAG, torch.device("cuda", 0 if len(args) < 2 else args[1]))
            return out
        target = _target_device(func, args, kwargs)
        if target is not None and target.type == "cuda":
            if "device" in kwargs:
                kwargs["device"] = "cpu"
            else:  # Tensor.to(device, ...): drop the device, keep dtype and the rest
                args = tuple(a for a in args if not isinstance(a, (str, torch.device)))
            out = func(*args, **kwargs)
            if func is torch.Tensor.to and out is args[0]:
                out = torch.Tensor.clone(out)  # a device move is a new tensor
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    setattr(t, TAG, target)
            return out
        out = func(*args, **kwargs)
        if target is None:  # results of tagged inputs stay on their device
            tags = [getattr(t, TAG) for t in tree_flatten((args, kwargs))[0] if hasattr(t, TAG)]
            if tags:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and not hasattr(t, TAG):
                        setattr(t, TAG, tags[0])
        return out


class NcclLikeDist:
    """torch.distributed with two ranks (this one rank 0; the other holds the same tensors) that
    refuses tensors off `rank_device` with NCCL's message and records each collective."""

    def __init__(self, rank_device: torch.device):
        self.rank_device = torch.device(rank_device)
        self.calls: list[tuple[str, list[torch.device]]] = []

    def _check(self, name: str, tensors) -> None:
        devices = [device_of(t) for t in tensors]
        self.calls.append((name, devices))
        for d in devices:
            if d != self.rank_device:
                raise RuntimeError(f"No backend type associated with device type {d.type} "
                                   f"({name}: tensor on {d}, the rank's device is {self.rank_device})")

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group=None) -> int:
        return 2

    def get_rank(self, group=None) -> int:
        return 0

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self._check("all_reduce", [tensor])
        tensor.mul_(2)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        self._check("all_gather", [tensor, *tensor_list])
        for part in tensor_list:
            part.copy_(tensor)

    def all_gather_object(self, object_list, obj, group=None):
        self.calls.append(("all_gather_object", []))
        object_list[:] = [obj] * len(object_list)

    def broadcast_object_list(self, object_list, src=0, group=None, device=None):
        self.calls.append(("broadcast_object_list", []))

    def barrier(self, group=None, async_op=False, device_ids=None):
        self.calls.append(("barrier", []))


class PerThreadCudaDevice:
    """Replacements for torch.cuda.{is_available, device_count, current_device, set_device} with the
    current device kept per thread, as CUDA keeps it."""

    def __init__(self, count: int = 2):
        self.count = count
        self._local = threading.local()

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", self.current_device)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def current_device(self) -> int:
        return getattr(self._local, "index", 0)

    def set_device(self, device) -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        self._local.index = index


# ---- autocast -----------------------------------------------------------------------------------
def _float(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def install_cuda_autocast_rules() -> None:
    """Makes CPU autocast run group_norm, layer_norm and softmax in fp32, as CUDA autocast does (its
    fp32 cast policy: inputs and weights upcast, an fp32 result); CPU autocast leaves them in the
    input's dtype. Without autocast they run as before. Patches torch.nn.functional for the process."""
    import torch.nn.functional as F

    for name in ("group_norm", "layer_norm", "softmax"):
        original = getattr(F, name)

        def in_fp32(*args, _original=original, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return _original(*[_float(a) for a in args], **{k: _float(v) for k, v in kwargs.items()})
            return _original(*args, **kwargs)

        setattr(F, name, in_fp32)
