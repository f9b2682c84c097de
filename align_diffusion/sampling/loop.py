"""The sampling loop: prompts × images per prompt through any adapter with any sampler, returning a trajectory.

Image k of a run (prompt-major order) owns one CPU `torch.Generator`; its initial noise and every SDE noise draw
come from that generator alone, so an image does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass

import torch
from tqdm.auto import tqdm

from align_diffusion.models.base import PipelineAdapter, PromptEmbeds, Schedule, is_whole_number
from align_diffusion.names import DEFAULT_NOISE_LEVEL, SEED_LIMIT
from align_diffusion.rewards.base import prompt_list
from align_diffusion.sampling.steps import (
    StepOutput,
    cps_step,
    dance_sde_step,
    ddim_step,
    ddim_eps_share,
    ddim_variance,
    flow_ode_step,
    flow_sde_step,
)

FLOW_SAMPLERS = ("ode", "flow-sde", "dance-sde", "cps")
DIFFUSION_SAMPLERS = ("ode", "ddim")
# The largest level valid at every step (see `check_noise_level`; DDIM's η may exceed 1 at some steps only).
LARGEST_NOISE_LEVEL = {"ode": 0.0, "flow-sde": math.inf, "dance-sde": math.inf, "cps": 1.0, "ddim": 1.0}


@dataclass
class Trajectory:
    """Everything a trainer, a dense reward or a gallery needs from one sampling run of B images over T steps."""

    prompts: list[str]  # (B,) the prompt of each image
    latents: torch.Tensor  # (B, T + 1, ...) float32: the initial noise, then the state after each step
    log_probs: torch.Tensor  # (B, T) log-prob of each transition; NaN where the step was deterministic
    pred_x0: torch.Tensor  # (B, T, ...) float32: the model's x̂0 at each step
    stochastic_steps: list[int]  # step indices that drew noise (and have log-probs)
    schedule: Schedule
    embeds: PromptEmbeds
    sampler: str
    noise_level: float | list[float]  # one level for every step, or one per step
    guidance_scale: float
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1], when decoded

    def level_at(self, step_index: int) -> float:
        return self.noise_level[step_index] if isinstance(self.noise_level, list) else self.noise_level

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]


def sampler_problem(is_flow: bool, sampler: str) -> str | None:
    """Why `sampler` does not fit a flow-matching (`is_flow`) or diffusion model, naming the samplers that do; None
    when it fits. Told by the model family alone, before the model loads."""
    allowed = FLOW_SAMPLERS if is_flow else DIFFUSION_SAMPLERS
    if sampler not in allowed:
        return f"{sampler!r} does not fit a {'flow-matching' if is_flow else 'diffusion'} model; use one of {allowed}"
    return None


def check_sampler(adapter: PipelineAdapter, sampler: str) -> None:
    """Refuses a sampler that does not fit the model type, naming the ones that do."""
    if problem := sampler_problem(adapter.is_flow, sampler):
        raise ValueError(f"sampler {problem}")
    if adapter.is_flow and sampler != "ode" and adapter.pipe.scheduler.config.get("invert_sigmas", False):
        raise ValueError(f"sampler {sampler!r}: the pipeline's scheduler sets invert_sigmas (σ from 0 to 1), and the "
                         "SDE samplers step σ from 1 to 0; only the ODE samples it")


def check_noise_level(sampler: str, level: float, schedule: Schedule, step_index: int) -> None:
    """Refuses a noise level at which `sampler`'s step at `step_index` is undefined: NaN, infinite or negative;
    for CPS an a above 1 (its noise share sin(aπ/2) turns back, then negative); for DDIM an η whose σ² exceeds
    1 - ᾱ_prev (the mean's square root would be of a negative number)."""
    if not 0 <= level < math.inf:
        raise ValueError(f"noise level must be a finite number >= 0, got {level} at step {step_index}")
    if sampler == "cps" and level > LARGEST_NOISE_LEVEL["cps"]:
        raise ValueError(f"cps noise level a must lie in [0, 1], got {level} at step {step_index}")
    if sampler == "ddim":
        alpha, alpha_prev = schedule.alphas_cumprod[step_index], schedule.alphas_cumprod_prev[step_index]
        if ddim_eps_share(alpha, alpha_prev, level) < 0:
            largest = float(((1 - alpha_prev) / ddim_variance(alpha, alpha_prev)) ** 0.5)
            raise ValueError(f"DDIM η = {level} at step {step_index} makes σ² exceed 1 - ᾱ_prev; η may be at most "
                             f"{largest:.6g} there (η <= 1 fits every step)")


def check_noise_levels(sampler: str, levels: Sequence[float], schedule: Schedule) -> None:
    """`check_noise_level` of every step's level, for a loop to call before its first model call."""
    for step_index, level in enumerate(levels):
        check_noise_level(sampler, level, schedule, step_index)


def take_step(
    adapter: PipelineAdapter,
    sampler: str,
    prediction: torch.Tensor,
    latents: torch.Tensor,
    schedule: Schedule,
    step_index: int,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """One step of `sampler` at `step_index`; `noise_level` 0 (or sampler "ode") is the deterministic step."""
    check_noise_level(sampler, noise_level, schedule, step_index)
    if not adapter.is_flow:
        eta = 0.0 if sampler == "ode" else noise_level
        alpha, alpha_prev = schedule.alphas_cumprod[step_index], schedule.alphas_cumprod_prev[step_index]
        return ddim_step(prediction, latents, alpha, alpha_prev, eta, adapter.prediction_type, noise, prev_sample)
    sigma, sigma_next = schedule.sigmas[step_index], schedule.sigmas[step_index + 1]
    if sampler == "ode":
        return flow_ode_step(prediction, latents, sigma, sigma_next)
    step = {"flow-sde": flow_sde_step, "dance-sde": dance_sde_step, "cps": cps_step}[sampler]
    return step(prediction, latents, sigma, sigma_next, noise_level, noise=noise, prev_sample=prev_sample)


def noisy_steps(adapter: PipelineAdapter, sampler: str, schedule: Schedule, levels: list[float],
                steps: Sequence[int]) -> list[int]:
    """Which of `steps` draw noise at their levels, told before any model call by a step on a one-value stand-in
    latent: a zero std makes a step deterministic (CPS's last, or DDIM's last where its scheduler sets ᾱ_prev to 1)."""
    probe = torch.zeros(1, 1)
    return [i for i in steps if sampler != "ode" and levels[i] > 0
            and take_step(adapter, sampler, probe, probe, schedule, i, levels[i], probe).log_prob is not None]


def step_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw per image from its own generator (on the generator's device)."""
    draws = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(like.device)


@dataclass
class Settings:
    """A run's sampling settings with every default filled in from the model and the sampler."""

    num_inference_steps: int
    guidance_scale: float
    noise_level: float | list[float]
    height: int
    width: int

    def levels(self) -> list[float]:
        """The noise level of every step."""
        if isinstance(self.noise_level, list):
            return self.noise_level
        return [self.noise_level] * self.num_inference_steps


def noise_levels_problem(sampler: str, levels) -> str | None:
    """Why noise levels do not fit `sampler`, told without the model: above 0 for the ODE, which draws no noise, so
    they would change nothing; above 1 for CPS (`check_noise_level`)."""
    if sampler == "ode" and any(level > 0 for level in levels):
        stochastic = ", ".join(s for s in DEFAULT_NOISE_LEVEL if s != "ode")
        return (f"the ode sampler draws no noise, so a level above 0 would change nothing; use a stochastic "
                f"sampler ({stochastic})")
    if sampler == "cps" and max(levels, default=0) > LARGEST_NOISE_LEVEL["cps"]:
        return f"cps noise levels a must lie in [0, 1], got {max(levels)}"
    return None


def check_count(name: str, value) -> None:
    """Refuses a `value` of the setting `name` (steps, height, width) that is no whole number >= 1."""
    if not is_whole_number(value) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def checked_seed(seed, count: int = 1) -> int:
    """`seed` as an int; ValueError unless a whole number with seed … seed + count − 1 (the generator seeds a run
    derives from it) in [0, 2**32): torch's CPU generator reads only a seed's low 32 bits (a negative one modulo
    2**64), so seed 2**32, or seed −1's image 1, would draw the noise of image 0 of a seed-0 run."""
    if not is_whole_number(seed) or not 0 <= seed <= SEED_LIMIT - count:
        limit = "[0, 2**32)" if count == 1 else f"[0, 2**32 − {count}] (generators up to seed + {count - 1} follow)"
        raise ValueError(f"seed must be a whole number in {limit}, got {seed!r}")
    return int(seed)


def checked_noise_level(sampler: str, noise_level, num_inference_steps: int) -> float | list[float]:
    """`noise_level` (None: the sampler's default; a number, or a sequence of one per step) refused, without the
    model, unless each step's is a finite number >= 0 that `sampler` takes (`noise_levels_problem`); a sequence comes
    back as a list of floats."""
    level = DEFAULT_NOISE_LEVEL[sampler] if noise_level is None else noise_level
    if getattr(level, "ndim", None) == 0:  # a 0-d tensor or array holds one level
        level = level.item()
    if isinstance(level, str) or not isinstance(level, numbers.Real | Iterable):
        raise ValueError(f"noise_level must be a number or a sequence of one per step, got {level!r}")
    if not isinstance(level, numbers.Real):  # one per step: a list, tuple, array or tensor
        level = [float(value) for value in level]
        if len(level) != num_inference_steps:
            raise ValueError(f"got {len(level)} noise levels for {num_inference_steps} steps")
    levels = level if isinstance(level, list) else [level] * num_inference_steps
    for step, value in enumerate(levels):
        if isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"noise_level must be a finite number >= 0, got {value!r}"
                             + (f" at step {step}" if isinstance(level, list) else ""))
    if problem := noise_levels_problem(sampler, levels):
        raise ValueError(f"noise_level: {problem}")
    return level if isinstance(level, list) else float(level)


def resolve_settings(
    adapter: PipelineAdapter, sampler: str, num_inference_steps=None, guidance_scale=None, noise_level=None,
    height=None, width=None,
) -> Settings:
    """Fills unset settings with the model family's (steps, guidance, size) and the sampler's (noise level), and
    refuses a sampler, steps, guidance, noise levels and sizes the model cannot sample with (ValueError naming the
    setting). A sequence of noise levels (one per step) comes back as a list of floats."""
    check_sampler(adapter, sampler)
    steps = adapter.default_steps if num_inference_steps is None else num_inference_steps
    check_count("num_inference_steps", steps)
    height, width = adapter.image_size(height, width)
    settings = Settings(
        num_inference_steps=steps,
        guidance_scale=adapter.default_guidance if guidance_scale is None else guidance_scale,
        noise_level=checked_noise_level(sampler, noise_level, steps),
        height=height,
        width=width,
    )
    for name in ("height", "width"):
        check_count(name, getattr(settings, name))
    guidance = settings.guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance!r}")
    adapter.check_size(settings.height, settings.width)
    return settings


def guidance_problem(family: type[PipelineAdapter] | None, guidance_scale: float | None, negative_prompt,
                     guidance_rescale: float, true_cfg_scale: float, mode: str | None = None) -> tuple[str, str] | None:
    """(option, why) for a negative prompt or guidance rescale that the guidance would ignore, because it runs no
    classifier-free guidance, or for FLUX's true CFG without the negative prompt it steers away from; None if
    neither. `mode`: the loaded model's `guidance_mode` (LCM UNets run none); None: judged before the model loads,
    from its family (an adapter class, or None when not known yet) and `guidance_scale` (None: not known yet)."""
    if true_cfg_scale > 1 and negative_prompt is None:
        return "true_cfg_scale", (f"FLUX's true classifier-free guidance ({true_cfg_scale}) steers away from a "
                                  "negative prompt, and none was given (the stock pipeline then runs no CFG)")
    ignored = "negative_prompt" if negative_prompt is not None else "guidance_rescale" if guidance_rescale else None
    if ignored is None or true_cfg_scale > 1:
        return None
    takes_true_cfg = family is not None and family.takes_true_cfg_scale
    if mode is not None:
        runs_cfg = mode == "cfg"
    elif takes_true_cfg:  # before the model loads: FLUX runs CFG only as true CFG
        runs_cfg = False
    elif guidance_scale is None:  # not known yet
        return None
    else:
        runs_cfg = guidance_scale > 1
    if runs_cfg:
        return None
    why = ("FLUX runs classifier-free guidance only as true CFG (a true_cfg_scale > 1)" if takes_true_cfg else
           f"guidance {guidance_scale} runs no classifier-free guidance{f' ({mode})' if mode else ''}")
    return ignored, f"{why}, so the {ignored.replace('_', ' ')} would have no effect"


def check_negative_prompts(negative_prompt, prompts: list[str]) -> None:
    """A list of negative prompts holds one per prompt (a single string serves them all)."""
    if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")


def check_guidance(adapter: PipelineAdapter, guidance_scale: float, negative_prompt) -> None:
    """ValueError, naming the option, for a `guidance_problem` of the adapter's options with `guidance_scale`."""
    problem = guidance_problem(type(adapter), guidance_scale, negative_prompt, adapter.guidance_rescale,
                               adapter.true_cfg_scale, adapter.guidance_mode(guidance_scale))
    if problem:
        raise ValueError(": ".join(problem))


@torch.no_grad()
def sample(
    adapter: PipelineAdapter,
    prompts: list[str],
    *,
    num_images_per_prompt: int = 1,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str = "ode",
    noise_level: float | Sequence[float] | None = None,
    noise_window: Iterable[int] | None = None,
    generators: list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | list[str] | None = None,
    decode: bool = True,
    progress: bool = False,
) -> Trajectory:
    """Samples len(prompts) × num_images_per_prompt images and records the trajectory.

    `generators` gives one CPU generator per image (default: image k seeded `seed + k`); it draws the image's
    initial noise unless `latents` gives it (then only the SDE noise comes from the generator). `noise_window` lists
    the step indices that draw SDE noise; the other steps take the deterministic step (default: all steps).
    `noise_level` is the sampler's a, η or DDIM η (default: DEFAULT_NOISE_LEVEL[sampler]), or one per step
    (a noise table such as DenseGRPO's calibrated ψ(t)).
    """
    prompts = prompt_list(prompts)
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level, height, width)
    num_inference_steps, guidance_scale, noise_level, height, width = astuple(settings)
    check_count("num_images_per_prompt", num_images_per_prompt)
    check_guidance(adapter, guidance_scale, negative_prompt)
    check_negative_prompts(negative_prompt, prompts)
    levels = settings.levels()
    batch = len(prompts) * num_images_per_prompt
    if generators is None:
        seed = checked_seed(seed, batch)
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)]
    if isinstance(generators, torch.Generator):
        raise TypeError(f"generators takes one torch.Generator per image, a list of {batch}, not a single generator")
    generators = list(generators)  # a tuple too, which diffusers' noise drawing would not take
    if not all(isinstance(generator, torch.Generator) for generator in generators):
        raise TypeError(f"generators must be torch.Generators, got {sorted({type(g).__name__ for g in generators})}")
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for {batch} images")
    window = set(range(num_inference_steps) if noise_window is None else noise_window)
    if not window <= set(range(num_inference_steps)):
        raise ValueError(f"noise_window indices must lie in [0, {num_inference_steps}), got {sorted(window)}")

    schedule = adapter.schedule(num_inference_steps, height, width)
    check_noise_levels(sampler, [level if i in window else 0.0 for i, level in enumerate(levels)], schedule)
    embeds = adapter.encode_prompt(prompts, guidance_scale, num_images_per_prompt, negative_prompt)
    if latents is None:
        x = adapter.initial_noise(generators, height, width)
    elif latents.shape != (batch, *adapter.latent_shape(height, width)):
        raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {batch} images of {height}×{width}")
    else:
        x = latents.to(adapter.device, torch.float32)
    states, x0s, log_probs = [x], [], torch.full((batch, num_inference_steps), float("nan"), device=x.device)
    stochastic = []
    for i in tqdm(range(num_inference_steps), desc="sampling", disable=not progress, leave=False):
        prediction = adapter.predict(x, schedule.timesteps[i], embeds, guidance_scale)
        noisy = sampler != "ode" and i in window
        noise = step_noise(generators, x) if noisy and levels[i] > 0 else None
        out = take_step(adapter, sampler, prediction, x, schedule, i, levels[i] if noisy else 0.0, noise)
        if out.log_prob is not None:
            log_probs[:, i] = out.log_prob
            stochastic.append(i)
        x = out.prev_sample
        states.append(x)
        x0s.append(out.pred_x0)
    trajectory = Trajectory(
        prompts=[p for p in prompts for _ in range(num_images_per_prompt)],
        latents=torch.stack(states, dim=1),
        log_probs=log_probs,
        pred_x0=torch.stack(x0s, dim=1),
        stochastic_steps=stochastic,
        schedule=schedule,
        embeds=embeds,
        sampler=sampler,
        noise_level=noise_level,
        guidance_scale=guidance_scale,
    )
    if decode:
        trajectory.images = adapter.decode(trajectory.final_latents)
    return trajectory


