"""Sampling with log-probs, the trajectory buffer, rewards, prompts and advantages."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel

from ddpo_fast.advantages import PerPromptStatTracker, compute_advantages, global_advantages
from ddpo_fast import config as cfg
from ddpo_fast.models import load_model
from ddpo_fast.prompts import get_prompt_fn
from ddpo_fast.rewards import RewardPool, build, jpeg_sizes_kb
from ddpo_fast.precision import FP32
from ddpo_fast.sampling import Trajectories, choose_train_steps, expected_bytes_per_sample, sample_batch

FAMILY_MODELS = ["tiny", "tiny-sdxl", "tiny-sd3"]  # one built-in model per family: sd, sdxl, sd3


class Sampler:
    """A built-in model with its step (6 sampling steps) and the three prompts' conditioning."""

    def __init__(self, name: str):
        self.model = load_model(name)
        self.step = self.model.make_step(cfg.from_preset("tiny-compressibility", ["sample.num_steps=6"]).sample, "cpu")

    def sample(self, storage_dtype=torch.float32, seed=3, k=3, batch=3, use_cfg=True):
        cond = self.model.encode(["cat", "dog", "a cow riding a bike"][:batch], "cpu")
        neg = self.model.negative_conditioning("cpu") if use_cfg else None
        traj, final = sample_batch(self.model, self.model.denoiser, self.step, cond, neg, guidance_scale=4.0,
                                   num_train_timesteps=k, seed=seed, storage_dtype=storage_dtype)
        return traj, final, cond, neg


_samplers = {}


def sampler_of(name: str) -> Sampler:
    if name not in _samplers:
        _samplers[name] = Sampler(name)
    return _samplers[name]


@pytest.fixture(scope="module")
def tiny():
    return sampler_of("tiny")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_buffer_bytes_match_formula(tiny, dtype):
    traj, _, cond, _ = tiny.sample(storage_dtype=dtype)
    expected = expected_bytes_per_sample(3, (4, 8, 8), dtype, cond)
    assert traj.bytes_per_sample() == expected
    assert expected == 3 * (2 * 256 * torch.empty((), dtype=dtype).element_size() + 4 + 8) + 16 * 32 * 4
    assert traj.latents.dtype == dtype and traj.next_latents.dtype == dtype and traj.log_probs.dtype == torch.float32


def test_buffer_keeps_each_familys_conditioning():
    """SDXL adds the pooled embedding and add_time_ids, SD3 the pooled embedding, to the per-sample buffer."""
    for name, keys in [("tiny-sdxl", {"prompt_embeds", "pooled", "time_ids"}), ("tiny-sd3", {"prompt_embeds", "pooled"})]:
        traj, _, cond, _ = sampler_of(name).sample(k=1, batch=2)
        assert set(traj.conditioning) == keys and all(v.shape[0] == 2 for v in traj.conditioning.values())
        assert traj.bytes_per_sample() == expected_bytes_per_sample(1, sampler_of(name).model.latent_shape,
                                                                    torch.float32, cond)
        assert torch.equal(Trajectories.cat([traj, traj]).select(torch.tensor([3])).conditioning["pooled"],
                           cond["pooled"][1:2])


def test_chosen_steps_are_distinct_and_sorted():
    steps = choose_train_steps(16, 10, 4, torch.Generator().manual_seed(0))
    assert steps.shape == (16, 4)
    assert (steps[:, 1:] > steps[:, :-1]).all() and steps.min() >= 0 and steps.max() < 10
    assert len({tuple(r) for r in steps.tolist()}) > 1  # chosen per sample


@pytest.mark.parametrize("name,dtype", [(m, torch.float32) for m in FAMILY_MODELS]
                         + [("tiny", torch.float16), ("tiny", torch.bfloat16), ("tiny-sd3", torch.bfloat16)])
