"""ShapesEval: judges shapes-world images from their pixels against their prompts.

Each pixel is explained as a blend of the background and one palette color (blurred edges are such blends);
it takes that color when the blend is at least half color, the background below that, and no label when no
blend explains it. Connected regions of one label are objects, classed by how much of their bounding box they
fill (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2) and, for triangles, by a row profile that puts the apex up. An
image is strictly correct when it holds exactly the prompt's objects, with the stated relation, and nothing else;
the graded score gives partial credit.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from align_diffusion.rewards.base import RANGE_TOLERANCE, eight_bit, prompt_list
from align_diffusion.world.render import relation_holds
from align_diffusion.world.spec import BACKGROUND, CANVAS, CATEGORIES, COLORS, Requirement, parse_prompt

COLOR_NAMES = list(COLORS)
MAX_RESIDUAL = 48.0  # RGB distance beyond which no background–color blend explains a pixel
MIN_AREA = 20  # smaller regions are specks, ignored (the smallest legal triangle covers ~70 px)
UNLABELED = len(COLORS)  # label of pixels no blend explains; BACKGROUND_LABEL for background
BACKGROUND_LABEL = -1
TAKES = (f"a uint8 ({CANVAS}, {CANVAS}, 3) array, a {CANVAS}×{CANVAS} PIL image, or a float "
         f"(3, {CANVAS}, {CANVAS}) tensor in [0, 1]")


@dataclass(frozen=True)
class Detected:
    """An object found in an image; shape None when its outline fits no world shape, color None when unlabeled."""

    shape: str | None
    color: str | None
    center: tuple[float, float]
    area: int


@dataclass(frozen=True)
class Judgement:
    strict: bool
    graded: float
    objects: tuple[Detected, ...]


def as_pixels(image) -> np.ndarray:
    """A (CANVAS, CANVAS, 3) float array in 0..255 from one image as TAKES says; ValueError for anything else, a
    float array or a uint8 tensor included (read as the other convention, they would judge a different image).
    NaN pixels, as a diverged sample has, read as background."""
    if isinstance(image, Image.Image):
        if image.size != (CANVAS, CANVAS):
            raise ValueError(f"ShapesEval takes {TAKES}, got a {image.width}×{image.height} PIL image")
        image = np.asarray(eight_bit(image).convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (CANVAS, CANVAS, 3):
        return image.astype(np.float32)
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.shape == (3, CANVAS, CANVAS):
        chw = image.detach().float().cpu()
        values = chw[~chw.isnan()]
        if len(values) and not (-RANGE_TOLERANCE <= values.min() and values.max() <= 1 + RANGE_TOLERANCE):
            raise ValueError(f"ShapesEval takes {TAKES}, got a tensor with values from {values.min().item():.4g} "
                             f"to {values.max().item():.4g}")
        return chw.clamp(0, 1).permute(1, 2, 0).numpy() * 255
    got = type(image).__name__
    if isinstance(image, (np.ndarray, torch.Tensor)):
        got = f"{got} of dtype {image.dtype} and shape {tuple(image.shape)}"
    raise ValueError(f"ShapesEval takes {TAKES}, got a {got}")


def label_pixels(pixels: np.ndarray) -> np.ndarray:
    """(CANVAS, CANVAS) int labels: a palette index, BACKGROUND_LABEL, or UNLABELED."""
    background = np.array(BACKGROUND, dtype=np.float32)
    directions = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float32) - background  # (K, 3)
    offset = pixels.reshape(-1, 1, 3) - background  # (P, 1, 3)
    alpha = np.clip((offset * directions).sum(-1) / (directions**2).sum(-1), 0, 1)  # (P, K)
    residual = np.linalg.norm(offset - alpha[..., None] * directions, axis=-1)  # (P, K)
    best = residual.argmin(axis=1)
    rows = np.arange(len(best))
    labels = np.where(alpha[rows, best] >= 0.5, best, BACKGROUND_LABEL)
    labels = np.where(residual[rows, best] > MAX_RESIDUAL, UNLABELED, labels)
    return labels.reshape(CANVAS, CANVAS)


def _regions(labels: np.ndarray):
    """4-connected regions of equal non-background label: yields (label, ys, xs)."""
    seen = labels == BACKGROUND_LABEL
    for start_y, start_x in zip(*np.nonzero(~seen)):
        if seen[start_y, start_x]:
            continue
        label = labels[start_y, start_x]
        stack, ys, xs = [(start_y, start_x)], [], []
        seen[start_y, start_x] = True
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < CANVAS and 0 <= nx < CANVAS and not seen[ny, nx] and labels[ny, nx] == label:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        yield label, np.array(ys), np.array(xs)


def classify_shape(ys: np.ndarray, xs: np.ndarray) -> str | None:
    """circle, square or triangle from a region's pixels; None for an outline that fits none."""
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if not (9 <= max(height, width) <= 24 and 0.75 <= width / height <= 1.33):
        return None
    fill = len(ys) / (height * width)
    # The apex-up profile comes first: blur shaves a triangle's apex, which lifts its fill up to ~0.68, into the
    # circle band. Circles and squares are top-bottom symmetric, so they never pass it. Equal top and bottom bands
    # of whole rows keep the test fair for heights that are not multiples of 3.
    rows = ys - ys.min()
    band = height // 3
    if 0.38 <= fill < 0.75 and (rows >= height - band).sum() > 2 * (rows < band).sum():
        return "triangle"
    if fill >= 0.88:
        return "square"
    if 0.66 <= fill < 0.88:
        return "circle"
    return None


