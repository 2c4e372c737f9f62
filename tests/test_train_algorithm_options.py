"""The options of today's trainers: GRPO groups, the KL penalty to the starting model, EMA, the
first-steps selection and evaluation during training."""
import json
import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from safetensors.torch import load_file

from ddpo_fast import config as cfg
from ddpo_fast.advantages import group_advantages
from ddpo_fast.ema import EMA
from ddpo_fast.reference import ddim_kl
from ddpo_fast.ops import ddim_step_logprob
from ddpo_fast.sampling import choose_train_steps
from ddpo_fast.train import Trainer
from train_helpers import TINY, metrics, run_deepspeed, run_train

ALL_OPTIONS = ["sample.group_size=4", "train.advantage=group", "train.skip_zero_advantage=true", "train.kl_beta=0.1", "ema.decay=0.9",
               "ema.use_for_final=true", "eval_freq=1", "eval_prompts=cat,a red car", "eval_seeds=0",
               "train.timestep_selection=first"]
DETERMINISTIC = ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "kl", "eval/reward_mean"]


# ---- groups ------------------------------------------------------------------------------------------
def test_group_advantages_normalise_within_each_group():
    rewards = np.array([1.0, 3.0, 10.0, 10.0, 2.0, np.nan, 4.0, 0.0])
    adv = group_advantages(rewards, 2)
    np.testing.assert_allclose(adv[:2], [-1.0, 1.0], atol=1e-5)  # mean 2, std 1
    assert adv[2] == adv[3] == 0  # equal rewards: nothing to learn
    assert adv[4] == 0 and adv[5] == 0  # one finite reward: its group's mean; NaN: dropped
    np.testing.assert_allclose(adv[6:], [1.0, -1.0], atol=1e-5)
    finite = rewards[np.isfinite(rewards)]
    adv_global = group_advantages(rewards, 2, global_std=True)
    np.testing.assert_allclose(adv_global[:2], np.array([-1.0, 1.0]) / finite.std(), rtol=1e-5)


def test_groups_share_a_prompt_across_ranks():
    """Each epoch draws its prompts once for every rank; each is sampled group_size times in a row."""
    config = cfg.from_preset(cfg.DEFAULT_PRESET, ["sample.batch_size=3", "sample.num_batches_per_epoch=2",
                                                   "sample.group_size=4"])
    prompt_fn = lambda rng: (f"p{rng.random():.6f}", {})  # noqa: E731
    seen = []
    for rank in range(2):
        me = types.SimpleNamespace(config=config, prompt_fn=prompt_fn, rank=rank, world_size=2)
        seen += [p for b in range(2) for p, _ in Trainer.batch_prompts(me, epoch=5, b=b)]
    assert len(seen) == 12 and len(set(seen)) == 3
    assert all(len(set(seen[i:i + 4])) == 1 for i in range(0, 12, 4))  # a group spans ranks 0 and 1 (i = 4)
    again = types.SimpleNamespace(config=config, prompt_fn=prompt_fn, rank=0, world_size=2)
    assert [p for p, _ in Trainer.batch_prompts(again, epoch=6, b=0)] != seen[:3]  # another epoch, other prompts


