"""Every prompt of the shapes world, and the train / val / test splits.

The test split holds combinations that no training prompt names: held-out color–shape pairs, count–shape pairs and
(relation, shape, shape) triples. Training images may still show, say, a red triangle (under "a triangle" or "two
triangles"); they never say so, so the base model has to generalize. Its two_object prompts' ordered shape pairs are
held out from two_object prompts only: color_attr training prompts name them, in the same order, with colors
(README: the weaker held-out kinds). (The generators' text encoder, the world CLIP's text tower, was trained on
renders of every split's prompts: assets/README.md.)
"""

from __future__ import annotations

import functools
import itertools
import random

from align_diffusion.world.spec import COLORS, NUMBERS, RELATIONS, SHAPES, parse_prompt

HELD_OUT_COLOR_SHAPE = {
    ("red", "triangle"), ("green", "square"), ("blue", "circle"),
    ("yellow", "circle"), ("purple", "triangle"), ("white", "square"),
}
HELD_OUT_COUNT_SHAPE = {("four", "circle"), ("three", "triangle"), ("two", "square")}
HELD_OUT_SHAPE_PAIRS = {("triangle", "circle"), ("square", "triangle")}  # from two_object prompts only
HELD_OUT_RELATIONS = {
    ("left of", "circle", "square"), ("right of", "triangle", "circle"),
    ("above", "square", "triangle"), ("below", "circle", "triangle"),
    ("above", "triangle", "circle"), ("left of", "square", "square"),
}
TEST_PROMPTS_PER_CATEGORY = 12
VAL_PROMPTS_PER_CATEGORY = 8


def all_prompts() -> dict[str, list[str]]:
    """Every prompt of the grammar, by category."""
    colors, pairs = list(COLORS), list(itertools.permutations(SHAPES, 2))
    color_pairs = list(itertools.permutations(colors, 2))
    return {
        "single_object": [f"a {s}" for s in SHAPES],
        "colors": [f"a {c} {s}" for c in colors for s in SHAPES],
        "counting": [f"{n} {s}s" for n in NUMBERS for s in SHAPES],
        "two_object": [f"a {s} and a {s2}" for s, s2 in pairs],
        "color_attr": [f"a {c} {s} and a {c2} {s2}" for c, c2 in color_pairs for s, s2 in pairs],
        "position": [
            f"a {c} {s} {r} a {c2} {s2}"
            for r in RELATIONS
            for c in colors
            for s in SHAPES
            for c2 in colors
            for s2 in SHAPES
            if (c, s) != (c2, s2)
        ],
    }


def is_held_out(prompt: str) -> bool:
    """Whether the prompt names a combination reserved for the test split."""
    requirement = parse_prompt(prompt)
    objects = requirement.objects
    if requirement.category == "counting":
        number = {v: k for k, v in NUMBERS.items()}[len(objects)]
        return (number, objects[0].shape) in HELD_OUT_COUNT_SHAPE
    if requirement.category == "two_object":
        return (objects[0].shape, objects[1].shape) in HELD_OUT_SHAPE_PAIRS
    if any((o.color, o.shape) in HELD_OUT_COLOR_SHAPE for o in objects):
        return True
    if requirement.category == "position":
        return (requirement.relation, objects[0].shape, objects[1].shape) in HELD_OUT_RELATIONS
    return False


@functools.cache
def splits(seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """{"train" | "val" | "test": {category: prompts}}, deterministic in `seed`.

    train: every prompt that names no held-out combination. val: a sample of those (the training distribution,
    for monitoring). test: held-out prompts, at most TEST_PROMPTS_PER_CATEGORY per category; single_object has no
    combination to hold out, so its three prompts appear in every split. Cached (training draws from it every
    step): treat the result as read-only.
    """
    rng = random.Random(seed)
    result = {"train": {}, "val": {}, "test": {}}
    for category, prompts in all_prompts().items():
        seen = [p for p in prompts if category == "single_object" or not is_held_out(p)]
        unseen = prompts if category == "single_object" else [p for p in prompts if is_held_out(p)]
        result["train"][category] = seen
        result["val"][category] = sorted(rng.sample(seen, min(VAL_PROMPTS_PER_CATEGORY, len(seen))))
        result["test"][category] = sorted(rng.sample(unseen, min(TEST_PROMPTS_PER_CATEGORY, len(unseen))))
    return result


def split_prompts(split: str, seed: int = 0) -> list[str]:
    """The prompts of one split, category by category."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return [p for prompts in splits(seed)[split].values() for p in prompts]
