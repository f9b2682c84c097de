"""The artifact reward model ("Understanding Reward Hacking in Text-to-Image Reinforcement Learning"): a frozen
vision backbone and a small trained head that gives P(artifact); reward = 1 − P(artifact). Added with a small
weight to another reward, it penalizes the noise, grids, over-saturation and fragments that reward hacking breeds.

A trained reward is a folder: `head.safetensors` and `artifact_reward.json` (backbone id or path, accuracies, and
for a backbone on disk a SHA-256 of its weight files: a head read on a rebuilt backbone's features scores noise).
Spec `artifact:DIR`. `train_artifact_reward` fits the head on labelled images (1 = has artifacts).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from align_diffusion.files import (check_output_folder, check_outside, files_sha256, home_expanded,
                                   write_folder_atomically)
from align_diffusion.models.base import is_whole_number
from align_diffusion.rewards.base import Reward, eight_bit, images_to_tensor
from align_diffusion.rewards.preprocess import TorchImageTransform

CONFIG_FILE = "artifact_reward.json"
HEAD_FILE = "head.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FrozenBackbone(torch.nn.Module):
    """A transformers vision model (Dinov2, CLIP vision, ViT …), frozen, read at every layer as [CLS, mean, std and
    max of the patch tokens]: artifacts are low-level statistics that a semantic encoder's last layer ignores.
    It sees the whole image, resized to the processor's crop size with no crop: an artifact in a cropped-off border
    would go unpenalized."""

    def __init__(self, backbone: str, device=None, dtype=torch.float32):
        super().__init__()
        model = AutoModel.from_pretrained(backbone, dtype=dtype)
        self.model = (getattr(model, "vision_model", None) or model).to(device).eval().requires_grad_(False)
        self.transform = TorchImageTransform.from_processor(AutoImageProcessor.from_pretrained(backbone), squash=True)
        self.features = 4 * (self.model.config.num_hidden_layers + 1) * self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parameter = next(self.model.parameters())
        pixels = self.transform(images.to(parameter.device, torch.float32)).to(parameter.dtype)
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return torch.cat([torch.cat([h[:, 0], h[:, 1:].mean(1), h[:, 1:].std(1), h[:, 1:].amax(1)], -1).float()
                          for h in hidden], -1)


CONSTANT_STD = 1e-6  # a feature no wider than this over the training set carries nothing (e.g. the input CLS token)


class Standardize(torch.nn.Module):
    """Feature-wise (x − mean) / std with the training set's statistics, kept as buffers in the head's weights;
    0 for a feature that was constant in training."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dividing by a constant feature's std would blow up its rounding error: a bfloat16 backbone moves it by
        # ~4e-4, 400 standard deviations, and the head's logit with it.
        return (x - self.mean) / self.std * (self.std > CONSTANT_STD)


def artifact_head(features: int) -> torch.nn.Module:
    return torch.nn.Sequential(Standardize(features), torch.nn.Linear(features, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 1))


def resolve_backbone(folder: Path, backbone: str) -> str:
    """A backbone saved as a path relative to the reward's folder (so a shipped reward moves with its encoder),
    else the id or path as written. Training saves a local backbone as `../PATH` (it may not lie inside the
    folder, which is replaced whole): one that is not there is named, never looked for from the current folder or
    the hub."""
    relative = folder / backbone
    if relative.is_dir():
        return str(relative)
    if backbone.startswith(("../", "./")):
        raise FileNotFoundError(f"artifact: {folder}'s backbone was saved as {backbone}, relative to the folder, and "
                                f"{relative} is no folder; move the reward together with its backbone")
    return backbone


def backbone_sha256(backbone: str) -> str | None:
    """A SHA-256 of the weight files transformers loads from a backbone folder (safetensors before a .bin, a
    sharded checkpoint's index and shards); None for a hub id, or a folder holding none of them."""
    folder = Path(backbone)
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        if (folder / name).is_file():
            break
    else:
        return None
    files = [folder / name]
    if name.endswith(".index.json"):
        shards = json.loads(files[0].read_text(encoding="utf-8"))["weight_map"].values()
        files += [folder / shard for shard in sorted(set(shards))]
    return files_sha256(files)


