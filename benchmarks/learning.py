"""Learning speed on the built-in `shapes` model: how fast the reward rises, per wall-clock second and
per sample, for ddpo_fast and trl 0.23.1's DDPOTrainer; the paper's algorithms side by side; and the
reward on held-out prompts before and after finetuning.

    OMP_NUM_THREADS=1 python benchmarks/learning.py [--quick] [--seeds 0,1,2] [--epochs 15] [--gain 0.1]
        [--parts speed,algorithms,heldout] [--jobs 2] [--out benchmarks/results/learning] [key=value ...]

The reward is JPEG compressibility (SETTINGS; `reward=shapes_alignment` to measure the judge instead):
on this model the judge's reward did not rise in any setting tried (BENCHMARKS.md), so the time to
reach a level of it is not measurable. Each trainer runs in a subprocess of its own, `--jobs` at a
time (one thread each): a seed's ddpo_fast and trl runs side by side, so both see the same load on
a shared machine, then its DDPO-SF and RWR runs.

- speed: ddpo_fast and trl's `DDPOTrainer` finetune the same saved pipeline directory (the shipped
  `ddpo_fast/weights/shapes`) on the same reward function with the same hyperparameters (SETTINGS, which
  both trainers have: DDPO-IS, per-prompt advantages, K random trained steps, two optimizer steps per
  epoch). Per epoch: the samples so far, the seconds of the epochs so far (sampling, reward and
  training; not the evaluations) and the epoch's mean reward. Every `--eval-every` epochs (and after
  the last) both are evaluated the same way on fixed prompts and seeds (`--eval-prompts` captions of
  `shapes` x `--eval-seeds`, the same noise for every model). Headline: the seconds and samples until
  the fixed-prompt reward first reaches the base model's + `--gain`.
- algorithms: ddpo_fast with `train.algorithm` = ddpo_is (the speed part's runs), ddpo_sf (one
  optimizer step per epoch: REINFORCE is on-policy, as in the paper) and rwr, at equal samples.
- heldout: every final model, and the base, on captions of `shapes_heldout` (colour-shape pairs the
  training prompts never ask for): the reward, and the shapes_alignment judge (what the finetuning did
  to prompt following).

Writes OUT/learning_curves.csv (one row per run and epoch), OUT/learning_summary.csv and
OUT/learning.png (the fixed-prompt reward against seconds and against samples; the algorithms against
samples), and prints the table of BENCHMARKS.md. `--quick`: one seed, two epochs of 8 samples, 2
prompts x 1 seed evaluated (a smoke run of the whole path).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Hyperparameters of every run (ddpo_fast keys; trl's DDPOConfig gets the same values, see run_trl).
# Both trainers have these: DDPO-IS (PPO clip), per-prompt advantage normalisation, K random trained
# steps. Two optimizer steps per epoch, so that DDPO-IS reuses its samples as the paper's does;
# DDPO-SF gets one (REINFORCE is on-policy: SF_SETTINGS).
SETTINGS = [
    "reward=jpeg_compressibility", "sample.num_steps=10", "sample.guidance_scale=3", "sample.eta=1",
    "sample.batch_size=16", "sample.num_batches_per_epoch=2",
    "train.batch_size=16", "train.gradient_accumulation_steps=1", "train.num_inner_epochs=1",
    "train.timestep_fraction=0.5", "train.learning_rate=3e-4", "train.clip_range=1e-3", "train.adv_clip_max=5",
    "train.max_grad_norm=1", "use_lora=false", "mixed_precision=no",
    "per_prompt_stat_tracking.enabled=true", "per_prompt_stat_tracking.buffer_size=16",
    "per_prompt_stat_tracking.min_count=4",
]
SF_SETTINGS = ["train.gradient_accumulation_steps=2"]
QUICK = ["sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4"]
EVAL_PROMPTS, EVAL_SEEDS = 16, "0,1,2,3"
JUDGE = "shapes_alignment"  # also reported on the held-out prompts: what the finetuning did to prompt following


def fixed_prompts(prompt_set: str, n: int) -> list[str]:
    """n distinct prompts of a set, drawn with a fixed seed (the same for every run)."""
    from ddpo_fast.prompts import PROMPT_SETS

    rng, prompts = random.Random(f"eval/{prompt_set}"), []
    while len(prompts) < n:
        p = PROMPT_SETS[prompt_set](rng)[0]
        if p not in prompts:
            prompts.append(p)
    return prompts


def run_config(overrides: list[str]):
    from ddpo_fast import config as cfg
    from ddpo_fast.models import SHAPES_DIR

    return cfg.validate(cfg.from_preset("shapes-alignment", [f"model={SHAPES_DIR}", "prompts=shapes", *SETTINGS,
                                                             *overrides]))


def evaluate_unet(unet, prompts: list[str], seeds: list[int], overrides: list[str]) -> dict:
    """The run's reward and the judge's of `unet` inside the shapes pipeline on fixed prompts and seeds (the
    sampler of `python -m ddpo_fast.evaluate`, all prompts in one batch, so every model sees the same noise)."""
    import torch

    from ddpo_fast.evaluate import sample_images
    from ddpo_fast.models import load_model
    from ddpo_fast.rewards import build as build_reward

    c = run_config(overrides)
    model = load_model("shapes")
    if unet is not None:
        model.pipe.unet = unet
    training = model.denoiser.training
    model.denoiser.eval()
    with torch.no_grad():
        images = sample_images(model, prompts, seeds, c, torch.device("cpu"), batch_size=len(prompts))
    model.denoiser.train(training)
    all_prompts = [p for p in prompts for _ in seeds]
    meta = [{} for _ in all_prompts]
    rewards, _ = build_reward(c.reward)(images, all_prompts, meta)
    judged = rewards if c.reward == JUDGE else build_reward(JUDGE)(images, all_prompts, meta)[0]
    return {"reward": float(rewards.mean()), "judge": float(judged.mean())}


# one run per subprocess -------------------------------------------------------------------------
def run_ours(seed: int, epochs: int, eval_every: int, eval_set: tuple, overrides: list[str], out: Path) -> dict:
    from ddpo_fast import train
    from ddpo_fast.models import SHAPES_DIR

    os.environ["DDPO_FAST_NO_PROGRESS"] = "1"
    c = run_config(overrides)
    run_dir = out / "run"
    start = time.perf_counter()
    prompts, seeds = eval_set
    train.main(["--run-dir", str(run_dir), "--overwrite", "--preset", "shapes-alignment", f"model={SHAPES_DIR}",
                "prompts=shapes", *SETTINGS, *overrides, f"seed={seed}", f"num_epochs={epochs}",
                f"save_freq={epochs}", "checkpoint_freq=100000", f"eval_freq={eval_every}",
                "eval_prompts=" + ",".join(prompts), "eval_seeds=" + ",".join(map(str, seeds))])
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve, seconds, samples = [], 0.0, 0
    per_epoch = c.sample.batch_size * c.sample.num_batches_per_epoch
    for r in records:
        seconds += r["sample_seconds"] + r["train_seconds"]
        samples += per_epoch
        curve.append({"epoch": r["epoch"], "samples": samples, "seconds": seconds, "reward": r["reward_mean"],
                      "eval_reward": r.get("eval/reward_mean")})
    return {"curve": curve, "unet": str(run_dir / "unet"), "process_seconds": total}


def run_trl(seed: int, epochs: int, eval_every: int, eval_set: tuple, overrides: list[str], out: Path) -> dict:
    """trl's DDPOTrainer with the same settings, reward function and prompt distribution. Its reward
    gets float images in [0, 1]; they are rounded to uint8, as ddpo_fast's decoder does, for the judge."""
    import warnings

    import torch
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from ddpo_fast.models import SHAPES_DIR
    from ddpo_fast.prompts import get_prompt_fn
    from ddpo_fast.rewards import build as build_reward

    warnings.filterwarnings("ignore")
    c = run_config(overrides)
    if c.train.algorithm != "ddpo_is" or c.use_lora or c.train.kl_beta or c.sample.group_size != 1:
        raise SystemExit("trl's DDPOTrainer runs DDPO-IS only (full UNet, no KL, no groups)")
    torch.manual_seed(seed)
    ddpo_config = DDPOConfig(
        num_epochs=epochs, seed=seed, mixed_precision="no",
        sample_num_steps=c.sample.num_steps, sample_eta=c.sample.eta, sample_guidance_scale=c.sample.guidance_scale,
        sample_batch_size=c.sample.batch_size, sample_num_batches_per_epoch=c.sample.num_batches_per_epoch,
        train_batch_size=c.train.batch_size, train_learning_rate=c.train.learning_rate,
        train_adam_beta1=c.train.adam_beta1, train_adam_beta2=c.train.adam_beta2,
        train_adam_weight_decay=c.train.adam_weight_decay, train_adam_epsilon=c.train.adam_epsilon,
        train_gradient_accumulation_steps=c.train.gradient_accumulation_steps,
        train_max_grad_norm=c.train.max_grad_norm, train_num_inner_epochs=c.train.num_inner_epochs,
        train_cfg=c.train.cfg, train_adv_clip_max=c.train.adv_clip_max, train_clip_range=c.train.clip_range,
        train_timestep_fraction=c.train.timestep_fraction,
        per_prompt_stat_tracking=c.per_prompt_stat_tracking.enabled,
        per_prompt_stat_tracking_buffer_size=c.per_prompt_stat_tracking.buffer_size,
        per_prompt_stat_tracking_min_count=c.per_prompt_stat_tracking.min_count,
        async_reward_computation=False, save_freq=10**6,
        logdir=tempfile.mkdtemp(prefix="learning-trl-"), log_with=None,
    )
    reward = build_reward(c.reward)
    prompt_fn = get_prompt_fn(c.prompts)
    rng = random.Random(seed)
    seen: list[float] = []

    def trl_reward(images, prompts, metadata):
        as_uint8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        rewards, _ = reward(as_uint8, list(prompts), list(metadata))
        seen.extend(rewards.tolist())
        return rewards, {}

    pipeline = DefaultDDPOStableDiffusionPipeline(str(SHAPES_DIR), use_lora=False)
    pipeline.sd_pipeline.set_progress_bar_config(disable=True)
    trainer = DDPOTrainer(ddpo_config, trl_reward, lambda: prompt_fn(rng), pipeline, image_samples_hook=lambda *a: None)
    trainer.image_samples_callback = None
    prompts, seeds = eval_set
    per_epoch = c.sample.batch_size * c.sample.num_batches_per_epoch
    curve, seconds, global_step = [], 0.0, 0
    start_all = time.perf_counter()
    for epoch in range(epochs):
        start = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds += time.perf_counter() - start
        row = {"epoch": epoch, "samples": per_epoch * (epoch + 1), "seconds": seconds,
               "reward": sum(seen) / len(seen), "eval_reward": None}
        seen.clear()
        if epoch % eval_every == 0 or epoch == epochs - 1:
            row["eval_reward"] = evaluate_unet(pipeline.sd_pipeline.unet, prompts, seeds, overrides)["reward"]
        curve.append(row)
    total = time.perf_counter() - start_all
    pipeline.sd_pipeline.unet.save_pretrained(str(out / "unet"))
    return {"curve": curve, "unet": str(out / "unet"), "process_seconds": total}


