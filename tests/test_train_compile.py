"""compile=true: the engines run the UNet through torch.compile in both phases (sampling through
engine.sampling_module, training through the engine), with the results of eager mode. Inductor's
code generation takes minutes on a 2-core CPU, so these tests compile with the aot_eager backend
(the same dynamo capture and AOT autograd, eager kernels); inductor itself is measured by
benchmarks/train.py --with-compile and on a GPU by benchmarks/gpu_suite.sh."""
import pytest
import torch

pytest.importorskip("diffusers")  # on the GPU machine: a carried wheel

from ddpo_fast import config as cfg
from ddpo_fast import engines
from ddpo_fast.engines import TorchEngine, prepare_denoiser
from ddpo_fast.models import load_model
from ddpo_fast.precision import Precision


@pytest.fixture
def aot_eager(monkeypatch):
    compiled = []
    original = torch.compile

    def compile_with_aot_eager(module, **kwargs):
        compiled.append(kwargs)
        return original(module, backend="aot_eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(engines.torch, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    yield compiled
    torch._dynamo.reset()


def _engine(compile_: bool, mode: str):
    model = load_model("tiny")
    config = cfg.from_preset("tiny-compressibility", [f"compile={str(compile_).lower()}", f"mixed_precision={mode}",
                                                      "train.gradient_accumulation_steps=1"])
    unet, params = prepare_denoiser(model, config)
    precision = Precision(mode, "cpu")
    return model, TorchEngine(unet, params, config, precision, torch.device("cpu")), precision


@pytest.mark.parametrize("mode", ["no", "bf16"])
def test_compiled_phases_match_eager(aot_eager, mode):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    results = {}
    for compile_ in (False, True):
        model, engine, precision = _engine(compile_, mode)
        cond = model.encode(["cat", "dog", "horse"], "cpu")
        negative = model.negative_conditioning("cpu")
        t = torch.tensor(994)
        with torch.no_grad():
            engine.module.eval()
            sampled = model.denoise(engine.sampling_module, x, t, cond, negative, precision)
        engine.module.train()
        trained = model.denoise(engine, x, t.expand(3), cond, negative, precision)
        trained.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in engine.params])
        results[compile_] = (sampled, trained.detach(), grads)
        assert (engine.sampling_module is not engine.module) == compile_
    assert len(aot_eager) == 2  # one compiled module per phase
    for eager, compiled in zip(results[False], results[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    sampled, trained, _ = results[True]
    torch.testing.assert_close(sampled, trained, rtol=1e-5, atol=1e-6)  # item 2 within rounding


def test_compile_refuses_zero3():
    with pytest.raises(cfg.ConfigError, match="compile=true does not work with zero_stage=3"):
        cfg.validate(cfg.from_preset("tiny-compressibility", ["compile=true", "zero_stage=3", "engine=deepspeed"]))
