"""TTSnap: denoise N seeds of a prompt in parallel and prune them early, ranked by a noise-aware reward of their
decoded x̂0, so the budget goes to the seeds that look promising; the survivors finish and the clean reward picks
the best.

At each prune step (e.g. steps 2, 6, 11 of 20), after that step's model call, the alive candidates are scored and
the top max(1, round(α · n)) of n kept (α: that step's keep fraction), halves rounded up. The authors' simulation
code rounds with Python's round, halves to even, so where α · n is a whole number and a half with an even whole
part it keeps one fewer than here (5 · 0.5: 3 here, 2 there), and its budgets differ to match. The noise-aware
reward is a student trained by `align-diffusion train-reward noise-aware` (spec `clip:DIR`); any reward works,
scored on x̂0. Budget: each alive candidate costs one model evaluation per step, so pruning buys seeds:
`seeds_for_budget` gives the largest N whose cost fits a best-of-N budget.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import torch

from align_diffusion.models.base import MODEL_OPTIONS, PipelineAdapter, is_whole_number, recorded_model_options
from align_diffusion.rewards.base import Reward
from align_diffusion.rewards.noise_aware import student_reports, unfit_run
from align_diffusion.sampling.loop import check_count, check_guidance, check_noise_levels, resolve_settings
from align_diffusion.steering.candidates import (
    Budget,
    SteeringResult,
    Timer,
    best_index,
    candidate_generators,
    denoise_step,
    one_prompt,
    score_candidates,
)

PRUNE_STEPS = (2, 6, 11)  # the default prune steps of a 20-step run, and the fraction each keeps
KEEP = (0.4, 0.4, 0.5)


def kept(count: int, fraction: float) -> int:
    """How many of `count` candidates a prune step keeps: max(1, round(fraction · count)), halves rounded up (not
    to even, as the authors' simulation code's Python round does: 2.5 keeps 3 here, 2 there). The product is taken
    in decimal, as the fraction is written: in binary 0.35 · 90 falls just short of 31.5."""
    product = Decimal(str(float(fraction))) * count
    return max(1, int(product.to_integral_value(rounding=ROUND_HALF_UP)))


def check_schedule(prune_steps: list[int], keep: list[float], num_inference_steps: int) -> None:
    if len(prune_steps) != len(keep):
        raise ValueError(f"TTSnap needs one keep fraction per prune step, got steps {prune_steps} and keep {keep}")
    if sorted(set(prune_steps)) != list(prune_steps) or not all(
            is_whole_number(s) and 0 <= s < num_inference_steps for s in prune_steps):
        defaults = (" (the defaults, made for 20 steps: give prune steps and keep fractions that fit)"
                    if tuple(prune_steps) == PRUNE_STEPS else "")
        raise ValueError(f"prune steps must be increasing step indices in [0, {num_inference_steps}), "
                         f"got {prune_steps}{defaults}")
    if not all(0 < fraction <= 1 for fraction in keep):
        raise ValueError(f"keep fractions must lie in (0, 1], got {keep}")


def check_ttsnap_options(num_inference_steps: int, guidance_scale: float, negative_prompt: str | None,
                         prune_reward: Reward, *, num_seeds: int, prune_steps: list[int], keep: list[float],
                         timesteps=None, made_with: dict | None = None) -> None:
    """The checks of TTSnap's options at the run's steps and guidance, which need no model
    (`steering.steer.check_steering`): among them, that each noise-aware student among the prune reward's terms was
    trained for such runs (with the model's `timesteps` for the run, for its schedule too, and `made_with`, its
    image size and options: `noise_aware.unfit_run`)."""
    prune_steps, keep = list(prune_steps), list(keep)
    check_schedule(prune_steps, keep, num_inference_steps)
    check_count("num_seeds", num_seeds)
    first_prune_step = prune_steps[0] if prune_steps else None
    for spec, report in student_reports(prune_reward).items():
        if problem := unfit_run(report, num_inference_steps, guidance_scale, negative_prompt, first_prune_step,
                                timesteps, made_with):
            raise ValueError(f"prune reward {spec}: {problem}")


def model_evals(num_seeds: int, prune_steps: list[int], keep: list[float], num_inference_steps: int) -> int:
    """Denoiser evaluations of a TTSnap run: the alive candidates summed over the steps."""
    alive, total, schedule = num_seeds, 0, dict(zip(prune_steps, keep))
    for step in range(num_inference_steps):
        total += alive
        if step in schedule:
            alive = kept(alive, schedule[step])
    return total


def seeds_for_budget(budget: int, prune_steps: list[int], keep: list[float], num_inference_steps: int) -> int:
    """The largest number of seeds whose model evaluations fit in `budget` (0 when one unpruned run does not)."""
    check_schedule(prune_steps, keep, num_inference_steps)
    seeds = 0
    while model_evals(seeds + 1, prune_steps, keep, num_inference_steps) <= budget:
        seeds += 1
    return seeds


@torch.no_grad()
def ttsnap(
    adapter: PipelineAdapter,
    prompt: str,
    reward: Reward,
    prune_reward: Reward | None = None,
    *,
    num_seeds: int = 16,
    prune_steps: list[int] = PRUNE_STEPS,
    keep: list[float] = KEEP,
    index: int = 0,
    seed: int = 0,
    sampler: str = "ode",
    noise_level: float | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> SteeringResult:
    """TTSnap on `prompt` (prompt number `index` of a run); see the module docstring. `prune_reward` ranks the x̂0s
    at the prune steps (default: `reward`). `winner` is the seed's candidate number (0 … num_seeds − 1)."""
    prompt = one_prompt(prompt)
    prune_reward = reward if prune_reward is None else prune_reward
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level, height, width)
    check_guidance(adapter, settings.guidance_scale, negative_prompt)
    prune_steps, keep = list(prune_steps), list(keep)
    schedule = adapter.schedule(settings.num_inference_steps, settings.height, settings.width)
    options = {option: getattr(adapter, option) for option in MODEL_OPTIONS}
    made_with = {"height": settings.height, "width": settings.width, **recorded_model_options(type(adapter), options)}
    check_ttsnap_options(settings.num_inference_steps, settings.guidance_scale, negative_prompt, prune_reward,
                         num_seeds=num_seeds, prune_steps=prune_steps, keep=keep, timesteps=schedule.timesteps,
                         made_with=made_with)
    check_noise_levels(sampler, settings.levels(), schedule)  # every step's, before the first model call
    budget = Budget()
    generators = candidate_generators(seed, index, num_seeds)
    alive = torch.arange(num_seeds)  # candidate numbers still running
    survivors, unscored = [], []
    with Timer(budget):
        embeds = adapter.encode_prompt([prompt], settings.guidance_scale, num_seeds, negative_prompt)
        x = adapter.initial_noise(generators, settings.height, settings.width)
        for i in range(settings.num_inference_steps):
            out = denoise_step(adapter, x, i, schedule, embeds.select(alive), settings.guidance_scale, sampler,
                               settings.levels()[i], [generators[c] for c in alive], budget)
            x = out.prev_sample
            if i in prune_steps:
                scores = score_candidates(prune_reward, adapter.decode(out.pred_x0), prompt, budget)
                unscored.append(int(torch.isnan(scores).sum()))  # ranked last, so pruned first
                count = kept(len(alive), keep[prune_steps.index(i)])
                order = torch.nan_to_num(scores, nan=float("-inf")).argsort(descending=True, stable=True)[:count]
                order = order.sort().values
                x, alive = x[order], alive[order]
                survivors.append(alive.tolist())
        images = adapter.decode(x).cpu()
        final = score_candidates(reward, images, prompt, budget)
        best = best_index(final)
    return SteeringResult(prompt, seed + index, "ttsnap", images[best], float(final[best]), int(alive[best]), budget,
                          {"candidate_rewards": final.tolist(), "survivors": survivors, "unscored": unscored})
