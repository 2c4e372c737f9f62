"""Rewards: build(), weighted sums, options, and the LAION aesthetic predictor on a tiny random CLIP."""
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

import ddpo_fast.train as train
from ddpo_fast import config as cfg
from ddpo_fast import rewards
from ddpo_fast.rewards import random_models
from ddpo_fast.rewards.aesthetic import AestheticMLP, load_mlp
from ddpo_fast.rewards.clip import CLIP_MEAN, CLIP_STD, preprocess
from train_helpers import TINY, metrics

PROJECTION = 12  # the tiny CLIP's embedding width
IMAGE_SIZE = 30
LAION_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP saved with save_pretrained: loaded back through from_pretrained by the reward."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": 6},
        projection_dim=PROJECTION)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).eval().save_pretrained(path)
    return path


def _random_mlp(input_size: int, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    mlp = AestheticMLP(input_size)
    for p in mlp.parameters():  # non-zero biases, scores of order 1
        torch.nn.init.normal_(p, std=0.5)
    return mlp.state_dict()


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "aesthetic.safetensors"
    save_file(_random_mlp(PROJECTION), str(path))
    return path


def _images(n=5, h=40, w=56, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- the aesthetic MLP and its weights ---------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_mlp_weights_round_trip_with_laion_keys(tmp_path, suffix):
    state = _random_mlp(PROJECTION)
    assert set(state) == LAION_KEYS  # the published predictor's key names
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, PROJECTION), (128, 1024), (64, 128), (16, 64), (1, 16)]
    path = tmp_path / f"mlp{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    mlp = load_mlp(path)
    assert mlp.input_size == PROJECTION and not mlp.training
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_mlp_weights_with_wrong_keys_or_shapes_are_named(tmp_path):
    state = _random_mlp(PROJECTION)
    renamed = {k.replace("layers.", "net."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="mlp_weights=.*layers.0.weight"):
        load_mlp(tmp_path / "renamed.pth")
    state["layers.2.weight"] = torch.zeros(128, 999)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="mlp_weights=.*LAION aesthetic MLP layout"):
        load_mlp(tmp_path / "shape.safetensors")
    torch.save({"layers.0.weight": torch.zeros(2, 2), "note": "text"}, tmp_path / "not_tensors.pth")
    with pytest.raises(ValueError, match="mlp_weights=.*state dict of tensors"):
        load_mlp(tmp_path / "not_tensors.pth")


def test_pth_loads_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"layers.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        load_mlp(tmp_path / "evil.pth")


# ---- preprocessing -------------------------------------------------------------------------------
def test_preprocess_resizes_shortest_side_crops_centre_and_normalises():
    grey = torch.full((2, 3, 40, 56), 128, dtype=torch.uint8)
    x = preprocess(grey, IMAGE_SIZE)
    assert x.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x, expected.view(1, 3, 1, 1).expand_as(x), atol=1e-5)
    # A wide image: the centre crop keeps the middle columns. Left third black, rest white:
    # after the crop (56 -> 42 wide, 6 columns cut each side) the first columns are still black.
    image = torch.full((1, 3, IMAGE_SIZE, 42), 255, dtype=torch.uint8)
    image[..., :10] = 0
    x = preprocess(image, IMAGE_SIZE)
    black = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[0, :, :, 0], black.view(3, 1).expand(3, IMAGE_SIZE), atol=1e-5)  # columns 6..9 black
    assert torch.allclose(x[0, :, :, 3], black.view(3, 1).expand(3, IMAGE_SIZE), atol=1e-5)
    assert (x[0, :, :, 5] > 0).all()
    # An image already at the CLIP size is only normalised.
    image = _images(1, IMAGE_SIZE, IMAGE_SIZE)
    x = preprocess(image, IMAGE_SIZE)
    expected = (image.float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)


# ---- the aesthetic reward --------------------------------------------------------------------
def _plain_scores(clip_dir, mlp_file, images, mean=CLIP_MEAN, std=CLIP_STD):
    """The predictor recomputed in plain PyTorch: CLIP embedding -> L2 normalise -> the MLP's linear layers."""
    from safetensors.torch import load_file

    clip = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=preprocess(images, IMAGE_SIZE, mean, std)).pooler_output
        e = clip.visual_projection(pooled)
        e = e / e.norm(dim=-1, keepdim=True)
        w = load_file(str(mlp_file))
        for i in (0, 2, 4, 6, 7):  # LAION's MLP has no activations; dropout is off at inference
            e = e @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    return e.squeeze(-1)


