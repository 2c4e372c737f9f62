"""Prompt sources: the paper's sets, a text file (`file:PATH`), or a user function (`module:function`).

A prompt function takes a `random.Random` and returns (prompt, metadata dict). Each rank draws from
its own seeded generator, so ranks sample different prompts and a resumed run draws the same ones.
"""
from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from pathlib import Path

from ddpo_fast import shapes as _shapes

PromptFn = Callable[[random.Random], tuple[str, dict]]

# A small set for quick runs and the tiny model.
SIMPLE_ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat"]

# 45 common animals (the paper's aesthetic-quality prompt set is of this kind).
COMMON_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark",
    "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee",
    "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]

# Prompt-image alignment: an animal doing an activity (the paper uses the same construction).
ACTIVITY_ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow",
                    "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly"]
ACTIVITIES = ["riding a bike", "playing chess", "washing the dishes"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _choice_fn(prompts: list[str]) -> PromptFn:
    def fn(rng: random.Random) -> tuple[str, dict]:
        return rng.choice(prompts), {}
    return fn


def animal_activities(rng: random.Random) -> tuple[str, dict]:
    animal, activity = rng.choice(ACTIVITY_ANIMALS), rng.choice(ACTIVITIES)
    return f"{_article(animal)} {animal} {activity}", {"animal": animal, "activity": activity}


# The shapes model's captions. Held out from `shapes` (for generalisation, as the paper's unseen
# animals): every scene with one of these colour-shape pairs. The pretraining data has them all, so
# the held-out set asks whether what RL teaches (counting, colours) carries over to pairs it never saw.
HELD_OUT_PAIRS = (("green", "triangle"), ("yellow", "circle"), ("red", "square"))


def _shape_captions(held_out: bool, groups: int) -> list[str]:
    return [_shapes.caption(scene) for scene in _shapes.all_scenes()
            if len(scene) == groups and any((g.colour, g.shape) in HELD_OUT_PAIRS for g in scene) == held_out]


def _shapes_fn(held_out: bool) -> PromptFn:
    """Half one-group captions ("three red circles"), half two-group ones, as in the pretraining data
    (two-group captions are ten times as many)."""
    by_groups = {1: _shape_captions(held_out, 1), 2: _shape_captions(held_out, 2)}

    def fn(rng: random.Random) -> tuple[str, dict]:
        groups = 1 if rng.random() < 0.5 else 2
        return rng.choice(by_groups[groups]), {}
    return fn


PROMPT_SETS: dict[str, PromptFn] = {
    "simple_animals": _choice_fn(SIMPLE_ANIMALS),
    "common_animals": _choice_fn(COMMON_ANIMALS),
    "animal_activities": animal_activities,
    "shapes": _shapes_fn(held_out=False),
    "shapes_heldout": _shapes_fn(held_out=True),
}


def all_prompt_words() -> list[str]:
    """Every word of the animal sets (the tiny tokenizer gives each one a token; the shapes model's
    tokenizer has its own words, `shapes.caption_words`)."""
    words = set(COMMON_ANIMALS) | set(SIMPLE_ANIMALS) | set(ACTIVITY_ANIMALS) | {"a", "an"}
    for activity in ACTIVITIES:
        words.update(activity.split())
    return sorted(words)


def load_function(spec: str, what: str):
    """Imports `module:function`; errors name the config key `what`."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"{what}={spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what}={spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{what}={spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def get_prompt_fn(spec: str) -> PromptFn:
    """Resolves the `prompts` config value."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]
    if spec.startswith("file:"):
        path = Path(spec[len("file:"):])
        if not path.is_file():
            raise ValueError(f"prompts={spec!r}: no such file {str(path)!r}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"prompts={spec!r}: the file has no prompts (one per line)")
        return _choice_fn(prompts)
    if ":" in spec:
        return load_function(spec, "prompts")
    raise ValueError(f"prompts={spec!r}: expected one of {', '.join(PROMPT_SETS)}, file:PATH or module:function")


def check_prompt_fn(spec: str) -> None:
    """Resolves `prompts` and draws one prompt, so that a wrong function fails before any model is built."""
    fn = get_prompt_fn(spec)
    try:
        result = fn(random.Random(0))
    except Exception as e:  # the user's function: any error
        raise ValueError(f"prompts={spec!r}: calling it with a random.Random raised {type(e).__name__}: {e} "
                         "(a prompt function takes a random.Random and returns (prompt, metadata dict))") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
            and isinstance(result[1], dict)):
        raise ValueError(f"prompts={spec!r}: returned {result!r:.80}; a prompt function returns "
                         "(prompt string, metadata dict)")