@pytest.mark.parametrize("accumulation, expected", [(1, 2), (2, 4)])
def test_skipping_zero_advantages_trains_whole_optimizer_steps(accumulation, expected):
    config = cfg.from_preset(cfg.DEFAULT_PRESET, ["train.batch_size=2", f"train.gradient_accumulation_steps={accumulation}",
                                                   "train.skip_zero_advantage=true"])
    me = types.SimpleNamespace(config=config)
    advantages = torch.tensor([0.0, 1.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    assert Trainer.samples_to_train(me, advantages) == expected  # 2 samples with an advantage: 1 batch
    assert Trainer.samples_to_train(me, torch.zeros(8)) == 0
    assert Trainer.samples_to_train(me, torch.ones(8)) == 8


# ---- the first steps -------------------------------------------------------------------------------------
def test_first_steps_selection_keeps_the_noise_stream():
    first = choose_train_steps(3, 10, 2, torch.Generator().manual_seed(0), "first")
    assert first.tolist() == [[0, 1]] * 3
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    choose_train_steps(3, 10, 2, g1, "first")
    choose_train_steps(3, 10, 2, g2, "random")
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


@pytest.mark.parametrize("model,op,noise", [("tiny", "ddim_step_logprob", "eta"),
                                             ("tiny-sd3", "flow_sde_step_logprob", "noise_level")])
def test_window_steps_are_the_only_stochastic_ones(monkeypatch, model, op, noise):
    """MixGRPO: inside the window the policy's noise (DDIM eta, the flow SDE's noise level), outside
    deterministic steps (0); the buffer holds the window's steps only."""
    import ddpo_fast.steps as steps
    from ddpo_fast.models import load_model
    from ddpo_fast.sampling import sample_batch

    levels = []
    real = getattr(steps, op)
    monkeypatch.setattr(steps, op, lambda *a, **k: levels.append(k[noise]) or real(*a, **k))
    family = load_model(model)
    config = cfg.from_preset("tiny-compressibility", ["sample.num_steps=6", "sample.eta=0.7", "sample.noise_level=0.7"])
    step = family.make_step(config.sample, "cpu")
    traj, _ = sample_batch(family, family.denoiser, step, family.encode(["cat", "dog"], "cpu"), None,
                           guidance_scale=1.0, num_train_timesteps=2, seed=0, storage_dtype=torch.float32,
                           timestep_selection="window", window_start=3)
    assert levels == [0.0, 0.0, 0.0, 0.7, 0.7, 0.0]
    assert traj.step_indices.tolist() == [[3, 4], [3, 4]] and traj.latents.shape[1] == 2
    assert (traj.log_probs != 0).all()


# ---- KL to the starting model --------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [None, 4.0])
def test_kl_closed_form_matches_a_monte_carlo_estimate(guidance):
    """E over x_{t-1} ~ policy of log p(x_{t-1}) - log p_ref(x_{t-1}), both from the fused op."""
    g = torch.Generator().manual_seed(1)
    rows = 2 if guidance else 1
    out = torch.randn(3 * rows, 4, 5, 7, generator=g, dtype=torch.float64)
    ref = out + 0.3 * torch.randn(out.shape, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64)
    a_t, a_prev = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64), torch.tensor([0.5, 0.6, 0.95], dtype=torch.float64)
    eta = 0.8
    kl = ddim_kl(out, ref, a_t, a_prev, eta=eta, guidance_scale=guidance)
    draws = 3000
    estimate = torch.zeros(3, dtype=torch.float64)
    for _ in range(draws):
        prev, lp = ddim_step_logprob(out, x, a_t, a_prev, eta=eta, guidance_scale=guidance,
                                     noise=torch.randn(x.shape, generator=g, dtype=torch.float64))
        _, lp_ref = ddim_step_logprob(ref, x, a_t, a_prev, eta=eta, guidance_scale=guidance, prev_sample=prev)
        estimate += (lp - lp_ref) / draws
    # The estimate's standard error is about sqrt(2 KL / n_elements / draws): well under 2% here.
    torch.testing.assert_close(kl.double(), estimate, rtol=0.03, atol=1e-4)


def test_kl_has_the_policy_gradient_only():
    out = torch.randn(2, 4, 3, 3, requires_grad=True)
    ref = torch.randn(2, 4, 3, 3, requires_grad=True)
    a_t, a_prev = torch.tensor([0.4, 0.6]), torch.tensor([0.5, 0.7])
    ddim_kl(out, ref, a_t, a_prev, eta=1.0).sum().backward()
    assert out.grad.abs().sum() > 0 and ref.grad is None
    assert ddim_kl(out, out, a_t, a_prev, eta=1.0).abs().max() == 0
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_kl(out, ref, a_t, a_prev, eta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        ddim_kl(out, ref[:1], a_t, a_prev, eta=1.0)


# ---- EMA ---------------------------------------------------------------------------------------------------
def test_ema_average_swap_and_state():
    module = torch.nn.Linear(2, 2)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    ema = EMA(module, decay=0.5, update_every=2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    ema.after_optimizer_step()  # step 1: not an update step
    assert all(torch.equal(ema.average[n], start[n]) for n in start)
    ema.after_optimizer_step()  # step 2: average = 0.5 start + 0.5 (start + 1)
    assert all(torch.allclose(ema.average[n], start[n] + 0.5) for n in start)
    with ema.swapped_in():
        assert torch.allclose(module.weight, start["weight"] + 0.5)
    assert torch.allclose(module.weight, start["weight"] + 1)  # the module's own weights are back
    other = EMA(torch.nn.Linear(2, 2), 0.5, 2)
    other.load_state_dict(ema.state_dict())
    assert other.optimizer_steps == 2 and torch.equal(other.average["bias"], ema.average["bias"])
    with pytest.raises(ValueError, match="does not match"):
        EMA(torch.nn.Linear(2, 3, bias=False), 0.5, 2).load_state_dict(ema.state_dict())


# ---- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["sample.group_size=3"], "sample.group_size"),  # 8 samples per epoch
    (["train.advantage=group"], "train.advantage=group needs sample.group_size"),
    (["train.advantage=grp"], "train.advantage must be"),
    (["train.timestep_selection=last"], "train.timestep_selection"),
    (["train.kl_beta=-1"], "train.kl_beta"),
    (["train.algorithm=rwr", "train.skip_zero_advantage=true"], "train.skip_zero_advantage does not apply"),
    (["ema.decay=1"], "ema.decay"),
    (["ema.use_for_final=true"], "ema.use_for_final"),
    (["ema.update_every=0"], "ema.update_every"),
    (["eval_freq=-1"], "eval_freq"),
    (["eval_seeds=a,b"], "eval_seeds"),
    (["engine=deepspeed", "zero_stage=3", "train.kl_beta=0.1"], "train.kl_beta > 0 with a full finetune under zero_stage=3"),
    (["engine=deepspeed", "zero_stage=3", "ema.decay=0.9"], "ema.decay with zero_stage=3"),
])
def test_option_errors_name_the_key(overrides, key):
    with pytest.raises(cfg.ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        cfg.validate(cfg.from_preset(cfg.DEFAULT_PRESET, [*TINY, *overrides]))


# ---- runs ------------------------------------------------------------------------------------------------------
def test_every_option_trains_and_resumes_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = run_train(["--run-dir", str(full), *TINY, *ALL_OPTIONS])
    assert "eval reward" in proc.stdout and "kl_to_start" in proc.stdout
    records = metrics(full)
    for r in records:
        assert r["kl"] > 0 and np.isfinite(r["eval/reward_mean"]) and 0 <= r["skipped_samples"] < 8
        assert set(r["eval/per_prompt"]) == {"cat", "a red car"}
        assert all(p["count"] % 4 == 0 for p in r["per_prompt"].values())  # groups of 4 samples of a prompt
    assert (full / "samples" / "eval_0001.png").exists() and (full / "checkpoints" / "epoch-1" / "ema.pt").exists()
    run_train(["--run-dir", str(resumed), *TINY, *ALL_OPTIONS, "num_epochs=1"])
    run_train(["--resume", str(resumed), "num_epochs=2"])
    for a, b in zip(records, metrics(resumed), strict=True):
        for key in DETERMINISTIC:
            assert a[key] == b[key], (a["epoch"], key)
    final_a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    final_b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # ema.use_for_final: the final model is the EMA of the last checkpoint, not its weights
    ema = torch.load(full / "checkpoints" / "epoch-1" / "ema.pt", weights_only=True)["average"]
    weights = torch.load(full / "checkpoints" / "epoch-1" / "engine.pt", weights_only=False)["params"]
    name = next(iter(ema))
    assert torch.equal(final_a[name], ema[name]) and not torch.equal(final_a[name], weights[name])


def test_two_deepspeed_ranks_with_every_option(tmp_path):
    run = tmp_path / "run"
    run_deepspeed(["--run-dir", str(run), *TINY, *ALL_OPTIONS, "use_lora=true", "num_epochs=1",
                   "train.timestep_selection=window"])
    (record,) = metrics(run)
    assert record["kl"] >= 0 and np.isfinite(record["eval/reward_mean"])
    assert all(p["count"] % 4 == 0 for p in record["per_prompt"].values())  # 16 samples: 4 groups over 2 ranks
    assert (run / "lora").is_dir()
    assert json.loads((run / "config.json").read_text())["sample"]["group_size"] == 4
