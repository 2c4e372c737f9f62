"""What crosses the network, counted on two DeepSpeed CPU ranks (tests/train_counting_comm.py):
the default stage reduces the gradient once per optimizer step, not once per backward call, and
ZeRO-3 gathers the UNet once per sampling phase, not on every forward."""
import json

import pytest

from train_helpers import TESTS, TINY, run_deepspeed

pytest.importorskip("deepspeed")
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced")
# 4 train batches of 2 per rank x 2 trained timesteps, 2 batches per optimizer step: 4 backward calls
# per optimizer step, 2 optimizer steps.
ARGS = [*TINY, "num_epochs=1", "train.batch_size=2", "train.gradient_accumulation_steps=2"]


def _counted_run(tmp_path, args: list[str]) -> list[dict]:
    counts = tmp_path / "counts"
    run_deepspeed(["--run-dir", str(tmp_path / "run"), *ARGS, *args], script=TESTS / "train_counting_comm.py",
                  extra_env={"DDPO_TEST_COMM_DIR": str(counts)})
    reports = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["optimizer_steps"] == 2 and r["trainable_numel"] > 0 for r in reports)
    return reports


def test_default_stage_reduces_the_gradient_once_per_optimizer_step(tmp_path):
    for r in _counted_run(tmp_path, []):  # mixed_precision auto is fp32 on the CPU: 4-byte gradients
        gradient_bytes = 4 * r["trainable_numel"]
        per_step = sum(r["sent"].get(k, 0) for k in REDUCTIONS) / r["optimizer_steps"]
        assert 0.9 <= per_step / gradient_bytes <= 1.5, per_step / gradient_bytes


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
