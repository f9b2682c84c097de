"""What every steering method shares: the budget it spent, its result, candidate seeds, one counted denoising step,
and scoring candidates so that a failing reward is never mistaken for a bad image.

Seeds: candidate 0 of prompt j is seeded `seed + j`, the image plain sampling (`align-diffusion sample`) gives;
candidate c is seeded `seed + j + c · SEED_STRIDE`. So best-of-N, TTSnap and FK start from the plain sample's noise
among others, and ReNO starts from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from align_diffusion.models.base import PipelineAdapter, PromptEmbeds, Schedule
from align_diffusion.rewards.base import Reward, RewardError
from align_diffusion.rewards.transforms import unscored_if_infinite
from align_diffusion.sampling.loop import checked_seed, step_noise, take_step
from align_diffusion.sampling.steps import StepOutput

SEED_STRIDE = 100_000


@dataclass
class Budget:
    """What a method spent on one prompt."""

    model_evals: int = 0  # images through the denoiser, one per image per step (a CFG pair counts once)
    reward_evals: int = 0  # images scored by a reward (the clean one or a noise-aware one)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SteeringResult:
    """One prompt's steered image and how it was chosen."""

    prompt: str
    seed: int  # the seed of candidate 0 (the plain sample's)
    method: str
    image: torch.Tensor  # (3, H, W) in [0, 1]
    reward: float  # the clean reward of `image`
    winner: int  # which candidate (numbered as in the module docstring) or ReNO iteration gave `image`
    budget: Budget
    details: dict = field(default_factory=dict)  # method-specific diagnostics (candidate rewards, ESS, …)

    def __post_init__(self):
        self.seed = int(self.seed)  # a numpy seed, which the methods take, is no JSON number


class Timer:
    """Adds the wall-clock seconds of a `with` block to a budget."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.budget.seconds += time.perf_counter() - self.started


def one_prompt(prompt) -> str:
    """`prompt`, checked to be one string: the methods that steer one prompt at a time (`steer` takes a list)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (steer() takes a list of them), got {type(prompt).__name__}")
    return prompt


def candidate_generators(seed: int, index: int, count: int) -> list[torch.Generator]:
    """CPU generators of candidates 0 … count − 1 of prompt `index` (see the module docstring)."""
    seed = checked_seed(seed, index + (count - 1) * SEED_STRIDE + 1)
    return [torch.Generator("cpu").manual_seed(seed + index + c * SEED_STRIDE) for c in range(count)]


def denoise_step(
    adapter: PipelineAdapter,
    x: torch.Tensor,
    step_index: int,
    schedule: Schedule,
    embeds: PromptEmbeds,
    guidance_scale: float,
    sampler: str,
    noise_level: float,
    generators: list[torch.Generator],
    budget: Budget,
) -> StepOutput:
    """One step for every image of `x` (noise from each image's own generator when the sampler is stochastic),
    counted in `budget`."""
    prediction = adapter.predict(x, schedule.timesteps[step_index], embeds, guidance_scale)
    budget.model_evals += len(x)
    stochastic = sampler != "ode" and noise_level > 0
    noise = step_noise(generators, x) if stochastic else None
    return take_step(adapter, sampler, prediction, x, schedule, step_index, noise_level if stochastic else 0.0, noise)


def score_candidates(reward: Reward, images: torch.Tensor, prompt: str, budget: Budget,
                     batch_size: int | None = None) -> torch.Tensor:
    """The reward of each of a prompt's candidate images (CPU, float32), `batch_size` at a time (default: all at
    once), counted in `budget`. An image the reward cannot score (NaN; an infinite score counts as NaN, as in
    training) never wins; when none of the prompt's candidates can be scored the reward's failure is raised, not
    papered over."""
    batch_size = batch_size or len(images)
    scores = unscored_if_infinite(torch.cat([reward(part, [prompt] * len(part)).detach().float().cpu()
                                             for part in images.split(batch_size)]))
    budget.reward_evals += len(images)
    if torch.isnan(scores).all():
        raise RewardError(f"{reward.name} could not score any of the {len(images)} candidates of {prompt!r}")
    return scores


def best_index(scores: torch.Tensor) -> int:
    """The index of the highest score, NaN counting as the lowest."""
    return int(torch.nan_to_num(scores, nan=float("-inf")).argmax())
