"""Gradient and parameter traffic per optimizer step of each ZeRO stage, counted on DeepSpeed ranks.

    python benchmarks/comm.py [--ranks 2] [--csv benchmarks/results/comm_cpu.csv] [key=value ...]

Runs the trainer (benchmarks/counted_train.py counts the bytes each rank puts into collectives) on
the tiny model for ZeRO-1, -2 and -3 in fp32 and bf16, one epoch each, with 4 backward calls per
optimizer step (4 train batches of 2 per rank x 2 trained timesteps, 2 batches per optimizer step),
and prints per stage: the bytes of the reductions (all-reduce, reduce-scatter, reduce) per optimizer
step over one gradient's bytes in the run's dtype (numel x 4 in fp32, x 2 in bf16: DeepSpeed
accumulates bf16 gradients in fp32 here, then reduces them in bf16), and the bytes each rank
contributed to parameter gathers in the sampling phase over its partition's bytes. ZeRO-3 runs with the persistence threshold
at 0, so that the tiny model's small parameters are partitioned as SD-1.5's large ones are.
CPU ranks (gloo) count the same bytes NCCL would move.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_csv import write_rows  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parent.parent
CONFIG = ["num_epochs=1", "sample.num_steps=8", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
          "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.timestep_fraction=0.25",
          "sample.guidance_scale=3", "reward_workers=1", "checkpoint_freq=100"]


def counted_run(ranks: int, stage: int, mode: str, overrides: list[str], workdir: Path) -> list[dict]:
    tag = f"zero{stage}-{mode}"
    extra = []
    if stage == 3:
        ds = workdir / "persist0.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        extra.append(f"deepspeed_config={ds}")
    env = {**os.environ, "DDPO_TEST_COMM_DIR": str(workdir / tag), "DDPO_FAST_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(29400 + os.getpid() % 500), str(REPO / "benchmarks" / "counted_train.py"),
           "--run-dir", str(workdir / f"run-{tag}"), *CONFIG, f"zero_stage={stage}", f"mixed_precision={mode}",
           *extra, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((workdir / tag / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "comm_cpu.csv"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddpo-comm-") as tmp:
        for stage in (1, 2, 3):
            for mode in ("no", "bf16"):
                report = counted_run(args.ranks, stage, mode, args.overrides, Path(tmp))[0]  # ranks send alike
                gradient_bytes = (2 if mode == "bf16" else 4) * report["trainable_numel"]
                reduced = report["reduced_bytes_per_step"]
                partition = gradient_bytes / args.ranks
                phases = report["sampling_phase_gather_bytes"]
                rows.append({"zero_stage": stage, "mixed_precision": mode,
                             "optimizer_steps": report["optimizer_steps"],
                             "gradient_MB": gradient_bytes / 1e6,
                             "reduced_per_step_x_gradient": reduced / gradient_bytes,
                             "sampling_gathers_x_partition": (sum(phases) / len(phases) / partition) if phases else 0.0})
                print(f"zero {stage} {mode}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{args.ranks} CPU ranks (gloo), tiny UNet, 4 backward calls per optimizer step, 16 CFG forwards "
          "per sampling phase")
    print(f"{'stage':>5} {'precision':>9} {'reduced / optimizer step':>26} {'sampling-phase gathers':>24}")
    for r in rows:
        print(f"{r['zero_stage']:>5} {r['mixed_precision']:>9} {r['reduced_per_step_x_gradient']:>24.2f}x "
              f"{r['sampling_gathers_x_partition']:>22.2f}x")
    write_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
