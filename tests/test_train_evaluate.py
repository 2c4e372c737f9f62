"""python -m ddpo_fast.evaluate: base vs finetuned on fixed prompts and seeds."""
import json

import numpy as np
import torch

import pytest

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from ddpo_fast import evaluate
from ddpo_fast.models import build_tiny_pipeline
from train_helpers import TINY, run_train


def test_evaluate_run_directory(tmp_path):
    run = tmp_path / "run"
    run_train(["--run-dir", str(run), *TINY, "num_epochs=1", "train.learning_rate=3e-2", "train.clip_range=0.5",
               "eval_prompts=cat,a red car", "eval_seeds=5"])
    out = tmp_path / "eval"
    # --prompts defaults to the run's eval_prompts; --seeds given wins over its eval_seeds
    assert evaluate.main(["--finetuned", str(run), "--seeds", "0,1", "--out", str(out)]) == 0
    result = json.loads((out / "rewards.json").read_text())
    assert result["reward"] == "jpeg_compressibility" and result["seeds"] == [0, 1]
    assert set(result["base"]["per_prompt"]) == {"cat", "a red car"}  # "a red car" was never trained on
    assert result["base"]["mean"] != result["finetuned"]["mean"]  # the finetuned UNet was loaded
    assert (out / "comparison.png").stat().st_size > 0
    assert "| cat |" in (out / "rewards.md").read_text()


def test_evaluate_same_model_gives_same_rewards(tmp_path):
    unet_dir = tmp_path / "unet"
    build_tiny_pipeline().unet.save_pretrained(unet_dir)
    result = evaluate.evaluate(unet_dir, tmp_path / "eval", base="tiny", prompts=["dog"], seeds=[3])
    assert result["base"]["mean"] == result["finetuned"]["mean"]


def test_evaluate_rejects_other_directories(tmp_path, capsys):
    assert evaluate.main(["--finetuned", str(tmp_path)]) == 2
    assert "--finetuned" in capsys.readouterr().err


def test_evaluate_builds_the_reward_with_its_options(tmp_path):
    """A reward that needs options (aesthetic's model paths) is built with them, not bare."""
    from ddpo_fast import rewards
    from ddpo_fast.rewards.jpeg import jpeg_compressibility

    def scaled_options(scale):
        return {"scale": float(scale)}

    def scaled(scale):
        return lambda images, prompts, metadata: (scale * jpeg_compressibility(images, prompts, metadata)[0], {})

    rewards.register_builder("test_scaled_jpeg", scaled_options, scaled)
    unet_dir = tmp_path / "unet"
    build_tiny_pipeline().unet.save_pretrained(unet_dir)
    plain = evaluate.evaluate(unet_dir, tmp_path / "a", base="tiny", reward="jpeg_compressibility", prompts=["dog"],
                              seeds=[3])
    scaled_result = evaluate.evaluate(unet_dir, tmp_path / "b", base="tiny", reward="test_scaled_jpeg",
                                      reward_options="scale=2", prompts=["dog"], seeds=[3])
    assert scaled_result["base"]["mean"] == 2 * plain["base"]["mean"]


def test_evaluate_uses_the_runs_reward_device(tmp_path):
    """A run's reward_device reaches the reward (as its device option) when evaluate rebuilds it."""
    from ddpo_fast import config as cfg
    from ddpo_fast import rewards
    from ddpo_fast.rewards.jpeg import jpeg_compressibility

    devices = []

    def device_options(device=None):
        return {"device": device}

    def make(device):
        devices.append(device)
        return jpeg_compressibility

    rewards.register_builder("test_device_jpeg", device_options, make)
    run = tmp_path / "run"
    build_tiny_pipeline().unet.save_pretrained(run / "unet")
    config = cfg.from_preset(cfg.DEFAULT_PRESET, ["reward=test_device_jpeg", "reward_device=cpu"])
    (run / "config.json").write_text(config.to_json())
    (run / "metrics.jsonl").write_text("")  # a run directory
    evaluate.evaluate(run, tmp_path / "out", base="tiny", prompts=["dog"], seeds=[3])
    assert devices == ["cpu"]


def test_default_output_is_never_inside_a_model_folder(tmp_path):
    model = tmp_path / "my_unet"
    model.mkdir()
    assert evaluate.default_out(model) == tmp_path / "eval-my_unet"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert evaluate.default_out(run) == run / "eval"


def test_comparison_grid_fits_long_labels(tmp_path):
    from PIL import Image, ImageDraw

    label = "a house on a hill at sunset / seed 12"  # cut at 22 characters before
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    evaluate.comparison_grid(tmp_path / "c.png", images, images, [label], np.array([-1.5]), np.array([2.25]))
    width = Image.open(tmp_path / "c.png").width
    assert width - 2 * 16 >= ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label)


def test_reward_curve_ticks_are_whole_epochs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ddpo_fast.run_logging import plot_rewards

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_rewards(tmp_path / "curve.png", [{"epoch": e, "reward_mean": float(e), "reward_std": None} for e in (0, 1)])
    ticks = figures[0].axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