class ArtifactReward(Reward):
    """1 − P(artifact) from a folder written by `train_artifact_reward`. Differentiable."""

    differentiable = True

    def __init__(self, folder: str | Path, device=None, dtype=torch.float32):
        super().__init__("artifact")
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"artifact: {folder} holds no {CONFIG_FILE} (train one with "
                                    "`align-diffusion train-reward artifact`)")
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        backbone = resolve_backbone(folder, config["backbone"])
        trained_on = config.get("backbone_sha256")  # rewards trained before it was recorded are taken as they are
        if trained_on is not None and Path(backbone).is_dir() and backbone_sha256(backbone) != trained_on:
            raise ValueError(f"artifact: {folder}'s head was trained on other weights than {backbone} holds now (a "
                             "backbone rebuilt or trained again since); train the head again on it: align-diffusion "
                             f"train-reward artifact --backbone {backbone} --out {folder} --data ...")
        self.backbone = FrozenBackbone(backbone, device, dtype)
        self.head = artifact_head(self.backbone.features)
        self.head.load_state_dict(load_file(folder / HEAD_FILE))
        self.head.to(device).eval().requires_grad_(False)

    def artifact_logit(self, images) -> torch.Tensor:
        return self.head(self.backbone(images_to_tensor(images))).squeeze(-1)

    def image_networks(self):
        return [self.backbone.model]

    def score(self, images, prompts, metadata):
        # 1 − sigmoid(z), computed as sigmoid(−z): for a sure artifact (z ≳ 17 in float32) the difference rounds
        # to exactly 0, which ties every such image and leaves no gradient.
        return torch.sigmoid(-self.artifact_logit(images))


REVIEW_LABELS = {"good": 0, "artifact": 1}  # labels exported by a review page (align_diffusion.gallery)


def read_labelled_images(data: str | Path) -> list[tuple[Path, int]]:
    """(file, label) pairs from a JSONL file of {"file", "label"} (paths relative to the file's folder) or from a
    folder with `clean/` (label 0) and `artifact/` (label 1) subfolders. A JSONL label is 0 or 1, or a review page's
    label: good (0), artifact (1) or bad (left out: wrong content says nothing about artifacts)."""
    data = Path(data)
    if data.is_dir():
        pairs, labelled = [], {}
        for label, name in ((0, "clean"), (1, "artifact")):
            folder = data / name
            if not folder.is_dir():
                raise ValueError(f"{data} must hold `clean/` and `artifact/` subfolders (missing {name}/)")
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                earlier = labelled.setdefault(path.resolve(), (path, label))  # a link and its target: one image
                if earlier[1] != label:
                    raise ValueError(f"{path} and {earlier[0]} are one image, in both clean/ and artifact/")
                if earlier[0] == path:
                    pairs.append((path, label))
    elif data.is_file():
        from align_diffusion.gallery.labels import label_lines, once_per_image

        rows = []
        for number, record in label_lines(data, '{"file": ..., "label": 0 or 1}'):
            label = record.get("label")
            label = REVIEW_LABELS.get(label, label) if isinstance(label, str) else label
            if isinstance(label, bool) or label not in (0, 1, "bad"):  # JSON true == 1 in Python
                raise ValueError(f"{data}:{number}: label must be 0 (clean) or 1 (artifact), or good / artifact / "
                                 f"bad, got {label!r}")
            rows.append((number, {"file": record["file"], "label": label}))
        pairs = [(record["file"], record["label"]) for record in once_per_image(data, rows) if record["label"] != "bad"]
    else:
        raise ValueError(f"artifact data {data} is neither a JSONL file nor a folder")
    labels = {label for _, label in pairs}
    if labels != {0, 1}:
        raise ValueError(f"artifact data {data} needs both clean and artifact images, found labels {sorted(labels)}")
    return pairs


