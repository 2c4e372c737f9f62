"""Model families (ddpo_fast.families): SDXL and SD3 behind the interface the SD path uses.

The tiny built-in models of each family are saved and loaded back like a user's model; the family is
read from model_index.json; deterministic sampling through the interface equals the diffusers
pipeline's own; and each family trains (full and LoRA), resumes exactly (SD3), runs on two DeepSpeed
ranks and saves a model its diffusers pipeline loads."""
import json

import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from ddpo_fast import config as cfg
from ddpo_fast import train
from ddpo_fast.families.base import absent_components
from ddpo_fast.models import BUILT_IN_MODELS, family_name, load_model
from ddpo_fast.precision import FP32
from train_helpers import TINY, metrics, run_deepspeed

PIPELINES = {"tiny-sdxl": StableDiffusionXLPipeline, "tiny-sd3": StableDiffusion3Pipeline}
DETERMINISTIC = ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny SDXL and SD3 pipelines saved as diffusers directories."""
    root = tmp_path_factory.mktemp("models")
    for name in PIPELINES:
        BUILT_IN_MODELS[name]().save_pretrained(root / name)
    return root


def test_the_family_is_read_from_model_index(saved, tmp_path):
    for name, family in [("tiny-sdxl", "sdxl"), ("tiny-sd3", "sd3")]:
        assert family_name(name) == family_name(str(saved / name)) == family
        model = load_model(str(saved / name))
        assert model.name == family and isinstance(model.pipe, PIPELINES[name])
    assert family_name("tiny") == family_name("shapes") == "sd"
    assert load_model(str(saved / "tiny-sdxl")).pipe.scheduler.__class__.__name__ == "DDIMScheduler"
    assert load_model(str(saved / "tiny-sd3")).pipe.scheduler.__class__.__name__ == "FlowMatchEulerDiscreteScheduler"
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"model='.*flux': a FluxPipeline is not supported \(supported: .*sd3"):
        load_model(str(tmp_path / "flux"))
    with pytest.raises(cfg.ConfigError, match="FluxPipeline is not supported"):
        train.resolve_config(train.parse_args(["--run-dir", str(tmp_path / "run"), f"model={tmp_path / 'flux'}"]), 1)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_deterministic_sampling_equals_the_diffusers_pipeline(saved, name):
    """Prompt encoding (with the negative prompt), the denoiser call with CFG, the schedule and the
    step (DDIM at eta 0; the SDE step at noise level 0 is the Euler step) and the decoding, through
    the family interface, give the latents and images the diffusers pipeline gives."""
    model = load_model(str(saved / name))
    config = cfg.from_preset("tiny-compressibility", ["sample.num_steps=4"])
    step = model.make_step(config.sample, "cpu")
    prompts = ["cat", "a dog riding a bike"]
    start = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    x, cond, negative = start, model.encode(prompts, "cpu"), model.negative_conditioning("cpu")
    with torch.no_grad():
        for i in range(step.num_steps):
            out = model.denoise(model.denoiser, x, step.timesteps[i], cond, negative, FP32)
            x, _ = step.sample(out, x, i, seed=0, guidance_scale=3.0, out_dtype=torch.float32, stochastic=False)
        pipe = PIPELINES[name].from_pretrained(saved / name, **absent_components(saved / name))
        pipe.scheduler = model.pipe.scheduler  # (SDXL: the DDIM scheduler the family samples with)
        expected = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=start.clone(),
                        output_type="latent").images
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)
        images = pipe.image_processor.postprocess(pipe.vae.decode(
            expected / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0)).sample, output_type="pt")
    ours = model.decode(x).float() / 255
    assert ours.shape == images.shape and (ours - images).abs().max() <= 1 / 255 + 1e-6


def _train(*argv):
    """The one-process trainer in this process (one thread: the tests run in parallel workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def _run(run_dir, *args):
    _train("--run-dir", run_dir, *TINY, *args)


def test_sd3_trains_resumes_exactly_and_saves_a_transformer_diffusers_loads(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")
    model = f"model={saved / 'tiny-sd3'}"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(full, model, "train.learning_rate=1e-2")
    _run(resumed, model, "train.learning_rate=1e-2", "num_epochs=1")
    _train("--resume", resumed, "num_epochs=2")
    a, b = metrics(full), metrics(resumed)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert ra["grad_norm"] > 0 and ra["skipped_steps"] == 0
        for key in DETERMINISTIC:
            assert ra[key] == rb[key], (ra["epoch"], key)
    wa = load_file(full / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    transformer = SD3Transformer2DModel.from_pretrained(full / "transformer")
    start = load_model(str(saved / "tiny-sd3")).denoiser
    assert any(not torch.equal(p, q) for p, q in zip(transformer.parameters(), start.parameters()))
    assert absent_components(saved / "tiny-sd3") == {"text_encoder_3": None, "tokenizer_3": None,
                                                     "image_encoder": None, "feature_extractor": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(saved / "tiny-sd3", transformer=transformer,
                                                    **absent_components(saved / "tiny-sd3"))
    assert pipe(["cat"], num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    from ddpo_fast.evaluate import evaluate

    result = evaluate(full, tmp_path / "eval", prompts=["cat"], seeds=[0], device="cpu")  # loads transformer/
    assert result["base"]["mean"] != result["finetuned"]["mean"]


def test_sdxl_lora_run_loads_into_the_sdxl_pipeline_and_evaluates(saved, tmp_path, monkeypatch):
    from ddpo_fast.evaluate import evaluate

    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")
    run = tmp_path / "run"
    _run(run, f"model={saved / 'tiny-sdxl'}", "use_lora=true", "lora.rank=2", "train.learning_rate=1e-2")
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == 0 for r in metrics(run))
    pipe = StableDiffusionXLPipeline.from_pretrained(saved / "tiny-sdxl")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(encoder_hidden_states=torch.randn(1, 16, 64), added_cond_kwargs={
        "text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        before = pipe.unet(x, 500, **kwargs).sample
        pipe.load_lora_weights(run / "lora")
        assert not torch.allclose(before, pipe.unet(x, 500, **kwargs).sample)
    result = evaluate(run, tmp_path / "eval", prompts=["cat"], seeds=[0], device="cpu")
    assert result["base"]["mean"] != result["finetuned"]["mean"] and (tmp_path / "eval" / "comparison.png").is_file()


@pytest.mark.parametrize("name, extra", [("tiny-sdxl", []),
                                         ("tiny-sd3", ["use_lora=true", "zero_stage=2", "train.kl_beta=0.1"])])
def test_two_deepspeed_ranks(saved, tmp_path, name, extra):
    """SDXL full under ZeRO-1; SD3 LoRA under ZeRO-2 with the KL penalty to the base (adapters off)
    fused into the flow step's loss."""
    run = tmp_path / "run"
    run_deepspeed(["--run-dir", str(run), *TINY, f"model={saved / name}", "train.learning_rate=1e-2", *extra])
    records = metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == 0 and r["reward_std"] > 0 for r in records)
    assert (run / ("lora" if extra else "unet")).is_dir()
    if extra:  # the first epoch starts at the base: the adapters' init (gaussian) already moves it a little
        assert all(r["kl"] > 0 for r in records) and records[1]["kl"] > records[0]["kl"]


@pytest.mark.parametrize("scheduler_config", [{"prediction_type": "v_prediction"},  # SD 2.x
                                              {"clip_sample": True, "clip_sample_range": 1.0}])
def test_the_ddim_step_follows_the_schedulers_prediction_type_and_clipping(scheduler_config):
    """The policy's step takes prediction_type and sample clipping from the pipeline's scheduler (the
    trainer used to sample every model as epsilon prediction): eta 0 equals diffusers' DDIM step."""
    from diffusers import DDIMScheduler

    from ddpo_fast.models import scheduler_config as sd_schedule
    from ddpo_fast.steps import DdimStep

    scheduler = DDIMScheduler(**{**sd_schedule(), **scheduler_config})
    step = DdimStep(scheduler, 10, "cpu", eta=1.0)
    generator = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for i in (0, 4, 9):
        ours, _ = step.sample(out, x, i, seed=0, guidance_scale=None, out_dtype=torch.float32, stochastic=False)
        expected = scheduler.step(out, step.timesteps[i], x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sample_resolution_sets_the_latent_size_and_bad_ones_name_the_key(saved):
    assert load_model("tiny", resolution=128).latent_shape == (4, 16, 16)
    assert load_model(str(saved / "tiny-sd3"), resolution=32).latent_shape == (16, 4, 4)
    with pytest.raises(ValueError, match=r"sample.resolution must be a multiple of 8 pixels and at most 64"):
        load_model("tiny-sd3", resolution=128)  # its position embedding covers 8 x 8 patches
    with pytest.raises(cfg.ConfigError, match="sample.resolution must be 0"):
        cfg.validate(cfg.from_preset("tiny-compressibility", ["sample.resolution=30"]))
