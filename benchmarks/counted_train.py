"""The trainer (as DeepSpeed's user script) with the bytes each rank puts into collectives counted
(benchmarks/comm.py and tests/test_train_communication.py run it).

Counted per rank: the input bytes of every collective by kind, the optimizer steps, the trainable
parameters' elements, the reduction bytes (all-reduce, reduce-scatter, reduce) per optimizer step,
and the gather bytes of each sampling phase (from entering
`engine.sampling_phase()` to leaving it). Written to DDPO_TEST_COMM_DIR/rank{RANK}.json at exit.
"""
import atexit
import contextlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced")
GATHERS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "broadcast")
sent = Counter()
report = {"optimizer_steps": 0, "trainable_numel": 0, "sampling_phase_gather_bytes": []}


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _counting(name, fn):
    def wrapper(*args, **kwargs):
        if name in ("all_gather", "reduce_scatter", "all_gather_into_tensor", "_all_gather_base",
                    "reduce_scatter_tensor"):  # (output, input): count the input
            payload = args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
        else:
            payload = args[0] if args else next(iter(kwargs.values()))
        sent[name] += _bytes(payload)
        return fn(*args, **kwargs)
    return wrapper


for name in REDUCTIONS + GATHERS:
    if hasattr(dist, name):
        setattr(dist, name, _counting(name, getattr(dist, name)))


def gathered() -> int:
    return sum(sent[k] for k in GATHERS if k != "broadcast")


from ddpo_fast import engines, train  # noqa: E402

_init, _step, _phase = engines.DeepSpeedEngine.__init__, engines.DeepSpeedEngine.step, engines.DeepSpeedEngine.sampling_phase


def init(self, module, params, *args, **kwargs):
    _init(self, module, params, *args, **kwargs)
    report["trainable_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)


def step(self):
    boundary = _step(self)
    report["optimizer_steps"] += int(boundary)
    return boundary


@contextlib.contextmanager
def sampling_phase(self):
    before = gathered()
    with _phase(self):
        yield
    report["sampling_phase_gather_bytes"].append(gathered() - before)


engines.DeepSpeedEngine.__init__, engines.DeepSpeedEngine.step = init, step
engines.DeepSpeedEngine.sampling_phase = sampling_phase


@atexit.register
def _write() -> None:
    out = Path(os.environ["DDPO_TEST_COMM_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    reduced = sum(sent[k] for k in REDUCTIONS) / max(report["optimizer_steps"], 1)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"sent": dict(sent), "reduced_bytes_per_step": reduced, **report}))


sys.exit(train.cli())
