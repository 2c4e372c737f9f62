"""The compiled backends behind ddpo_fast.ops, and how one is chosen.

Every backend takes one `DdimCall`: validated, contiguous tensors flattened to (rows, numel), with
the outputs allocated by the caller. The C++ backends (CPU, CUDA) receive it as the torch-free
`DdimArgs` struct of csrc/ddim_core.h; the Triton backend reads the tensors directly.

Backend choice: the environment variable DDPO_FAST_BACKEND (`auto`, `reference`, `cpu`, `cuda`,
`triton`) or `set_backend()`; `auto` picks the C++ kernels for the tensors' device when built, then
Triton (CUDA tensors), then the plain-PyTorch reference.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

try:
    from ddpo_fast import _C
    _C_IMPORT_ERROR: str | None = None
except ImportError as error:  # not built (e.g. a source checkout without `pip install`)
    _C = None
    _C_IMPORT_ERROR = f"{type(error).__name__}: {error}"


@dataclass
class DdimCall:
    """One fused DDIM call. Shapes: B samples of N elements; model_output has 2B rows with CFG."""

    model_output: torch.Tensor  # (B or 2B, N)
    sample: torch.Tensor  # (B, N), x_t
    alpha_t: torch.Tensor  # (B,), compute dtype
    alpha_prev: torch.Tensor  # (B,), compute dtype
    prev_sample: torch.Tensor  # (B, N), x_{t-1}: written when sample_noise, read otherwise
    log_prob: torch.Tensor | None = None  # (B,) out, compute dtype (forward)
    eta: float = 1.0
    guidance_scale: float | None = None
    prediction: int = 0  # PREDICTION_CODES
    clip_sample_range: float | None = None
    use_clipped_model_output: bool = False
    sample_noise: bool = False
    noise: torch.Tensor | None = None  # (B, N); None: the Philox stream of (seed, offset)
    seed: int = 0
    offset: int = 0
    # PPO stage (forward), run when old_log_prob is not None; all (B,) or 0-d, compute dtype.
    old_log_prob: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    ppo_clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    loss: torch.Tensor | None = None
    approx_kl: torch.Tensor | None = None
    clipfrac: torch.Tensor | None = None
    dloss_dlogp: torch.Tensor | None = None
    # KL penalty to a reference policy (a given prev_sample): the reference model's output, like
    # model_output; the forward pass writes kl (B,), the PPO stage reads it (loss += kl_beta * mean)
    # and writes kl_mean (0-d).
    reference_output: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    kl_beta: float = 0.0
    kl_mean: torch.Tensor | None = None
    # Backward.
    grad_prev_sample: torch.Tensor | None = None  # (B, N), optional
    grad_log_prob: torch.Tensor | None = None  # (B,), compute dtype
    grad_kl: torch.Tensor | None = None  # (B,), compute dtype, optional (needs reference_output)
    grad_model_output: torch.Tensor | None = None  # out, like model_output
    # CPU only: d log_prob / d (guided) model output, (B, N) in the compute dtype; written by the
    # forward pass of a given prev_sample, read by the backward pass (see csrc/ddim_core.h).
    grad_direction: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.sample.shape[0]

    @property
    def numel(self) -> int:
        return self.sample.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.alpha_t.dtype


def core_args(call: DdimCall):
    """The DdimArgs struct of the C++ core for `call`. Only fields that differ from the struct's
    defaults (csrc/ddim_core.h) are set: each attribute costs a pybind11 call, and this runs on
    every op call."""
    a = _C.DdimArgs()
    a.batch, a.numel = call.batch, call.numel
    if call.alpha_t.dtype is torch.float64:
        a.compute = DTYPE_CODES[torch.float64]
    if call.eta != 1.0:
        a.eta = call.eta
    if call.guidance_scale is not None:
        a.cfg, a.guidance_scale = True, call.guidance_scale
    if call.prediction:
        a.prediction = call.prediction
    if call.clip_sample_range is not None:
        a.clip_sample, a.clip_sample_range = True, call.clip_sample_range
    if call.use_clipped_model_output:
        a.use_clipped_model_output = True
    for name in ("model_output", "sample", "prev_sample", "noise", "grad_prev_sample", "reference_output"):
        t = getattr(call, name)
        if t is not None:
            setattr(a, name, t.data_ptr())
            if t.dtype is not torch.float32:
                setattr(a, name + "_dtype", DTYPE_CODES[t.dtype])
    a.alpha_t, a.alpha_prev = call.alpha_t.data_ptr(), call.alpha_prev.data_ptr()
    if call.sample_noise:
        a.sample_noise = True
    if call.seed:
        a.seed = call.seed
    if call.offset:
        a.offset = call.offset
    if call.old_log_prob is not None:
        a.old_log_prob, a.advantages = call.old_log_prob.data_ptr(), call.advantages.data_ptr()
        a.ppo_clip_range, a.adv_clip_max = call.ppo_clip_range, call.adv_clip_max
    for name in ("log_prob", "loss", "approx_kl", "clipfrac", "dloss_dlogp", "grad_log_prob", "grad_model_output",
                 "grad_direction", "kl", "kl_mean", "grad_kl"):
        t = getattr(call, name)
        if t is not None:
            setattr(a, name, t.data_ptr())
    if call.kl_beta:
        a.kl_beta = call.kl_beta
    return a


# ---- Runners: each backend is an object with forward / backward / ppo taking a DdimCall ---------


class _CoreCPU:
    """The C++ CPU kernels, on as many threads as torch uses (torch.set_num_threads / OMP_NUM_THREADS)."""

    name = "cpu"

    @staticmethod
    def _args(call: DdimCall):
        _C.set_num_threads(torch.get_num_threads())
        return core_args(call)

    def forward(self, call: DdimCall) -> None:
        _C.ddim_forward_cpu(self._args(call))

    def backward(self, call: DdimCall) -> None:
        _C.ddim_backward_cpu(self._args(call))

    def ppo(self, call: DdimCall) -> None:
        _C.ppo_forward_cpu(self._args(call))


class _CoreCUDA:
    name = "cuda"

    @staticmethod
    def _args(call: DdimCall, with_workspace: bool):
        args = core_args(call)
        device = call.sample.device
        args.device = device.index if device.index is not None else torch.cuda.current_device()
        args.stream = torch.cuda.current_stream(device).cuda_stream
        if with_workspace:  # the KL penalty's partial sums in a second half
            chunks = _C.chunks_per_sample(call.numel) * (2 if call.reference_output is not None else 1)
            call._workspace = torch.empty(call.batch * chunks, dtype=call.compute_dtype, device=device)
            args.workspace = call._workspace.data_ptr()
        return args

    def forward(self, call: DdimCall) -> None:
        _C.ddim_forward_cuda(self._args(call, with_workspace=True))

    def backward(self, call: DdimCall) -> None:
        _C.ddim_backward_cuda(self._args(call, with_workspace=False))

    def ppo(self, call: DdimCall) -> None:
        _C.ppo_forward_cuda(self._args(call, with_workspace=False))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_backend_override: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for all later calls (None: back to DDPO_FAST_BACKEND / auto)."""
    global _backend_override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend_override = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager forcing a backend, e.g. `with use_backend("triton"): ...`."""
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def requested_backend() -> str:
    name = _backend_override or os.environ.get("DDPO_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"DDPO_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def cuda_kernels_built() -> bool:
    return _C is not None and _C.built_with_cuda()


_warned_fallback: set[str] = set()


def _auto_backend(device_type: str) -> tuple[str, str | None]:
    """What `auto` picks for a device type, and why, when it is the reference."""
    if device_type == "cpu":
        if _C is not None:
            return "cpu", None
        return "reference", f"the compiled module ddpo_fast._C is missing ({_C_IMPORT_ERROR})"
    if device_type == "cuda":
        if cuda_kernels_built():
            return "cuda", None
        if triton_available():
            return "triton", None
        built = "missing" if _C is None else "built without CUDA"
        return "reference", f"ddpo_fast._C is {built} and triton is not installed"
    return "reference", f"no compiled backend runs on {device_type} tensors"


def _warn_fallback(device_type: str, reason: str) -> None:
    """Once per device type and process: the slow path is in use although nobody asked for it."""
    if device_type in _warned_fallback:
        return
    _warned_fallback.add(device_type)
    package = os.path.dirname(os.path.abspath(__file__))
    warnings.warn(
        f"ddpo_fast: {device_type} tensors fall back to the slow reference ops: {reason}. ddpo_fast "
        f"was imported from {package}; a source checkout shadows an installed package when Python "
        f"runs from the repository's folder, so build it in place (`pip install -e .`) or run from "
        f"elsewhere. Set DDPO_FAST_BACKEND=reference to choose the reference without this warning; "
        f"ddpo_fast.ops.backend_info() says what each device gets.",
        RuntimeWarning, stacklevel=3)


def resolve_backend(device: torch.device) -> str:
    """The backend that runs on `device`: the requested one, checked, or the best available."""
    name = requested_backend()
    if name == "auto":
        name, reason = _auto_backend(device.type)
        if reason is not None and device.type in ("cpu", "cuda"):
            _warn_fallback(device.type, reason)
        return name
    if name == "cpu" and (_C is None or device.type != "cpu"):
        raise RuntimeError(
            f"backend 'cpu' needs the compiled extension ddpo_fast._C and CPU tensors "
            f"(built: {_C is not None}, tensors on {device})"
        )
    if name == "cuda" and (not cuda_kernels_built() or device.type != "cuda"):
        raise RuntimeError(
            f"backend 'cuda' needs ddpo_fast._C built with CUDA and CUDA tensors "
            f"(built with CUDA: {cuda_kernels_built()}, tensors on {device})"
        )
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' runs on CPU tensors only with TRITON_INTERPRET=1")
    return name


def runner(name: str):
    """The runner object of a compiled backend name ('cpu', 'cuda' or 'triton')."""
    if name == "cpu":
        return _CoreCPU()
    if name == "cuda":
        return _CoreCUDA()
    if name == "triton":
        from ddpo_fast.kernels import ddim as triton_ddim

        return triton_ddim
    raise ValueError(f"no compiled runner for backend {name!r}")


def backend_info() -> dict:
    """Which backend each device gets, and why: {"compiled_module": path or None, "import_error",
    "built_with_cuda", "requested" (DDPO_FAST_BACKEND / set_backend), "devices": {"cpu": {"backend",
    "cpu_isa", "supported_cpu_isas", "reason"}, "cuda:N": {...}}}. "reason" says why a device gets the
    reference (None otherwise). Warns nothing and runs no kernel."""
    requested = requested_backend()
    devices = {"cpu": "cpu"}
    if torch.cuda.is_available():
        devices.update({f"cuda:{i}": "cuda" for i in range(torch.cuda.device_count())})
    info = {
        "compiled_module": getattr(_C, "__file__", None),
        "import_error": _C_IMPORT_ERROR,
        "built_with_cuda": cuda_kernels_built(),
        "requested": requested,
        "devices": {},
    }
    for name, device_type in devices.items():
        backend, reason = _auto_backend(device_type)
        if requested != "auto":
            backend, reason = requested, None
        entry = {"backend": backend, "reason": reason}
        if device_type == "cpu":
            entry["cpu_isa"] = _C.cpu_isa() if _C is not None and backend == "cpu" else None
            entry["supported_cpu_isas"] = list(_C.supported_cpu_isas()) if _C is not None else []
        info["devices"][name] = entry
    return info
