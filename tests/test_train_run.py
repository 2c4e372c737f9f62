"""End-to-end one-process runs of the trainer on the tiny model."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import ddpo_fast.train as train
from ddpo_fast.models import build_tiny_pipeline
from train_helpers import TINY, metrics, run_train

METRIC_KEYS = {"epoch", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "grad_norm", "samples_per_s",
               "sample_seconds", "train_seconds", "skipped_steps", "reward_wait_seconds"}
DETERMINISTIC = ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "grad_norm"]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")


def _main(run_dir, *overrides):
    return train.main(["--run-dir", str(run_dir), *TINY, *overrides])


def test_one_process_run_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = run_train(["--run-dir", str(run), *TINY, "num_checkpoint_limit=1"])
    out = proc.stdout
    assert "samples per epoch: 8" in out and "train.batch_size 4" in out
    assert "backward calls per optimizer step (engine gradient_accumulation_steps): 2" in out
    assert f"sample grid: {run / 'samples' / 'epoch_0001.png'}" in out
    assert f"reward curve: {run / 'reward_curve.png'}" in out
    config = json.loads((run / "config.json").read_text())
    assert config["sample"]["num_steps"] == 4 and config["train"]["algorithm"] == "ddpo_is"
    records = metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert METRIC_KEYS <= set(r)
        assert r["skipped_steps"] == 0 and r["dropped_samples"] == 0
        assert 0 <= r["reward_wait_seconds"] <= r["sample_seconds"]  # part of the sampling phase
        assert all(torch.isfinite(torch.tensor(r[k])) for k in DETERMINISTIC)
    assert records[0]["buffer_bytes_per_sample"] == 2 * (2 * 256 * 4 + 4 + 8) + 16 * 32 * 4
    assert (run / "reward_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "epoch_0000.jsonl", "epoch_0000.png", "epoch_0001.jsonl", "epoch_0001.png"]
    for epoch, record in enumerate(records):  # every sample of the epoch: its prompt and reward
        samples = [json.loads(line) for line in (run / "samples" / f"epoch_{epoch:04d}.jsonl").read_text().splitlines()]
        assert len(samples) == 8 and all(set(s) == {"prompt", "reward"} and s["prompt"] for s in samples)
        assert sum(s["reward"] for s in samples) / 8 == pytest.approx(record["reward_mean"], abs=1e-6)
    for r in records:  # per-prompt statistics over all samples, the optimizer's learning rate
        assert sum(p["count"] for p in r["per_prompt"].values()) == 8 and r["learning_rate"] == 1e-3
        assert all(p["mean"] is not None for p in r["per_prompt"].values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [0, 1]  # the sample grids
    assert "reward_mean" in events.Tags()["scalars"]
    umask = os.umask(0)
    os.umask(umask)
    mode = (run / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, f"the saved model has mode {oct(mode)}, not the umask's (the saver's 0600)"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-1"]  # rotation kept 1
    # The final UNet loads with diffusers, equals the last checkpoint, and differs from the start.
    unet = UNet2DConditionModel.from_pretrained(run / "unet")
    state = torch.load(run / "checkpoints" / "epoch-1" / "engine.pt", weights_only=False)["params"]
    for name, p in unet.named_parameters():
        assert torch.equal(p, state[name]), name
    base = build_tiny_pipeline().unet
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), base.parameters()))
    pipe = build_tiny_pipeline()
    pipe.unet = unet
    assert pipe(["cat"], num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    args = [*TINY, "num_epochs=3", "reward=train_helpers:kill_once_reward"]
    full = tmp_path / "full"
    run_train(["--run-dir", str(full), *args])
    killed = tmp_path / "killed"
    marker = tmp_path / "killed.marker"
    # Reward calls: 2 per epoch; call 6 is the second batch of epoch 2, after the checkpoint of epoch 1.
    proc = run_train(["--run-dir", str(killed), *args], check=False,
                     extra_env={"DDPO_TEST_KILL_AT": "6", "DDPO_TEST_KILL_MARKER": str(marker)})
    assert proc.returncode == -9 and marker.exists()
    assert [r["epoch"] for r in metrics(killed)] == [0, 1]
    # A save interrupted by the kill leaves only a temporary directory, which resume must ignore.
    (killed / "checkpoints" / ".tmp-epoch-2").mkdir()
    (killed / "checkpoints" / "epoch-9").mkdir()  # no trainer_state.json: incomplete, ignored
    run_train(["--resume", str(killed)], extra_env={"DDPO_TEST_KILL_AT": "6", "DDPO_TEST_KILL_MARKER": str(marker)})
    a, b = metrics(full), metrics(killed)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert ra[key] == rb[key], (ra["epoch"], key, ra[key], rb[key])
    wa = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(killed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_reward_is_dropped(tmp_path):
    _main(tmp_path / "run", "reward=train_helpers:nan_first_reward", "num_epochs=1")
    (record,) = metrics(tmp_path / "run")
    assert record["dropped_samples"] == 2  # the first image of each of the 2 batches
    assert torch.isfinite(torch.tensor([record["reward_mean"], record["loss"], record["grad_norm"]])).all()
    assert record["skipped_steps"] == 0


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_skips_the_step(tmp_path, monkeypatch, poison):
    original = train.Trainer.loss_fn
    calls = {"n": 0}

    def poisoned(self, out, *args):
        calls["n"] += 1
        if calls["n"] == 1 and poison == "gradient":
            out = _NanGrad.apply(out)
        loss, stats = original(self, out, *args)
        if calls["n"] == 1 and poison == "loss":
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(train.Trainer, "loss_fn", poisoned)
    _main(tmp_path / "run", "num_epochs=1", "train.max_grad_norm=0")
    (record,) = metrics(tmp_path / "run")
    assert record["skipped_steps"] == 1  # the first of the 2 optimizer steps
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet")
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    base = build_tiny_pipeline().unet
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), base.parameters()))  # step 2 applied


@pytest.mark.parametrize("override", ["train.algorithm=ddpo_sf", "train.algorithm=rwr", "mixed_precision=bf16"])
def test_variants_train(tmp_path, override):
    _main(tmp_path / "run", override, "num_epochs=1")
    (record,) = metrics(tmp_path / "run")
    assert torch.isfinite(torch.tensor([record["loss"], record["grad_norm"]])).all() and record["grad_norm"] > 0
    if override == "mixed_precision=bf16":  # bf16 latents: 2 steps x (2 x 256 x 2 + 4 + 8); the text encoder
        # runs in bf16 too, so the prompt embedding (16 x 32) is stored in bf16
        assert record["buffer_bytes_per_sample"] == 2 * (2 * 256 * 2 + 4 + 8) + 16 * 32 * 2
        assert record["approx_kl"] < 1.0  # old log-probs consistent with the stored bf16 latents


def test_lora_on_a_saved_pipeline_directory(tmp_path):
    model_dir = tmp_path / "tiny"
    build_tiny_pipeline().save_pretrained(model_dir)
    _main(tmp_path / "run", f"model={model_dir}", "use_lora=true", "lora.rank=2", "num_epochs=1",
          "train.learning_rate=1e-2")
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(tmp_path / "run" / "lora")
        after = pipe.unet(x, 500, encoder_hidden_states=emb).sample
    assert not torch.allclose(before, after)


def test_model_directory_gives_the_same_run_as_tiny(tmp_path):
    model_dir = tmp_path / "tiny"
    build_tiny_pipeline().save_pretrained(model_dir)
    _main(tmp_path / "a", "num_epochs=1")
    _main(tmp_path / "b", "num_epochs=1", f"model={model_dir}")
    (a,), (b,) = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert all(a[k] == b[k] for k in DETERMINISTIC)


@pytest.mark.slow
def test_tiny_preset_reward_rises(tmp_path):
    """The tiny preset visibly learns: the last epochs' reward beats the first epochs' by far."""
    run_train(["--run-dir", str(tmp_path / "run")], timeout=900)
    r = [m["reward_mean"] for m in metrics(tmp_path / "run")]
    std = metrics(tmp_path / "run")[0]["reward_std"]
    assert sum(r[-3:]) / 3 - sum(r[:3]) / 3 > 2 * std, r
