"""Training data for the world's models: category-balanced prompts and their renders, as tensors."""

from __future__ import annotations

import random

import numpy as np
import torch

from align_diffusion.world.prompts import splits
from align_diffusion.world.render import Layout, render_prompt
from align_diffusion.world.spec import CATEGORIES, COLORS, NUMBERS, RELATIONS, SHAPES

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
WORDS = sorted(
    {"a", "and", "of", "left", "right", "above", "below", *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS}
    | {word for relation in RELATIONS for word in relation.split()}
)


def balanced_prompts(split: str, count: int, rng: random.Random, split_seed: int = 0) -> list[str]:
    """`count` prompts of a split: a uniformly drawn category, then a uniformly drawn prompt of it."""
    by_category = splits(split_seed)[split]
    return [rng.choice(by_category[rng.choice(CATEGORIES)]) for _ in range(count)]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC renders to a float (B, 3, H, W) batch in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_batch(prompts: list[str], rng: random.Random, layout: Layout = Layout()) -> torch.Tensor:
    """One fresh render per prompt, in [-1, 1]."""
    return to_tensor([render_prompt(p, rng.getrandbits(32), layout) for p in prompts])
