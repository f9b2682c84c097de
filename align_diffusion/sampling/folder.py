"""Sampling many prompts to a folder: `images/00000.png …` plus one `metadata.jsonl` line per image.

Each image is written, then its metadata line appended and flushed, so an interrupted run keeps every image it
finished. Image k (prompt-major) is seeded `seed + k` whatever the batch size.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align_diffusion.models.base import PipelineAdapter
from align_diffusion.sampling.loop import resolve_settings, sample


def sample_to_folder(
    adapter: PipelineAdapter,
    prompts: list[str],
    out_dir: str | Path,
    *,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    sampler: str = "ode",
    noise_level: float | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    extra_metadata: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Writes every image and its metadata to `out_dir`; returns the metadata records."""
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level, height, width)
    jobs = [(prompt, seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(num_images_per_prompt))]

    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open(Path(out_dir) / "metadata.jsonl", "w") as metadata, tqdm(
        total=len(jobs), desc="images", disable=not progress
    ) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            trajectory = sample(
                adapter,
                [prompt for prompt, _ in batch],
                generators=[torch.Generator("cpu").manual_seed(image_seed) for _, image_seed in batch],
                sampler=sampler,
                **asdict(settings),
            )
            for offset, ((prompt, image_seed), image) in enumerate(zip(batch, adapter.to_pil(trajectory.images))):
                file = f"images/{start + offset:05d}.png"
                image.save(Path(out_dir) / file)
                record = {
                    "file": file,
                    "prompt": prompt,
                    "seed": image_seed,
                    "sampler": sampler,
                    "noise_level": settings.noise_level,
                    "steps": settings.num_inference_steps,
                    "guidance": settings.guidance_scale,
                    "height": settings.height,
                    "width": settings.width,
                    **(extra_metadata or {}),
                }
                metadata.write(json.dumps(record) + "\n")
                metadata.flush()
                records.append(record)
            bar.update(len(batch))
    return records
