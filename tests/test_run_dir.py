"""What a new user hit: run directories that mixed runs, resumes that accepted what they could not
apply, errors that came after the models were built, and the key documentation (--help, --config,
the README's table)."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

import ddpo_fast.train as train
from ddpo_fast import config as cfg
from ddpo_fast import rewards
from ddpo_fast.run_dir import RunFinished, plan_resume, read_config, start_new_run
from train_helpers import REPO, TINY, metrics, run_train


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*")}


def _fake_run(run_dir: Path, epochs_done: int, *overrides: str, engine: str = "torch", world_size: int = 1) -> Path:
    """A run directory as the trainer leaves it: config.json and the checkpoint of the last epoch done."""
    config = cfg.from_preset(cfg.DEFAULT_PRESET, [*TINY, *overrides])
    start_new_run(run_dir, config, overwrite=False)
    if epochs_done:
        checkpoint = run_dir / "checkpoints" / f"epoch-{epochs_done - 1}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps(
            {"epoch": epochs_done - 1, "engine": engine, "world_size": world_size}))
    return run_dir


def _cli(capsys, *args) -> tuple[int, str]:
    code = train.cli(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


# ---- a run directory belongs to one run ------------------------------------------------------------
def test_new_run_into_a_used_directory_is_refused_and_touches_nothing(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", 2)
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    before = _snapshot(run)
    code, out = _cli(capsys, "--run-dir", str(run), *TINY)
    assert code == 2 and "--resume" in out and "--overwrite" in out and "is not empty" in out
    assert _snapshot(run) == before


def test_overwrite_empties_a_run_directory_but_refuses_any_other(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", 2)
    (run / "samples").mkdir()
    (run / "samples" / "epoch_0001.png").write_bytes(b"old")
    args = train.parse_args(["--run-dir", str(run), "--overwrite", *TINY])
    config, run_dir, resume = train.resolve_config(args, 1)
    assert resume is None
    start_new_run(run_dir, config, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]

    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    code, out = _cli(capsys, "--run-dir", str(other), "--overwrite", *TINY)
    assert code == 2 and "not a ddpo_fast run directory" in out
    assert (other / "thesis.tex").read_text() == "precious"


# ---- resume: refuse what it cannot apply, before anything is written ----------------------------------
@pytest.mark.parametrize("override", ["use_lora=true", "seed=3", "sample.guidance_scale=7", "model=sd15-random",
                                      "sample.batch_size=8", "lora.rank=8", "zero_stage=2", "sample.num_steps=8"])
def test_resume_refuses_keys_fixed_by_the_run(tmp_path, capsys, override):
    run = _fake_run(tmp_path / "run", 1, "num_epochs=3")
    before = _snapshot(run)
    code, out = _cli(capsys, "--resume", str(run), override)
    key = override.split("=")[0]
    assert code == 2 and f"{key} (" in out and "cannot change on resume" in out
    assert _snapshot(run) == before  # config.json not rewritten


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", 2, "num_epochs=2")
    before = _snapshot(run)
    with pytest.raises(RunFinished, match="finished all its 2 epochs; give num_epochs=N with N > 2"):
        plan_resume(run, {}, 1)
    code, out = _cli(capsys, "--resume", str(run))
    assert code == 0 and "finished all its 2 epochs" in out
    code, out = _cli(capsys, "--resume", str(run), "num_epochs=1")
    assert code == 2 and "num_epochs=1, but the run has already finished 2 epochs" in out
    assert _snapshot(run) == before


def test_resume_with_another_launch_says_how_to_resume(tmp_path):
    run = _fake_run(tmp_path / "run", 1, "num_epochs=3", engine="deepspeed", world_size=2)
    with pytest.raises(cfg.ConfigError) as info:
        plan_resume(run, {}, 1)
    message = str(info.value)
    assert "engine=deepspeed with 2 rank(s)" in message and "engine=torch with 1" in message
    assert f"deepspeed --num_gpus 2 ddpo_fast/train.py --resume {run}" in message
    assert "torchrun --nproc_per_node 2" in message
    plan_resume(run, {}, 2)  # the same launch resumes
    torch_run = _fake_run(tmp_path / "torch_run", 1, "num_epochs=3")
    with pytest.raises(cfg.ConfigError, match=r"Resume with: python -m ddpo_fast.train --resume .* \(one process\)"):
        plan_resume(torch_run, {}, 2)


def test_resume_rejects_preset_and_overwrite(capsys):
    for extra in (["--preset", "tiny-compressibility"], ["--overwrite"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--resume", "somewhere", *extra])
        assert "--resume" in capsys.readouterr().err


def test_resume_applies_optimizer_changes_and_records_them(tmp_path):
    """The restored AdamW used to keep the checkpoint's learning rate while config.json said otherwise."""
    run = tmp_path / "run"
    run_train(["--run-dir", str(run), *TINY, "num_epochs=1"])
    proc = run_train(["--resume", str(run), "num_epochs=2", "train.learning_rate=1e-4", "train.adam_beta1=0.5"])
    assert "changed on resume, from epoch 1: num_epochs 1 -> 2, train.learning_rate 0.001 -> 0.0001" in proc.stdout
    assert [r["learning_rate"] for r in metrics(run)] == [1e-3, 1e-4]  # read from the optimizer's param groups
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["learning_rate"] == 1e-4 and saved["num_epochs"] == 2
    assert saved["resumed"] == [{"epoch": 1, "changes": {"num_epochs": [1, 2], "train.learning_rate": [1e-3, 1e-4],
                                                        "train.adam_beta1": [0.9, 0.5]}}]
    config, history = read_config(run)
    assert config.train.adam_beta1 == 0.5 and len(history) == 1


