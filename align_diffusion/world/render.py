"""Scenes of the shapes world: random layouts that satisfy a prompt, rendered to exact-palette 64×64 images."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from align_diffusion.world.spec import (
    BACKGROUND,
    CANVAS,
    COLORS,
    MAX_SIDE,
    MIN_GAP,
    MIN_RELATION_OFFSET,
    MIN_SIDE,
    Requirement,
    parse_prompt,
)


@dataclass(frozen=True)
class Placed:
    """An object on the canvas: its bounding box is [x, x + side) × [y, y + side)."""

    shape: str
    color: str
    x: int
    y: int
    side: int

    @property
    def center(self) -> tuple[float, float]:
        """Centroid of the rendered pixels (a triangle's sits lower than its box's middle)."""
        ys, xs = np.nonzero(self.mask())
        return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5

    def mask(self) -> np.ndarray:
        """Pixels whose centers fall inside the shape, as a (CANVAS, CANVAS) bool array."""
        ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
        dx, dy = xs - self.x, ys - self.y
        inside_box = (dx >= 0) & (dx < self.side) & (dy >= 0) & (dy < self.side)
        if self.shape == "square":
            return inside_box
        if self.shape == "circle":
            return (dx - self.side / 2) ** 2 + (dy - self.side / 2) ** 2 <= (self.side / 2) ** 2
        # triangle: apex at the top middle, flat base at the bottom, width = height
        return inside_box & (np.abs(dx - self.side / 2) <= dy / 2)


def render(objects: list[Placed]) -> np.ndarray:
    """A (CANVAS, CANVAS, 3) uint8 image of the objects on the background."""
    image = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        image[obj.mask()] = COLORS[obj.color]
    return image


def _apart(a: Placed, b: Placed) -> bool:
    return (
        a.x + a.side + MIN_GAP <= b.x
        or b.x + b.side + MIN_GAP <= a.x
        or a.y + a.side + MIN_GAP <= b.y
        or b.y + b.side + MIN_GAP <= a.y
    )


def relation_holds(a, b, relation: str, min_offset: float = MIN_RELATION_OFFSET) -> bool:
    """Whether a is {relation} b (Placed objects or (x, y) centroids), with centroids `min_offset` px apart
    along that axis."""
    (ax, ay), (bx, by) = (p.center if isinstance(p, Placed) else p for p in (a, b))
    offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
    return offset >= min_offset


@dataclass(frozen=True)
class Layout:
    """Where sample_scene may put objects: sides drawn from [min_side, max_side], box corners on multiples of
    `grid` pixels. The default is the whole spec; the generators train on a narrower, still correct layout."""

    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    grid: int = 1

    def __post_init__(self):
        if not MIN_SIDE <= self.min_side <= self.max_side <= MAX_SIDE:
            raise ValueError(f"Layout sides must satisfy {MIN_SIDE} <= min_side <= max_side <= {MAX_SIDE}, got "
                             f"min_side={self.min_side}, max_side={self.max_side}")
        if self.grid < 1:
            raise ValueError(f"Layout grid must be >= 1 pixel, got {self.grid}")


def sample_scene(requirement: Requirement, rng: random.Random, max_tries: int = 1000,
                 layout: Layout = Layout()) -> list[Placed]:
    """A random layout holding exactly the required objects (any color where none is named)."""
    for _ in range(max_tries):
        objects: list[Placed] = []
        for wanted in requirement.objects:
            side = rng.randint(layout.min_side, layout.max_side)
            candidate = Placed(
                wanted.shape,
                wanted.color or rng.choice(list(COLORS)),
                rng.randrange(0, CANVAS - side + 1, layout.grid),
                rng.randrange(0, CANVAS - side + 1, layout.grid),
                side,
            )
            if not all(_apart(candidate, other) for other in objects):
                break
            objects.append(candidate)
        else:
            # One pixel of margin beyond the spec's offset, so mild blur cannot move a correct image out of it.
            if requirement.relation is None or relation_holds(
                objects[0], objects[1], requirement.relation, MIN_RELATION_OFFSET + 1
            ):
                return objects
    raise RuntimeError(f"no layout found for {requirement} in {max_tries} tries")


def render_prompt(prompt: str, seed: int, layout: Layout = Layout()) -> np.ndarray:
    """A correct image for `prompt`, deterministic in `seed`."""
    return render(sample_scene(parse_prompt(prompt), random.Random(seed), layout=layout))