def sample_images(adapter: PipelineAdapter, prompts: list[str], *, seed: int = 0, batch_size: int = 16,
                  desc: str | None = None, **sample_kwargs) -> torch.Tensor:
    """Decoded images (on the CPU), one per prompt, sampled `batch_size` at a time; image k seeded `seed + k`,
    so the result does not depend on `batch_size` (beyond float rounding: batched kernels may sum in another
    order, ~1e-5, which can move a saved 8-bit pixel by one level). A progress bar when `desc` is given."""
    prompts = prompt_list(prompts)
    check_count("batch_size", batch_size)
    if "num_images_per_prompt" in sample_kwargs:
        raise TypeError("sample_images draws one image per prompt: repeat a prompt for more of its images")
    if "generators" in sample_kwargs:
        raise TypeError("sample_images seeds image k with seed + k: pass seed, or call sample with generators")
    seed = checked_seed(seed, len(prompts))
    negative_prompt = sample_kwargs.pop("negative_prompt", None)  # one for all prompts, or one per prompt
    check_negative_prompts(negative_prompt, prompts)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + k) for k in range(len(batch))]
        negative = negative_prompt[start : start + batch_size] if isinstance(negative_prompt, list) else negative_prompt
        images.append(sample(adapter, batch, generators=generators, negative_prompt=negative,
                             **sample_kwargs).images.cpu())
    return torch.cat(images)


