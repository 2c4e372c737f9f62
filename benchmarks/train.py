"""End-to-end training throughput: ddpo_fast's trainer against trl 0.23.1's DDPOTrainer (the eager
baseline of the same algorithm) on the same saved tiny pipeline and the same config.

    python benchmarks/train.py [--epochs 3] [--with-compile] [--csv benchmarks/results/train.csv] [key=value ...]
    python benchmarks/train.py --model sd15-random --epochs 3 --skip-trl   # on a GPU (bf16 there by default)
    python benchmarks/train.py --model tiny-sd3 --epochs 3                  # other families: ddpo_fast only

Defaults: the issue's bar config (20 DDIM steps, CFG 5, 32 samples per epoch, full finetune,
JPEG compressibility). Each trainer runs in its own subprocess (clean peak memory); the first epoch
is a warm-up (torch.compile's compilation too, with --with-compile) and samples/s is the mean of the
others. `--with-compile` adds a row for ddpo_fast with compile=true. Peak memory: max RSS on CPU, max allocated on
CUDA.

Model FLOP utilisation: the denoiser's FLOPs per sample of an epoch (forwards while sampling, twice
with CFG; forward + backward, counted as 3 forwards, for each trained step; counted with
FlopCounterMode on meta tensors, ~0.80 TFLOP per SD-1.5 forward at 64x64 latents) times samples/s,
over the device's measured matmul throughput in the run's dtype (a large matrix product).
`--model sd15-random` runs ddpo_fast alone on the SD-1.5-shaped pipeline with random weights
(trl's trainer needs a saved pipeline directory: 4 GB at that size). `--model tiny-sdxl` and
`--model tiny-sd3` run ddpo_fast alone (trl trains SD 1.x/2.x only) on the other families' tiny
models, saved to a directory and loaded back as a user's model would be.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BAR = ["sample.num_steps=20", "sample.guidance_scale=5", "sample.batch_size=8", "sample.num_batches_per_epoch=4",
       "train.batch_size=8", "train.gradient_accumulation_steps=1", "train.timestep_fraction=1.0",
       "train.num_inner_epochs=1", "train.learning_rate=1e-4", "train.clip_range=1e-4", "use_lora=false",
       "per_prompt_stat_tracking.min_count=16"]


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bar_config(overrides: list[str]):
    from ddpo_fast import config as cfg

    return cfg.validate(cfg.from_preset("tiny-compressibility", [*BAR, *overrides]))


def denoiser_flops_per_sample(model: str, overrides: list[str]) -> float:
    """Denoiser FLOPs per sample of one epoch: sampling forwards plus 3x forward per trained step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpo_fast.models import load_model
    from ddpo_fast.precision import FP32

    c = bar_config(overrides)
    with torch.device("meta"):  # the model's shapes only: no weights are made
        family = load_model(model, resolution=c.sample.resolution)
        latents, cond = torch.empty(1, *family.latent_shape), family.encode([""], "meta")
        with FlopCounterMode(display=False) as counter:  # the denoiser alone, not the text encoders
            family.denoise(family.denoiser, latents, torch.tensor([500.0]), cond, None, FP32)
    forward = counter.get_total_flops()
    sample_rows = 2 if c.use_cfg else 1
    train_rows = 2 if c.use_cfg and c.train.cfg else 1
    per_sample = c.sample.num_steps * sample_rows + 3 * c.num_train_timesteps * train_rows * c.train.num_inner_epochs
    return forward * per_sample


def resolved_precision(overrides: list[str]) -> str:
    """The run's mixed precision on this machine (auto: bf16 on a GPU, no on a CPU)."""
    import torch

    from ddpo_fast.precision import Precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Precision.for_device(bar_config(overrides).mixed_precision, device).mode


