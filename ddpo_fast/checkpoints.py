"""Checkpoints (atomic, newest N kept), the final model, and stopping on SIGTERM/SIGINT without
losing the last finished epoch.

A checkpoint is `RUN_DIR/checkpoints/epoch-N/`: the engine's state (weights, optimizer) and
`trainer_state.json`. It is written under a temporary name and renamed, so a kill mid-save leaves no
checkpoint that resume would pick.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

from ddpo_fast import config as cfg
from ddpo_fast import distributed

CHECKPOINT_PREFIX = "epoch-"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress lives under a temporary name)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(run_dir: Path, epoch: int, engine, state: dict, limit: int, extra: dict | None = None) -> Path:
    """Writes the checkpoint of `epoch` (every rank saves its part; rank 0 also `extra`, {file name:
    state dict}, e.g. the EMA); keeps the newest `limit`."""
    ckpt_dir = run_dir / "checkpoints"
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{epoch}"
    tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{epoch}"
    rank = distributed.world()[0]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    engine.save(tmp)
    distributed.barrier()
    if rank == 0:
        for name, value in (extra or {}).items():
            torch.save(value, tmp / name)
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def save_final_model(model, denoiser, config: cfg.Config, run_dir: Path) -> Path:
    """The finetuned denoiser in diffusers format (run_dir/unet, run_dir/transformer for SD3), or LoRA
    weights (run_dir/lora) that the family's pipeline loads with load_lora_weights."""
    if config.use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = run_dir / "lora"
        model.save_lora(out, convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser)))
    else:
        out = run_dir / model.denoiser_name
        denoiser.save_pretrained(str(out))
    _default_permissions(out)
    return out


def _default_permissions(directory: Path) -> None:
    """The saver writes through a private temporary file (mode 0600); give the model the mode any new
    file gets (the umask's), so that others who may read the run can load it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


class StopRequests:
    """SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) ask the run to stop; the trainer polls
    `requested()` at points where stopping loses nothing (between sampling batches, before the weights
    of the epoch change, and after each epoch) and then saves the last finished epoch. A second
    signal stops at once (the default handler: no checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        distributed.log(f"received {signal.Signals(signum).name}: stopping at the next safe point "
                        "(a checkpoint of the last finished epoch); send it again to stop at once")
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)

    def requested(self) -> bool:
        """True on every rank when any rank received a signal (a collective: call on all ranks)."""
        return distributed.any_rank(self.received is not None)


class Stopped(Exception):
    """The run stopped on a signal after saving the checkpoint of its last finished epoch."""

    def __init__(self, signum: int | None, checkpoint: Path | None, resume_command: str):
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        where = f"checkpoint {checkpoint}" if checkpoint else "no finished epoch to save"
        super().__init__(f"stopped by {name}; {where}; continue with: {resume_command}")
        self.exit_code = 128 + (signum or signal.SIGTERM)
