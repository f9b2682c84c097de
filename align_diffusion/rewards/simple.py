"""Rewards computed without a learned model: JPEG compressibility (DDPO) and the shapes world's ShapesEval."""

from __future__ import annotations

import io

import torch

from align_diffusion.rewards.base import Reward, images_to_pil
from align_diffusion.world.evaluate import score_image
from align_diffusion.world.spec import CANVAS, parse_prompt


class JpegCompressibility(Reward):
    """Minus the JPEG size in kilobytes at `quality` (DDPO's compressibility reward). Spec `jpeg` or `jpeg:QUALITY`."""

    def __init__(self, quality: int = 95):
        # PIL's quality scale ends at 95 (above it, parts of the compression are switched off); libjpeg reads 0 as 1.
        if not 1 <= quality <= 95:
            raise ValueError(f"JPEG quality must be an integer from 1 to 95, got {quality!r}")
        super().__init__("jpeg")
        self.quality = quality

    def score(self, images, prompts, metadata):
        sizes = []
        for image in images_to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes)


class ShapesReward(Reward):
    """ShapesEval on shapes-world images: the graded partial-credit score in [0, 1] (spec `shapes`) or strict
    correctness 0 / 1 (spec `shapes:strict`). Prompts outside the world's grammar raise."""

    def __init__(self, mode: str = "graded"):
        if mode not in ("graded", "strict"):
            raise ValueError(f"shapes reward mode must be 'graded' or 'strict', got {mode!r}")
        super().__init__("shapes" if mode == "graded" else "shapes:strict")
        self.mode = mode

    def check_prompt_list(self, prompts):
        for prompt in prompts:
            try:
                parse_prompt(prompt)
            except ValueError as error:
                raise ValueError(f"reward {self.name}: {error}") from None

    def check_size(self, height, width):
        if (height, width) != (CANVAS, CANVAS):
            raise ValueError(f"ShapesEval judges {CANVAS}×{CANVAS} shapes-world images, got {height}×{width}")

    def score(self, images, prompts, metadata):
        self.check_prompt_list(prompts)
        judgements = [score_image(prompt, image) for prompt, image in zip(prompts, images.cpu())]
        if self.mode == "strict":
            return torch.tensor([float(j.strict) for j in judgements])
        return torch.tensor([j.graded for j in judgements])
