"""CLIP-family preference rewards: CLIPScore and PickScore (transformers `CLIPModel`), HPSv2 / v2.1 (an open_clip
model plus a weights file) and the LAION aesthetic predictor (CLIP ViT-L/14 image embedding and an MLP head).

All are differentiable: images go through `TorchImageTransform`, never PIL.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel

from align_diffusion.rewards.base import Reward
from align_diffusion.rewards.preprocess import TorchImageTransform

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_ARCH = "ViT-H-14"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
TEXT_CACHE_SIZE = 4096  # prompts whose features a CLIP reward keeps: 4 KB each at width 1024


class TextFeatures:
    """Normalized text features by prompt, each encoded once: the text tower is frozen, and steering and training
    score the same prompts again and again. Entries are kept per device, dtype and autocast dtype, so a moved model
    or a caller's autocast gets features computed as they would be now; the least recently used go first."""

    def __init__(self, encode, capacity: int = TEXT_CACHE_SIZE):
        self.encode = encode  # (prompts, device) -> (len(prompts), d) unnormalized features
        self.capacity = capacity
        self.features = OrderedDict()

    def __call__(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(len(prompts), d) float32 features, unit length."""
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        context = (str(device), dtype, autocast)
        missing = list(dict.fromkeys(p for p in prompts if (context, p) not in self.features))
        if missing:
            with torch.no_grad():
                encoded = F.normalize(self.encode(missing, device).float(), dim=-1)
            # a row's own copy: a view would keep its whole batch alive as long as any one of its rows is kept
            self.features.update(((context, prompt), feature.clone()) for prompt, feature in zip(missing, encoded))
        for prompt in prompts:
            self.features.move_to_end((context, prompt))
        features = torch.stack([self.features[(context, prompt)] for prompt in prompts])
        while len(self.features) > self.capacity:
            self.features.popitem(last=False)
        return features


class _TransformersClip(Reward):
    """Cosine similarity of a transformers CLIP model's normalized image and text embeddings; `logit_scale` is
    exp of the checkpoint's logit scale, read in float32 whatever `dtype` the model runs in."""

    differentiable = True

    def __init__(self, name: str, model: str, processor: str | None, device=None, dtype=torch.float32):
        super().__init__(name)
        clip = CLIPModel.from_pretrained(model, dtype=torch.float32)
        # Read before the cast: bfloat16 rounds PickScore's ln 100 to 4.59375, a scale of 99 (every score 1% low).
        self.logit_scale = clip.logit_scale.exp().item()
        self.model = clip.to(device, dtype).eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(processor or model)  # saved with a noise-aware student
        self.tokenizer = self.processor.tokenizer
        self.transform = TorchImageTransform.from_processor(self.processor.image_processor)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.text_features = TextFeatures(self.encode_text)

    def image_networks(self):
        return [self.model.vision_model]

    def encode_text(self, prompts: list[str], device) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        return self.model.get_text_features(**tokens).pooler_output

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device, dtype = self.model.device, self.model.dtype
        pixels = self.transform(images.to(device, torch.float32)).to(dtype)
        image_embeds = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        return (image_embeds * self.text_features(prompts, device, dtype)).sum(-1)


class ClipScore(_TransformersClip):
    """CLIPScore (Hessel et al. 2021): 2.5 · max(cos(image, prompt), 0). Spec `clip:ID_OR_PATH`. The prompt is
    encoded as it is: Hessel et al.'s reference code prepends "A photo depicts ", so published CLIPScores differ."""

    def __init__(self, model: str, processor: str | None = None, device=None, dtype=torch.float32):
        super().__init__("clip", model, processor, device, dtype)

    def score(self, images, prompts, metadata):
        return self.linear_score(images, prompts).clamp(min=0)

    def linear_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """2.5 · cos before the clamp at 0, below which the score has no gradient (noise-aware distillation)."""
        return 2.5 * self.cosine(images, prompts)


class PickScore(_TransformersClip):
    """PickScore (Kirstain et al. 2023): the model's logit scale times the cosine. Spec `pickscore[:ID_OR_PATH]`;
    the published model reads images with the CLIP-ViT-H-14 processor, used when `model` is the default."""

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str | None = None, device=None,
                 dtype=torch.float32):
        if processor is None and model == PICKSCORE_MODEL:
            processor = PICKSCORE_PROCESSOR
        super().__init__("pickscore", model, processor, device, dtype)

    def score(self, images, prompts, metadata):
        return self.linear_score(images, prompts)

    def linear_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.logit_scale * self.cosine(images, prompts)


