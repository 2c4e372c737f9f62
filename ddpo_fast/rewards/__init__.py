"""Rewards: named rewards with options, `module:function` user rewards, weighted sums, and a
background pool that computes them while the next batch samples.

    from ddpo_fast import rewards
    fn = rewards.build("aesthetic", clip_model="/models/clip-vit-large-patch14", mlp_weights="/models/laion.pth")
    scores, info = fn(images, prompts, metadata)

A reward function takes (images, prompts, metadata): images a uint8 tensor (N, 3, H, W) on any
device, prompts a list of N strings, metadata a list of N dicts; it returns (rewards, info) with
rewards a float tensor of shape (N,) and info a dict. An info value that is a list of N items is
per image (e.g. the VLM's answers: saved beside the sample grids, split per request by the reward
server); any other value is about the batch, and is logged when it is a number.

The reward spec given to `build` (the trainer's `reward=`) is one of:
  - a registered name: jpeg_compressibility, jpeg_incompressibility, aesthetic, llava_bertscore,
    shapes_alignment (a programmatic judge for the `shapes` model's prompts), and the human-preference
    scores pickscore, clipscore, hpsv2, imagereward;
  - module:function, a user reward function (it takes no options);
  - a weighted sum `NAME:WEIGHT,NAME:WEIGHT,...` (a missing weight is 1), e.g.
    `aesthetic:1.0,jpeg_compressibility:0.1`; each component's mean reward is logged in info under
    its name, and its own info under `NAME/KEY`. An option goes to every component that accepts it.
Options (the trainer's `reward_options=key=value,key=value`) are checked by `check` without building
any model; values may be strings, as they come from the command line.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ddpo_fast.prompts import load_function
from ddpo_fast.rewards import aesthetic as _aesthetic
from ddpo_fast.rewards import alignment as _alignment
from ddpo_fast.rewards import clipscore as _clipscore
from ddpo_fast.rewards import hpsv2 as _hpsv2
from ddpo_fast.rewards import imagereward as _imagereward
from ddpo_fast.rewards import pickscore as _pickscore
from ddpo_fast.rewards.jpeg import JPEG_QUALITY, jpeg_compressibility, jpeg_incompressibility, jpeg_sizes_kb
from ddpo_fast.rewards.shapes_alignment import shapes_alignment

__all__ = ["JPEG_QUALITY", "REWARDS", "RewardError", "RewardPool", "build", "check", "jpeg_compressibility",
           "jpeg_incompressibility", "jpeg_sizes_kb", "parse_options", "register_builder", "register_reward"]

RewardFn = Callable[[torch.Tensor, list, list], tuple]


@dataclass(frozen=True)
class _Builder:
    options: Callable[..., dict]  # takes the options as keywords, validates and converts them; builds nothing
    make: Callable[..., RewardFn]  # takes the validated options, returns the reward function


REWARDS: dict[str, RewardFn] = {}  # plain reward functions (no options) by name
_BUILDERS: dict[str, _Builder] = {}


def _no_options() -> dict:
    return {}


def register_reward(name: str):
    """Decorator registering a plain reward function (no options) under `name`."""
    def decorator(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        _BUILDERS[name] = _Builder(_no_options, lambda: fn)
        return fn
    return decorator


def register_builder(name: str, options: Callable[..., dict], make: Callable[..., RewardFn]) -> None:
    """Registers a reward with options: `options(**given)` validates them (its keyword parameters are
    the accepted options) and returns them converted; `make(**converted)` builds the reward function."""
    _BUILDERS[name] = _Builder(options, make)


register_reward("jpeg_compressibility")(jpeg_compressibility)
register_reward("jpeg_incompressibility")(jpeg_incompressibility)
register_reward("shapes_alignment")(shapes_alignment)
register_builder("aesthetic", _aesthetic.aesthetic_options, _aesthetic.AestheticReward)
register_builder("llava_bertscore", _alignment.llava_bertscore_options, _alignment.LlavaBertScoreReward)
register_builder("pickscore", _pickscore.pickscore_options, _pickscore.PickScoreReward)
register_builder("clipscore", _clipscore.clipscore_options, _clipscore.ClipScoreReward)
register_builder("hpsv2", _hpsv2.hpsv2_options, _hpsv2.HPSv2Reward)
register_builder("imagereward", _imagereward.imagereward_options, _imagereward.ImageRewardReward)


# ---- specs and options -------------------------------------------------------------------------
def parse_options(text: str) -> dict[str, str]:
    """`key=value,key=value` (the trainer's reward_options) -> {key: value}."""
    options: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"reward_options={text!r}: {item.strip()!r} is not of the form key=value")
        if key in options:
            raise ValueError(f"reward_options={text!r}: option {key!r} is given twice")
        options[key] = value.strip()
    return options


