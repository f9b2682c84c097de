"""Feynman–Kac steering (Singhal et al., 2025): k particles of one prompt run through a stochastic sampler and are
resampled by reward potentials along the way; the final pick is the particle with the best reward.

At each step of the resampling schedule (start, start + interval, … up to end, plus the last step) every
particle's x̂0 is decoded and scored, r_s. By default the schedule spans the paper's window, 20 % to 80 % of the
steps (its text-to-image runs score steps 20, 40, 60 and 80 of 100): the earliest x̂0s say little about the final
reward, and every scored step costs a decode of all particles. The default interval, though, is a fixed 5 steps,
not the paper's: the authors' released text-to-image script scores every 20th of 100 steps (start 20, end 80) and
resamples adaptively, when the ESS falls below 0.5 · k, whereas the default here scores 20, 25, … 80 of 100 and
resamples at each. `resample_interval=num_inference_steps // 5, adaptive_threshold=0.5` gives the script's schedule,
but not all its decisions: where it does not resample, the authors' code drops the weights and the next scored step
weighs afresh, while here they are carried (below), so the two can resample at different steps.
Potentials, in log space with tilt λ, over a particle's lineage:

    max         λ · max over scored steps s ≤ t of r_s
    sum         λ · Σ_{s ≤ t} r_s
    difference  λ · (r_t − r_prev), r_prev = 0 at the first scored step, so the product over a lineage's steps
                telescopes to exp(λ · r) of its latest weighed score

Particles are resampled (multinomial or systematic) in proportion to their weights. With adaptive resampling they
are resampled only when the effective sample size 1 / Σ W_i² of the normalized weights falls below
threshold · k, or when a particle could not be scored (NaN), which must not live on; otherwise the weights are
carried to the next scored step and multiplied by its potentials. The last step's score is the clean reward of
the finished images; it is not weighed (no resampling follows it, and the pick is the best final reward, not a
draw), so the particles are tilted by their intermediate x̂0 scores, not by exp(λ · r_final).

A deterministic sampler would leave resampled copies identical forever, so it is refused for k > 1, as are noise
levels that draw no noise after the first resampling.
"""

from __future__ import annotations

import math
import numbers

import torch

from align_diffusion.models.base import PipelineAdapter, is_whole_number
from align_diffusion.names import FK_POTENTIALS, FK_RESAMPLING
from align_diffusion.rewards.base import Reward, RewardError
from align_diffusion.sampling.loop import check_count, check_guidance, check_noise_levels, resolve_settings
from align_diffusion.steering.candidates import (
    SEED_STRIDE,
    Budget,
    SteeringResult,
    Timer,
    best_index,
    candidate_generators,
    denoise_step,
    one_prompt,
    score_candidates,
)

DEFAULT_WINDOW = (0.2, 0.8)  # fractions of the steps: the default first and last scheduled step


def resampling_steps(num_inference_steps: int, start: int | None, interval: int, end: int | None) -> list[int]:
    """The step indices whose x̂0 is scored: start, start + interval, … ≤ end, and the last step. A start or end of
    None is its end of DEFAULT_WINDOW (20 % and 80 % of the steps, rounded down)."""
    last = num_inference_steps - 1
    defaults = [int(fraction * num_inference_steps) for fraction in DEFAULT_WINDOW]
    start, end = (defaults[0] if start is None else start), (defaults[1] if end is None else end)
    if not 0 <= start <= last or interval < 1 or end < start:
        raise ValueError(f"resampling schedule start={start}, interval={interval}, end={end} does not fit "
                         f"{num_inference_steps} steps (0 <= start <= end, interval >= 1; by default start and end "
                         f"are {defaults[0]} and {defaults[1]}, 20 % and 80 % of the steps)")
    return sorted({*range(start, min(end, last) + 1, interval), last})


def default_fk_sampler(is_flow: bool) -> str:
    """FK's sampler unless one is given: Flow-SDE for flow models, DDIM (η = 1) for ε-models."""
    return "flow-sde" if is_flow else "ddim"