# ---- errors before any model is built -----------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("sample.eta=2", "sample.eta must be in (0, 1]"),
    ("model=/nonexistent", "model='/nonexistent': no such directory"),
    ("model=not a hub id!", "model='not a hub id!': neither"),
    ("reward=os:getcwd", "reward='os:getcwd': a reward function is called as fn(images, prompts, metadata)"),
    ("prompts=os:getcwd", "prompts='os:getcwd': calling it with a random.Random raised TypeError"),
    ("prompts=train_helpers:string_prompt", "prompts='train_helpers:string_prompt': returned 'a cat'"),
])
def test_bad_values_fail_before_anything_is_built_or_written(tmp_path, capsys, monkeypatch, override, words):
    import ddpo_fast.models

    monkeypatch.setattr(ddpo_fast.models, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    code, out = _cli(capsys, "--run-dir", str(tmp_path / "run"), *TINY, override)
    assert code == 2 and words in out, out
    assert not (tmp_path / "run").exists()


def test_model_directory_without_a_pipeline_is_named(tmp_path, capsys):
    code, out = _cli(capsys, "--run-dir", str(tmp_path / "run"), f"model={tmp_path}")
    assert code == 2 and "has no model_index.json" in out


def test_log_wandb_without_wandb_fails_first(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, out = _cli(capsys, "--run-dir", str(tmp_path / "run"), "log_wandb=true")
    assert code == 2 and "log_wandb=true needs the wandb package" in out


def _images(n):
    return torch.zeros(n, 3, 8, 8, dtype=torch.uint8)


@pytest.mark.parametrize("returned, words", [
    (lambda n: (torch.zeros(n, 2), {}), "returned rewards of shape (8, 2) for 8 images; expected shape (8,)"),
    (lambda n: (torch.zeros(n - 1), {}), "shape (7,) for 8 images"),
    (lambda n: torch.zeros(n), "must return (rewards, info), got Tensor"),
    (lambda n: (torch.zeros(n, dtype=torch.complex64), {}), "dtype torch.complex64"),
    (lambda n: (["a"] * n, {}), "not numbers"),
    (lambda n: (torch.zeros(n), [1]), "info of type list"),
])
def test_wrong_reward_output_names_the_reward_and_what_it_returned(returned, words):
    def my_reward(images, prompts, metadata):
        return returned(len(images))

    with pytest.raises(rewards.RewardError) as info:
        rewards._checked_call(my_reward, _images(8), ["p"] * 8, [{}] * 8)
    assert "reward my_reward" in str(info.value) and words in str(info.value)


def test_a_raising_reward_says_which_and_where():
    def my_reward(images, prompts, metadata):
        raise KeyError("no such thing")

    with pytest.raises(rewards.RewardError, match=r"reward my_reward raised KeyError: 'no such thing' \(at .*"
                                                  r"test_run_dir.py:\d+, on a batch of 8 images\)"):
        rewards._checked_call(my_reward, _images(8), ["p"] * 8, [{}] * 8)


def test_a_raising_or_never_finite_reward_ends_the_run_with_a_message_not_a_traceback(tmp_path):
    proc = run_train(["--run-dir", str(tmp_path / "raising"), *TINY, "reward=train_helpers:raising_reward"],
                     check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: reward train_helpers:raising_reward raised ValueError: bad pixels (at " in proc.stderr
    assert "Traceback" not in proc.stderr and "continue with --resume" in proc.stderr
    assert "requires torchvision" not in proc.stderr  # transformers' PIL-fallback warning, on every run before

    run = tmp_path / "nan"
    proc = run_train(["--run-dir", str(run), *TINY, "num_epochs=3", "max_nonfinite_epochs=2",
                      "reward=train_helpers:nan_reward"], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "warning: epoch 0: 8 of 8 rewards were not finite" in proc.stdout
    assert "gave no finite reward in 2 epochs in a row (max_nonfinite_epochs=2)" in proc.stderr
    # metrics.jsonl is strict JSON: null where the mean of no reward is not a number
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert [r["reward_mean"] for r in records] == [None] and records[0]["dropped_samples"] == 8
    samples = (run / "samples" / "epoch_0000.jsonl").read_text().splitlines()
    assert all(json.loads(s, parse_constant=lambda c: pytest.fail(c))["reward"] is None for s in samples)


# ---- keys: one source for --help, the README and --config ------------------------------------------
def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    for key, default, meaning in cfg.describe_keys():
        assert f"  {key}={cfg.format_value(default)}\n" in out, key
        assert meaning, f"{key} has no meaning in config.py"


def test_readme_key_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    assert cfg.markdown_key_table() in readme, "regenerate with: python -c 'from ddpo_fast.config import " \
                                               "markdown_key_table as t; print(t())'"
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", readme, flags=re.M))
    assert set(cfg.all_keys()) <= documented


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "num_epochs: 7\ntrain:\n  learning_rate: 2.0e-4\nsample.num_steps: 6\n"),
    (".json", '{"num_epochs": 7, "train": {"learning_rate": 2e-4}, "sample.num_steps": 6}'),
])
def test_config_file_then_command_line(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "--config", str(path), "sample.num_steps=5"])
    config, _, _ = train.resolve_config(args, 1)
    assert (config.num_epochs, config.train.learning_rate, config.sample.num_steps) == (7, 2e-4, 5)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(cfg.ConfigError, match=r"--config .*bad.yaml: unknown config key 'train.learning_rat'"):
        cfg.read_config_file(str(bad))
    with pytest.raises(cfg.ConfigError, match="cannot read it"):
        cfg.read_config_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(cfg.ConfigError, match="must hold a mapping"):
        cfg.read_config_file(str(tmp_path / "list.json"))


def test_final_model_files_get_the_umask_mode(tmp_path):
    from ddpo_fast.checkpoints import _default_permissions

    (tmp_path / "weights.safetensors").write_bytes(b"x")
    os.chmod(tmp_path / "weights.safetensors", 0o600)  # as the saver's temporary file leaves it
    umask = os.umask(0o022)
    try:
        _default_permissions(tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / "weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_wandb_gets_project_name_entity_scalars_and_grids(tmp_path, monkeypatch):
    """A stand-in wandb module (the package is not installed here) records what the logger sends it."""
    import sys
    import types

    import numpy as np

    from ddpo_fast.run_logging import Logger, save_grid

    calls = {"log": []}
    fake = types.ModuleType("wandb")
    fake.Image = lambda path: ("image", path)
    fake.init = lambda **kwargs: calls.setdefault("init", kwargs) and types.SimpleNamespace(
        log=lambda data, step: calls["log"].append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = cfg.from_preset(cfg.DEFAULT_PRESET, ["log_wandb=true", "wandb.project=p", "wandb.entity=team"])
    run = tmp_path / "my-run"
    run.mkdir()
    logger = Logger(run, config, 0)
    logger.log({"epoch": 0, "reward_mean": float("nan"), "reward_std": 0.0})
    grid = run / "samples" / "epoch_0000.png"
    save_grid(grid, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], np.zeros(2))
    logger.log_grid(grid, 0)
    logger.close()
    assert calls["init"]["project"] == "p" and calls["init"]["entity"] == "team" and calls["init"]["name"] == "my-run"
    assert calls["log"][0][0] == 0 and calls["log"][1] == (0, {"samples": ("image", str(grid))})
    assert json.loads((run / "metrics.jsonl").read_text())["reward_mean"] is None
