"""A run directory belongs to one run: what a new run, `--overwrite` and `--resume` may do with it.

Everything here only reads until the checks pass, so a refused command leaves the directory as it was.
`config.json` holds the run's config and, under "resumed", every change a resume applied with the
epoch it took effect from.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ddpo_fast import config as cfg
from ddpo_fast.checkpoints import list_checkpoints

CONFIG_FILE = "config.json"


class RunFinished(Exception):
    """`--resume` of a run that has done all its epochs: nothing to do."""


def read_config(run_dir: Path) -> tuple[cfg.Config, list[dict]]:
    """The run's config and its resume history."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise cfg.ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a run directory)")
    data = json.loads(path.read_text())
    history = data.pop("resumed", [])
    return cfg.from_dict(data), history


def write_config(run_dir: Path, config: cfg.Config, history: list[dict]) -> None:
    data = config.to_dict()
    if history:
        data["resumed"] = history
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / CONFIG_FILE)  # a kill mid-write leaves the old file


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """A new run needs an absent or empty directory, or `--overwrite` of an earlier run's directory."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise cfg.ConfigError(f"--run-dir {run_dir} is a file, not a directory")
    if not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise cfg.ConfigError(
            f"--run-dir {run_dir} is not empty (an earlier run?); nothing in it was touched. Continue that run "
            f"with --resume {run_dir}, or pass --overwrite to delete what it holds and start again")
    if not (run_dir / CONFIG_FILE).is_file():
        raise cfg.ConfigError(
            f"--overwrite: {run_dir} holds no {CONFIG_FILE}, so it is not a ddpo_fast run directory; it was left as "
            "it is. Choose a new or empty --run-dir")


def start_new_run(run_dir: Path, config: cfg.Config, overwrite: bool) -> None:
    """Rank 0, after `check_new_run` passed on every rank: empties the directory if asked, writes the config."""
    if overwrite and run_dir.is_dir():
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config, [])


@dataclass
class Resume:
    config: cfg.Config
    checkpoint: Path | None  # None: no epoch was saved, the run starts again at epoch 0
    start_epoch: int
    changes: dict[str, tuple]  # key -> (old, new), applied from start_epoch
    history: list[dict]  # the earlier resumes' changes


def how_to_launch(engine: str, world_size: int, run_dir: Path) -> str:
    if engine == "deepspeed" and world_size > 1:
        return (f"deepspeed --num_gpus {world_size} ddpo_fast/train.py --resume {run_dir} (or torchrun "
                f"--nproc_per_node {world_size} -m ddpo_fast.train --resume {run_dir})")
    if engine == "deepspeed":
        return f"python -m ddpo_fast.train --resume {run_dir} with engine=deepspeed in the run's config (one rank)"
    return f"python -m ddpo_fast.train --resume {run_dir} (one process)"


def plan_resume(run_dir: Path, overrides: dict, world_size: int) -> Resume:
    """Checks `overrides` and the launch against the run; raises ConfigError naming what cannot change."""
    saved, history = read_config(run_dir)
    config = cfg.apply_overrides(copy.deepcopy(saved), overrides)
    changes = cfg.changed_keys(saved, config)
    fixed = [k for k in changes if k not in cfg.RESUMABLE_KEYS]
    if fixed:
        described = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in fixed)
        raise cfg.ConfigError(
            f"--resume {run_dir}: {described} cannot change on resume (the run's checkpoints or the epochs still to "
            f"come depend on it); start a new run with --run-dir to change it. Keys a resume can change: "
            f"{', '.join(sorted(cfg.RESUMABLE_KEYS))}")
    checkpoints = list_checkpoints(run_dir)
    checkpoint = checkpoints[-1] if checkpoints else None
    state = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else {}
    start_epoch = state["epoch"] + 1 if checkpoint else 0
    if start_epoch >= config.num_epochs:
        if "num_epochs" in changes:
            raise cfg.ConfigError(f"--resume {run_dir}: num_epochs={config.num_epochs}, but the run has already "
                                  f"finished {start_epoch} epochs; give num_epochs > {start_epoch} to train on")
        raise RunFinished(f"{run_dir} has finished all its {start_epoch} epochs; give num_epochs=N with "
                          f"N > {start_epoch} to train on")
    engine = cfg.resolved_engine(config, world_size)
    made_by = (state.get("engine"), state.get("world_size"))
    if checkpoint and None not in made_by and made_by != (engine, world_size):
        raise cfg.ConfigError(
            f"--resume {run_dir}: its checkpoint {checkpoint.name} was written by engine={made_by[0]} with "
            f"{made_by[1]} rank(s), and this launch has engine={engine} with {world_size}; a checkpoint's optimizer "
            f"state is split per rank. Resume with: {how_to_launch(*made_by, run_dir)}")
    return Resume(config, checkpoint, start_epoch, changes, history)