@dataclass
class ArtifactTraining:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-2
    holdout: float = 0.2  # share of each class's images kept out of training to report accuracy on
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first setting that cannot train a head."""
        for name in ("steps", "batch_size"):
            if not is_whole_number(value := getattr(self, name)) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must lie in (0, 1), got {self.holdout}")


def train_artifact_reward(data, out: str | Path, backbone: str | Path, settings: ArtifactTraining | None = None,
                          device=None, unseen: str | Path | None = None, log=print) -> dict:
    """Fits the head on `data` (see `read_labelled_images`), saves the reward under `out` and returns
    {"train_accuracy", "heldout_accuracy", "heldout_clean_accuracy", "heldout_artifact_accuracy", "train_images",
    "heldout_images"}. Each class is split on its own (`holdout` of its images held out) and weighs as much as the
    other in the loss, so a set of few artifacts is not learned as "everything is clean". With `unseen`, a folder of
    artifact images of kinds left out of `data`, also "unseen_below_clean": the share of (held-out clean image,
    unseen image) pairs in which the unseen image gets the lower reward (0.5 is chance)."""
    settings = settings or ArtifactTraining()
    settings.check()
    backbone = home_expanded(str(backbone))
    check_output_folder(out, CONFIG_FILE)
    check_outside(out, {"data": data, "backbone": backbone, "unseen": unseen})
    pairs = read_labelled_images(data)
    if unseen is not None:
        if not Path(unseen).is_dir():
            raise ValueError(f"unseen: no such folder {unseen}")
        unseen_files = sorted(p for p in Path(unseen).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not unseen_files:
            raise ValueError(f"unseen: {unseen} holds no images")
        trained_on = {path.resolve(): path for path, _ in pairs}
        if seen := [path for path in unseen_files if path.resolve() in trained_on]:
            raise ValueError(f"unseen: {seen[0]} is also in {data}, which the head trains and is measured on")
    rng, training, held_out = random.Random(settings.seed), [], []
    for label, name in ((0, "clean"), (1, "artifact")):
        of_class = [pair for pair in pairs if pair[1] == label]
        rng.shuffle(of_class)
        held = round(settings.holdout * len(of_class))
        if not 0 < held < len(of_class):  # a class missing on either side: nothing to learn or measure
            raise ValueError(f"holdout {settings.holdout} of the {len(of_class)} {name} images of {data} leaves "
                             f"{'none held out' if held == 0 else 'none to train on'}; give more images of each, "
                             "or another holdout")
        held_out += of_class[:held]
        training += of_class[held:]
    torch.manual_seed(settings.seed)
    weights = backbone_sha256(backbone)  # of the weights the head is trained on
    backbone_model = FrozenBackbone(backbone, device)
    train_x, test_x = (_features(backbone_model, [path for path, _ in part]) for part in (training, held_out))
    train_y, test_y = (torch.tensor([label for _, label in part], dtype=torch.float32, device=train_x.device)
                       for part in (training, held_out))
    head = artifact_head(backbone_model.features).to(train_x.device)
    head[0].mean.copy_(train_x.mean(0))
    head[0].std.copy_(train_x.std(0).clamp(min=CONSTANT_STD))
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    artifacts = train_y.sum()
    class_balance = (len(train_y) - artifacts) / artifacts  # the artifact images weigh as much as the clean ones
    for step in range(settings.steps):
        pick = torch.randint(0, len(train_x), (settings.batch_size,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(head(train_x[pick]).squeeze(-1), train_y[pick],
                                                  pos_weight=class_balance)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == settings.steps - 1:
            log(f"artifact head step {step + 1}/{settings.steps} loss {loss.item():.4f}")
    head.eval()
    # Stored with float16 linear weights (half the size); loaded back now, so the accuracies are the stored head's.
    stored = {k: (v.half() if k.endswith("weight") else v).contiguous().cpu() for k, v in head.state_dict().items()}
    head.load_state_dict(stored)
    with torch.no_grad():
        def accuracy(x, y):
            return float(((head(x).squeeze(-1) > 0).float() == y).float().mean())

        result = {"train_accuracy": accuracy(train_x, train_y), "heldout_accuracy": accuracy(test_x, test_y),
                  "heldout_clean_accuracy": accuracy(test_x[test_y == 0], test_y[test_y == 0]),
                  "heldout_artifact_accuracy": accuracy(test_x[test_y == 1], test_y[test_y == 1]),
                  "train_images": len(train_x), "heldout_images": len(test_x)}
        if unseen is not None:
            clean_logits = head(test_x[test_y == 0]).squeeze(-1)
            unseen_logits = head(_features(backbone_model, unseen_files)).squeeze(-1)
            result["unseen_below_clean"] = float((unseen_logits[None] > clean_logits[:, None]).float().mean())
            result["unseen_images"] = len(unseen_files)
    out = Path(out)
    if Path(backbone).is_dir():
        backbone = os.path.relpath(Path(backbone).resolve(), out.resolve())
    recorded = {"backbone": str(backbone), **({"backbone_sha256": weights} if weights else {})}

    def write(folder: Path) -> None:
        save_file(stored, folder / HEAD_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({**recorded, **result}, indent=1))

    write_folder_atomically(out, write)
    return result


@torch.no_grad()
def _features(backbone: FrozenBackbone, files: list[Path], batch_size: int = 64) -> torch.Tensor:
    """The backbone's features of image files of any sizes (it resizes each), batched among images of one size."""
    features = []
    for start in range(0, len(files), batch_size):
        images = [eight_bit(Image.open(path), str(path)) for path in files[start : start + batch_size]]
        by_size = {}
        for k, image in enumerate(images):
            by_size.setdefault(image.size, []).append(k)
        batch = [None] * len(images)
        for indices in by_size.values():
            for k, row in zip(indices, backbone(images_to_tensor([images[k] for k in indices]))):
                batch[k] = row
        features.append(torch.stack(batch))
    return torch.cat(features)


