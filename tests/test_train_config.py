"""Trainer config: presets, key=value overrides, validation errors that name the key."""
import json

import pytest
import torch

from ddpo_fast import config as cfg
from train_helpers import run_train


def test_presets_resolve_and_validate():
    for name in cfg.PRESETS:
        config = cfg.from_preset(name)
        cfg.validate(config, world_size=8 if name != cfg.DEFAULT_PRESET else 1)
    tiny = cfg.from_preset()
    assert tiny.model == "tiny" and tiny.reward == "jpeg_compressibility"


def test_overrides_are_typed():
    config = cfg.from_preset("tiny-compressibility", ["train.learning_rate=2e-4", "sample.num_steps=7",
                                                      "use_lora=true", "train.cfg=no", "prompts=file:x.txt"])
    assert config.train.learning_rate == 2e-4 and isinstance(config.train.learning_rate, float)
    assert config.sample.num_steps == 7 and isinstance(config.sample.num_steps, int)
    assert config.use_lora is True and config.train.cfg is False
    assert config.prompts == "file:x.txt"


def test_roundtrip_through_json():
    config = cfg.from_preset("compressibility", ["seed=5"])
    again = cfg.from_dict(json.loads(config.to_json()))
    assert again == config


@pytest.mark.parametrize("override, words", [
    ("sample.num_stepz=3", ["unknown config key", "sample.num_stepz"]),
    ("bogus=1", ["unknown config key", "bogus"]),
    ("sample=3", ["sample", "section"]),
    ("sample.num_steps=abc", ["sample.num_steps", "integer"]),
    ("sample.num_steps=2.5", ["sample.num_steps", "integer"]),
    ("use_lora=maybe", ["use_lora", "true or false"]),
    ("train.learning_rate=fast", ["train.learning_rate", "number"]),
    ("nokeyvalue", ["key=value"]),
])
def test_override_errors_name_the_key(override, words):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_preset("tiny-compressibility", [override])
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("sample.eta=0", "sample.eta"),
    ("train.timestep_fraction=1.5", "train.timestep_fraction"),
    ("train.batch_size=3", "train.batch_size"),
    ("train.gradient_accumulation_steps=3", "train.gradient_accumulation_steps"),
    ("train.algorithm=ppo2", "train.algorithm"),
    ("mixed_precision=fp8", "mixed_precision"),
    ("zero_stage=4", "zero_stage"),
    ("train.clip_range=0", "train.clip_range"),
    ("num_epochs=0", "num_epochs"),
    ("sample.storage_dtype=int8", "sample.storage_dtype"),
    ("mixed_precision=fp16", "mixed_precision"),  # one process: no loss scaler
])
def test_invalid_values_name_the_key(override, key):
    config = cfg.from_preset("tiny-compressibility", [override])
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(config, world_size=1)
    assert key in str(info.value)


def test_sf_must_be_on_policy():
    config = cfg.from_preset("tiny-compressibility", ["train.algorithm=ddpo_sf", "train.num_inner_epochs=2"])
    with pytest.raises(cfg.ConfigError, match="num_inner_epochs"):
        cfg.validate(config)


def test_engine_accumulation_counts_backward_calls():
    config = cfg.from_preset("tiny-compressibility", ["sample.num_steps=10", "train.timestep_fraction=0.5",
                                                      "train.gradient_accumulation_steps=2",
                                                      "sample.batch_size=4", "sample.num_batches_per_epoch=4",
                                                      "train.batch_size=2"])
    cfg.validate(config)
    assert config.num_train_timesteps == 5
    assert config.engine_accumulation_steps == 10  # 2 train batches x 5 timesteps
    assert config.train_batches_per_epoch == 8
    assert config.optimizer_steps_per_epoch == 4


@pytest.mark.parametrize("args, words", [
    (["bogus.key=1"], ["unknown config key", "bogus.key"]),
    (["reward=nosuchreward"], ["reward=", "nosuchreward", "jpeg_compressibility"]),
    (["reward=nosuchmodule_xyz:fn"], ["reward=", "nosuchmodule_xyz"]),
    (["prompts=file:/nonexistent/prompts.txt"], ["prompts=", "no such file"]),
    (["train.batch_size=5"], ["train.batch_size"]),
    pytest.param(["mixed_precision=fp16", "engine=deepspeed"], ["mixed_precision=fp16", "CUDA"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")),
])
def test_cli_errors_before_any_model_is_built(tmp_path, capsys, monkeypatch, args, words):
    import ddpo_fast.models
    import ddpo_fast.train as train

    monkeypatch.setattr(ddpo_fast.models, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    assert train.cli(["--run-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not (tmp_path / "run").exists()  # nothing was written, no model was built


def test_cli_error_in_a_process_exits_2_without_a_traceback(tmp_path):
    proc = run_train(["--run-dir", str(tmp_path / "run"), "bogus.key=1"], check=False)
    assert proc.returncode == 2 and "unknown config key" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_preset(tmp_path, capsys):
    import ddpo_fast.train as train

    assert train.cli(["--preset", "nope", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--preset must be one of" in capsys.readouterr().err
