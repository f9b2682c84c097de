"""Image preprocessing for encoder-based rewards in pure torch (resize, center crop or pad, normalize), so gradients
reach the pixels. It mirrors the pipelines of transformers' image processors (their default torchvision backend:
the `...Pil` processors pad an odd pixel before the image, not after) and open_clip's eval transforms as their
configs set them; a setting it cannot reproduce raises instead of being read differently."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes whose antialiased torch resampling matches transformers'
OPEN_CLIP_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}  # open_clip's eval
RESCALE = 1 / 255  # the processor's uint8 scaling, which [0, 1] images have already had


def _height_width(size) -> tuple[int, int] | None:
    """(height, width) of a processor's size or crop size (a dict or transformers' SizeDict), None without both."""
    try:
        height, width = size["height"], size["width"]
    except (KeyError, TypeError):
        return None
    return (height, width) if height and width else None


@dataclass(frozen=True)
class TorchImageTransform:
    """Resize as `resize` says, center-crop or zero-pad to `size`, normalize."""

    resize: str  # "shortest" / "longest": that side to `edge`, the aspect kept; "squash": to `size`; "none"
    size: tuple[int, int] | None  # (height, width) the resized image is center-cropped or zero-padded to; None: kept
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    edge: int | None = None
    interpolation: str = "bicubic"
    round_crop_offset: bool = False  # torchvision's center crop (open_clip) rounds the offset, transformers' floors it
    # "longest": open_clip's ResizeKeepRatio sizes the short side round(short / (long / edge)), HPSv2's letterbox
    # round(short · (edge / long)); the two differ by a pixel at some sizes (105 × 192 to 224: 122 and 123)
    longest_rounding: str = "open_clip"

    @classmethod
    def from_processor(cls, processor, squash: bool = False) -> TorchImageTransform:
        """From a transformers image processor (CLIPImageProcessor, BitImageProcessor, ...). With `squash`, the whole
        image is resized to the processor's crop size instead of its resize and center crop (to its size, for a
        processor without a crop such as ViT's or SigLIP's)."""
        if processor.resample not in PIL_RESAMPLE:
            raise ValueError(f"resample={processor.resample!r}: only bilinear (2) and bicubic (3) are supported")
        if not (processor.do_rescale and math.isclose(processor.rescale_factor, RESCALE)):
            raise ValueError(f"do_rescale={processor.do_rescale}, rescale_factor={processor.rescale_factor}: "
                             "expected images rescaled by 1/255")
        interpolation = PIL_RESAMPLE[processor.resample]
        mean, std = ((tuple(processor.image_mean), tuple(processor.image_std)) if processor.do_normalize
                     else ((0.0,) * 3, (1.0,) * 3))
        crop = getattr(processor, "crop_size", None)
        if squash:
            target = _height_width(crop) or _height_width(processor.size)
            if target is None:
                raise ValueError(f"crop_size={crop}, size={processor.size}: expected a height and width to resize "
                                 "the whole image to")
            return cls("squash", target, mean, std, interpolation=interpolation)
        size = processor.size
        if processor.do_resize and set(dict(size)) != {"shortest_edge"}:
            raise ValueError(f"size={dict(size)}: expected an image processor that resizes the shortest edge")
        return cls("shortest" if processor.do_resize else "none",
                   (crop["height"], crop["width"]) if processor.do_center_crop else None, mean, std,
                   edge=size["shortest_edge"] if processor.do_resize else None, interpolation=interpolation)

    @classmethod
    def from_open_clip(cls, visual, resize_mode: str | None = None,
                       longest_rounding: str = "open_clip") -> TorchImageTransform:
        """From an open_clip vision tower's `preprocess_cfg` (its eval transform); `resize_mode` ("shortest",
        "longest" or "squash") overrides the config's, `longest_rounding` ("hpsv2") open_clip's rounding of it."""
        config = visual.preprocess_cfg
        resize_mode = resize_mode or config.get("resize_mode", "shortest")
        interpolation = config.get("interpolation", "bicubic")
        if interpolation not in OPEN_CLIP_INTERPOLATION:
            raise ValueError(f"interpolation={interpolation!r}: expected one of {sorted(OPEN_CLIP_INTERPOLATION)}")
        if config.get("fill_color", 0) != 0:
            raise ValueError(f"fill_color={config['fill_color']}: only black (0) padding is supported")
        size = config["size"]
        height, width = (size, size) if isinstance(size, int) else size
        mean, std = tuple(config["mean"]), tuple(config["std"])
        interpolation = OPEN_CLIP_INTERPOLATION[interpolation]
        if resize_mode == "squash":
            return cls("squash", (height, width), mean, std, interpolation=interpolation)
        if resize_mode not in ("shortest", "longest"):
            raise ValueError(f"resize_mode={resize_mode!r}: expected shortest, longest or squash")
        if height != width:
            raise ValueError(f"size={size}: a non-square input is supported only with resize_mode='squash'")
        return cls(resize_mode, (height, width), mean, std, edge=height, interpolation=interpolation,
                   round_crop_offset=True, longest_rounding=longest_rounding)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size after the resize."""
        if self.resize == "none":
            return height, width
        if self.resize == "squash":
            return self.size
        short, long = sorted((height, width))
        if self.resize == "shortest":
            short, long = self.edge, int(self.edge * long / short)  # truncated, as transformers and torchvision do
        elif self.longest_rounding == "hpsv2":
            short, long = round(short * (self.edge / long)), self.edge
        else:
            short, long = round(short / (long / self.edge)), self.edge
        return (short, long) if height <= width else (long, short)

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images after the resize alone (neither cropped nor normalized), clamped into [0, 1] as the
        processors' resizing of 8-bit images saturates (bicubic overshoots at edges)."""
        new_size = self.resized_size(*images.shape[-2:])
        if new_size == tuple(images.shape[-2:]):
            return images
        resized = F.interpolate(images, size=new_size, mode=self.interpolation, align_corners=False, antialias=True)
        return resized.clamp(0, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] to normalized model input; differentiable."""
        images = self.resized(images)
        if self.size is not None:
            images = self.center_crop_or_pad(images)
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def center_crop_or_pad(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pads a side shorter than `size` (the odd pixel after), then center-crops to `size`."""
        height, width = self.size
        pad_height, pad_width = max(height - images.shape[-2], 0), max(width - images.shape[-1], 0)
        if pad_height or pad_width:
            images = F.pad(images, (pad_width // 2, pad_width - pad_width // 2,
                                    pad_height // 2, pad_height - pad_height // 2))
        top, left = (int(round(margin / 2)) if self.round_crop_offset else margin // 2  # Python's round, as torchvision
                     for margin in (images.shape[-2] - height, images.shape[-1] - width))
        return images[..., top : top + height, left : left + width]
