"""The shapes model: the pretraining script, the shipped weights, a trainer epoch on them."""
import json

import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ddpo_fast import pretrain_shapes
from ddpo_fast.models import SHAPES_DIR, load_pipeline

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