class OpenClipScore(Reward):
    """Cosine of an open_clip model's normalized image and text features: HPSv2's score for any open_clip model
    (benchmarks use it on random-weight architectures)."""

    differentiable = True

    def __init__(self, name: str, model, tokenizer, device=None, dtype=torch.float32, resize_mode: str | None = None,
                 longest_rounding: str = "open_clip"):
        super().__init__(name)
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = TorchImageTransform.from_open_clip(model.visual, resize_mode, longest_rounding)
        self.text_features = TextFeatures(self.encode_text)

    def image_networks(self):
        return [self.model.visual]

    def encode_text(self, prompts: list[str], device) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(device))

    def score(self, images, prompts, metadata):
        parameter = next(self.model.parameters())
        pixels = self.transform(images.to(parameter.device, torch.float32)).to(parameter.dtype)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return (image_features * self.text_features(prompts, parameter.device, parameter.dtype)).sum(-1)


class HPSv2(OpenClipScore):
    """HPSv2 / v2.1 (Wu et al. 2023): an open_clip model (ViT-H-14 as published) with fine-tuned weights from a
    file; reward = cosine of the normalized image and text features. Spec `hpsv2:WEIGHTS` or
    `hpsv2:ARCH:WEIGHTS` (ARCH an open_clip model name, e.g. one registered with `open_clip.add_model_config`).
    Images are letterboxed as HPSv2's scorer reads them (its `light_augmentation`): the longest side resized to the
    model's input size and the rest zero-padded, so a non-square image is seen whole."""

    def __init__(self, weights: str | Path, arch: str = HPS_ARCH, device=None, dtype=torch.float32):
        import open_clip

        if not Path(weights).is_file():
            raise FileNotFoundError(f"hpsv2: weights file {weights} not found")
        model = open_clip.create_model(arch, pretrained=None)
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint.get("state_dict", checkpoint))
        super().__init__("hpsv2", model, open_clip.get_tokenizer(arch), device, dtype, resize_mode="longest",
                         longest_rounding="hpsv2")


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor's MLP (keys `layers.0` … `layers.7` as in its published weights)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_features, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings):
        return self.layers(embeddings)


class Aesthetic(Reward):
    """LAION aesthetic score: MLP head on the L2-normalized CLIP image embedding. Spec `aesthetic:HEAD` (CLIP
    ViT-L/14) or `aesthetic:CLIP_ID_OR_PATH:HEAD`."""

    differentiable = True

    def __init__(self, head: str | Path, clip: str = AESTHETIC_CLIP, device=None, dtype=torch.float32):
        super().__init__("aesthetic")
        if not Path(head).is_file():
            raise FileNotFoundError(f"aesthetic: head weights file {head} not found")
        self.model = CLIPModel.from_pretrained(clip, dtype=dtype).to(device).eval().requires_grad_(False)
        # LAION's predictor preprocesses with openai CLIP's torchvision center crop, which rounds the offset
        self.transform = dataclasses.replace(
            TorchImageTransform.from_processor(AutoProcessor.from_pretrained(clip).image_processor),
            round_crop_offset=True)
        state = torch.load(head, map_location="cpu", weights_only=True)
        self.head = AestheticHead(state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.to(device).eval().requires_grad_(False)

    def image_networks(self):
        return [self.model.vision_model]

    def score(self, images, prompts, metadata):
        pixels = self.transform(images.to(self.model.device, torch.float32)).to(self.model.dtype)
        embeddings = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        return self.head(embeddings).squeeze(-1)
