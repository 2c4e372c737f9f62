"""`python tests/phase_forwards.py ENGINE:MIXED_PRECISION ...`: prints, as one JSON line per argument,
whether the sampling phase's and the training phase's UNet forwards of the same inputs are identical
for a training engine (torch, or deepspeed on one rank), with CPU autocast following CUDA's rules
(tests/emulated_cuda.py). The trainer's own code paths: engine.sampling_module in eval mode without
grad, the engine itself in train mode with grad, both through the model family's `denoise`."""
import datetime
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402

from emulated_cuda import install_cuda_autocast_rules  # noqa: E402

install_cuda_autocast_rules()

from ddpo_fast import config as cfg  # noqa: E402
from ddpo_fast import distributed  # noqa: E402
from ddpo_fast.engines import DeepSpeedEngine, TorchEngine, prepare_denoiser  # noqa: E402
from ddpo_fast.models import load_model  # noqa: E402
from ddpo_fast.precision import Precision  # noqa: E402

device = torch.device("cpu")
if any(arg.startswith("deepspeed:") for arg in sys.argv[1:]):
    distributed.init(device, datetime.timedelta(minutes=5), use_deepspeed=True)


def compare(engine_name: str, mode: str) -> dict:
    config = cfg.from_preset("tiny-compressibility", [f"engine={engine_name}", f"mixed_precision={mode}"])
    precision = Precision(mode, device.type)
    model = load_model("tiny")
    model.place(device, precision.dtype)
    unet, params = prepare_denoiser(model, config)
    engine = (DeepSpeedEngine if engine_name == "deepspeed" else TorchEngine)(unet, params, config, precision, device)
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8).to(precision.dtype or torch.float32)
    cond = model.encode(["cat", "dog", "horse", "a cow riding a bike"], device)
    negative = model.negative_conditioning(device)
    t = model.pipe.scheduler.timesteps[3]
    with torch.no_grad():
        engine.module.eval()
        sampled = model.denoise(engine.sampling_module, x, t, cond, negative, precision)  # one t for the batch
    engine.module.train()
    trained = model.denoise(engine, x, t.expand(4), cond, negative, precision)  # one t per row
    return {"engine": engine_name, "mixed_precision": mode, "identical": bool(torch.equal(sampled, trained.detach())),
            "dtype": str(sampled.dtype), "max_abs_diff": float((sampled.float() - trained.detach().float()).abs().max())}


for arg in sys.argv[1:]:
    print(json.dumps(compare(*arg.split(":"))), flush=True)