def corrupt(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A typical generator artifact applied to a uint8 HWC render."""
    x = image.astype(np.float32)
    if kind == "noise":
        x = x + rng.normal(0, rng.uniform(20, 50), x.shape)
    elif kind == "blocking":
        block = int(rng.choice([4, 8]))
        small = x[::block, ::block]
        x = np.repeat(np.repeat(small, block, 0), block, 1)[: x.shape[0], : x.shape[1]]
    elif kind == "grid":
        period = int(rng.choice([4, 6, 8]))
        x[::period] += rng.uniform(40, 90)
        x[:, ::period] += rng.uniform(40, 90)
    elif kind == "oversaturation":
        mean = x.mean(-1, keepdims=True)
        x = mean + rng.uniform(2.0, 3.5) * (x - mean) + rng.uniform(20, 60)
    elif kind == "smear":
        shift = int(rng.integers(3, 8))
        axis = int(rng.integers(0, 2))
        x = sum(np.roll(x, k, axis=axis) for k in range(shift)) / shift
    elif kind == "posterize":
        levels = int(rng.integers(3, 6))
        x = np.round(x / 255 * (levels - 1)) / (levels - 1) * 255
    elif kind == "ghost":
        shift = rng.integers(4, 12, 2) * rng.choice([-1, 1], 2)
        background = np.median(x.reshape(-1, 3), axis=0)  # so the faint copy adds only the objects
        x = x + rng.uniform(0.3, 0.6) * (np.roll(x, tuple(shift), axis=(0, 1)) - background)
    elif kind == "fragments":
        for _ in range(int(rng.integers(4, 10))):
            y0, x0 = rng.integers(0, x.shape[0] - 4, 2)
            x[y0 : y0 + int(rng.integers(2, 5)), x0 : x0 + int(rng.integers(2, 5))] = rng.uniform(30, 240, 3)
    else:
        raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")
    return np.clip(x, 0, 255).round().astype(np.uint8)


CORRUPTIONS = ("noise", "blocking", "grid", "oversaturation", "smear", "fragments", "posterize", "ghost")