def check_fk_options(num_inference_steps: int, levels: list[float], *, sampler: str, num_particles: int, lam: float,
                     potential: str, resampling: str, adaptive_threshold: float | None, resample_start: int | None,
                     resample_interval: int, resample_end: int | None) -> None:
    """The checks of FK's options at the run's steps and noise levels, which need no model
    (`steering.steer.check_steering`)."""
    check_count("num_particles", num_particles)
    if num_particles > 1 and (sampler == "ode" or max(levels) == 0):
        raise ValueError(f"FK steering with {num_particles} particles needs a stochastic sampler (flow-sde, "
                         "dance-sde, cps, or ddim with noise_level > 0): resampled copies of a deterministic "
                         "sampler stay identical, so the particles would collapse onto a few images")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (the tilt λ) must be a finite number >= 0, got {lam!r}")
    if potential not in FK_POTENTIALS:
        raise ValueError(f"potential must be one of {FK_POTENTIALS}, got {potential!r}")
    if resampling not in FK_RESAMPLING:
        raise ValueError(f"resampling must be one of {FK_RESAMPLING}, got {resampling!r}")
    if adaptive_threshold is not None and not 0 < adaptive_threshold <= 1:
        raise ValueError(f"adaptive_threshold must lie in (0, 1], got {adaptive_threshold}")
    for name, value in {"resample_start": resample_start, "resample_interval": resample_interval,
                        "resample_end": resample_end}.items():
        if value is not None and not is_whole_number(value):
            raise ValueError(f"{name} must be a whole number of steps, got {value!r}")
    scored = resampling_steps(num_inference_steps, resample_start, resample_interval, resample_end)
    if num_particles > 1 and len(scored) > 1 and max(levels[scored[0] + 1:]) == 0:
        raise ValueError(f"noise levels {levels} draw no noise after step {scored[0]}, the first resampling: "
                         "resampled copies would stay identical, so the particles would collapse onto a few images")


def log_potential(history: torch.Tensor, potential: str, lam: float) -> torch.Tensor:
    """log G_t per particle from its lineage's scores so far, `history` (k, s) with the current step last."""
    if potential == "max":
        return lam * history.max(dim=1).values
    if potential == "sum":
        return lam * history.sum(dim=1)
    if potential == "difference":
        previous = history[:, -2] if history.shape[1] > 1 else 0.0
        return lam * (history[:, -1] - previous)
    raise ValueError(f"potential must be one of {FK_POTENTIALS}, got {potential!r}")


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """1 / Σ W_i² of the normalized weights (k for uniform weights, 1 when one particle holds all)."""
    weights = torch.softmax(log_weights.double(), dim=0)
    return float(1 / (weights**2).sum())


def resample_indices(log_weights: torch.Tensor, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """k ancestor indices drawn in proportion to the weights."""
    k = len(log_weights)
    weights = torch.softmax(log_weights.double(), dim=0)
    if scheme == "multinomial":
        return torch.multinomial(weights, k, replacement=True, generator=generator)
    if scheme == "systematic":
        positions = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(k)) / k
        cumulative = weights.cumsum(0)
        cumulative[-1] = 1.0  # guard against rounding below the last position
        return torch.searchsorted(cumulative, positions)
    raise ValueError(f"resampling must be one of {FK_RESAMPLING}, got {scheme!r}")


