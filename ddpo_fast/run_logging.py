"""Run logging on rank 0: metrics.jsonl, TensorBoard (and wandb when asked), the reward curve, sample
grids and the per-sample jsonl."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ddpo_fast import config as cfg


def save_grid(path: Path, images: torch.Tensor, prompts: list[str], rewards: np.ndarray, scale: int = 2) -> None:
    """A grid of images, each captioned with its prompt and reward."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    h, w = images.shape[2] * scale, images.shape[3] * scale
    caption = 24
    grid = Image.new("RGB", (cols * w, rows * (h + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        tile = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
        x, y = (i % cols) * w, (i // cols) * (h + caption)
        grid.paste(tile, (x, y))
        draw.text((x + 2, y + h + 1), prompts[i][:24], fill="black")
        draw.text((x + 2, y + h + 12), f"r={rewards[i]:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def strict_json(value):
    """`value` with every non-finite float as None: JSON has no NaN or Infinity (Python's json writes
    them, and strict readers such as jq, JavaScript or pandas' engine refuse the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_line(record: dict) -> str:
    return json.dumps(strict_json(record), allow_nan=False, default=str) + "\n"


def save_samples(path: Path, samples: list[dict]) -> None:
    """One JSON line per sample of rank 0 (the grid shows the first ones): prompt, reward and the
    reward's per-image info, e.g. the VLM's answer of llava_bertscore."""
    with open(path, "w") as f:
        for sample in samples:
            f.write(json_line(sample))


def plot_rewards(path: Path, metrics: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    mean = np.array([m["reward_mean"] for m in metrics], dtype=float)  # None (no finite reward) -> NaN
    std = np.array([m["reward_std"] for m in metrics], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, mean, marker="o", label="reward mean")
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, label="± std")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Logger:
    """metrics.jsonl, TensorBoard (and wandb when asked) and the reward curve, on rank 0."""

    def __init__(self, run_dir: Path, config: cfg.Config, start_epoch: int):
        self.run_dir = run_dir
        self.metrics = [m for m in read_metrics(run_dir) if m["epoch"] < start_epoch]
        (run_dir / "metrics.jsonl").write_text("".join(json_line(m) for m in self.metrics))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch)
        self.wandb = None
        if config.log_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("log_wandb=true needs the wandb package (pip install wandb)") from e
            w = config.wandb
            self.wandb = wandb.init(project=w.project, name=w.name or run_dir.resolve().name, entity=w.entity or None,
                                    config=config.to_dict(), dir=str(run_dir))

    def log(self, record: dict) -> None:
        self.metrics.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json_line(record))
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["epoch"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])
        plot_rewards(self.run_dir / "reward_curve.png", self.metrics)

    def log_grid(self, path: Path, epoch: int, tag: str = "samples") -> None:
        """The epoch's sample grid (saved at `path`) in TensorBoard's Images tab and in wandb."""
        from PIL import Image

        grid = np.asarray(Image.open(path).convert("RGB"))
        self.tb.add_image(tag, grid, epoch, dataformats="HWC")
        self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=epoch)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