def child(args) -> int:
    out = Path(args.child_out)
    fn = run_trl if args.child == "trl" else run_ours
    eval_set = (fixed_prompts("shapes", args.eval_prompts), [int(s) for s in args.eval_seeds.split(",")])
    result = fn(args.seed, args.epochs, args.eval_every, eval_set, args.overrides, out)
    (out / "result.json").write_text(json.dumps(result))
    return 0


# the parent -------------------------------------------------------------------------------------
def launch(job: dict, args, work: Path) -> dict:
    out = work / f"{job['name']}-seed{job['seed']}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", job["trainer"], "--child-out", str(out), "--seed", str(job["seed"]),
           "--epochs", str(args.epochs), "--eval-every", str(args.eval_every), "--eval-prompts", str(args.eval_prompts),
           "--eval-seeds", args.eval_seeds, *job["overrides"]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{job['name']} seed {job['seed']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads((out / "result.json").read_text())
    print(f"  {job['name']} seed {job['seed']}: {time.perf_counter() - start:.0f} s, epoch rewards "
          + " ".join(f"{r['reward']:.3f}" for r in result["curve"]), flush=True)
    return {**job, **result}


def first_reaching(curve: list[dict], level: float) -> tuple[float | None, int | None]:
    """(seconds, samples) at the first evaluation whose fixed-prompt reward is >= level."""
    for r in curve:
        if r["eval_reward"] is not None and r["eval_reward"] >= level:
            return r["seconds"], r["samples"]
    return None, None


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def plot(results: list[dict], base_eval: float, level: float, reward: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ddpo_fast": "tab:blue", "trl": "tab:orange", "ddpo_is": "tab:blue", "ddpo_sf": "tab:green",
               "rwr": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    speed = [r for r in results if r["name"] in ("ddpo_fast", "trl")]
    for ax, x in ((axes[0], "seconds"), (axes[1], "samples")):  # per seed: thin lines of the same colour
        labelled = set()
        for r in speed:
            points = [(p[x], p["eval_reward"]) for p in r["curve"] if p["eval_reward"] is not None]
            xs, ys = [0.0] + [p[0] for p in points], [base_eval] + [p[1] for p in points]
            ax.plot(xs, ys, marker="o", ms=3, color=colours[r["name"]], alpha=0.8,
                    label=None if r["name"] in labelled else r["name"])
            labelled.add(r["name"])
        ax.axhline(level, color="grey", ls="--", lw=1)
        ax.set_xlabel("training seconds (sampling + reward + training)" if x == "seconds" else "samples")
        ax.set_ylabel(f"{reward}, fixed prompts and seeds")
        ax.legend(fontsize=7)
    axes[0].set_title("ddpo_fast vs trl DDPOTrainer: reward against time")
    axes[1].set_title("... against samples")
    by_algorithm: dict[str, list[dict]] = {}
    for r in results:
        if r["name"] in ("ddpo_fast", "ddpo_sf", "rwr"):
            by_algorithm.setdefault("ddpo_is" if r["name"] == "ddpo_fast" else r["name"], []).append(r)
    for name, runs in by_algorithm.items():
        for i, r in enumerate(runs):
            points = [(p["samples"], p["eval_reward"]) for p in r["curve"] if p["eval_reward"] is not None]
            axes[2].plot([0] + [p[0] for p in points], [base_eval] + [p[1] for p in points], marker="o", ms=3,
                         color=colours[name], alpha=0.8, label=name if i == 0 else None)
    axes[2].set_xlabel("samples")
    axes[2].set_title("DDPO-IS, DDPO-SF, RWR (ddpo_fast)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one seed, 2 epochs of 8 samples, 2 prompts x 1 seed evaluated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eval-every", type=int, default=3, help="epochs between fixed-prompt evaluations")
    parser.add_argument("--eval-prompts", type=int, default=16, help="fixed prompts of the evaluations")
    parser.add_argument("--eval-seeds", default="0,1,2,3", help="seeds of the evaluations (one image per prompt)")
    parser.add_argument("--gain", type=float, default=0.15,
                        help="the headline's level: the base model's fixed-prompt reward + GAIN")
    parser.add_argument("--parts", default="speed,algorithms,heldout")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each by default)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to SETTINGS, for every run")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.seeds, args.epochs, args.eval_every, args.eval_prompts, args.eval_seeds = "0", 2, 1, 2, "0"
        args.overrides = [*QUICK, *args.overrides]
    parts = set(args.parts.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="learning-"))
    started = time.perf_counter()

    c = run_config(args.overrides)
    eval_prompts = fixed_prompts("shapes", args.eval_prompts)
    eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    base = evaluate_unet(None, eval_prompts, eval_seeds, args.overrides)
    base_eval = base["reward"]
    level = base_eval + args.gain
    print(f"settings: {' '.join([*SETTINGS, *args.overrides])}; {args.epochs} epochs of "
          f"{c.sample.batch_size * c.sample.num_batches_per_epoch} samples; seeds {seeds}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {args.jobs} runs at once")
    print(f"base model on the fixed prompts ({len(eval_prompts)} x seeds {args.eval_seeds}): {c.reward} "
          f"{base_eval:.3f} (judge {base['judge']:.3f}); level {level:.3f}", flush=True)

    # Jobs in pairs that run side by side: a seed's ddpo_fast and trl runs, then its DDPO-SF and RWR runs.
    jobs = []
    for s in seeds:
        jobs.append({"name": "ddpo_fast", "trainer": "ours", "seed": s, "overrides": list(args.overrides)})
        if "speed" in parts:
            jobs.append({"name": "trl", "trainer": "trl", "seed": s, "overrides": list(args.overrides)})
    if "algorithms" in parts:
        for s in seeds:
            jobs.append({"name": "ddpo_sf", "trainer": "ours", "seed": s,
                         "overrides": [*args.overrides, "train.algorithm=ddpo_sf", *SF_SETTINGS]})
            jobs.append({"name": "rwr", "trainer": "ours", "seed": s,
                         "overrides": [*args.overrides, "train.algorithm=rwr"]})
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: launch(job, args, work), jobs))

    rows = []
    for r in results:
        for p in r["curve"]:
            rows.append({"run": r["name"], "seed": r["seed"], **p})
    with open(out / "learning_curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "seed", "epoch", "samples", "seconds", "reward", "eval_reward"])
        writer.writeheader()
        writer.writerows(rows)

    # held-out prompts: every final model and the base, the same prompts and seeds for all
    base_heldout = {"reward": None, "judge": None}
    if "heldout" in parts:
        from diffusers import UNet2DConditionModel

        heldout_prompts = fixed_prompts("shapes_heldout", args.eval_prompts)
        base_heldout = evaluate_unet(None, heldout_prompts, eval_seeds, args.overrides)
        for r in results:
            unet = UNet2DConditionModel.from_pretrained(r["unet"])
            r["heldout"] = evaluate_unet(unet, heldout_prompts, eval_seeds, args.overrides)

    summary = []
    names = [n for n in ("ddpo_fast", "trl", "ddpo_sf", "rwr") if any(r["name"] == n for r in results)]
    print(f"\n| run | seeds | samples | seconds per epoch | {c.reward}, fixed prompts: base -> final (per seed) "
          f"| seconds to {level:.3f} | samples to {level:.3f} | held-out prompts: {c.reward} base -> final "
          f"| held-out: judge base -> final |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        runs = [r for r in results if r["name"] == name]
        reach = [first_reaching(r["curve"], level) for r in runs]
        row = {
            "run": {"ddpo_fast": "ddpo_fast (ddpo_is)", "trl": "trl DDPOTrainer (ddpo_is)"}.get(name,
                                                                                         f"ddpo_fast ({name})"),
            "seeds": len(runs), "samples": runs[0]["curve"][-1]["samples"],
            "epoch_seconds": mean([r["curve"][-1]["seconds"] / len(r["curve"]) for r in runs]),
            "eval_final": mean([r["curve"][-1]["eval_reward"] for r in runs]),
            "eval_final_per_seed": " ".join(fmt(r["curve"][-1]["eval_reward"]) for r in runs),
            "reached": f"{sum(t is not None for t, _ in reach)}/{len(runs)}",
            "seconds_to_level": mean([t for t, _ in reach]), "samples_to_level": mean([n for _, n in reach]),
            "heldout_final": mean([r["heldout"]["reward"] for r in runs if "heldout" in r]),
            "heldout_judge_final": mean([r["heldout"]["judge"] for r in runs if "heldout" in r]),
        }
        summary.append(row)
        print(f"| {row['run']} | {row['seeds']} | {row['samples']} | {fmt(row['epoch_seconds'], '.1f')} | "
              f"{base_eval:.3f} -> {fmt(row['eval_final'])} ({row['eval_final_per_seed']}) | "
              f"{fmt(row['seconds_to_level'], '.0f')} ({row['reached']} seeds) | "
              f"{fmt(row['samples_to_level'], '.0f')} | "
              f"{fmt(base_heldout['reward'])} -> {fmt(row['heldout_final'])} | "
              f"{fmt(base_heldout['judge'])} -> {fmt(row['heldout_judge_final'])} |")
    with open(out / "learning_summary.csv", "w", newline="") as f:
        extra = ["base_eval", "base_judge", "base_heldout", "base_heldout_judge", "level", "settings"]
        writer = csv.DictWriter(f, fieldnames=list(summary[0]) + extra)
        writer.writeheader()
        for row in summary:
            writer.writerow({**row, "base_eval": base_eval, "base_judge": base["judge"],
                             "base_heldout": base_heldout["reward"], "base_heldout_judge": base_heldout["judge"],
                             "level": level, "settings": " ".join([*SETTINGS, *args.overrides])})
    plot(results, base_eval, level, c.reward, out / "learning.png")
    print(f"\n{time.perf_counter() - started:.0f} s in all; wrote {out / 'learning_curves.csv'}, "
          f"{out / 'learning_summary.csv'}, {out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