@torch.no_grad()
def fk_steering(
    adapter: PipelineAdapter,
    prompt: str,
    reward: Reward,
    *,
    num_particles: int = 4,
    potential: str = "max",
    lam: float = 10.0,
    resample_start: int | None = None,
    resample_interval: int = 5,
    resample_end: int | None = None,
    resampling: str = "multinomial",
    adaptive_threshold: float | None = None,
    index: int = 0,
    seed: int = 0,
    sampler: str | None = None,
    noise_level: float | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> SteeringResult:
    """FK steering of `prompt` (prompt number `index` of a run) with `num_particles` particles; see the module
    docstring. `sampler` defaults to Flow-SDE for flow models and DDIM (η = 1) for ε-models. `winner` is the
    candidate number of the particle whose starting noise began the winning lineage; the details' `candidate_rewards`
    and `ancestors` (each slot's starting candidate) list the final particle slots."""
    prompt = one_prompt(prompt)
    sampler = sampler or default_fk_sampler(adapter.is_flow)
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level, height, width)
    check_guidance(adapter, settings.guidance_scale, negative_prompt)
    levels = settings.levels()
    check_fk_options(settings.num_inference_steps, levels, sampler=sampler, num_particles=num_particles, lam=lam,
                     potential=potential, resampling=resampling, adaptive_threshold=adaptive_threshold,
                     resample_start=resample_start, resample_interval=resample_interval, resample_end=resample_end)
    steps = settings.num_inference_steps
    scored_steps = resampling_steps(steps, resample_start, resample_interval, resample_end)

    budget = Budget()
    generators = candidate_generators(seed, index, num_particles)
    # Candidate −1's seed, which no particle's noise uses: seeded like particle 0, the resampling draws would be a
    # copy of its noise stream.
    resampler = torch.Generator("cpu").manual_seed(seed + index - SEED_STRIDE)
    history = torch.zeros(num_particles, 0)  # each particle's lineage scores at the scored steps so far
    log_weights = torch.zeros(num_particles)  # carried between scored steps that skip resampling
    ess, resampled, unscored, lineage = [], [], [], torch.arange(num_particles)
    schedule = adapter.schedule(steps, settings.height, settings.width)
    check_noise_levels(sampler, levels, schedule)  # every step's, before the first model call
    with Timer(budget):
        embeds = adapter.encode_prompt([prompt], settings.guidance_scale, num_particles, negative_prompt)
        x = adapter.initial_noise(generators, settings.height, settings.width)
        for i in range(steps):
            out = denoise_step(adapter, x, i, schedule, embeds, settings.guidance_scale, sampler, levels[i],
                               generators, budget)
            x = out.prev_sample
            if i not in scored_steps:
                continue
            last = i == steps - 1
            images = adapter.decode(x if last else out.pred_x0)
            scores = score_candidates(reward, images, prompt, budget)
            history = torch.cat([history, scores[:, None]], dim=1)
            unscored.append(int(torch.isnan(scores).sum()))
            if last:
                break
            log_weights = log_weights + log_potential(history, potential, lam)
            # An unscorable particle (NaN, or an infinite score) dies: resampled away at once. Some particle is
            # alive, as score_candidates raises when none can be scored, and only live particles' weights are ever
            # carried; finite scores leave no finite weight only where λ times them overflows.
            log_weights = log_weights.masked_fill(torch.isnan(log_weights), -math.inf)
            if torch.isposinf(log_weights).any() or torch.isneginf(log_weights).all():
                raise RewardError(f"{reward.name} left FK no finite weights to resample {prompt!r} by at step {i} "
                                  f"(scores {scores.tolist()}, lam {lam}): the tilted potentials overflow; lower lam")
            ess.append(effective_sample_size(log_weights))
            carry = adaptive_threshold is not None and ess[-1] >= adaptive_threshold * num_particles
            if carry and torch.isfinite(log_weights).all():
                resampled.append(False)
                log_weights = log_weights - torch.logsumexp(log_weights, 0)
                continue
            ancestors = resample_indices(log_weights, resampling, resampler)
            x, history, lineage = x[ancestors], history[ancestors], lineage[ancestors]
            log_weights = torch.zeros(num_particles)
            resampled.append(True)
        final = history[:, -1]
        best = best_index(final)
    details = {"candidate_rewards": final.tolist(), "scored_steps": scored_steps, "ess": ess, "resampled": resampled,
               "unscored": unscored, "ancestors": lineage.tolist()}
    return SteeringResult(prompt, seed + index, "fk", images[best].cpu(), float(final[best]), int(lineage[best]),
                          budget, details)
