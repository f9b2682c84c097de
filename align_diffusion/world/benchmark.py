"""Sampling a model on a shapes-world split and scoring it with ShapesEval (the `eval` command's work)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from align_diffusion.gallery import build_gallery
from align_diffusion.models.base import PipelineAdapter
from align_diffusion.sampling.folder import SampleFolder, adapter_record, check_out_dir, settings_record
from align_diffusion.sampling.loop import check_count, resolve_settings, sample_images
from align_diffusion.world.evaluate import shapes_eval
from align_diffusion.world.prompts import split_prompts
from align_diffusion.world.spec import CANVAS


def evaluate_shapes(
    adapter: PipelineAdapter,
    split: str = "test",
    *,
    num_images_per_prompt: int = 4,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str = "ode",
    noise_level: float | None = None,
    negative_prompt: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    extra_metadata: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """ShapesEval of `adapter`'s samples for every prompt of `split`; image k is seeded `seed + k`. With `out_dir`,
    the samples are also written there as a sample folder with their verdicts, the settings and model they were made
    with (`extra_metadata` adds to or replaces the model's record) as `sample` writes them, and its review page;
    samples (or other files) already there are replaced only with `overwrite`. `diverged_images` counts the samples
    that diverged (`PipelineAdapter.diverged`), marked `"diverged": true` in `per_image`."""
    check_count("num_images_per_prompt", num_images_per_prompt)
    check_count("batch_size", batch_size)
    if out_dir is not None:
        if (Path(out_dir) / "metadata.jsonl").exists() and not overwrite:
            raise FileExistsError(f"{out_dir} already holds samples; pass overwrite=True to replace them")
        check_out_dir(out_dir, overwrite)
    prompts = [p for p in split_prompts(split) for _ in range(num_images_per_prompt)]
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level)
    if (settings.height, settings.width) != (CANVAS, CANVAS):  # refused now, not after sampling the whole split
        raise ValueError(f"ShapesEval judges {CANVAS}×{CANVAS} images, and this model samples "
                         f"{settings.height}×{settings.width}: evaluate a shapes-world generator")
    images = sample_images(adapter, prompts, seed=seed, batch_size=batch_size,
                           desc=f"shapes {split}" if progress else None, sampler=sampler,
                           negative_prompt=negative_prompt, **asdict(settings))
    diverged = adapter.diverged(images)
    images = adapter.as_saved(images)
    result = shapes_eval(prompts, images)
    result["diverged_images"] = sum(diverged)
    result["settings"] = {"split": split, "num_images_per_prompt": num_images_per_prompt, "sampler": sampler,
                          "seed": seed, "negative_prompt": negative_prompt, **asdict(settings)}
    for k, record in enumerate(result["per_image"]):
        record["seed"] = seed + k
        if diverged[k]:
            record["diverged"] = True
    if out_dir is not None:
        made_with = {**settings_record(sampler, settings, negative_prompt), **adapter_record(adapter),
                     **(extra_metadata or {})}
        with SampleFolder(out_dir) as folder:
            for image, record in zip(adapter.to_pil(images), result["per_image"]):
                folder.add(image, {"prompt": record["prompt"], "seed": record["seed"],
                                   "shapes_strict": record["strict"], "rewards": {"shapes": record["graded"]},
                                   **made_with, **({"diverged": True} if record.get("diverged") else {})})
        build_gallery(out_dir, title=eval_title(result))
    return result


def eval_title(result: dict) -> str:
    """The review page's title for a ShapesEval result (`evaluate_shapes`'s, or its eval.json read back)."""
    return f"ShapesEval {result['settings']['split']}: strict {result['overall_strict']:.3f}"
