"""The tiny built-in pipeline: deterministic, no download, a normal diffusers directory."""
import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ddpo_fast import shapes
from ddpo_fast.models import build_tiny_pipeline, load_model, shapes_tokenizer, tiny_tokenizer


def test_tiny_tokenizer_vocabulary_built_in_code():
    tok = tiny_tokenizer()
    assert tok.tokenize("a horse") == ["a</w>", "horse</w>"]  # prompt words are single tokens
    assert tok.tokenize("xq") == ["x", "q</w>"]  # any other word falls back to characters
    ids = tok("cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids[0] == tok.bos_token_id and ids[2] == tok.eos_token_id and len(ids) == tok.model_max_length


def test_shapes_tokenizer_gives_every_caption_word_a_token():
    tok = shapes_tokenizer()
    for word in shapes.caption_words():  # left-to-right merges broke "squares" into squa|re|s
        assert tok.tokenize(word) == [word + "</w>"]
    longest = max((shapes.caption(s) for s in shapes.all_scenes()), key=lambda c: len(c.split()))
    ids = tok(longest, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    words = longest.split()
    assert len(words) == 7 and ids[1:8] == tok.convert_tokens_to_ids([w + "</w>" for w in words])  # nothing cut
    assert ids[8] == tok.eos_token_id
    assert tok.tokenize("xq") == ["x", "q</w>"]  # other words still tokenize


def test_tiny_pipeline_is_seeded():
    a, b, c = build_tiny_pipeline(1), build_tiny_pipeline(1), build_tiny_pipeline(2)
    for name in ("unet", "vae", "text_encoder"):
        pa, pb, pc = (torch.cat([p.flatten() for p in getattr(x, name).parameters()]) for x in (a, b, c))
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_saved_tiny_pipeline_loads_with_diffusers(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny")
    again = load_model(str(tmp_path / "tiny")).pipe  # the trainer's model=DIR path
    assert again.scheduler.__class__.__name__ == "DDIMScheduler"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = load_model("tiny").encode(["cat", "a dog riding a bike"], "cpu")["prompt_embeds"]
    assert torch.equal(emb, pipe.encode_prompt(["cat", "a dog riding a bike"], "cpu", 1, False)[0])  # diffusers' own
    with torch.no_grad():
        ref = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        assert torch.equal(ref, loaded.unet(x, 500, encoder_hidden_states=emb).sample)
        assert torch.equal(ref, again.unet(x, 500, encoder_hidden_states=emb).sample)
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path / "tiny", subfolder="unet"), UNet2DConditionModel)


def test_diffusers_pipeline_call_runs_on_tiny_model():
    pipe = build_tiny_pipeline()
    out = pipe(["cat"], num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="model="):
        load_model(str(tmp_path / "nothing-here"))


def test_sd15_random_has_stable_diffusion_15_shapes():
    """`model=sd15-random` is SD-1.5's architecture: its parameter counts, built on the meta device."""
    with torch.device("meta"):
        pipe = load_model("sd15-random").pipe
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 768
    assert pipe.tokenizer.model_max_length == 77


def test_benchmark_counts_denoiser_flops_per_sample():
    """benchmarks/train.py's MFU numerator: ~0.80 TFLOP per SD-1.5 forward at 64x64 latents, times the
    forwards of an epoch's sample (20 steps x 2 CFG rows while sampling, 3 x 20 x 2 while training)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sd15 = bench.denoiser_flops_per_sample("sd15-random", [])
    assert abs(sd15 / (20 * 2 + 3 * 20 * 2) - 0.803e12) < 0.01e12
    half = bench.denoiser_flops_per_sample("sd15-random", ["train.timestep_fraction=0.5"])
    assert abs(half / (20 * 2 + 3 * 10 * 2) - 0.803e12) < 0.01e12
    assert 0 < bench.denoiser_flops_per_sample("tiny", []) < sd15 / 1000