def _terms(spec: str) -> list[tuple[str, float | None]]:
    """The spec as (name, weight) terms; weight None for a single unweighted reward."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward={spec!r}: expected a reward name, module:function or NAME:WEIGHT,...")
    terms = []
    for raw in spec.split(","):
        term = raw.strip()
        if not term:
            raise ValueError(f"reward={spec!r}: empty term in the weighted sum")
        head, sep, tail = term.rpartition(":")
        weight = None
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                pass  # module:function
        if weight is not None:
            if not math.isfinite(weight):
                raise ValueError(f"reward={spec!r}: weight of {head.strip()!r} must be finite, got {tail!r}")
            term = head.strip()
        terms.append((term, weight))
    if len(terms) > 1:
        terms = [(name, 1.0 if weight is None else weight) for name, weight in terms]
    names = [name for name, _ in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward={spec!r}: {', '.join(duplicates)} appears more than once")
    return terms


def _builder(name: str, spec: str) -> _Builder:
    if name in _BUILDERS:
        return _BUILDERS[name]
    if ":" in name:
        fn = load_function(name, "reward")
        _check_signature(fn, name)
        return _Builder(_no_options, lambda: _UserReward(name, fn))
    raise ValueError(f"reward={spec!r}: unknown reward {name!r}; expected one of {', '.join(sorted(_BUILDERS))} "
                     "or module:function")


def _check_signature(fn, spec: str) -> None:
    """A user reward must accept (images, prompts, metadata)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: the first call will tell
        return
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise ValueError(f"reward={spec!r}: a reward function is called as fn(images, prompts, metadata), but "
                         f"{getattr(fn, '__name__', spec)}{signature} cannot take those three arguments") from None


def _accepted(builder: _Builder) -> list[str]:
    return list(inspect.signature(builder.options).parameters)


def _plan(spec: str, options: dict) -> list[tuple[str, float | None, _Builder, dict]]:
    """Resolves the spec and routes, validates and converts the options; builds no model."""
    plan, used = [], set()
    terms = _terms(spec)
    for name, weight in terms:
        builder = _builder(name, spec)
        accepted = _accepted(builder)
        mine = {k: v for k, v in options.items() if k in accepted}
        used |= mine.keys()
        plan.append((name, weight, builder, builder.options(**mine)))
    unknown = sorted(set(options) - used)
    if unknown:
        offered = {name: _accepted(b) for name, _, b, _ in plan}
        described = "; ".join(f"{n}: {', '.join(a) or 'none'}" for n, a in offered.items())
        raise ValueError(f"reward={spec!r}: unknown reward option {', '.join(map(repr, unknown))} "
                         f"(options accepted: {described})")
    return plan


def check(spec: str, **options) -> None:
    """Raises ValueError (naming the reward or option) if `build(spec, **options)` would fail on its
    arguments; imports user functions but builds no model."""
    _plan(spec, options)


