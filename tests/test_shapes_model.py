"""The shapes model: the pretraining script, the shipped weights, a trainer epoch on them."""
import json

import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ddpo_fast import pretrain_shapes
from ddpo_fast.models import SHAPES_DIR, load_model

# The shipped model scored 0.72 (colours 0.94) on 64 `shapes` prompts, random weights 0.14 (0.27).
THRESHOLD_REWARD, THRESHOLD_COLOUR = 0.45, 0.6
SHORT = dict(vae_steps=2, unet_steps=3, vae_batch_size=2, unet_batch_size=2, log_every=1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "model"
    pretrain_shapes.pretrain(out, seed=3, **SHORT)
    return out


def _tensors(directory):
    tensors = {}
    for path in sorted(directory.rglob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({f"{path.parent.name}/{k}": f.get_tensor(k) for k in f.keys()})
    return tensors


def test_pretraining_is_deterministic_and_saves_a_pipeline(pretrained, tmp_path):
    pretrain_shapes.pretrain(tmp_path / "again", seed=3, **SHORT)
    a, b = _tensors(pretrained), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((pretrained / "pretraining.json").read_text())
    assert [e["step"] for e in record["unet_loss"]] == [1, 2, 3] and record["settings"]["seed"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(pretrained)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.scaling_factor == pytest.approx(
        record["scaling_factor"])
    with pytest.raises(ValueError, match="unet_steps"):
        pretrain_shapes.pretrain(tmp_path / "bad", unet_steps=0)


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_shipped_files_are_the_saved_format(pretrained):
    # The packaged directory holds what the script saves: the same files, configs (but the VAE's measured
    # latent scale), tokenizer, and tensors of the same names, shapes and dtypes as the architecture's.
    assert _files(SHAPES_DIR) == _files(pretrained)
    for path in SHAPES_DIR.rglob("*.json"):
        if path.name == "pretraining.json":
            continue
        shipped, fresh = json.loads(path.read_text()), json.loads((pretrained / path.relative_to(SHAPES_DIR)).read_text())
        shipped.pop("scaling_factor", None), fresh.pop("scaling_factor", None)
        assert shipped == fresh, path
    assert (SHAPES_DIR / "tokenizer" / "tokenizer.json").read_bytes() == (
        pretrained / "tokenizer" / "tokenizer.json").read_bytes()
    shipped, fresh = _tensors(SHAPES_DIR), _tensors(pretrained)
    assert {k: (v.shape, v.dtype) for k, v in shipped.items()} == {k: (v.shape, v.dtype) for k, v in fresh.items()}
    assert all(torch.isfinite(v).all() for v in shipped.values())
    record = json.loads((SHAPES_DIR / "pretraining.json").read_text())
    assert record["unet_loss"][-1]["loss"] < 0.5 * record["unet_loss"][0]["loss"]  # it was trained
    assert sum(f.stat().st_size for f in SHAPES_DIR.rglob("*")) < 10e6  # a few MB


def test_shipped_model_loads_and_follows_prompts():
    from ddpo_fast import config as cfg
    from ddpo_fast.evaluate import sample_images
    from ddpo_fast.rewards.shapes_alignment import shapes_alignment

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_DIR)
    assert pipe.unet.config.sample_size == 16 and pipe.tokenizer.tokenize("squares") == ["squares</w>"]
    model = load_model("shapes")  # the trainer's path
    prompts = ["a red circle", "two blue squares", "three green triangles", "a yellow square",
               "a red triangle and a blue circle", "two green circles", "a blue triangle", "four red squares"]
    config = cfg.from_preset(overrides=["sample.num_steps=20", "sample.guidance_scale=3"])
    with torch.no_grad():
        images = sample_images(model, prompts, [0, 1], config, torch.device("cpu"))
    rewards, info = shapes_alignment(images, [p for p in prompts for _ in (0, 1)], [{}] * 16)
    # random weights: reward ~0.1, colours ~0.2 (benchmarks/shapes_model.py)
    assert rewards.mean() > THRESHOLD_REWARD and info["colour_accuracy"] > THRESHOLD_COLOUR, info


def test_one_trainer_epoch_on_shapes(tmp_path):
    from train_helpers import TINY, run_train

    run = tmp_path / "run"
    run_train(["--run-dir", str(run), *TINY, "num_epochs=1", "model=shapes", "reward=shapes_alignment",
               "prompts=shapes"])
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["reward_mean"] <= 1 and 0 <= record["reward_info/count_accuracy"] <= 1
    samples = [json.loads(line) for line in (run / "samples" / "epoch_0000.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["found"] and s["unmet"] for s in samples)  # the judge's per-image findings


def test_demo_preset_evaluates_shapes_captions():
    # `make demo` trains shapes-compressibility, then evaluates on the run's eval prompts: shapes captions.
    from ddpo_fast import config as cfg
    from ddpo_fast import shapes

    c = cfg.validate(cfg.from_preset("shapes-compressibility"))
    assert c.model == "shapes" and c.eval_freq > 0 and c.eval_prompts
    for prompt in c.eval_prompts.split(","):
        shapes.parse_caption(prompt)  # raises if it is not a caption of the shapes model