def matmul_peak_flops(dtype_name: str) -> float:
    """Measured FLOP/s of a large matrix product on this device in the run's dtype."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32) if cuda else torch.float32
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device="cuda" if cuda else "cpu").to(dtype)
    b = torch.randn(n, n, device=a.device).to(dtype)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def run_ours(model_dir: str, overrides: list[str], epochs: int) -> dict:
    from ddpo_fast import train

    os.environ["DDPO_FAST_NO_PROGRESS"] = "1"
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    train.main(["--run-dir", str(run_dir), f"model={model_dir}", *BAR, *overrides, f"num_epochs={epochs}",
                "checkpoint_freq=1000", f"save_freq={epochs}"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    samples = sum(r["samples_per_s"] * (r["sample_seconds"] + r["train_seconds"]) for r in timed)
    seconds = sum(r["sample_seconds"] + r["train_seconds"] for r in timed)
    name = "ddpo_fast compile=true" if "compile=true" in overrides else "ddpo_fast"
    first = records[0]["sample_seconds"] + records[0]["train_seconds"]  # with compile: compilation included
    return {"trainer": name, "samples_per_s": samples / seconds, "peak_memory_mb": peak_memory_mb(),
            "first_epoch_s": first,
            "reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"]}


def run_trl(model_dir: str, overrides: list[str], epochs: int) -> dict:
    import warnings

    import torch
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from ddpo_fast import config as cfg
    from ddpo_fast.prompts import get_prompt_fn
    from ddpo_fast.rewards import build as build_reward
    from ddpo_fast.rewards import parse_options

    warnings.filterwarnings("ignore")
    c = cfg.validate(cfg.from_preset("tiny-compressibility", [*BAR, *overrides]))
    ddpo_config = DDPOConfig(
        num_epochs=epochs, seed=c.seed, mixed_precision=resolved_precision(overrides),
        sample_num_steps=c.sample.num_steps, sample_eta=c.sample.eta, sample_guidance_scale=c.sample.guidance_scale,
        sample_batch_size=c.sample.batch_size, sample_num_batches_per_epoch=c.sample.num_batches_per_epoch,
        train_batch_size=c.train.batch_size, train_learning_rate=c.train.learning_rate,
        train_gradient_accumulation_steps=c.train.gradient_accumulation_steps,
        train_max_grad_norm=c.train.max_grad_norm, train_num_inner_epochs=c.train.num_inner_epochs,
        train_cfg=c.train.cfg, train_adv_clip_max=c.train.adv_clip_max, train_clip_range=c.train.clip_range,
        train_timestep_fraction=c.train.timestep_fraction, train_adam_weight_decay=c.train.adam_weight_decay,
        train_adam_epsilon=c.train.adam_epsilon,
        per_prompt_stat_tracking=c.per_prompt_stat_tracking.enabled,
        per_prompt_stat_tracking_buffer_size=c.per_prompt_stat_tracking.buffer_size,
        per_prompt_stat_tracking_min_count=c.per_prompt_stat_tracking.min_count,
        async_reward_computation=False, save_freq=10**6,  # trl's async mode wants futures from the reward
        logdir=tempfile.mkdtemp(prefix="bench-trl-"), log_with=None,
    )
    reward = build_reward(c.reward, **parse_options(c.reward_options))
    prompt_fn = get_prompt_fn(c.prompts)
    import random

    rng = random.Random(c.seed)

    seen: list[float] = []  # every reward trl computed, to report its learning curve like ours

    def trl_reward(images, prompts, metadata):
        as_uint8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        rewards, _ = reward(as_uint8, list(prompts), list(metadata))
        seen.extend(rewards.tolist())
        return rewards, {}

    pipeline = DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=c.use_lora)
    # A hook avoids a logging call before accelerate is set up; then no image logging (no tracker).
    trainer = DDPOTrainer(ddpo_config, trl_reward, lambda: prompt_fn(rng), pipeline, image_samples_hook=lambda *a: None)
    trainer.image_samples_callback = None
    samples_per_epoch = c.sample.batch_size * c.sample.num_batches_per_epoch
    times, epoch_rewards = [], []
    global_step = 0
    for epoch in range(epochs):
        start = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        times.append(time.perf_counter() - start)
        epoch_rewards.append(sum(seen) / len(seen))
        seen.clear()
    timed = times[1:] or times
    return {"trainer": "trl 0.23.1 DDPOTrainer", "samples_per_s": samples_per_epoch * len(timed) / sum(timed),
            "peak_memory_mb": peak_memory_mb(), "first_epoch_s": times[0], "reward_first": epoch_rewards[0],
            "reward_last": epoch_rewards[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "train.csv"))
    parser.add_argument("--only", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--skip-trl", action="store_true", help="measure ddpo_fast only")
    parser.add_argument("--with-compile", action="store_true", help="also measure ddpo_fast with compile=true")
    parser.add_argument("--model", choices=["tiny", "tiny-sdxl", "tiny-sd3", "sd15-random", "sd35m-random"],
                        default="tiny", help="built-in model (sd15-random, sd35m-random: SD-1.5's and SD-3.5-medium's "
                                             "shapes, random weights; all but tiny: ddpo_fast only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.only:  # child process: one trainer, result as JSON on the last line
        fn = run_ours if args.only == "ours" else run_trl
        print(json.dumps(fn(args.model_dir, args.overrides, args.epochs)))
        return 0

    from ddpo_fast.models import BUILT_IN_MODELS

    if args.model.startswith("tiny"):
        model_dir = tempfile.mkdtemp(prefix=f"bench-{args.model}-")
        BUILT_IN_MODELS[args.model]().save_pretrained(model_dir)
    else:
        model_dir = args.model  # built in the trainer's process
    rows = []
    runs = [("ours", [])] + ([("ours", ["compile=true"])] if args.with_compile else [])
    runs += [] if args.skip_trl or args.model != "tiny" else [("trl", [])]
    for which, extra in runs:
        cmd = [sys.executable, __file__, "--only", which, "--model-dir", model_dir, "--epochs", str(args.epochs),
               *args.overrides, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    config = " ".join([*BAR, *args.overrides])
    flops_per_sample = denoiser_flops_per_sample(args.model, args.overrides)
    peak = matmul_peak_flops(resolved_precision(args.overrides))
    print(f"model: {args.model}; config: {config}; epochs {args.epochs} (first one is warm-up)")
    print(f"denoiser {flops_per_sample / 1e12:.4f} TFLOP per sample; measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    print(f"{'trainer':<26}{'samples/s':>12}{'peak MB':>10}{'vs trl':>9}{'MFU':>8}{'first epoch s':>15}"
          f"{'reward first':>14}{'reward last':>13}")
    base = rows[-1]["samples_per_s"] if rows[-1]["trainer"].startswith("trl") else None
    for r in rows:
        r["mfu"] = r["samples_per_s"] * flops_per_sample / peak
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['trainer']:<26}{r['samples_per_s']:>12.2f}{r['peak_memory_mb']:>10.0f}{ratio:>9}{r['mfu']:>8.1%}"
              f"{r['first_epoch_s']:>15.1f}{r['reward_first']:>14.4f}{r['reward_last']:>13.4f}")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trainer", "samples_per_s", "peak_memory_mb", "mfu", "first_epoch_s",
                                               "reward_first", "reward_last", "model", "config", "epochs"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "model": args.model, "config": config, "epochs": args.epochs})
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
