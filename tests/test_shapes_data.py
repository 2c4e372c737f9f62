"""The procedural shapes data set: captions, determinism, and the pixels it draws."""
import random

import pytest
import torch

from ddpo_fast import shapes
from ddpo_fast.shapes import Group


def test_captions_count_word_first_and_parse_back():
    assert shapes.caption([Group(1, "red", "circle")]) == "a red circle"
    assert shapes.caption([Group(3, "red", "circle")]) == "three red circles"
    assert shapes.caption([Group(1, "blue", "square"), Group(1, "yellow", "triangle")]) == \
        "a blue square and a yellow triangle"
    for scene in shapes.all_scenes():
        assert shapes.parse_caption(shapes.caption(scene)) == scene


@pytest.mark.parametrize("text, words", [
    ("a purple circle", "colour"), ("five red circles", "COUNT"), ("a red hexagon", "shape"),
    ("three red circles and two blue squares", "more than 4"), ("red circles", "COUNT"),
])
def test_bad_captions_name_the_problem(text, words):
    with pytest.raises(ValueError, match=words):
        shapes.parse_caption(text)


def test_deterministic_and_varied():
    a, caps_a = shapes.batch(3, 24)
    b, caps_b = shapes.batch(3, 24)
    c, _ = shapes.batch(4, 24)
    assert torch.equal(a, b) and caps_a == caps_b
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == (24, 3, 64, 64)
    assert len(set(caps_a)) > 12


def test_drawn_pixels_match_the_scene():
    # Count pixels of each shape colour: a square of half size h covers about (2h)^2 pixels, so every
    # requested colour is there, no other colour is, and the background (corners) is light.
    for i, scene in enumerate(shapes.all_scenes()[::7]):
        image = shapes.draw_scene(scene, random.Random(i)).int()
        for colour, rgb in shapes.COLOURS.items():
            near = ((image - torch.tensor(rgb).view(3, 1, 1)).abs().amax(0) <= 12).sum()
            wanted = sum(g.count for g in scene if g.colour == colour)
            if wanted:
                assert near >= wanted * 25, (scene, colour, near)
            else:
                assert near == 0, (scene, colour, near)
        assert image[:, 0, 0].min() >= 205


def test_every_count_fits():
    rng = random.Random(0)
    for _ in range(300):  # four shapes of any size always find room
        shapes.draw_scene([Group(4, "green", "square")], rng)
