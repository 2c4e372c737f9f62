"""The one precision policy of sampling and training.

DDPO's first PPO ratio is 1 only if training recomputes exactly the log-probability that sampling
stored, so both phases must run the UNet under the same numerics. CUDA autocast runs group_norm,
layer_norm and softmax in fp32 while CPU autocast does not, so a phase with autocast and a phase
without it (e.g. DeepSpeed's bf16 module trained without autocast) agree on a CPU and differ on a
GPU (flow_grpo#131, DanceGRPO#57). Here every denoiser forward goes through the model family's
`denoise` (ddpo_fast.families), which enters the policy's autocast itself: the phases cannot differ
by construction.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve(mixed_precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU (tensor cores) and fp32 (`no`) on a CPU."""
    if mixed_precision == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return mixed_precision


@dataclass(frozen=True)
class Precision:
    mode: str  # "no", "bf16" or "fp16" (resolved)
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return _DTYPES[self.mode]

    @classmethod
    def for_device(cls, mixed_precision: str, device: torch.device) -> "Precision":
        """The policy of the `mixed_precision` key on `device` (`auto` resolved)."""
        return cls(resolve(mixed_precision, device), device.type)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


FP32 = Precision("no", "cpu")  # no autocast (the device type does not matter then)
