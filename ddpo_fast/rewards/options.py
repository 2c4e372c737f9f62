"""Converters for reward options: values come as strings from the command line (the trainer's
reward_options) or as Python values from code; each error names the reward and the option."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def model_path(reward: str, option: str, value, example: str) -> str:
    """A model directory or hub id; a value that looks like a path must be an existing directory."""
    if value is None or not str(value).strip():
        raise ValueError(f"{reward} reward: option {option} is required (a model directory or hub id, e.g. {example})")
    value = str(value).strip()
    if (value.startswith((".", "/", "~")) or Path(value).is_absolute()) and not Path(value).expanduser().is_dir():
        raise ValueError(f"{reward} reward: {option}={value!r} is not a directory")
    return str(Path(value).expanduser()) if value.startswith("~") else value


def file(reward: str, option: str, value, suffixes: tuple[str, ...], what: str) -> str:
    """An existing file with one of the suffixes; `what` says what it is when the option is missing."""
    if value is None or not str(value).strip():
        raise ValueError(f"{reward} reward: option {option} is required ({what})")
    path = Path(str(value).strip()).expanduser()
    if path.suffix not in suffixes:
        raise ValueError(f"{reward} reward: {option}={str(value)!r} must end in {', '.join(suffixes)}")
    if not path.is_file():
        raise ValueError(f"{reward} reward: {option}={str(value)!r}: no such file")
    return str(path)


def device(reward: str, value) -> torch.device:
    """A torch device with an explicit index. None or '' means this thread's current CUDA device when a
    GPU is visible (the trainer makes it cuda:LOCAL_RANK), else cpu; a bare 'cuda' means the current
    CUDA device too. Never a bare 'cuda': the current device is per thread, and a reward called from a
    pool thread, where it is cuda:0, would put its inputs on GPU 0 while its weights are elsewhere."""
    if value is None or value == "":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{reward} reward: device={value!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if result.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{reward} reward: device={str(result)!r} but no CUDA GPU is available")
        if result.index is None:
            result = torch.device("cuda", torch.cuda.current_device())
        if result.index >= torch.cuda.device_count():
            raise ValueError(f"{reward} reward: device={str(result)!r} but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
    return result


def dtype(reward: str, value, allowed: tuple[str, ...]) -> torch.dtype:
    """A dtype by name (fp32, bf16, fp16) or a torch.dtype, one of `allowed`."""
    if isinstance(value, torch.dtype):
        value = next((name for name, d in DTYPES.items() if d == value), str(value))
    if value not in allowed:
        raise ValueError(f"{reward} reward: dtype must be {' or '.join(allowed)}, got {value!r}")
    return DTYPES[value]


def integer(reward: str, option: str, value, minimum: int = 1) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{reward} reward: {option} must be an integer, got {value!r}") from None
    if result < minimum:
        raise ValueError(f"{reward} reward: {option} must be >= {minimum}, got {result}")
    return result


def number(reward: str, option: str, value, minimum: float = 0.0) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{reward} reward: {option} must be a number, got {value!r}") from None
    if not result > minimum:
        raise ValueError(f"{reward} reward: {option} must be > {minimum:g}, got {value!r}")
    return result


def choice(reward: str, option: str, value, choices: tuple[str, ...]) -> str:
    value = str(value).strip().lower()
    if value not in choices:
        raise ValueError(f"{reward} reward: {option} must be one of {', '.join(choices)}, got {value!r}")
    return value
