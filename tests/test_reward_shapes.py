"""The shapes_alignment judge, on images drawn by the shapes generator (the answers are known)."""
import random

import pytest
import torch

from ddpo_fast import rewards, shapes
from ddpo_fast.prompts import HELD_OUT_PAIRS, PROMPT_SETS
from ddpo_fast.rewards.shapes_alignment import connected_components, find_shapes, judge, shapes_alignment
from ddpo_fast.shapes import Group


def _draw(scene, seed=0):
    return shapes.draw_scene(scene, random.Random(seed)).unsqueeze(0)


def test_reads_generated_scenes_exactly():
    scenes = shapes.all_scenes()[::5]  # every count, colour and shape, one and two groups
    images = shapes.draw_scenes(scenes, seed=5)
    for scene, seen in zip(scenes, find_shapes(images)):
        wanted = sorted((g.colour, g.shape) for g in scene for _ in range(g.count))
        assert sorted((c, s) for c, s, _ in seen) == wanted
    scores, info = shapes_alignment(images, [shapes.caption(s) for s in scenes], [{}] * len(scenes))
    assert torch.equal(scores, torch.ones(len(scenes)))
    assert info["all_met"] == 1.0 and info["unmet"][0] == "-"


def test_partial_credit_counts_requests():
    image = _draw([Group(2, "red", "circle")])
    # asked: three red circles -> colour and shape met, count and total not: 2 of 4
    scores, info = shapes_alignment(image, ["three red circles"], [{}])
    assert scores.item() == pytest.approx(0.5)
    assert info["found"] == ["2 red circle"] and info["unmet"] == ["3 red circle: count, total"]
    # asked: two red squares -> colour and total met
    assert shapes_alignment(image, ["two red squares"], [{}])[0].item() == pytest.approx(0.5)
    # asked: two blue circles -> only the total
    assert shapes_alignment(image, ["two blue circles"], [{}])[0].item() == pytest.approx(0.25)
    # two groups: 7 requests; the blue square is missing: colour, shape, count of it, and the total
    met = judge("two red circles and a blue square", find_shapes(image)[0])
    assert sum(met.values()) == 3 and len(met) == 7


def test_blank_and_noisy_images():
    blank = torch.full((1, 3, 64, 64), 230, dtype=torch.uint8)
    assert shapes_alignment(blank, ["a red circle"], [{}])[0].item() == 0.0
    speckle = blank.clone()
    speckle[0, :, ::9, ::9] = torch.tensor([215, 35, 35], dtype=torch.uint8).view(3, 1, 1)  # single red pixels: noise
    assert find_shapes(speckle) == [[]]
    smear = blank.clone()
    for k in range(40):  # a thick diagonal stroke: red, large, like no shape
        smear[0, :, 10 + k, 10 + k:14 + k] = torch.tensor([215, 35, 35], dtype=torch.uint8).view(3, 1)
    assert [s[:2] for s in find_shapes(smear)[0]] == [("red", "blob")]
    scores, info = shapes_alignment(smear, ["a red circle"], [{}])
    assert scores.item() == 0.25 and info["unmet"] == ["1 red circle: colour, 1 red circle: shape, 1 red circle: count"]


def test_connected_components_against_known_labels():
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, 0:2, 0:2] = True
    m[0, 2, 2] = True  # touches the first block diagonally: 8-connected
    m[0, 4:6, 4] = True
    labels = connected_components(m)[0]
    assert labels[0, 0] == labels[2, 2] != labels[4, 4] == labels[5, 4]
    assert (labels > 0).sum() == 7 and len(labels.unique()) == 3


def test_errors_name_the_problem():
    image = _draw([Group(1, "red", "circle")])
    with pytest.raises(ValueError, match="prompt 'a purple circle'"):
        shapes_alignment(image, ["a purple circle"], [{}])
    with pytest.raises(ValueError, match="uint8"):
        shapes_alignment(image.float(), ["a red circle"], [{}])
    with pytest.raises(rewards.RewardError, match="shapes_alignment"):
        rewards.RewardPool(rewards.build("shapes_alignment"), workers=1).submit(image, ["a cat"], [{}]).result()


def test_prompt_sets_split_colour_shape_pairs():
    rng = random.Random(0)
    draws = [PROMPT_SETS["shapes"](rng)[0] for _ in range(400)]
    train, held = set(draws), {PROMPT_SETS["shapes_heldout"](rng)[0] for _ in range(400)}
    assert train and held and not train & held
    def pairs(prompts):
        return {(g.colour, g.shape) for p in prompts for g in shapes.parse_caption(p)}
    assert not pairs(train) & set(HELD_OUT_PAIRS)
    assert all(any((g.colour, g.shape) in HELD_OUT_PAIRS for g in shapes.parse_caption(p)) for p in held)
    assert 0.4 < sum(" and " not in p for p in draws) / len(draws) < 0.6  # one-group captions are not drowned out
