"""Fast defaults on a GPU, checked on the CPU: bf16 by default on CUDA (fp32 stays the CPU default),
the frozen VAE and text encoder in the mixed-precision dtype, TF32 and cuDNN's autotuner, SDPA or
xformers attention, and evaluate sampling on the given device in batches."""
import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel

from ddpo_fast import config as cfg
from ddpo_fast import evaluate, precision
from ddpo_fast import train
from ddpo_fast.models import build_tiny_pipeline, load_model, set_attention


def test_mixed_precision_auto_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    assert cfg.Config().mixed_precision == "auto"
    assert precision.resolve("auto", torch.device("cuda", 3)) == "bf16"
    assert precision.resolve("auto", torch.device("cpu")) == "no"
    assert precision.resolve("fp16", torch.device("cuda", 0)) == "fp16"  # an explicit choice stays


def test_cuda_turns_on_tf32_and_the_cudnn_autotuner():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = False
        train.configure_device(torch.device("cuda", 0))
        assert matmul.allow_tf32 and cudnn.allow_tf32 and cudnn.benchmark
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


def test_frozen_modules_run_in_the_mixed_precision_dtype_and_the_unet_stays_fp32():
    for name in ("tiny", "tiny-sdxl", "tiny-sd3"):
        model = load_model(name)
        model.place(torch.device("cpu"), torch.bfloat16)
        assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
        assert len(model.text_encoders()) == (1 if name == "tiny" else 2)
        assert {p.dtype for e in model.text_encoders() for p in e.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in model.denoiser.parameters()} == {torch.float32}  # the master weights


def test_attention_choices():
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = build_tiny_pipeline().unet
    set_attention(unet, "sdpa")
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="attention must be sdpa or xformers"):
        set_attention(unet, "flash")
    with pytest.raises(cfg.ConfigError, match="attention must be one of"):
        cfg.validate(cfg.from_preset("tiny-compressibility", ["attention=flash"]))


def test_attention_xformers_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name == "xformers":
            raise ImportError("no xformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "attention=xformers"])
    with pytest.raises(cfg.ConfigError, match="attention=xformers needs the xformers package"):
        train.resolve_config(args, 1)


def test_evaluate_samples_on_the_device_in_batches_of_prompts(monkeypatch):
    import ddpo_fast.sampling as sampling

    calls = []
    original = sampling.sample_batch

    def recording(model, denoiser, step, cond, *args, **kwargs):
        embeds = cond["prompt_embeds"]
        calls.append((embeds.shape[0], embeds.device, kwargs["precision"].mode, kwargs["seed"]))
        return original(model, denoiser, step, cond, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_batch", recording)  # evaluate samples through sampling
    config = cfg.from_preset("tiny-compressibility", ["mixed_precision=bf16"])
    prompts, seeds = ["cat", "dog", "horse"], [0, 7]
    images = evaluate.sample_images(load_model("tiny"), prompts, seeds, config, torch.device("cpu"), batch_size=2)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    # 2 batches of prompts (2 + 1) x 2 seeds, on the device, in the run's precision
    assert [(n, s) for n, _, _, s in calls] == [(2, 0), (2, 7), (1, 0), (1, 7)]
    assert all(d.type == "cpu" and mode == "bf16" for _, d, mode, _ in calls)
    # Row order: prompt-major, then seed; the same prompt and seed in the same batch give the same image.
    again = evaluate.sample_images(load_model("tiny"), prompts, seeds, config, torch.device("cpu"), batch_size=2)
    assert torch.equal(images, again)
    assert not torch.equal(images[0], images[1])  # seeds 0 and 7 of "cat" differ


def test_evaluate_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert evaluate.default_device() == torch.device("cuda", 0)
