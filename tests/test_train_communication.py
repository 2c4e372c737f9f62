"""What crosses the network, counted on two DeepSpeed CPU ranks (benchmarks/counted_train.py): ZeRO-3
gathers the UNet once per sampling phase, not on every forward (a full finetune under ZeRO-3 with its
final model). The default stage's single gradient reduction per optimizer step is checked in
tests/test_train_deepspeed.py, within its run-and-resume test."""
import json

import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: carried wheels
pytest.importorskip("deepspeed")
from diffusers import UNet2DConditionModel  # noqa: E402

from train_helpers import REPO, TINY, run_deepspeed  # noqa: E402
# 4 train batches of 2 per rank x 2 trained timesteps, 2 batches per optimizer step: 4 backward calls
# per optimizer step, 2 optimizer steps.
ARGS = [*TINY, "num_epochs=1", "train.batch_size=2", "train.gradient_accumulation_steps=2"]


def _counted_run(tmp_path, args: list[str]) -> list[dict]:
    counts = tmp_path / "counts"
    run_deepspeed(["--run-dir", str(tmp_path / "run"), *ARGS, *args], script=REPO / "benchmarks" / "counted_train.py",
                  extra_env={"DDPO_TEST_COMM_DIR": str(counts)})
    reports = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["optimizer_steps"] == 2 and r["trainable_numel"] > 0 for r in reports)
    return reports


def test_zero3_gathers_the_unet_once_per_sampling_phase(tmp_path):
    # Parameters under DeepSpeed's persistence threshold (1e5 elements: all of the tiny UNet's) are
    # never partitioned; with 0, every one is, as most of SD-1.5's 860M parameters are.
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    reports = _counted_run(tmp_path, ["zero_stage=3", f"deepspeed_config={ds_config}", "sample.num_steps=8",
                                      "train.timestep_fraction=0.25"])
    for r in reports:
        partition_bytes = 4 * r["trainable_numel"] / 2  # what each rank contributes to a full gather
        (phase,) = r["sampling_phase_gather_bytes"]  # one epoch: 2 batches x 8 steps of CFG forwards
        assert 0.9 <= phase / partition_bytes <= 1.5, phase / partition_bytes
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet")  # gathered and saved by rank 0
    assert all(torch.isfinite(p).all() for p in unet.parameters())
