"""The fixed specification of the shapes world: canvas, palette, shapes, prompt grammar.

Images are judged from this spec alone, so the numbers here are the contract; everything else in the world
package (rendering, prompts, ShapesEval) derives from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CANVAS = 64
BACKGROUND = (24, 24, 24)
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 220),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE = 12, 20  # bounding-box side in pixels
MIN_GAP = 2  # pixels between bounding boxes
MIN_RELATION_OFFSET = 8  # pixels between centroids along the relation's axis
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "colors", "counting", "two_object", "color_attr", "position")


@dataclass(frozen=True)
class Wanted:
    """One object a prompt asks for; color None means any color."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class Requirement:
    """What an image must hold to be correct for a prompt: exactly these objects (and the relation, if any)."""

    category: str
    objects: tuple[Wanted, ...]
    relation: str | None = None  # position: objects[0] {relation} objects[1]


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_FORMS = {
    "single_object": rf"a (?P<shape>{_SHAPE})",
    "colors": rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE})",
    "counting": rf"(?P<number>{'|'.join(NUMBERS)}) (?P<shape>{_SHAPE})s",
    "two_object": rf"a (?P<shape>{_SHAPE}) and a (?P<shape2>{_SHAPE})",
    "color_attr": rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) and a (?P<color2>{_COLOR}) (?P<shape2>{_SHAPE})",
    "position": rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) (?P<relation>{'|'.join(RELATIONS)}) "
    rf"a (?P<color2>{_COLOR}) (?P<shape2>{_SHAPE})",
}


def parse_prompt(prompt: str) -> Requirement:
    """The requirement a world prompt states; ValueError for text outside the grammar."""
    for category, form in _FORMS.items():
        match = re.fullmatch(form, prompt)
        if match is None:
            continue
        g = match.groupdict()
        if category == "counting":
            return Requirement(category, (Wanted(g["shape"]),) * NUMBERS[g["number"]])
        first = Wanted(g["shape"], g.get("color"))
        if "shape2" not in g:
            return Requirement(category, (first,))
        second = Wanted(g["shape2"], g.get("color2"))
        if category in ("two_object", "color_attr") and g["shape"] == g["shape2"]:
            break
        if category == "color_attr" and g["color"] == g["color2"]:
            break
        if category == "position" and first == second:
            break
        return Requirement(category, (first, second), g.get("relation"))
    raise ValueError(f"not a shapes-world prompt: {prompt!r}")
