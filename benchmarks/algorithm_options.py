"""What the KL penalty and the trained-step window do, on the built-in model.

    python benchmarks/algorithm_options.py [--epochs 12] [--model tiny] [key=value ...]

Runs the trainer (the tiny-compressibility preset, or the given keys) once per variant, each in its
own process, one after the other, and prints per variant the reward of the first and last epochs,
the mean KL to the starting model, and samples/s; the per-epoch rows go to
benchmarks/results/algorithm_options_cpu.csv (or _gpu on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import write_rows  # noqa: E402

VARIANTS = {
    "all 8 steps (DDPO)": [],
    "kl_beta=1": ["train.kl_beta=1"],
    "kl_beta=10": ["train.kl_beta=10"],
    "first 2 of 8 steps": ["train.timestep_fraction=0.25", "train.timestep_selection=first"],
    "random 2 of 8 steps": ["train.timestep_fraction=0.25", "train.timestep_selection=random"],
    "window of 2 of 8 steps": ["train.timestep_fraction=0.25", "train.timestep_selection=window"],
}


def run(name: str, overrides: list[str], epochs: int, extra: list[str], out: Path) -> list[dict]:
    run_dir = out / name.replace(" ", "_").replace("=", "")
    env = {**os.environ, "DDPO_FAST_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ddpo_fast.train", "--run-dir", str(run_dir), f"num_epochs={epochs}",
           "checkpoint_freq=1000", "save_freq=1000", *overrides, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = parser.parse_args()
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            records = run(name, overrides, args.epochs, args.overrides, Path(tmp))
            for r in records:
                rows.append({"variant": name, "epoch": r["epoch"], "reward_mean": r["reward_mean"], "kl": r["kl"],
                             "samples_per_s": r["samples_per_s"], "train_seconds": r["train_seconds"]})
            k = max(1, len(records) // 4)  # the first and last quarter of the epochs
            first = sum(r["reward_mean"] for r in records[:k]) / k
            last = sum(r["reward_mean"] for r in records[-k:]) / k
            summary.append((name, first, last, sum(r["kl"] for r in records) / len(records),
                            sum(r["samples_per_s"] for r in records) / len(records)))
            print(f"{name}: reward {first:.3f} -> {last:.3f}", flush=True)
    print(f"\n| variant | reward, first {k} epochs | reward, last {k} epochs | mean KL to start | samples/s |")
    print("|---|---|---|---|---|")
    for name, first, last, kl, speed in summary:
        print(f"| {name} | {first:.3f} | {last:.3f} | {kl:.2e} | {speed:.2f} |")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_rows(ROOT / "benchmarks" / "results" / f"algorithm_options_{device}.csv", rows)


if __name__ == "__main__":
    main()
