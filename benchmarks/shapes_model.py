"""How well a shapes model follows its prompts: the shapes_alignment judge on its samples.

    OMP_NUM_THREADS=1 python benchmarks/shapes_model.py [--model shapes|random|DIR ...] [--n 64] [--grid OUT.png]

For each model and prompt set (`shapes`, `shapes_heldout`), samples n prompts drawn with a fixed seed
(DDIM, 20 steps, eta 1, guidance 3, one seed per image) and prints the judge's mean reward and the
accuracy of each kind of request. `random` is the same architecture with seeded random weights.
--grid writes the first model's first 32 `shapes` samples with their prompts.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from ddpo_fast import config as cfg
from ddpo_fast.evaluate import sample_images
from ddpo_fast.models import load_pipeline
from ddpo_fast.prompts import PROMPT_SETS
from ddpo_fast.rewards.shapes_alignment import shapes_alignment

KEYS = ("colour_accuracy", "shape_accuracy", "count_accuracy", "total_accuracy", "all_met")


def _pipeline(model: str):
    if model == "random":
        from ddpo_fast.pretrain_shapes import build_shapes_pipeline

        pipe = build_shapes_pipeline(0)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_pipeline(model)


def score(model: str, prompt_set: str, n: int, config: cfg.Config) -> tuple[dict, torch.Tensor, list[str]]:
    rng = random.Random(f"eval/{prompt_set}")
    prompts = [PROMPT_SETS[prompt_set](rng)[0] for _ in range(n)]
    with torch.no_grad():
        images = sample_images(_pipeline(model), prompts, [0], config, torch.device("cpu"), batch_size=32)
    rewards, info = shapes_alignment(images, prompts, [{}] * n)
    return {"reward": float(rewards.mean()), **{k: info[k] for k in KEYS}}, images, prompts


def grid(path: Path, images: torch.Tensor, prompts: list[str], columns: int = 8) -> None:
    from PIL import Image, ImageDraw

    cell_w, cell_h = 160, 152
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((128, 128), Image.NEAREST), (x + 16, y))
        words = prompt.split(" and ")
        for k, line in enumerate(words):
            draw.text((x + 2, y + 129 + 11 * k), line + (" and" if k < len(words) - 1 else ""), fill="black")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["random", "shapes"])
    parser.add_argument("--n", type=int, default=64, help="prompts per set")
    parser.add_argument("--grid", type=Path, default=None)
    args = parser.parse_args()
    config = cfg.from_preset(overrides=["sample.num_steps=20", "sample.guidance_scale=3", "sample.eta=1.0"])
    print("| model | prompts | n | reward | colour | shape | count | total | all met | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, model in enumerate(args.model):
        for prompt_set in ("shapes", "shapes_heldout"):
            start = time.perf_counter()
            result, images, prompts = score(model, prompt_set, args.n, config)
            print(f"| {model} | {prompt_set} | {args.n} | {result['reward']:.3f} | "
                  + " | ".join(f"{result[k]:.2f}" for k in KEYS) + f" | {time.perf_counter() - start:.0f} |", flush=True)
            if args.grid and i == 0 and prompt_set == "shapes":
                grid(args.grid, images[:32], prompts[:32])


if __name__ == "__main__":
    main()
