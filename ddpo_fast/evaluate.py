"""Compare a base model with a finetuned one on fixed prompts and seeds.

    python -m ddpo_fast.evaluate --finetuned RUN_DIR [--base MODEL] [--reward NAME]
        [--prompts "cat,dog,a red car"] [--seeds 0,1,2] [--out DIR] [--device cuda:0] [--batch-size 16]

RUN_DIR is a trainer run directory (its config.json names the base model, the reward, the
sampler settings and, if the run had them, its eval_prompts and eval_seeds, the defaults of --prompts
and --seeds; the finetuned weights are RUN_DIR/unet, RUN_DIR/transformer or RUN_DIR/lora), or a
diffusers UNet or transformer directory (then give --base). Writes OUT/comparison.png (one row per prompt and seed: base |
finetuned, captioned with the rewards) and OUT/rewards.json + OUT/rewards.md (mean, std, per prompt).
The default prompts include some that the built-in training sets never use. Sampling runs on the
GPU when there is one (in the run's mixed precision), batched over prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ddpo_fast import config as cfg
from ddpo_fast.families import ModelFamily
from ddpo_fast.models import load_model
from ddpo_fast.precision import Precision
from ddpo_fast.rewards import build as build_reward
from ddpo_fast.rewards import parse_options
from ddpo_fast.sampling import sample_images_per_seed

DEFAULT_PROMPTS = ["cat", "dog", "horse", "a red car", "a house on a hill", "a bowl of fruit"]


def load_finetuned(finetuned: Path, base: str) -> tuple[ModelFamily, cfg.Config | None]:
    """(the model with the finetuned denoiser, run config or None)."""
    run_config = None
    if (finetuned / "config.json").is_file() and (finetuned / "metrics.jsonl").exists():
        run_config = cfg.from_dict(json.loads((finetuned / "config.json").read_text()))
    resolution = run_config.sample.resolution if run_config else 0
    model = load_model(run_config.model if run_config and base is None else (base or "tiny"), resolution=resolution)
    model.load_finetuned(finetuned)
    return model, run_config


def sample_images(model: ModelFamily, prompts: list[str], seeds: list[int], config: cfg.Config, device: torch.device,
                  batch_size: int = 16) -> torch.Tensor:
    """uint8 images, prompt-major then seed (row i = prompts[i // len(seeds)], seeds[i % len(seeds)]).

    Batched over prompts (up to `batch_size` at once) per seed, on `device` in the run's mixed
    precision (bf16 on a GPU by default). An image depends on its seed and on the prompts batched with
    it, so the base and the finetuned model see exactly the same noise."""
    s = config.sample
    precision = Precision.for_device(config.mixed_precision, device)
    model.place(device, precision.dtype)
    step = model.make_step(s, device)
    negative = model.negative_conditioning(device) if config.use_cfg else None
    rows = []
    for first in range(0, len(prompts), batch_size):
        cond = model.encode(prompts[first:first + batch_size], device)
        rows.append(sample_images_per_seed(model, model.denoiser, step, cond, negative, seeds,
                                           guidance_scale=s.guidance_scale,
                                           storage_dtype=precision.dtype or torch.float32, precision=precision))
    return torch.cat(rows)


def comparison_grid(path: Path, base: torch.Tensor, tuned: torch.Tensor, labels: list[str],
                    base_rewards: np.ndarray, tuned_rewards: np.ndarray, scale: int = 2) -> None:
    from PIL import Image, ImageDraw

    h, w = base.shape[2] * scale, base.shape[3] * scale
    lines = [(label, f"base {b:.3f}", f"tuned {t:.3f}") for label, b, t in zip(labels, base_rewards, tuned_rewards)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + int(max(measure.textlength(text) for row in lines for text in row))  # no label is cut
    head = 16
    grid = Image.new("RGB", (label_w + 2 * w, head + len(labels) * max(h, 40)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w + 2, 2), "base", fill="black")
    draw.text((label_w + w + 2, 2), "finetuned", fill="black")
    for i, row in enumerate(lines):
        y = head + i * max(h, 40)
        for k, text in enumerate(row):
            draw.text((2, y + 2 + 12 * k), text, fill="black")
        for j, img in enumerate((base[i], tuned[i])):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
            grid.paste(tile, (label_w + j * w, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def summarize(prompts: list[str], seeds: list[int], rewards: np.ndarray) -> dict:
    per_prompt = rewards.reshape(len(prompts), len(seeds))
    return {"mean": float(rewards.mean()), "std": float(rewards.std()),
            "per_prompt": {p: float(r.mean()) for p, r in zip(prompts, per_prompt)}}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def evaluate(finetuned: Path, out: Path, base: str | None = None, reward: str | None = None,
             prompts: list[str] | None = None, seeds: list[int] | None = None, reward_options: str = "",
             device: torch.device | str | None = None, batch_size: int = 16) -> dict:
    device = torch.device(device) if device is not None else default_device()
    tuned_model, run_config = load_finetuned(Path(finetuned), base)
    config = run_config or cfg.from_preset()
    if not prompts:  # the run's own evaluation prompts and seeds, if it had them
        run_prompts = [p.strip() for p in config.eval_prompts.split(",") if p.strip()] if run_config else []
        prompts = run_prompts or DEFAULT_PROMPTS
    if not seeds:
        seeds = [int(x) for x in config.eval_seeds.split(",")] if run_config else [0, 1]
    # The run's reward with the run's options (e.g. aesthetic's model paths) and reward_device, unless one is given.
    if reward:
        reward_fn = build_reward(reward, **parse_options(reward_options))
    elif config.reward_server not in ("", "auto"):  # the run's reward server, if it still runs
        from ddpo_fast.rewards.client import RemoteReward

        reward_fn = RemoteReward(config.reward_server, config.reward, timeout=config.reward_timeout)
    else:
        from ddpo_fast.rewards.run import reward_options as run_reward_options

        reward_fn = build_reward(config.reward, **run_reward_options(config))
    base_model = load_model(base or config.model, resolution=config.sample.resolution)
    with torch.no_grad():
        base_images = sample_images(base_model, prompts, seeds, config, device, batch_size)
        del base_model  # one pipeline on the device at a time
        tuned_images = sample_images(tuned_model, prompts, seeds, config, device, batch_size)
    all_prompts = [p for p in prompts for _ in seeds]
    meta = [{} for _ in all_prompts]
    base_rewards = reward_fn(base_images, all_prompts, meta)[0].numpy()
    tuned_rewards = reward_fn(tuned_images, all_prompts, meta)[0].numpy()
    labels = [f"{p} (seed {s})" for p in prompts for s in seeds]
    out = Path(out)
    comparison_grid(out / "comparison.png", base_images, tuned_images, labels, base_rewards, tuned_rewards)
    result = {"reward": reward or config.reward, "seeds": seeds, "base": summarize(prompts, seeds, base_rewards),
              "finetuned": summarize(prompts, seeds, tuned_rewards)}
    (out / "rewards.json").write_text(json.dumps(result, indent=2))
    lines = ["| prompt | base | finetuned |", "|---|---|---|"]
    for p in prompts:
        lines.append(f"| {p} | {result['base']['per_prompt'][p]:.4f} | {result['finetuned']['per_prompt'][p]:.4f} |")
    lines.append(f"| **mean ± std** | {result['base']['mean']:.4f} ± {result['base']['std']:.4f} | "
                 f"{result['finetuned']['mean']:.4f} ± {result['finetuned']['std']:.4f} |")
    (out / "rewards.md").write_text("\n".join(lines) + "\n")
    return result


def default_out(finetuned: Path) -> Path:
    """RUN_DIR/eval for a run; beside a model folder (never inside it: it is someone's model)."""
    if (finetuned / "config.json").is_file() and (finetuned / "metrics.jsonl").exists():
        return finetuned / "eval"
    return finetuned.resolve().parent / f"eval-{finetuned.resolve().name}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpo_fast.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--finetuned", required=True, help="a run directory, or a diffusers UNet or transformer directory")
    parser.add_argument("--base", default=None, help="base model (default: the run's model)")
    parser.add_argument("--reward", default=None, help="reward (default: the run's reward and reward_options)")
    parser.add_argument("--reward-options", default="", help="options of --reward, key=value,key=value")
    parser.add_argument("--prompts", default=None, help="comma-separated prompts (default: the run's eval_prompts, "
                                                         "if it has them, else a few built-in ones)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the run's eval_seeds, 0,1)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval for a run, "
                                                         "eval-NAME beside a model folder NAME)")
    parser.add_argument("--device", default=None, help="sampling device (default: cuda if there is a GPU, else cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts sampled at once (default 16)")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    prompts = [p.strip() for p in args.prompts.split(",")] if args.prompts else None
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        torch.device(args.device) if args.device else None
    except RuntimeError:
        parser.error(f"--device must be a torch device (cpu, cuda, cuda:1), got {args.device!r}")
    out = Path(args.out) if args.out else default_out(Path(args.finetuned))
    try:
        result = evaluate(Path(args.finetuned), out, args.base, args.reward, prompts, seeds, args.reward_options,
                          args.device, args.batch_size)
    except ValueError as e:
        print(f"ddpo_fast.evaluate: error: {e}", file=sys.stderr)
        return 2
    print((out / "rewards.md").read_text())
    print(f"comparison grid: {out / 'comparison.png'}")
    print(f"reward table: {out / 'rewards.json'}")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
