"""DeepSpeed: two CPU ranks (ZeRO-1, -2 and -3, full and LoRA, resume, the gradient communicated once per
optimizer step), gradient accumulation that matches the one-process engine, and the non-finite step guard."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: carried wheels
pytest.importorskip("deepspeed")
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ddpo_fast.config import ConfigError
from ddpo_fast.run_dir import plan_resume
from train_helpers import REPO, TINY, env, metrics, one_rank_env, run_deepspeed, run_train

pytest.importorskip("deepspeed")
DS = [*TINY, "num_epochs=1"]


def _check_run(run, proc, stage, lora, epochs=1):
    assert "samples per epoch: 16 (sample.batch_size 4 x sample.num_batches_per_epoch 2 x 2 ranks)" in proc.stdout
    assert f"engine=deepspeed zero_stage={stage}" in proc.stdout
    records = metrics(run)  # rank 0 alone writes the metrics
    assert [r["epoch"] for r in records] == list(range(epochs))
    for r in records:
        assert r["skipped_steps"] == 0 and r["grad_norm"] > 0 and r["reward_std"] > 0
    if lora:
        assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:
        unet = UNet2DConditionModel.from_pretrained(run / "unet")
        assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert (run / "checkpoints" / f"epoch-{epochs - 1}").is_dir()


def test_two_rank_default_stage_full_then_resume(tmp_path):
    """The default stage (ZeRO-1), full finetune, then --resume; the bytes communicated are counted
    (benchmarks/counted_train.py): the gradient crosses the network once per optimizer step, not once
    per backward call (2 train batches x 2 timesteps = 4 backward calls per optimizer step here)."""
    run, counts = tmp_path / "run", tmp_path / "counts"
    proc = run_deepspeed(["--run-dir", str(run), *DS, "train.batch_size=2", "train.gradient_accumulation_steps=2"],
                         script=REPO / "benchmarks" / "counted_train.py", extra_env={"DDPO_TEST_COMM_DIR": str(counts)})
    _check_run(run, proc, 1, False)
    for rank in range(2):
        report = json.loads((counts / f"rank{rank}.json").read_text())
        gradient_bytes = 4 * report["trainable_numel"]  # fp32 on the CPU (mixed_precision=auto)
        reduced = report["reduced_bytes_per_step"]
        assert report["optimizer_steps"] == 2 and 0.9 <= reduced / gradient_bytes <= 1.5, reduced / gradient_bytes
    with pytest.raises(ConfigError, match=r"written by engine=deepspeed with 2 rank\(s\).*deepspeed --num_gpus 2"):
        plan_resume(run, {"num_epochs": "2"}, 1)  # one process cannot load two ranks' optimizer parts
    proc = run_deepspeed(["--resume", str(run), "num_epochs=2"])
    assert "resumed from" in proc.stdout
    _check_run(run, proc, 1, False, epochs=2)
    assert "FutureWarning" not in proc.stdout + proc.stderr  # DeepSpeed's, once per rank and epoch before


@pytest.mark.parametrize("stage, lora", [(2, False), (2, True), (3, True)])  # ZeRO-3 full: test_train_communication
def test_two_rank_run(tmp_path, stage, lora):
    run = tmp_path / "run"
    proc = run_deepspeed(["--run-dir", str(run), *DS, f"zero_stage={stage}", f"use_lora={str(lora).lower()}",
                          "train.learning_rate=1e-2"])
    _check_run(run, proc, stage, lora)


def test_deepspeed_accumulation_matches_one_process_engine(tmp_path):
    """One rank through DeepSpeed ZeRO-2 ends with the weights of the plain engine: the
    accumulation boundary counts every backward call (2 train batches x 2 timesteps here)."""
    common = [*DS, "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.max_grad_norm=0"]
    run_train(["--run-dir", str(tmp_path / "torch"), *common, "engine=torch"])
    extra = one_rank_env()
    run_train(["--run-dir", str(tmp_path / "ds"), *common, "engine=deepspeed", "zero_stage=2"], extra_env=extra)
    a = load_file(tmp_path / "torch" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "ds" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma, mb = metrics(tmp_path / "torch")[0], metrics(tmp_path / "ds")[0]
    assert ma["reward_mean"] == mb["reward_mean"]


def test_deepspeed_skips_a_non_finite_step(tmp_path):
    run = tmp_path / "run"
    extra = one_rank_env()
    argv = ["--run-dir", str(run), *DS, "engine=deepspeed", "zero_stage=2"]
    proc = subprocess.run([sys.executable, "-c", f"import train_helpers; train_helpers.poisoned_main({argv!r})"],
                          cwd=REPO, env={**env(), **extra}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (record,) = metrics(run)
    assert record["skipped_steps"] == 1  # the first of the 2 optimizer steps
    unet = UNet2DConditionModel.from_pretrained(run / "unet")
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_two_rank_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    args = [*DS, "num_epochs=3", "zero_stage=2", "reward=train_helpers:kill_once_reward"]
    run_deepspeed(["--run-dir", str(tmp_path / "full"), *args])
    killed, marker = tmp_path / "killed", tmp_path / "marker"
    extra = {"DDPO_TEST_KILL_AT": "6", "DDPO_TEST_KILL_MARKER": str(marker)}  # rank 0 or 1, epoch 2
    proc = run_deepspeed(["--run-dir", str(killed), *args], check=False, extra_env=extra)
    assert proc.returncode != 0 and marker.exists()
    assert [r["epoch"] for r in metrics(killed)] == [0, 1]
    run_deepspeed(["--resume", str(killed)], extra_env=extra)
    a, b = metrics(tmp_path / "full"), metrics(killed)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        for key in ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "grad_norm"]:
            assert ra[key] == rb[key], (ra["epoch"], key)
    wa = load_file(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(killed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
