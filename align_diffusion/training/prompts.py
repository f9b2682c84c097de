"""Where training and eval prompts come from: `shapes:SPLIT` (the shapes world, category-balanced) or a text file
with one prompt per line; and reference images for trainable rewards. Draws are a function of (seed, step) alone,
so a resumed run sees the same prompts and references."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from align_diffusion.files import files_sha256, home_expanded
from align_diffusion.rewards.base import eight_bit
from align_diffusion.world.data import balanced_prompts
from align_diffusion.world.prompts import split_prompts
from align_diffusion.world.render import render_prompt
from align_diffusion.world.spec import parse_prompt

SHAPES_PREFIX = "shapes:"


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file (a byte-order mark dropped), blank lines skipped; ValueError naming
    the file when it is no UTF-8 text or holds no prompt."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from None
    prompts = [line.strip() for line in text.split("\n") if line.strip()]  # not splitlines: U+2028 in a prompt
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


class PromptSource:
    def __init__(self, spec: str, field: str = "prompts"):
        """Prompts from `spec`; errors name the config `field` it came from."""
        self.spec = spec
        self.shapes_split = spec[len(SHAPES_PREFIX):] if spec.startswith(SHAPES_PREFIX) else None
        if self.shapes_split is not None:
            try:
                self.prompts = split_prompts(self.shapes_split)
            except ValueError as error:
                raise ValueError(f"{field}: {spec!r}: {error}") from None
        else:
            path = Path(home_expanded(spec))
            if not path.is_file():
                raise FileNotFoundError(f"{field}: {spec!r} is neither shapes:SPLIT nor a file")
            try:
                self.prompts = read_prompt_file(path)
            except ValueError as error:
                raise ValueError(f"{field}: {error}") from None

    def all(self) -> list[str]:
        return list(self.prompts)

    def draw(self, seed: int, step: int, count: int) -> list[str]:
        """`count` prompts for training step `step`: category-balanced for the shapes world, uniform otherwise."""
        rng = random.Random(seed * 1_000_003 + step)
        if self.shapes_split is not None:
            return balanced_prompts(self.shapes_split, count, rng)
        return [rng.choice(self.prompts) for _ in range(count)]


class ReferenceSource:
    """Reference images for trainable rewards (Adv-GRPO's discriminator): `shapes` renders each prompt correctly
    (the shapes world), a folder gives images drawn from it. Draws are a function of (seed, step) alone."""

    def __init__(self, spec: str):
        """ValueError, naming the config's `references`, for a folder without images, or of images of several sizes
        (a draw is one batch)."""
        self.spec = spec
        self.folder = None if spec == "shapes" else Path(spec)
        if self.folder is not None:
            suffixes = {".png", ".jpg", ".jpeg", ".webp"}
            self.files = sorted(p for p in self.folder.glob("*") if p.suffix.lower() in suffixes) \
                if self.folder.is_dir() else []
            if not self.files:
                raise ValueError(f"references: {spec!r} is neither 'shapes' nor a folder holding images")
            sizes = {}
            for path in self.files:
                try:
                    with Image.open(path) as image:  # reads the header only
                        sizes.setdefault(image.size, path)
                except (OSError, UnidentifiedImageError) as error:
                    raise ValueError(f"references: {path} is no image ({error})") from None
            if len(sizes) > 1:
                (size, path), (other_size, other) = list(sizes.items())[:2]
                raise ValueError(f"references: {spec!r} holds images of several sizes ({path.name} is "
                                 f"{size[0]}×{size[1]}, {other.name} {other_size[0]}×{other_size[1]}); give one size")

    @functools.cached_property
    def digest(self) -> str | None:
        """A SHA-256 of the folder's image names and contents as first read, which every draw depends on (None for
        `shapes`), so a resume can tell a folder changed since; read once, not at every checkpoint."""
        return None if self.folder is None else files_sha256(self.files)

    def check_prompts(self, prompts: list[str]) -> None:
        """ValueError naming the first of `prompts` the references cannot be drawn for: `shapes` renders
        shapes-world prompts only."""
        if self.folder is None:
            for prompt in prompts:
                try:
                    parse_prompt(prompt)
                except ValueError as error:
                    raise ValueError(f"references: shapes renders shapes-world prompts only: {error}") from None

    def draw(self, prompts: list[str], seed: int, step: int) -> torch.Tensor:
        """(len(prompts), 3, H, W) images in [0, 1]: renders of the prompts, or random images of the folder."""
        rng = random.Random(seed * 1_000_003 + step)
        if self.folder is None:
            arrays = [render_prompt(prompt, rng.randrange(2**31)) for prompt in prompts]
        else:
            arrays = [np.asarray(eight_bit(Image.open(path), str(path)).convert("RGB"))
                      for path in (rng.choice(self.files) for _ in prompts)]
        return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays])
