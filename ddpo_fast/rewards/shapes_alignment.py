"""`shapes_alignment`: a programmatic judge of prompt-image alignment for the shapes model, the paper's
alignment task in miniature (there a VLM describes the image; here pixels are read directly).

Reading an image (all on tensors): a pixel belongs to a shape when it is saturated (max - min channel
>= 80 of 255; the backgrounds are light and greyish), and its colour is the nearest hue (red 0,
yellow 49, green 129, blue 228 degrees). Each colour's pixels split into 8-connected components;
components under MIN_AREA pixels are noise. A component's shape is whichever of a square, a circle
and an upright triangle, each fitted to its bounding box, it overlaps best; one that overlaps none of
them well (random weights' speckle, smears) is a "blob": it meets no colour or shape request, but it
counts against the total.

Scoring: the prompt ("two red circles and a blue square", the captions of `ddpo_fast.shapes`) makes
requests: per group, its colour is present, a component of that colour has the shape, and the number
of such components is the count; and the image holds no more and no fewer shapes than asked for in
all. The reward is the fraction of requests met, in [0, 1]. Info: per image, what was found and which
requests were met; per batch, the accuracy of each kind of request.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpo_fast import shapes

MIN_SATURATION = 80  # of 255: the shapes have ~180, the generator's backgrounds at most 45
MIN_AREA = 30  # pixels; the generator's smallest shape (a triangle of half size 5) has ~50, speckle less
MIN_IOU = 0.6  # a component overlapping no shape template this well is a blob (the generator's shapes: >= 0.8)
HUES = {"red": 0.0, "yellow": 49.0, "green": 129.0, "blue": 228.0}


def hue_degrees(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in [0, 360) of float (N, 3, H, W) pixels (HSV's hexagonal hue)."""
    r, g, b = rgb.unbind(1)
    mx, mn = rgb.amax(1), rgb.amin(1)
    delta = (mx - mn).clamp_min(1e-6)
    hue = torch.where(mx == r, ((g - b) / delta) % 6, torch.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return hue * 60.0


def colour_masks(images: torch.Tensor) -> torch.Tensor:
    """bool (N, C, H, W): the pixels of each colour of HUES, in its order."""
    rgb = images.float()
    saturated = (rgb.amax(1) - rgb.amin(1)) >= MIN_SATURATION
    hue = hue_degrees(rgb)
    centres = torch.tensor(list(HUES.values()))
    distance = (hue.unsqueeze(1) - centres.view(1, -1, 1, 1)).abs()
    distance = torch.minimum(distance, 360.0 - distance)  # hue is circular
    nearest = distance.argmin(1)
    return torch.stack([saturated & (nearest == i) for i in range(len(HUES))], 1)


def connected_components(masks: torch.Tensor) -> torch.Tensor:
    """int64 labels (same shape as the bool (..., H, W) masks): 0 off the mask, else one label per 8-connected
    component (the largest pixel index + 1 in it), by propagating the maximum over 3x3 neighbourhoods."""
    shape = masks.shape
    m = masks.reshape(-1, 1, *shape[-2:])
    index = torch.arange(1, m[0].numel() + 1, dtype=torch.float32).view(1, 1, *shape[-2:])
    labels = torch.where(m, index, torch.zeros(()))
    while True:
        grown = torch.where(m, F.max_pool2d(labels, 3, stride=1, padding=1), torch.zeros(()))
        if torch.equal(grown, labels):
            return labels.long().reshape(shape)
        labels = grown


def _templates(h: int, w: int) -> dict[str, torch.Tensor]:
    """The ideal square, circle (ellipse) and upright triangle filling an h x w box, on its pixel grid.
    The box is taken half a pixel wider on each side: a drawn shape's extent reaches past its outermost
    pixel centres (without this a circle of 11 pixels across looks like a rounded square)."""
    v = ((torch.arange(h, dtype=torch.float32) + 1.0) / (h + 1)).view(-1, 1)
    u = ((torch.arange(w, dtype=torch.float32) + 1.0) / (w + 1)).view(1, -1)
    return {
        "square": torch.ones(h, w, dtype=torch.bool),
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": (u - 0.5).abs() <= v / 2,
    }


def classify(component: torch.Tensor) -> tuple[str, float]:
    """(shape, IoU): the shape whose template, fitted to the component's bounding box, overlaps it best
    (intersection over union; robust to the pixel grid, where a small circle fills most of its box)."""
    rows, cols = component.any(1).nonzero(), component.any(0).nonzero()
    crop = component[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    best, best_iou = "square", -1.0
    for name, template in _templates(*crop.shape).items():
        iou = (crop & template).sum().item() / max(1, (crop | template).sum().item())
        if iou > best_iou:
            best, best_iou = name, iou
    return best, best_iou


def find_shapes(images: torch.Tensor) -> list[list[tuple[str, str, int]]]:
    """Per image, the shapes seen: (colour, shape, area in pixels), components under MIN_AREA left out.
    A component like none of the shapes (best IoU under MIN_IOU: noise, smears) has shape "blob"."""
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    labels = connected_components(colour_masks(images.cpu()))
    colours = list(HUES)
    found: list[list[tuple[str, str, int]]] = []
    for image_labels in labels:
        seen = []
        for colour, label_map in zip(colours, image_labels):
            ids, areas = torch.unique(label_map, return_counts=True)
            for label, area in zip(ids.tolist(), areas.tolist()):
                if label == 0 or area < MIN_AREA:
                    continue
                shape, iou = classify(label_map == label)
                seen.append((colour, shape if iou >= MIN_IOU else "blob", area))
        found.append(seen)
    return found


def judge(prompt: str, seen: list[tuple[str, str, int]]) -> dict[str, bool]:
    """The prompt's requests and whether the shapes seen meet each: `N COLOUR SHAPE: colour|shape|count`, `total`."""
    groups = shapes.parse_caption(prompt)
    met = {}
    for g in groups:
        of_colour = [s for s in seen if s[0] == g.colour and s[1] != "blob"]
        matching = [s for s in of_colour if s[1] == g.shape]
        name = f"{g.count} {g.colour} {g.shape}"
        met[f"{name}: colour"] = bool(of_colour)
        met[f"{name}: shape"] = bool(matching)
        met[f"{name}: count"] = len(matching) == g.count
    met["total"] = len(seen) == sum(g.count for g in groups)
    return met


def describe(seen: list[tuple[str, str, int]]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for colour, shape, _ in seen:
        counts[(colour, shape)] = counts.get((colour, shape), 0) + 1
    return ", ".join(f"{n} {c} {s}" for (c, s), n in sorted(counts.items())) or "nothing"


def shapes_alignment(images: torch.Tensor, prompts: list, metadata: list):
    """Reward = fraction of the prompt's requests the image meets (see the module docstring)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: {len(prompts)} prompts for {images.shape[0]} images")
    found = find_shapes(images)
    scores, met_all = [], []
    for prompt, seen in zip(prompts, found):
        met = judge(prompt, seen)
        met_all.append(met)
        scores.append(sum(met.values()) / len(met))

    def accuracy(kind: str) -> float:
        values = [v for met in met_all for k, v in met.items() if k.endswith(kind)]
        return sum(values) / len(values)

    info = {
        "found": [describe(seen) for seen in found],
        "unmet": [", ".join(k for k, v in met.items() if not v) or "-" for met in met_all],
        "colour_accuracy": accuracy(": colour"), "shape_accuracy": accuracy(": shape"),
        "count_accuracy": accuracy(": count"), "total_accuracy": accuracy("total"),
        "all_met": sum(all(met.values()) for met in met_all) / len(met_all),
    }
    return torch.tensor(scores, dtype=torch.float32), info


shapes_alignment.thread_safe = True  # a pure function of its inputs
