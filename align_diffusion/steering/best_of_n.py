"""Best-of-N: sample N candidates of a prompt, score each finished image, keep the best. The baseline the other
steering methods are measured against at the same number of denoiser evaluations (N × steps)."""

from __future__ import annotations

import torch

from align_diffusion.models.base import PipelineAdapter
from align_diffusion.rewards.base import Reward
from align_diffusion.sampling.loop import check_count, resolve_settings, sample
from align_diffusion.steering.candidates import (
    Budget,
    SteeringResult,
    Timer,
    best_index,
    candidate_generators,
    one_prompt,
    score_candidates,
)


def check_best_of_n_options(num_candidates: int, batch_size: int) -> None:
    """The checks of best-of-n's own options, which need no model (`steering.steer.check_steering`)."""
    check_count("num_candidates", num_candidates)
    check_count("batch_size", batch_size)


@torch.no_grad()
def best_of_n(
    adapter: PipelineAdapter,
    prompt: str,
    reward: Reward,
    *,
    num_candidates: int = 4,
    index: int = 0,
    seed: int = 0,
    sampler: str = "ode",
    noise_level: float | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 16,
) -> SteeringResult:
    """The best of `num_candidates` samples of `prompt` (prompt number `index` of a run) under `reward`."""
    prompt = one_prompt(prompt)
    check_best_of_n_options(num_candidates, batch_size)
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level, height, width)
    budget = Budget()
    generators = candidate_generators(seed, index, num_candidates)
    with Timer(budget):
        images = []
        for start in range(0, num_candidates, batch_size):
            part = generators[start : start + batch_size]
            batch = sample(adapter, [prompt] * len(part), generators=part, sampler=sampler,
                           num_inference_steps=settings.num_inference_steps,
                           guidance_scale=settings.guidance_scale, noise_level=settings.noise_level,
                           height=settings.height, width=settings.width, negative_prompt=negative_prompt).images
            budget.model_evals += len(part) * settings.num_inference_steps
            images.append(batch.cpu())
        images = torch.cat(images)
        scores = score_candidates(reward, images, prompt, budget, batch_size)
        winner = best_index(scores)
    return SteeringResult(prompt, seed + index, "best-of-n", images[winner], float(scores[winner]), winner, budget,
                          {"candidate_rewards": scores.tolist()})