def build(spec: str, **options) -> RewardFn:
    """The reward function for `spec` (a name, module:function or weighted sum) with its options."""
    plan = _plan(spec, options)
    if len(plan) == 1 and plan[0][1] is None:
        _, _, builder, converted = plan[0]
        return builder.make(**converted)
    return WeightedSum([(name, weight, builder.make(**converted)) for name, weight, builder, converted in plan])


# ---- calling rewards ------------------------------------------------------------------------------
class RewardError(RuntimeError):
    """A reward function raised or returned something other than (rewards (N,), info dict)."""


def _checked_call(fn: RewardFn, images: torch.Tensor, prompts: list, metadata: list,
                  name: str | None = None) -> tuple[torch.Tensor, dict]:
    """Calls a reward function and checks its answer: (float32 CPU tensor (N,), dict)."""
    name = name or getattr(fn, "__name__", type(fn).__name__)
    n = images.shape[0]
    try:
        result = fn(images, prompts, metadata)
    except RewardError:
        raise
    except Exception as e:  # the reward's own failure: say which reward and where
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise RewardError(f"reward {name} raised {type(e).__name__}: {e} (at {frame.filename}:{frame.lineno}, "
                          f"on a batch of {n} images)") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise RewardError(f"reward {name} must return (rewards, info), got {type(result).__name__}")
    rewards, info = result
    try:
        rewards = rewards if torch.is_tensor(rewards) else torch.as_tensor(np.asarray(rewards, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name} returned rewards that are not numbers ({e})") from None
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise RewardError(f"reward {name} returned rewards of dtype {rewards.dtype}; expected real numbers")
    if tuple(rewards.shape) not in ((n,), (n, 1)):
        raise RewardError(f"reward {name} returned rewards of shape {tuple(rewards.shape)} for {n} images; "
                          f"expected shape ({n},), one reward per image")
    if not isinstance(info or {}, dict):
        raise RewardError(f"reward {name} returned info of type {type(info).__name__}; expected a dict")
    return rewards.detach().float().cpu().reshape(-1), dict(info or {})


class _UserReward:
    """A module:function reward, its answer checked."""

    def __init__(self, spec: str, fn: RewardFn):
        self.__name__, self.fn = spec, fn
        self.thread_safe = getattr(fn, "thread_safe", False)

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        return _checked_call(self.fn, images, prompts, metadata, self.__name__)


class WeightedSum:
    """sum_i weight_i * reward_i; info holds each component's mean under its name and its info under NAME/KEY."""

    def __init__(self, components: list[tuple[str, float, RewardFn]]):
        self.components = components
        self.thread_safe = all(getattr(fn, "thread_safe", False) for _, _, fn in components)
        self.__name__ = ",".join(f"{name}:{weight:g}" for name, weight, _ in components)

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        total = torch.zeros(images.shape[0])
        info: dict = {}
        for name, weight, fn in self.components:
            rewards, part_info = _checked_call(fn, images, prompts, metadata)
            total += weight * rewards
            info[name] = float(rewards.mean())
            info.update({f"{name}/{key}": value for key, value in part_info.items()})
        return total, info


class RewardPool:
    """Computes rewards in background threads: `submit` returns a Future of (rewards (N,), info).

    The threads run with `device` as their current CUDA device (the current device is per thread: in a
    new thread it is cuda:0, whatever the rank). A reward function is called from one thread at a time
    unless it says it is thread-safe (`fn.thread_safe = True`, as the JPEG rewards and the reward
    server's client do): a model-backed reward shares one model, tokenizer and CUDA stream."""

    def __init__(self, fn: RewardFn, workers: int = 2, device: torch.device | None = None):
        self.fn = fn
        self.device = device
        self._lock = contextlib.nullcontext() if getattr(fn, "thread_safe", False) else threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward",
                                           initializer=self._enter_device)

    def _enter_device(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _call(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        with self._lock:
            return _checked_call(self.fn, images, prompts, metadata)

    def submit(self, images: torch.Tensor, prompts: list, metadata: list) -> Future:
        return self.executor.submit(self._call, images, prompts, metadata)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