def test_aesthetic_equals_plain_pytorch_and_is_deterministic(clip_dir, mlp_file):
    fn = rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(mlp_file), device="cpu", batch_size="2")
    images = _images()
    scores, info = fn(images, ["p"] * 5, [{}] * 5)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert scores.std() > 1e-3  # different images, different scores
    assert torch.allclose(scores, _plain_scores(clip_dir, mlp_file, images), atol=1e-5, rtol=1e-5)
    assert info["aesthetic_mean"] == pytest.approx(float(scores.mean()))
    again, _ = fn(images, ["p"] * 5, [{}] * 5)
    assert torch.equal(scores, again)
    other = rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(mlp_file), batch_size=5)
    assert torch.allclose(other(images, [], [])[0], scores, atol=1e-6)  # batching does not change the scores


def test_aesthetic_normalises_with_the_models_preprocessor_config(tmp_path, mlp_file):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    clip = random_models.save_clip(tmp_path / "clip", mean=mean, std=std)  # with a preprocessor_config.json
    assert random_models.TINY_VISION["image_size"] == IMAGE_SIZE and random_models.TINY_VISION["projection_dim"] == PROJECTION
    fn = rewards.build("aesthetic", clip_model=str(clip), mlp_weights=str(mlp_file))
    assert fn.mean == mean and fn.std == std and fn.image_size == IMAGE_SIZE
    images = _images()
    scores = fn(images, [], [])[0]
    assert torch.allclose(scores, _plain_scores(clip, mlp_file, images, mean, std), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores, _plain_scores(clip, mlp_file, images), atol=1e-3)  # the config mattered


def test_aesthetic_bf16_is_close_to_fp32(clip_dir, mlp_file):
    images = _images(3)
    fp32 = rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(mlp_file))(images, [], [])[0]
    bf16_fn = rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(mlp_file), dtype="bf16")
    assert next(bf16_fn.clip.parameters()).dtype == torch.bfloat16
    bf16 = bf16_fn(images, [], [])[0]
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, fp32, atol=0.05 * float(fp32.abs().max()))


def test_aesthetic_width_mismatch_names_both_sides(clip_dir, tmp_path):
    save_file(_random_mlp(768), str(tmp_path / "laion.safetensors"))
    with pytest.raises(ValueError, match="takes 768-wide.*projection_dim 12"):
        rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(tmp_path / "laion.safetensors"))


@pytest.mark.parametrize("options, words", [
    ({"mlp_weights": "MLP"}, ["clip_model", "required"]),
    ({"clip_model": "CLIP"}, ["mlp_weights", "required", "no random-weight default"]),
    ({"clip_model": "/nonexistent/clip", "mlp_weights": "MLP"}, ["clip_model=", "/nonexistent/clip", "not a directory"]),
    ({"clip_model": "CLIP", "mlp_weights": "/nonexistent/mlp.pth"}, ["mlp_weights=", "no such file"]),
    ({"clip_model": "CLIP", "mlp_weights": "weights.bin"}, ["mlp_weights=", ".safetensors"]),
    ({"clip_model": "CLIP", "mlp_weights": "MLP", "dtype": "fp16"}, ["dtype", "fp32 or bf16", "fp16"]),
    ({"clip_model": "CLIP", "mlp_weights": "MLP", "batch_size": "0"}, ["batch_size", ">= 1"]),
    ({"clip_model": "CLIP", "mlp_weights": "MLP", "batch_size": "many"}, ["batch_size", "integer"]),
    ({"clip_model": "CLIP", "mlp_weights": "MLP", "device": "gpu7"}, ["device=", "gpu7"]),
    ({"clip_model": "CLIP", "mlp_weights": "MLP", "clip_modle": "x"}, ["unknown reward option", "clip_modle",
                                                                       "aesthetic: clip_model, mlp_weights"]),
])
def test_bad_aesthetic_options_are_named(clip_dir, mlp_file, options, words):
    options = {k: {"CLIP": str(clip_dir), "MLP": str(mlp_file)}.get(v, v) for k, v in options.items()}
    with pytest.raises(ValueError) as info:
        rewards.check("aesthetic", **options)  # the same checks as build, without loading a model
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ValueError):
        rewards.build("aesthetic", **options)


def test_bad_images_are_refused(clip_dir, mlp_file):
    fn = rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(mlp_file))
    with pytest.raises(ValueError, match="uint8"):
        fn(torch.zeros(2, 3, 8, 8), [], [])


# ---- build(), jpeg rewards, user rewards, weighted sums --------------------------------------------
def test_jpeg_rewards_through_build():
    images = _images(3, 32, 32)
    sizes = torch.from_numpy(rewards.jpeg_sizes_kb(images))
    r, info = rewards.build("jpeg_compressibility")(images, [], [])
    assert torch.equal(r, -sizes) and info["jpeg_kb"] == pytest.approx(float(sizes.mean()))
    r, _ = rewards.build("jpeg_incompressibility")(images, [], [])
    assert torch.equal(r, sizes)
    assert rewards.build("jpeg_compressibility") is rewards.REWARDS["jpeg_compressibility"]
    with pytest.raises(ValueError, match="unknown reward option 'quality'.*jpeg_compressibility: none"):
        rewards.build("jpeg_compressibility", quality=90)


