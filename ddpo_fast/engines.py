"""Training engines: what turns backward calls into optimizer steps.

Both engines count backward calls: DDPO makes one per (train batch, trained timestep), and the
optimizer steps every `config.engine_accumulation_steps` of them.

- `TorchEngine`: one process; AdamW on the trainable parameters (fp32), gradient clipping, a
  non-finite guard.
- `DeepSpeedEngine`: DeepSpeed ZeRO. The stage decides how often gradients cross the network:
  ZeRO-1 (the default) keeps whole gradients on each rank and reduces them once per optimizer step;
  ZeRO-2 partitions the gradients and reduce-scatters on every backward call (50-100 per optimizer
  step in DDPO); ZeRO-3 also partitions the parameters and all-gathers them on each forward.
  bf16 gradients are accumulated in fp32 (DeepSpeed's data_types.grad_accum_dtype): 50-100 bf16
  additions would lose the small per-timestep contributions.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from ddpo_fast import config as cfg
from ddpo_fast.precision import Precision


def prepare_denoiser(model, config: cfg.Config):
    """Freezes the VAE and text encoders; returns (denoiser, trainable params): the whole denoiser, or
    LoRA adapters on `lora.target_modules` (`auto`: the family's usual targets)."""
    model.freeze_frozen_modules()
    denoiser = model.denoiser
    if config.use_lora:
        from peft import LoraConfig

        denoiser.requires_grad_(False)
        names = model.lora_targets if config.lora.target_modules == "auto" else config.lora.target_modules
        targets = [m.strip() for m in names.split(",")]
        denoiser.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, target_modules=targets,
                                        init_lora_weights="gaussian"))
    else:
        denoiser.requires_grad_(True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"lora.target_modules={config.lora.target_modules!r} matched no module of the "
                         f"{type(denoiser).__name__}")
    return denoiser, params


def _adamw(params, t: cfg.TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)


def set_optimizer_settings(param_groups, t: cfg.TrainConfig) -> None:
    """The config's AdamW settings, over those a loaded checkpoint restored (a resume may change them)."""
    for group in param_groups:
        group.update(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
                     eps=t.adam_epsilon)


def _compiled(module, device: torch.device, sampling: bool):
    """torch.compile of the UNet; sampling (no grad, fixed shapes) replays CUDA graphs on a GPU. The
    two phases get two compiled graphs (inference, and forward-for-backward): they agree to rounding
    (measured on a CPU: approx_kl ~1e-14 with unchanged weights), not bit for bit as eager does."""
    mode = "reduce-overhead" if sampling and device.type == "cuda" else None
    return torch.compile(module, mode=mode, dynamic=False)


class TorchEngine:
    """One-process engine: AdamW, gradient accumulation over `accumulation_steps` backward calls,
    gradient clipping, and a non-finite guard (a step whose gradient is not finite is skipped)."""

    def __init__(self, module, params, config: cfg.Config, precision: Precision, device: torch.device):
        t = config.train
        self.module = module
        self.params = params
        self.optimizer = _adamw(params, t)
        self.accumulation_steps = config.engine_accumulation_steps
        self.max_grad_norm = t.max_grad_norm
        self.micro_steps = 0
        self.skipped_steps = 0
        self.last_grad_norm = float("nan")
        self._train_forward = _compiled(module, device, sampling=False) if config.compile else module
        self.sampling_module = _compiled(module, device, sampling=True) if config.compile else module

    def __call__(self, *args, **kwargs):
        return self._train_forward(*args, **kwargs)

    def sampling_phase(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> bool:
        """Call after every backward; returns True at an optimizer step boundary."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation_steps:
            return False
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.last_grad_norm = float(norm)
        if math.isfinite(self.last_grad_norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, directory: Path) -> None:
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"params": {n: p.detach().cpu() for n, p in trainable.items()},
                    "optimizer": self.optimizer.state_dict(), "micro_steps": self.micro_steps,
                    "skipped_steps": self.skipped_steps}, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=False)
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps, self.skipped_steps = state["micro_steps"], state["skipped_steps"]

    def apply_optimizer_settings(self, t: cfg.TrainConfig) -> None:
        set_optimizer_settings(self.optimizer.param_groups, t)
        self.max_grad_norm = t.max_grad_norm

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def deepspeed_config(config: cfg.Config, precision: Precision) -> dict:
    t = config.train
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        # The number of backward calls per optimizer step: with any other value ZeRO-2 would keep only
        # the last micro-step's gradient.
        "gradient_accumulation_steps": config.engine_accumulation_steps,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision.mode == "bf16"},
        "fp16": {"enabled": precision.mode == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision.mode in ("bf16", "fp16"):
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if config.deepspeed_config:
        _merge(ds, cfg.deepspeed_overrides(config.deepspeed_config))
    return ds


def _merge(base: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class DeepSpeedEngine:
    """DeepSpeed ZeRO engine; its gradient_accumulation_steps is the number of backward calls per
    optimizer step, so the boundary falls where ours does. DeepSpeed skips a step whose gradient
    norm is not finite (counted in its skipped_steps)."""

    def __init__(self, module, params, config: cfg.Config, precision: Precision, device: torch.device):
        import deepspeed

        # DeepSpeed's ZeRO calls a collective that torch 2.13 deprecates: a warning per rank and epoch
        # that the user can do nothing about.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning)

        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=_adamw(params, config.train),
                                                    config=deepspeed_config(config, precision))
        self.module = self.engine.module
        self.zero_stage = config.zero_stage
        self.accumulation_steps = config.engine_accumulation_steps
        self.last_grad_norm = float("nan")
        self.sampling_module = self.module
        if config.compile:
            self.engine.compile()
            self.sampling_module = _compiled(self.module, device, sampling=True)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    def sampling_phase(self):
        """ZeRO-3 partitions the parameters and gathers each module's on every forward: a sampling
        phase of S steps would gather the UNet S times. Gather it once for the phase instead."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        return _gathered_without_hooks(self.engine)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else float("nan")
        return boundary

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine")
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def apply_optimizer_settings(self, t: cfg.TrainConfig) -> None:
        # The ZeRO optimizer exposes the wrapped AdamW's groups; gradient clipping comes from the
        # DeepSpeed config, built from this run's config.
        set_optimizer_settings(self.engine.optimizer.param_groups, t)

    @property
    def learning_rate(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]


@contextlib.contextmanager
def _gathered_without_hooks(engine):
    """All ZeRO-3 parameters gathered once, with DeepSpeed's per-module fetch/release hooks taken off
    for the duration (with them on, each module's forward re-partitions its parameters afterwards,
    even inside GatheredParameters), then put back."""
    import deepspeed

    offload = engine.optimizer.parameter_offload
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.clear()
            offload.setup_zero_stage3_hooks()
