"""Image preprocessing for encoder-based rewards in pure torch (resize, center crop, normalize), so gradients
reach the pixels. It mirrors the PIL pipelines of transformers' image processors and open_clip's transforms:
shortest side resized bicubically, then a center crop, then per-channel normalization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TorchImageTransform:
    resize: int  # target length of the shortest side
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    round_crop_offset: bool = False  # torchvision's center crop (open_clip) rounds the offset, transformers' floors it

    @classmethod
    def from_processor(cls, processor) -> TorchImageTransform:
        """From a transformers image processor (CLIPImageProcessor, BitImageProcessor, ...)."""
        size, crop = processor.size, processor.crop_size
        if "shortest_edge" not in size:
            raise ValueError(f"expected an image processor that resizes the shortest edge, got size={size}")
        return cls(size["shortest_edge"], (crop["height"], crop["width"]), tuple(processor.image_mean),
                   tuple(processor.image_std))

    @classmethod
    def from_open_clip(cls, visual) -> TorchImageTransform:
        """From an open_clip vision tower's `preprocess_cfg` (its own eval transform: resize + center crop)."""
        config = visual.preprocess_cfg
        size = config["size"]
        side = size if isinstance(size, int) else size[0]
        return cls(side, (side, side), tuple(config["mean"]), tuple(config["std"]), round_crop_offset=True)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] to normalized model input; differentiable."""
        height, width = images.shape[-2:]
        short, long = sorted((height, width))
        long_resized = int(self.resize * long / short)  # truncated, as transformers and torchvision do
        new_size = (self.resize, long_resized) if height <= width else (long_resized, self.resize)
        if new_size != (height, width):
            images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
        crop_height, crop_width = self.crop
        top, left = (int(round(margin / 2)) if self.round_crop_offset else margin // 2  # Python's round, as torchvision
                     for margin in (images.shape[-2] - crop_height, images.shape[-1] - crop_width))
        images = images[..., top : top + crop_height, left : left + crop_width]
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std