def test_stored_log_probs_are_those_of_the_stored_latents(name, dtype):
    """The first PPO ratio is 1: the log-prob recomputed from the buffer equals the stored one (DDIM
    for SD and SDXL, the flow SDE step for SD3)."""
    sampler = sampler_of(name)
    traj, _, cond, neg = sampler.sample(storage_dtype=dtype)
    for j in range(traj.latents.shape[1]):
        x, x_next = traj.latents[:, j].contiguous(), traj.next_latents[:, j].contiguous()
        indices = traj.step_indices[:, j]
        with torch.no_grad():
            out = sampler.model.denoise(sampler.model.denoiser, x, sampler.step.timesteps[indices], cond, neg, FP32)
        log_prob = sampler.step.log_prob(out, x, x_next, indices, guidance_scale=4.0)
        torch.testing.assert_close(log_prob, traj.log_probs[:, j], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_buffer_holds_the_chain_at_the_chosen_steps(name):
    """With every step kept, x_{t-1} of step i is x_t of step i + 1 and the last one is the output."""
    traj, final, _, _ = sampler_of(name).sample(k=6)
    assert torch.equal(traj.step_indices, torch.arange(6).expand(3, 6))
    assert torch.equal(traj.next_latents[:, :-1], traj.latents[:, 1:])
    assert torch.equal(traj.next_latents[:, -1], final)
    assert (traj.log_probs != 0).all()


def test_sampling_is_reproducible_from_the_seed(tiny):
    a, fa, _, _ = tiny.sample(seed=11)
    b, fb, _, _ = tiny.sample(seed=11)
    c, fc, _, _ = tiny.sample(seed=12)
    assert torch.equal(fa, fb) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(fa, fc)


def test_trajectories_select_and_cat(tiny):
    traj, _, _, _ = tiny.sample()
    both = Trajectories.cat([traj, traj])
    assert len(both) == 6
    assert torch.equal(both.select(torch.tensor([4])).latents, traj.latents[1:2])


def test_jpeg_rewards():
    flat = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    sizes = jpeg_sizes_kb(images)
    assert sizes[0] < sizes[1]
    r, info = build("jpeg_compressibility")(images, ["a", "b"], [{}, {}])
    assert r[0] > r[1] and r.shape == (2,) and "jpeg_kb" in info
    r, _ = build("jpeg_incompressibility")(images, ["a", "b"], [{}, {}])
    assert r[0] < r[1]
    with pytest.raises(ValueError, match="uint8"):
        jpeg_sizes_kb(images.float())


def test_reward_pool_and_user_reward(tiny):
    _, final, _, _ = tiny.sample()
    images = tiny.model.decode(final)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 64, 64)
    pool = RewardPool(build("train_helpers:nan_first_reward"), workers=2)
    rewards, _ = pool.submit(images, ["a", "b", "c"], [{}, {}, {}]).result()
    pool.close()
    assert torch.isnan(rewards[0]) and torch.isfinite(rewards[1:]).all()
    with pytest.raises(ValueError, match="no function"):
        build("train_helpers:nope")


def test_prompt_sources(tmp_path):
    import random

    path = tmp_path / "p.txt"
    path.write_text("one prompt\n\nanother prompt\n")
    fn = get_prompt_fn(f"file:{path}")
    drawn = {fn(random.Random(i))[0] for i in range(30)}
    assert drawn == {"one prompt", "another prompt"}
    prompt, meta = get_prompt_fn("animal_activities")(random.Random(0))
    assert meta["activity"] in prompt and meta["animal"] in prompt
    assert get_prompt_fn("common_animals")(random.Random(0))[0]
    with pytest.raises(ValueError, match="prompts="):
        get_prompt_fn("nothing")


def test_per_prompt_stat_tracking():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b", "b"]
    first = tracker.update(prompts, np.array([1.0, 3.0, 10.0, 20.0]))
    batch = np.array([1.0, 3.0, 10.0, 20.0])
    np.testing.assert_allclose(first, (batch - batch.mean()) / (batch.std() + 1e-6))  # below min_count
    second = tracker.update(["a", "a"], np.array([5.0, 7.0]))  # "a" now has 4 rewards: 1, 3, 5, 7
    hist = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(second, (np.array([5.0, 7.0]) - hist.mean()) / (hist.std() + 1e-6))
    tracker.update(["a"], np.array([9.0]))  # the buffer keeps the last 4
    assert list(tracker.stats["a"]) == [3.0, 5.0, 7.0, 9.0]
    restored = PerPromptStatTracker(4, 3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.stats == tracker.stats


def test_non_finite_rewards_get_zero_advantage():
    rewards = np.array([1.0, np.nan, 3.0, np.inf])
    adv = global_advantages(rewards)
    assert adv[1] == 0 and adv[3] == 0 and np.isfinite(adv).all()
    tracker = PerPromptStatTracker(8, 1)
    adv = tracker.update(["a", "a", "a", "a"], rewards)
    assert adv[1] == 0 and np.isfinite(adv).all() and list(tracker.stats["a"]) == [1.0, 3.0]
    mine, all_rewards, all_adv, _ = compute_advantages(torch.tensor([1.0, 2.0]), ["x", "y"], lambda _, r: global_advantages(r))
    assert mine.dtype == torch.float32 and all_rewards.shape == (2,) and mine[0] < mine[1]