def step_log_prob(adapter: PipelineAdapter, trajectory: Trajectory, step_index: int, index=None) -> StepOutput:
    """Re-scores the stored transition at `step_index` under the adapter's current weights (grad flows if enabled).

    `index` optionally selects a subset of the trajectory's images (an int list, slice or bool mask; one int: a
    batch of that one image).
    """
    if step_index not in trajectory.stochastic_steps:
        raise ValueError(f"step {step_index} was deterministic; stochastic steps are {trajectory.stochastic_steps}")
    if isinstance(index, numbers.Integral):  # indexing by it would drop the batch dimension
        index = [index]
    embeds = trajectory.embeds if index is None else trajectory.embeds.select(index)
    index = slice(None) if index is None else index
    x = trajectory.latents[index, step_index]
    prediction = adapter.predict(x, trajectory.schedule.timesteps[step_index], embeds, trajectory.guidance_scale)
    return take_step(
        adapter,
        trajectory.sampler,
        prediction,
        x,
        trajectory.schedule,
        step_index,
        trajectory.level_at(step_index),
        prev_sample=trajectory.latents[index, step_index + 1],
    )


@torch.no_grad()
def ode_complete(
    adapter: PipelineAdapter,
    latents: torch.Tensor,
    step_index: int,
    embeds: PromptEmbeds,
    schedule: Schedule,
    guidance_scale: float,
) -> torch.Tensor:
    """Deterministic completion: runs the ODE (DDIM η = 0 for diffusion models) from state `step_index` to the end.

    `latents` is the state before step `step_index` (step 0 starts from the initial noise); returns clean latents.
    """
    if not 0 <= step_index <= schedule.num_steps:
        raise ValueError(f"step_index must lie in [0, {schedule.num_steps}], got {step_index}")
    x = latents.float()
    for i in range(step_index, schedule.num_steps):
        prediction = adapter.predict(x, schedule.timesteps[i], embeds, guidance_scale)
        x = take_step(adapter, "ode", prediction, x, schedule, i, 0.0).prev_sample
    return x
