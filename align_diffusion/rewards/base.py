"""The one reward interface: a batch of images with their prompts in, one float per image out.

Images come as a (B, 3, H, W) tensor in [0, 1] or a list of PIL images. A reward that cannot score an image
returns NaN for it (callers count and mask those) or raises; it never substitutes a default score. An image with
a NaN or infinite pixel (a diverged sample) is one no reward can score. Flags say what a caller may do with a
reward: backpropagate through it, must pass reference images, may train it, or must save its state with a
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image


class RewardError(RuntimeError):
    """A reward could not score a batch at all (a missing model file, an unreachable server, ...)."""


RANGE_TOLERANCE = 1e-3  # rounding noise past 0 and 1 passes; [-1, 1] or 0…255 pixels overshoot by far more
# PIL modes of 8 bits a channel; converting a 16-bit or float image to RGB clips its values rather than scaling them.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def eight_bit(image: Image.Image, source: str = "image") -> Image.Image:
    """`image` as it is; ValueError naming `source` when it holds more than 8 bits a channel (a 16-bit PNG), which
    converting to RGB would clip rather than scale, or transparent pixels, whose color converting would make up."""
    if image.mode not in EIGHT_BIT_MODES:
        raise ValueError(f"{source}: an image of mode {image.mode}; expected 8 bits a channel "
                         f"({', '.join(EIGHT_BIT_MODES)})")
    if image.has_transparency_data and image.convert("RGBA").getchannel("A").getextrema()[0] < 255:
        raise ValueError(f"{source}: an image with transparent pixels, which have no color to score (CLIP's "
                         "processor puts white behind them, open_clip's drops the alpha); flatten it onto a "
                         "background first")
    return image


def decoded_batch(images: Iterable[Image.Image], count: int, width: int, height: int) -> torch.Tensor:
    """(count, 3, height, width) in [0, 1] from `count` 8-bit PIL images of that size, decoded one at a time into
    the batch (the images an iterator yields can be freed as soon as each is copied)."""
    batch = torch.empty(count, 3, height, width)
    for row, image in zip(batch, images, strict=True):
        row.copy_(torch.from_numpy(np.array(eight_bit(image).convert("RGB"))).permute(2, 0, 1))
    return batch.div_(255)


def images_to_tensor(images) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] from such a tensor (returned as is, so gradients flow) or a list of PIL images;
    ValueError for a tensor of another shape, an integer dtype, or values outside [0, 1], NaN included, and for PIL
    images of different sizes or of more than 8 bits a channel."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        if images.numel() == 0:
            return images
        lowest, highest = torch.aminmax(images.detach())  # NaN when any pixel is, which fails both comparisons
        if not (lowest >= -RANGE_TOLERANCE and highest <= 1 + RANGE_TOLERANCE):
            raise ValueError(f"expected images in [0, 1], got values from {lowest.item():.4g} to {highest.item():.4g}")
        return images
    if not isinstance(images, Sequence) or not all(isinstance(image, Image.Image) for image in images):
        raise TypeError("images must be a (B, 3, H, W) tensor in [0, 1] or a list of PIL images")
    if not images:
        return torch.empty(0, 3, 0, 0)
    if len({image.size for image in images}) > 1:  # one tensor holds them; resizing is the caller's choice
        raise ValueError(f"expected PIL images of one size, got sizes {sorted({image.size for image in images})}")
    return decoded_batch(images, len(images), *images[0].size)


def images_to_pil(images) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        from align_diffusion.models.base import PipelineAdapter

        return PipelineAdapter.to_pil(images_to_tensor(images))
    return [image.convert("RGB") for image in images]


def prompt_list(prompts: str | Sequence[str], *, allow_empty: bool = False) -> list[str]:
    """`prompts` as a list: one string is one prompt (as diffusers' pipelines take it), not its letters; TypeError
    for anything else than strings, ValueError for none unless `allow_empty` (a reward scores an empty batch), and
    for a string that is no text (half a UTF-16 pair, as undecodable bytes in a command's arguments become)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts and not allow_empty:
        raise ValueError("prompts is empty")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"prompt {prompt!r} is no text: {error.reason}") from None
    return list(prompts)


class Reward(torch.nn.Module):
    """Base class: subclasses implement `score(images, prompts, metadata)` on a (B, 3, H, W) tensor in [0, 1]."""

    differentiable: bool = False  # gradients reach the pixels through `score`
    needs_reference: bool = False  # metadata must carry reference images
    trainable: bool = False  # has parameters a trainer may update (e.g. the adversarial DINO head)
    stateful: bool = False  # keeps state that a checkpoint must save (`reward_state`)

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.spec = name  # the spec it was loaded from (`load_reward` sets it): `jpeg:5` where the name is `jpeg`

    def forward(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Rewards (B,) float32; NaN where an image could not be scored, among them any with a non-finite pixel."""
        scorable = None
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.numel():
            # min and max are NaN or infinite when any pixel is; no per-pixel mask (gigabytes for a large batch)
            scorable = torch.isfinite(torch.stack(torch.aminmax(images.detach().flatten(1), dim=1))).all(dim=0)
            if not scorable.all():  # a blank stands in for such an image, whose score is then masked
                images = torch.where(scorable.view(-1, 1, 1, 1), images, torch.zeros((), dtype=images.dtype))
        images = images_to_tensor(images)
        prompts = prompt_list(prompts, allow_empty=True)
        if len(prompts) != len(images):
            raise ValueError(f"{self.name}: {len(prompts)} prompts for {len(images)} images")
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"{self.name}: {len(metadata)} metadata entries for {len(images)} images")
        if len(images) == 0:
            return torch.empty(0)
        if not self.differentiable:
            images = images.detach()
        rewards = self.score(images, prompts, metadata)
        if rewards.shape != (len(images),):
            raise RewardError(f"{self.name} returned shape {tuple(rewards.shape)} for {len(images)} images")
        rewards = rewards.float()
        return rewards if scorable is None else rewards.masked_fill(~scorable.to(rewards.device), math.nan)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: Sequence[dict] | None) -> torch.Tensor:
        raise NotImplementedError

    def check_prompts(self, prompts: str | Sequence[str]) -> None:
        """ValueError naming the first of `prompts` (one string: one prompt, see `prompt_list`) this reward cannot
        score, for callers to check before they make any image."""
        self.check_prompt_list(prompt_list(prompts, allow_empty=True))

    def check_prompt_list(self, prompts: list[str]) -> None:
        """`check_prompts` of a list, which a reward that cannot score every prompt overrides (most can: nothing to
        check)."""

    def check_size(self, height: int, width: int) -> None:
        """ValueError when this reward cannot score `height` × `width` images, for callers to check before they make
        any (most rewards resize what they are given)."""

    def image_networks(self) -> list[torch.nn.Module]:
        """The frozen networks `score` runs images through, for callers that compile them (`compile_models`); none
        for a reward without one."""
        return []

    def reward_state(self) -> dict:
        """What a checkpoint saves for a stateful reward (trained weights, optimizer, schedule counters)."""
        return {}

    def load_reward_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, but a checkpoint holds some for it")

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"
