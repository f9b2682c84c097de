"""Where training and eval prompts come from: `shapes:SPLIT` (the shapes world, category-balanced) or a text file
with one prompt per line. Draws are a function of (seed, step) alone, so a resumed run sees the same prompts."""

from __future__ import annotations

import random
from pathlib import Path

from align_diffusion.world.data import balanced_prompts
from align_diffusion.world.prompts import split_prompts

SHAPES_PREFIX = "shapes:"


class PromptSource:
    def __init__(self, spec: str):
        self.spec = spec
        self.shapes_split = spec[len(SHAPES_PREFIX):] if spec.startswith(SHAPES_PREFIX) else None
        if self.shapes_split is not None:
            self.prompts = split_prompts(self.shapes_split)
        else:
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"prompts: {spec!r} is neither shapes:SPLIT nor a file")
            self.prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not self.prompts:
                raise ValueError(f"prompts: {spec} holds no prompt")

    def all(self) -> list[str]:
        return list(self.prompts)

    def draw(self, seed: int, step: int, count: int) -> list[str]:
        """`count` prompts for training step `step`: category-balanced for the shapes world, uniform otherwise."""
        rng = random.Random(seed * 1_000_003 + step)
        if self.shapes_split is not None:
            return balanced_prompts(self.shapes_split, count, rng)
        return [rng.choice(self.prompts) for _ in range(count)]
