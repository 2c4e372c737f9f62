"""The human-preference rewards (pickscore, clipscore, hpsv2, imagereward) on the tiny random models of
ddpo_fast.rewards.random_models, each against a recomputation of its definition that shares none of the
reward's code: transformers' CLIPModel with its PIL image processor (pickscore, clipscore), and plain
PyTorch from the raw checkpoints' tensors (hpsv2: open_clip's ViT and text transformer; imagereward:
BLIP's ViT and BERT with cross-attention), preprocessed with PIL.

Tolerances: fp32 1e-5 where the images need no resizing (the preprocessing is exact: crop, pad,
normalise); where they are resized, PIL's bicubic (on uint8) and torch's antialiased bicubic (on floats)
differ by up to a few 1/255 per pixel, so the scores are compared at 2e-2 of their scale, and their error
must be under a tenth of the scores' spread over the images."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ddpo_fast.train as train
from ddpo_fast import rewards
from ddpo_fast.rewards import imagereward as ir
from ddpo_fast.rewards import random_models
from ddpo_fast.rewards.client import start_server
from ddpo_fast.rewards.clip import CLIP_MEAN, CLIP_STD, preprocess
from train_helpers import TINY, env, metrics

PROMPTS = ["a cat riding a bike", "a dog", "horse playing chess", "cat", "a dog washing the dishes"]
CLIP_SIZE = random_models.TINY_VISION["image_size"]  # 30
BLIP_SIZE = random_models.SHAPES["tiny"]["blip_vision"]["image_size"]  # 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """reward -> its options (paths) for the tiny random models."""
    root = tmp_path_factory.mktemp("preference")
    saved = random_models.save_reward_models(root, rewards=("aesthetic", "pickscore", "clipscore", "hpsv2",
                                                            "imagereward"))
    return {name: rewards.parse_options(text) for name, text in saved.items()}


def _images(n=5, h=CLIP_SIZE, w=CLIP_SIZE, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pil(images):
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


def _to_pixels(pils, mean=CLIP_MEAN, std=CLIP_STD):
    x = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1) for p in pils])
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _pil_crop(pils, size):
    """CLIP's crop preprocessing with PIL: shortest side to size (bicubic), centre crop."""
    out = []
    for p in pils:
        w, h = p.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        p = p.resize(new, Image.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        out.append(p.crop((left, top, left + size, top + size)))
    return out


def _pil_pad(pils, size):
    """open_clip's resize_longest_max with PIL: longest side to size (bicubic), centred on a black square."""
    out = []
    for p in pils:
        w, h = p.size
        scale = size / max(w, h)
        new = (round(w * scale), round(h * scale))
        p = p.resize(new, Image.BICUBIC) if new != (w, h) else p
        square = Image.new("RGB", (size, size))
        square.paste(p, ((size - new[0]) // 2, (size - new[1]) // 2))
        out.append(square)
    return out


def _close(scores, reference, resized):
    """Equal at 1e-5 (no resizing), or at 2e-2 of the scale and a tenth of the spread (resized)."""
    scale = float(reference.abs().max())
    tol = 2e-2 * scale if resized else 1e-5 * max(scale, 1)
    assert torch.allclose(scores, reference, atol=tol, rtol=0), (scores, reference)
    if resized:  # and the resizing's error small against the spread of the scores
        assert (scores - reference).abs().max() < 0.1 * (reference.max() - reference.min())
    assert scores.std() > 1e-3  # different images, different scores: the comparison means something


# ---- pickscore and clipscore: transformers' CLIP with its PIL processor --------------------------------
def _hf_cosine(model_dir, images, prompts):
    """cos and exp(logit_scale) from CLIPModel.get_image/text_features and the saved PIL image processor."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    clip = CLIPModel.from_pretrained(model_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(model_dir)(images=_pil(images), return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(model_dir)(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=pixels).pooler_output
        text = clip.get_text_features(**tokens).pooler_output
    cos = F.cosine_similarity(image, text, dim=-1)
    return cos, float(clip.logit_scale.detach().exp())


@pytest.mark.parametrize("shape", [(CLIP_SIZE, CLIP_SIZE), (64, 48)], ids=["native", "resized"])
def test_pickscore_equals_transformers_clip_with_its_processor(models, shape):
    images = _images(5, *shape)
    fn = rewards.build("pickscore", **models["pickscore"], device="cpu", batch_size=2)
    scores, info = fn(images, PROMPTS, [{}] * 5)
    cos, logit_scale = _hf_cosine(models["pickscore"]["model"], images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    _close(scores, logit_scale * cos, resized=shape != (CLIP_SIZE, CLIP_SIZE))
    assert info["pickscore_mean"] == pytest.approx(float(scores.mean()))
    other_prompts, _ = fn(images, PROMPTS[::-1], [{}] * 5)
    assert not torch.allclose(other_prompts, scores, atol=1e-3)  # the prompt matters


def test_clipscore_cosine_and_w_scaling(models):
    images = _images(5, 48, 64, seed=1)
    cos, _ = _hf_cosine(models["clipscore"]["model"], images, PROMPTS)
    plain = rewards.build("clipscore", **models["clipscore"])(images, PROMPTS, [])[0]
    _close(plain, cos, resized=True)
    scaled, info = rewards.build("clipscore", **models["clipscore"], w="2.5")(images, PROMPTS, [])
    assert torch.allclose(scaled, 2.5 * plain.clamp(min=0), atol=1e-6)
    assert info["cosine_mean"] == pytest.approx(float(plain.mean()), abs=1e-6)
    flipped = rewards.build("clipscore", **models["clipscore"], w=2.5)
    flipped.similarity.clip.text_projection.weight.data.neg_()  # every cosine negated: cut to 0 by the scaling
    neg = flipped(images, PROMPTS, [])[0]
    assert (plain > 0).all() and torch.equal(neg, torch.zeros(5))


@pytest.mark.parametrize("reward", ["pickscore", "clipscore", "hpsv2", "imagereward"])
def test_bf16_is_close_to_fp32(models, reward):
    images = _images(3, 64, 64)
    fp32_fn = rewards.build(reward, **models[reward])
    fp32 = fp32_fn(images, PROMPTS[:3], [])[0]
    bf16_fn = rewards.build(reward, **models[reward], dtype="bf16")
    if reward == "pickscore":  # exp(logit_scale) from the fp32 weights: bf16 would move it by ~1%
        assert bf16_fn.similarity.logit_scale == pytest.approx(fp32_fn.similarity.logit_scale, rel=1e-6)
    model = bf16_fn.vision if reward == "imagereward" else bf16_fn.similarity.clip
    assert next(model.parameters()).dtype == torch.bfloat16
    bf16 = bf16_fn(images, PROMPTS[:3], [])[0]
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, fp32, atol=0.05 * float(fp32.abs().max()))


def test_pad_preprocessing_centres_on_black():
    image = torch.full((1, 3, 20, 30), 255, dtype=torch.uint8)  # wide: padded above and below
    x = preprocess(image, 30, mode="pad")
    black = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[0, :, :5].mean((1, 2)), black) and torch.allclose(x[0, :, 25:].mean((1, 2)), black)
    assert torch.allclose(x[0, :, 5:25].mean((1, 2)), white)
    with pytest.raises(ValueError, match="mode must be crop or pad"):
        preprocess(image, 30, mode="stretch")


# ---- hpsv2: open_clip's forward in plain PyTorch from the checkpoint's tensors -----------------------
def _ln(x, sd, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _open_clip_block(x, sd, p, heads, mask=None):
    """open_clip's ResidualAttentionBlock: nn.MultiheadAttention with the fused in_proj, GELU MLP."""
    h = _ln(x, sd, p + "ln_1").transpose(0, 1)  # (L, N, D), nn.MultiheadAttention's layout
    a, _ = F.multi_head_attention_forward(
        h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
        0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)
    x = x + a.transpose(0, 1)
    h = _ln(x, sd, p + "ln_2")
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def _hps_plain(sd, pixels, tokens, eos_id, heads):
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    for i in range(layers):
        x = _open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    image = _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]
    n = tokens.shape[1]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(layers):
        t = _open_clip_block(t, sd, f"transformer.resblocks.{i}.", heads, causal)
    t = _ln(t, sd, "ln_final")[torch.arange(len(t)), (tokens == eos_id).int().argmax(1)] @ sd["text_projection"]
    return F.cosine_similarity(image, t, dim=-1)


@pytest.mark.parametrize("shape", [(20, CLIP_SIZE), (60, 40)], ids=["padded", "resized"])
def test_hpsv2_equals_open_clip_forward_from_the_checkpoint(models, shape):
    from transformers import AutoTokenizer

    options = models["hpsv2"]
    images = _images(5, *shape, seed=2)
    scores, info = rewards.build("hpsv2", **options, batch_size=3)(images, PROMPTS, [])
    sd = torch.load(options["checkpoint"], weights_only=True)["state_dict"]
    tokenizer = AutoTokenizer.from_pretrained(options["clip_model"])
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = _hps_plain(sd, _to_pixels(_pil_pad(_pil(images), CLIP_SIZE)), tokens, tokenizer.eos_token_id,
                               random_models.TINY_VISION["num_attention_heads"])
    _close(scores, reference, resized=shape != (20, CLIP_SIZE))
    assert info["hpsv2_mean"] == pytest.approx(float(scores.mean()))


def test_hpsv2_checkpoint_errors_name_the_option(models, tmp_path):
    options = models["hpsv2"]
    sd = torch.load(options["checkpoint"], weights_only=True)["state_dict"]
    bad = tmp_path / "renamed.pt"
    torch.save({"state_dict": {k.replace("ln_1", "norm1"): v for k, v in sd.items()}}, bad)
    with pytest.raises(ValueError, match=r"checkpoint=.*renamed.pt.*not an open_clip CLIP state dict.*norm1"):
        rewards.build("hpsv2", **{**options, "checkpoint": str(bad)})
    torch.save({"state_dict": {k: v for k, v in sd.items() if "resblocks.0." not in k}}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"checkpoint=.*short.pt.*does not fit clip_model="):
        rewards.build("hpsv2", **{**options, "checkpoint": str(tmp_path / "short.pt")})
    with pytest.raises(ValueError, match=r"clip_model=.*quick_gelu.*gelu"):  # OpenAI's CLIP config, not open_clip's
        rewards.build("hpsv2", **{**options, "clip_model": models["clipscore"]["model"]})


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("reward", ["hpsv2", "imagereward"])
def test_checkpoints_load_with_weights_only(models, tmp_path, reward):
    torch.save({"state_dict": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only|weights_only"):
        rewards.build(reward, **{**models[reward], "checkpoint": str(tmp_path / "evil.pt")})


# ---- imagereward: BLIP's ViT and BERT with cross-attention in plain PyTorch ---------------------------
def _attention(q_in, kv_in, sd, p, heads, mask=None):
    """BERT's attention (query/key/value, softmax(q k^T / sqrt(d)) v) with an additive key mask."""
    q, k, v = (F.linear(x, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]) for x, n in
               ((q_in, "query"), (kv_in, "key"), (kv_in, "value")))
    split = lambda x: x.view(*x.shape[:2], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (1 - mask[:, None, None, :].float()) * -1e9
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def _imagereward_plain(sd, pixels, ids, mask, med):
    p, width = "blip.visual_encoder.", sd["blip.visual_encoder.pos_embed"].shape[-1]
    heads = width // 64
    patch = sd[p + "patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[p + "pos_embed"]
    for i in range(1 + max(int(k.split(".")[3]) for k in sd if k.startswith(p + "blocks."))):
        b = f"{p}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(
            *h.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = _ln(x, sd, b + "norm2", 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    image = _ln(x, sd, p + "norm", 1e-6)

    t, eps = "blip.text_encoder.", med["layer_norm_eps"]
    y = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    y = _ln(y, sd, t + "embeddings.LayerNorm", eps)
    for i in range(med["num_hidden_layers"]):
        L = f"{t}encoder.layer.{i}."
        for part, kv, m in (("attention", None, mask), ("crossattention", image, None)):
            a = _attention(y, y if kv is None else kv, sd, L + part + ".self", med["num_attention_heads"], m)
            y = _ln(y + F.linear(a, sd[L + part + ".output.dense.weight"], sd[L + part + ".output.dense.bias"]),
                    sd, L + part + ".output.LayerNorm", eps)
        h = F.gelu(F.linear(y, sd[L + "intermediate.dense.weight"], sd[L + "intermediate.dense.bias"]))
        y = _ln(y + F.linear(h, sd[L + "output.dense.weight"], sd[L + "output.dense.bias"]), sd, L + "output.LayerNorm", eps)
    z = y[:, 0]
    for i in (0, 2, 4, 6, 7):  # ImageReward's MLP: linear layers only (dropout off)
        z = F.linear(z, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return (z.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.mark.parametrize("shape", [(BLIP_SIZE, BLIP_SIZE), (64, 48)], ids=["native", "resized"])
def test_imagereward_equals_blip_forward_from_the_checkpoint(models, shape):
    import json

    from transformers import BertTokenizer

    options = models["imagereward"]
    images = _images(5, *shape, seed=3)
    scores, info = rewards.build("imagereward", **options, batch_size=2)(images, PROMPTS, [])
    sd = torch.load(options["checkpoint"], weights_only=True)
    med = json.load(open(options["med_config"]))
    text = BertTokenizer.from_pretrained(options["tokenizer"])(PROMPTS, padding="max_length", max_length=35,
                                                                return_tensors="pt")
    with torch.no_grad():
        reference = _imagereward_plain(sd, _to_pixels(_pil_crop(_pil(images), BLIP_SIZE)), text["input_ids"],
                                       text["attention_mask"], med)
    _close(scores, reference, resized=shape != (BLIP_SIZE, BLIP_SIZE))
    assert info["imagereward_mean"] == pytest.approx(float(scores.mean()))
    assert ir.MAX_LENGTH == 35


def test_imagereward_checkpoint_errors_name_the_option(models, tmp_path):
    options = models["imagereward"]
    sd = torch.load(options["checkpoint"], weights_only=True)
    torch.save({k.replace("blip.", "model."): v for k, v in sd.items()}, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"checkpoint=.*renamed.pt.*ImageReward's key names"):
        rewards.build("imagereward", **{**options, "checkpoint": str(tmp_path / "renamed.pt")})
    torch.save({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(3)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"checkpoint=.*unknown ViT key blip.visual_encoder.blocks.0.ls1.gamma"):
        rewards.build("imagereward", **{**options, "checkpoint": str(tmp_path / "extra.pt")})
    med = tmp_path / "med_config.json"
    med.write_text('{"vocab_size": 10, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, '
                   '"num_attention_heads": 2, "max_position_embeddings": 40}')  # a vocabulary that does not fit
    with pytest.raises(ValueError, match=r"checkpoint=.*blip.text_encoder does not fit \(med_config="):
        rewards.build("imagereward", **{**options, "med_config": str(med)})
    med.write_text('{"hidden_size": 24}')
    with pytest.raises(ValueError, match=r"med_config=.*has no 'vocab_size'"):
        rewards.build("imagereward", **{**options, "med_config": str(med)})


# ---- the random checkpoints fit the published architectures ------------------------------------------------
@pytest.mark.parametrize("size, clip_h_params, blip_vit_params", [("tiny", None, None), ("full", 986e6, 303e6)])
def test_random_checkpoints_convert_to_the_architectures(size, clip_h_params, blip_vit_params):
    """The open_clip and BLIP names and shapes of save_hpsv2 / save_imagereward, renamed by the rewards, are
    exactly transformers' CLIP ViT-H/14 and BLIP ViT-L/16 (full: their published sizes), on the meta device."""
    from transformers import BlipVisionModel, CLIPModel

    from ddpo_fast.rewards.hpsv2 import open_clip_to_transformers

    def meta(shapes):
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    def shapes(state):
        return {k: tuple(v.shape) for k, v in state.items()}

    config, _ = random_models.clip_config(size, "vit_h")
    with torch.device("meta"):
        clip = CLIPModel(config)
    assert shapes(open_clip_to_transformers(meta(random_models.open_clip_shapes(size)))) == shapes(clip.state_dict())
    vit = ir.vision_to_transformers(meta(random_models.blip_vit_shapes(size)))
    with torch.device("meta"):
        blip = BlipVisionModel(ir.vit_config(vit))
    assert shapes(vit) == shapes(blip.state_dict())
    if size == "full":
        assert sum(p.numel() for p in clip.parameters()) == pytest.approx(clip_h_params, rel=0.01)
        assert sum(p.numel() for p in blip.parameters()) == pytest.approx(blip_vit_params, rel=0.01)
        assert blip.config.num_attention_heads == 16 and blip.config.image_size == 224


# ---- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reward, options, words", [
    ("pickscore", {}, ["pickscore reward", "option model is required", "yuvalkirstain/PickScore_v1"]),
    ("pickscore", {"model": "/nonexistent/pick"}, ["model='/nonexistent/pick'", "not a directory"]),
    ("pickscore", {"model": "M", "processor": "/nonexistent/proc"}, ["processor='/nonexistent/proc'", "not a directory"]),
    ("pickscore", {"model": "M", "dtype": "fp16"}, ["pickscore reward", "dtype", "fp32 or bf16"]),
    ("pickscore", {"model": "M", "batch_size": "0"}, ["batch_size", ">= 1"]),
    ("clipscore", {"model": "/nonexistent/clip"}, ["clipscore reward", "model='/nonexistent/clip'"]),
    ("clipscore", {"model": "M", "w": "-1"}, ["clipscore reward", "w must be > 0"]),
    ("clipscore", {"model": "M", "w": "big"}, ["w must be a number", "big"]),
    ("hpsv2", {"clip_model": "M"}, ["hpsv2 reward", "option checkpoint is required", "HPS_v2.1_compressed.pt"]),
    ("hpsv2", {"checkpoint": "/nonexistent/hps.pt", "clip_model": "M"}, ["checkpoint='/nonexistent/hps.pt'", "no such file"]),
    ("hpsv2", {"checkpoint": "hps.ckpt", "clip_model": "M"}, ["checkpoint='hps.ckpt'", "must end in .pt"]),
    ("hpsv2", {"checkpoint": "HPS"}, ["hpsv2 reward", "option clip_model is required"]),
    ("imagereward", {"med_config": "MED"}, ["imagereward reward", "option checkpoint is required", "ImageReward.pt"]),
    ("imagereward", {"checkpoint": "IR"}, ["option med_config is required", "med_config.json"]),
    ("imagereward", {"checkpoint": "/nonexistent/ir.pt", "med_config": "MED"}, ["checkpoint='/nonexistent/ir.pt'",
                                                                              "no such file"]),
    ("imagereward", {"checkpoint": "IR", "med_config": "/nonexistent/med.json"}, ["med_config='/nonexistent/med.json'"]),
    ("imagereward", {"checkpoint": "IR", "med_config": "MED", "tokenizer": "/nonexistent/bert"},
     ["tokenizer='/nonexistent/bert'", "not a directory"]),
    ("imagereward", {"checkpoint": "IR", "med_config": "MED", "model": "M"}, ["unknown reward option 'model'",
                                                                            "imagereward: checkpoint, med_config"]),
])
def test_bad_options_are_named(models, reward, options, words):
    paths = {"M": models["pickscore"]["model"], "HPS": models["hpsv2"]["checkpoint"],
             "IR": models["imagereward"]["checkpoint"], "MED": models["imagereward"]["med_config"]}
    options = {k: paths.get(v, v) for k, v in options.items()}
    with pytest.raises(ValueError) as info:
        rewards.check(reward, **options)  # before any model loads
    for word in words:
        assert word in str(info.value)


def test_random_models_refuse_an_unknown_reward(tmp_path):
    with pytest.raises(ValueError, match="rewards: no random models for pickscor; known: .*pickscore"):
        random_models.save_reward_models(tmp_path, rewards=("pickscor",))


def test_bad_images_and_prompt_counts_are_refused(models):
    fn = rewards.build("pickscore", **models["pickscore"])
    with pytest.raises(ValueError, match="uint8"):
        fn(torch.zeros(2, 3, 8, 8), PROMPTS[:2], [])
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        fn(_images(2), PROMPTS[:3], [])


def test_weighted_pickscore_and_aesthetic(models):
    images = _images(4, 64, 64)
    pick = rewards.build("pickscore", **models["pickscore"])(images, PROMPTS[:4], [])[0]
    aesthetic = rewards.build("aesthetic", **models["aesthetic"])(images, PROMPTS[:4], [])[0]
    r, info = rewards.build("pickscore:1.0,aesthetic:0.5", **models["pickscore"], **models["aesthetic"])(
        images, PROMPTS[:4], [])
    assert torch.allclose(r, pick + 0.5 * aesthetic, atol=1e-5)
    assert info["pickscore"] == pytest.approx(float(pick.mean()), abs=1e-5)
    assert "pickscore/pickscore_mean" in info and "aesthetic/aesthetic_mean" in info


# ---- the trainer and the reward server ------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["pickscore:1.0,aesthetic:0.5", "clipscore", "hpsv2", "imagereward"])
def test_trainer_epoch(tmp_path, models, monkeypatch, spec):
    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")
    names = [term.split(":")[0] for term in spec.split(",")]
    options = ",".join(f"{k}={v}" for name in names for k, v in models[name].items())
    run = tmp_path / "run"
    train.main(["--run-dir", str(run), *TINY, "num_epochs=1", f"reward={spec}", f"reward_options={options},device=cpu"])
    (record,) = metrics(run)
    assert math.isfinite(record["reward_mean"]) and record["reward_std"] > 0
    # Both batches have the same size: the mean of the per-batch means is the epoch's mean reward.
    if len(names) == 1:
        assert record[f"reward_info/{spec}_mean"] == pytest.approx(record["reward_mean"], abs=1e-5)
    else:
        combined = record["reward_info/pickscore"] + 0.5 * record["reward_info/aesthetic"]
        assert combined == pytest.approx(record["reward_mean"], abs=1e-5)
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0


def test_reward_server_serves_pickscore(tmp_path, models):
    images, prompts = _images(3, 64, 64), PROMPTS[:3]
    local = rewards.build("pickscore", **models["pickscore"], device="cpu")(images, prompts, [{}] * 3)[0]
    with start_server("pickscore", {**models["pickscore"], "device": "cpu"}, startup_timeout=120, env=env(),
                      log_path=tmp_path / "server.log") as server:
        served, info = server.remote(timeout=60)(images, prompts, [{}] * 3)
    assert torch.allclose(served, local, atol=1e-5)
    assert info["pickscore_mean"] == pytest.approx(float(local.mean()), abs=1e-5)
