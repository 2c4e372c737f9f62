"""A procedural, captioned data set of simple scenes: 1-4 coloured shapes on a light background.

    scenes = [random_scene(random.Random(i)) for i in range(16)]
    images = draw_scenes(scenes, seed=0)        # uint8 (16, 3, 64, 64)
    captions = [caption(s) for s in scenes]     # "a red circle", "three blue squares", ...

A scene is a list of groups (count, colour, shape): one group ("two red circles") or two groups of
different colour-shape pairs ("a blue square and a yellow triangle"), 1-4 shapes in all. Captions put
the count word first. Drawing is on tensors (coordinate masks), so a batch takes milliseconds, and it
is deterministic: the same scenes and seed give the same pixels.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import torch

RESOLUTION = 64
COLOURS = {  # RGB, saturated so that the judge separates them from the light backgrounds by saturation
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 195, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
NUMBER_OF = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
MAX_OBJECTS = 4
MIN_HALF_SIZE, MAX_HALF_SIZE = 5, 11  # pixels from a shape's centre to its bounding box's edge


class Group(NamedTuple):
    count: int
    colour: str
    shape: str


def check_group(group: Group) -> None:
    if group.count not in COUNT_WORDS:
        raise ValueError(f"count must be 1-{MAX_OBJECTS}, got {group.count!r}")
    if group.colour not in COLOURS:
        raise ValueError(f"colour must be one of {', '.join(COLOURS)}, got {group.colour!r}")
    if group.shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {group.shape!r}")


def caption(scene: list[Group]) -> str:
    """Plain English, count word first: 'a red circle', 'two blue squares and a yellow triangle'."""
    parts = []
    for g in scene:
        check_group(g)
        parts.append(f"{COUNT_WORDS[g.count]} {g.colour} {g.shape}{'s' if g.count > 1 else ''}")
    return " and ".join(parts)


def parse_caption(text: str) -> list[Group]:
    """The scene a caption asks for (the inverse of `caption`); ValueError if it is not of that form."""
    groups = []
    for part in text.strip().lower().split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] not in NUMBER_OF:
            raise ValueError(f"prompt {text!r}: expected 'COUNT COLOUR SHAPE[s]' parts joined by 'and', "
                             f"like 'two red circles and a blue square'")
        shape = words[2][:-1] if words[2].endswith("s") else words[2]
        group = Group(NUMBER_OF[words[0]], words[1], shape)
        try:
            check_group(group)
        except ValueError as e:
            raise ValueError(f"prompt {text!r}: {e}") from None
        groups.append(group)
    if sum(g.count for g in groups) > MAX_OBJECTS:
        raise ValueError(f"prompt {text!r}: more than {MAX_OBJECTS} shapes")
    return groups


def all_scenes() -> list[list[Group]]:
    """Every scene the generator can ask for (one group, or two groups of different colour-shape pairs)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    scenes = [[Group(n, c, s)] for n in COUNT_WORDS for c, s in pairs]
    for i, (c1, s1) in enumerate(pairs):
        for c2, s2 in pairs[i + 1:]:
            for n1 in range(1, MAX_OBJECTS):
                for n2 in range(1, MAX_OBJECTS + 1 - n1):
                    scenes.append([Group(n1, c1, s1), Group(n2, c2, s2)])
    return scenes


def caption_words() -> list[str]:
    """Every word a caption can hold (sorted)."""
    words = {"and"} | set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COUNT_WORDS.values())
    return sorted(words)


def random_scene(rng: random.Random) -> list[Group]:
    """Half the scenes one group, half two (more two-group scenes exist, but single ones teach counting)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if rng.random() < 0.5:
        c, s = rng.choice(pairs)
        return [Group(rng.randint(1, MAX_OBJECTS), c, s)]
    (c1, s1), (c2, s2) = rng.sample(pairs, 2)
    n1 = rng.randint(1, MAX_OBJECTS - 1)
    n2 = rng.randint(1, MAX_OBJECTS - n1)
    return [Group(n1, c1, s1), Group(n2, c2, s2)]


def _layout(n: int, rng: random.Random) -> list[tuple[float, float, float]]:
    """(x, y, half size) of n shapes whose bounding circles do not touch (smaller shapes when crowded)."""
    for attempt in range(200):
        largest = MAX_HALF_SIZE - (attempt // 40) - (n - 1)  # shrink when the shapes do not fit
        largest = max(MIN_HALF_SIZE, largest)
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _ in range(50):
                h = rng.uniform(MIN_HALF_SIZE, largest)
                x, y = rng.uniform(h + 1, RESOLUTION - 2 - h), rng.uniform(h + 1, RESOLUTION - 2 - h)
                if all((x - px) ** 2 + (y - py) ** 2 > (1.45 * (h + ph) + 3) ** 2 for px, py, ph in placed):
                    placed.append((x, y, h))
                    break
            else:
                break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not place {n} shapes")  # not reached for n <= 4 (tested)


def _mask(shape: str, x: float, y: float, h: float, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Pixels (centres at integer + 0.5) inside one shape of half size h centred at (x, y)."""
    dx, dy = xs - x, ys - y
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (dx.abs() <= h) & (dy.abs() <= h)
    # an upright isosceles triangle: base 2h at y + h, apex at y - h; |dx| <= (dy + h) / 2
    return (dy <= h) & (2 * dx.abs() <= dy + h)


def draw_scene(scene: list[Group], rng: random.Random) -> torch.Tensor:
    """One uint8 (3, 64, 64) image of `scene`, positions, sizes and background drawn from rng."""
    coords = torch.arange(RESOLUTION, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    background = [rng.randint(205, 250) for _ in range(3)]
    image = torch.tensor(background, dtype=torch.uint8).view(3, 1, 1).repeat(1, RESOLUTION, RESOLUTION)
    items = [(g.colour, g.shape) for g in scene for _ in range(g.count)]
    rng.shuffle(items)
    for (colour, shape), (x, y, h) in zip(items, _layout(len(items), rng)):
        mask = _mask(shape, x, y, h, xs, ys)
        jitter = [max(0, min(255, v + rng.randint(-12, 12))) for v in COLOURS[colour]]  # small shade changes
        image[:, mask] = torch.tensor(jitter, dtype=torch.uint8).view(3, 1)
    return image


def draw_scenes(scenes: list[list[Group]], seed: int) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) images of `scenes`; image i depends only on (seed, i, scenes[i])."""
    return torch.stack([draw_scene(s, random.Random(f"{seed}/{i}")) for i, s in enumerate(scenes)])


def batch(seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """n random scenes: images (n, 3, 64, 64) uint8 and their captions, a function of (seed, n) only."""
    rng = random.Random(f"scenes/{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    return draw_scenes(scenes, seed), [caption(s) for s in scenes]