def detect(image) -> list[Detected]:
    """The objects in an image (specks below MIN_AREA ignored)."""
    objects = []
    for label, ys, xs in _regions(label_pixels(as_pixels(image))):
        if len(ys) < MIN_AREA:
            continue
        color = None if label == UNLABELED else COLOR_NAMES[label]
        shape = None if color is None else classify_shape(ys, xs)
        objects.append(Detected(shape, color, (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), len(ys)))
    return objects


def _credit(wanted, found: Detected) -> float:
    """1 for the right shape and color; 0.5 for one of the two named; a color-free request needs the shape."""
    shape_ok = found.shape == wanted.shape
    color_ok = shape_ok if wanted.color is None else found.color == wanted.color
    return 0.5 * shape_ok + 0.5 * color_ok


def judge(requirement: Requirement, objects: list[Detected]) -> Judgement:
    """Strict correctness and graded score of detected objects against a requirement. Graded: the wanted objects'
    mean credit under the best one-to-one assignment (1 for the right shape and color, 0.5 for one of them), halved
    for a position prompt unless the relation holds, which is judged only between objects that are both right (an
    imperfect object halves it too), and divided by 1 + the number of extra objects."""
    wanted = requirement.objects
    best_score, best_all_found, best_relation_ok = -1.0, False, False
    # One-to-one assignment of detections to wanted objects (at most 4 wanted; the largest 8 detections). The
    # relation is scored per assignment: with a duplicate object only some assignments satisfy it.
    candidates = sorted(objects, key=lambda o: -o.area)[:8]
    padded = candidates + [None] * len(wanted)
    for chosen in itertools.permutations(padded, len(wanted)):
        credits = [0.0 if d is None else _credit(w, d) for w, d in zip(wanted, chosen)]
        all_found = all(credit == 1 for credit in credits)
        relation_ok = requirement.relation is None or (
            all_found and relation_holds(chosen[0].center, chosen[1].center, requirement.relation))
        score = sum(credits) * (1.0 if relation_ok else 0.5)
        if score > best_score:
            best_score, best_all_found, best_relation_ok = score, all_found, relation_ok
    extras = max(0, len(objects) - len(wanted))
    graded = best_score / len(wanted) / (1 + extras)
    strict = best_all_found and best_relation_ok and len(objects) == len(wanted)
    return Judgement(strict, graded, tuple(objects))


def score_image(prompt: str, image) -> Judgement:
    return judge(parse_prompt(prompt), detect(image))


def shapes_eval(prompts: list[str], images) -> dict:
    """Per-category and overall strict accuracy (overall = mean over the categories present) with their standard
    errors, mean graded score, pass@k (see `pass_at_k`), and each image's own scores.

    The standard errors are binomial, √(p(1 − p)/n) per category, with images counted as independent; images of one
    prompt are not, so read them as a lower bound when telling a change from the noise. A category whose every image
    passed (or failed) gets 0: there the formula says nothing, least of all from a few images.
    """
    prompts = prompt_list(prompts, allow_empty=True)  # none: refused below, by what it means here
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    if not prompts:
        raise ValueError("shapes_eval needs at least one image")
    strict, per_image = defaultdict(list), []
    for prompt, image in zip(prompts, images):
        judgement = score_image(prompt, image)
        strict[parse_prompt(prompt).category].append(judgement.strict)
        per_image.append({"prompt": prompt, "strict": judgement.strict, "graded": judgement.graded})
    per_category = {c: float(np.mean(strict[c])) for c in CATEGORIES if strict[c]}
    per_category_se = {c: float(np.sqrt(p * (1 - p) / len(strict[c]))) for c, p in per_category.items()}
    return {
        "overall_strict": float(np.mean(list(per_category.values()))),
        "overall_strict_se": float(np.sqrt(sum(se**2 for se in per_category_se.values())) / len(per_category)),
        "per_category_strict": per_category,
        "per_category_strict_se": per_category_se,
        "graded": float(np.mean([record["graded"] for record in per_image])),
        "num_images": len(prompts),
        "pass_at_k": pass_at_k(per_image),
        "per_image": per_image,
    }


def pass_at_k(per_image: list[dict]) -> dict[str, dict]:
    """{k: {"overall": …, "per_category": {…}}}: the chance that at least one of k samples of a prompt is strictly
    correct, for k = 1, 2, 4, … up to the fewest images any prompt has, estimated without bias from n ≥ k samples
    with c correct as 1 − C(n − c, k) / C(n, k) (Chen et al. 2021), averaged over a category's prompts and then
    over the categories. What best-of-k selection by a perfect judge would reach: the headroom that reward
    fine-tuning can turn into single samples.
    """
    samples = defaultdict(lambda: [0, 0])  # prompt -> [images, strictly correct]
    for record in per_image:
        samples[record["prompt"]][0] += 1
        samples[record["prompt"]][1] += record["strict"]
    fewest = min(n for n, _ in samples.values())
    by_category = defaultdict(list)
    for prompt, counts in samples.items():
        by_category[parse_prompt(prompt).category].append(counts)
    result = {}
    for k in (2**i for i in range(fewest.bit_length())):
        per_category = {
            category: float(np.mean([1 - math.comb(n - c, k) / math.comb(n, k) for n, c in by_category[category]]))
            for category in CATEGORIES
            if category in by_category
        }
        result[str(k)] = {"overall": float(np.mean(list(per_category.values()))), "per_category": per_category}
    return result