def test_user_reward_through_build_is_checked():
    images = _images(3, 16, 16)
    r, _ = rewards.build("train_helpers:nan_first_reward")(images, [], [])
    assert r.shape == (3,) and math.isnan(r[0]) and torch.isfinite(r[1:]).all()
    with pytest.raises(ValueError, match="reward='nosuchmodule_xyz:fn'.*cannot import"):
        rewards.build("nosuchmodule_xyz:fn")


def test_weighted_sum_combines_and_logs_components():
    images = _images(4, 32, 32)
    sizes = torch.from_numpy(rewards.jpeg_sizes_kb(images))
    r, info = rewards.build(" jpeg_compressibility:1.0 , jpeg_incompressibility:0.25")(images, [], [])
    assert torch.allclose(r, -0.75 * sizes)
    assert info["jpeg_compressibility"] == pytest.approx(-float(sizes.mean()))
    assert info["jpeg_incompressibility"] == pytest.approx(float(sizes.mean()))
    assert info["jpeg_compressibility/jpeg_kb"] == pytest.approx(float(sizes.mean()))
    r, _ = rewards.build("jpeg_compressibility:-2")(images, [], [])  # one weighted term
    assert torch.allclose(r, 2 * sizes)
    r, info = rewards.build("jpeg_incompressibility,train_helpers:nan_first_reward:0.5")(images, [], [])
    assert math.isnan(r[0]) and torch.allclose(r[1:], 0.5 * sizes[1:])  # a missing weight is 1
    assert "train_helpers:nan_first_reward" in info


def test_weighted_sum_with_aesthetic_routes_options(clip_dir, mlp_file):
    images = _images(3)
    aesthetic = rewards.build("aesthetic", clip_model=str(clip_dir), mlp_weights=str(mlp_file))(images, [], [])[0]
    sizes = torch.from_numpy(rewards.jpeg_sizes_kb(images))
    fn = rewards.build("aesthetic:1.0,jpeg_compressibility:0.1", clip_model=str(clip_dir), mlp_weights=str(mlp_file))
    r, info = fn(images, [], [])
    assert torch.allclose(r, aesthetic - 0.1 * sizes, atol=1e-5)
    assert info["aesthetic"] == pytest.approx(float(aesthetic.mean()), abs=1e-6)
    assert info["jpeg_compressibility"] == pytest.approx(-float(sizes.mean()))
    assert {"aesthetic/aesthetic_mean", "jpeg_compressibility/jpeg_kb"} <= set(info)


@pytest.mark.parametrize("spec, words", [
    ("nosuchreward", ["reward='nosuchreward'", "unknown reward", "aesthetic", "jpeg_compressibility"]),
    ("jpeg_compressibility:1,,jpeg_incompressibility:1", ["empty term"]),
    ("jpeg_compressibility:1,jpeg_compressibility:2", ["jpeg_compressibility appears more than once"]),
    ("jpeg_compressibility:inf", ["weight", "finite"]),
    ("jpeg_compressibility:1,bogus:1", ["unknown reward 'bogus'"]),
    ("", ["reward=''"]),
])
def test_bad_specs_are_named(spec, words):
    with pytest.raises(ValueError) as info:
        rewards.check(spec)
    for word in words:
        assert word in str(info.value)


def test_parse_options():
    assert rewards.parse_options("") == {}
    assert rewards.parse_options("clip_model=/a/b, mlp_weights=x=y.pth,") == {"clip_model": "/a/b",
                                                                            "mlp_weights": "x=y.pth"}
    with pytest.raises(ValueError, match="reward_options=.*'clip_model' is not of the form key=value"):
        rewards.parse_options("clip_model")
    with pytest.raises(ValueError, match="reward_options=.*given twice"):
        rewards.parse_options("a=1,a=2")


# ---- the trainer --------------------------------------------------------------------------------
def test_trainer_option_errors_come_before_any_model(tmp_path):
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "reward=aesthetic", "reward_options=dtype=bf16"])
    with pytest.raises(cfg.ConfigError, match="clip_model.*required"):
        train.resolve_config(args, 1)
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "reward_options=clip_model"])
    with pytest.raises(cfg.ConfigError, match="reward_options="):
        train.resolve_config(args, 1)


def test_trainer_runs_with_the_aesthetic_reward(tmp_path, clip_dir, mlp_file, monkeypatch):
    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")
    run = tmp_path / "run"
    train.main(["--run-dir", str(run), *TINY, "num_epochs=1", "reward=aesthetic",
                f"reward_options=clip_model={clip_dir},mlp_weights={mlp_file},device=cpu"])
    (record,) = metrics(run)
    assert math.isfinite(record["reward_mean"]) and record["reward_std"] > 0
    # Both batches have the same size: the mean of the per-batch means is the epoch's mean reward.
    assert record["reward_info/aesthetic_mean"] == pytest.approx(record["reward_mean"], abs=1e-5)
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0
