"""ReNO (Eyring et al., 2024): optimize the initial noise of a few-step sampler by gradient ascent on differentiable
rewards, keeping the noise near the shell where Gaussian noise lives.

Per prompt, the loss of noise ε is − reward(decode(sample(ε))) + w · (½‖ε‖² − (d − 1) · log‖ε‖), the second term
(computed in fp32) being the negative log-density of ‖ε‖ under the χ distribution with d degrees of freedom, minimal
at ‖ε‖² = d − 1. Paper defaults: SGD with lr 5, momentum 0.9, Nesterov, 50 iterations, gradient norm clipped to 0.1,
w = 0.01. Every iterate is scored; the best one (the initial noise included) is returned.

Prompts are optimized together in one batch: each image depends only on its own noise, the loss is a sum over
images, and gradients are clipped per image, so the result equals optimizing each prompt alone. A prompt whose
image the reward cannot score (NaN) at some iteration keeps its best iterate so far and its noise stops moving,
while the others go on; one unscorable at the start has no iterate at all, and the call raises.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from align_diffusion.models.base import PipelineAdapter, is_whole_number
from align_diffusion.rewards.base import Reward, RewardError, prompt_list
from align_diffusion.rewards.transforms import unscored_if_infinite
from align_diffusion.sampling.loop import check_guidance, resolve_settings, take_step
from align_diffusion.steering.candidates import Budget, SteeringResult, Timer, candidate_generators

DEFAULT_STEPS = 4  # ODE steps of each iterate: the method's one- to four-step regime


def steps_per_iterate(num_inference_steps: int | None) -> int | None:
    """The ODE steps of each iterate: None (every option's way to ask for its default) is ReNO's DEFAULT_STEPS, not
    the model's default step count."""
    return DEFAULT_STEPS if num_inference_steps is None else num_inference_steps


def noise_norm_regularizer(noise: torch.Tensor) -> torch.Tensor:
    """½‖ε‖² − (d − 1) · log‖ε‖ per image, in fp32; its gradient ε · (1 − (d − 1) / ‖ε‖²) vanishes at
    ‖ε‖² = d − 1."""
    flat = noise.float().flatten(1)
    dims = flat.shape[1]
    squared = (flat**2).sum(dim=1)
    return 0.5 * squared - (dims - 1) * 0.5 * torch.log(squared)


@contextlib.contextmanager
def _frozen(*modules):
    """No parameter gradients for these modules (only the noise is optimized); their flags restored after."""
    parameters = [p for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()]
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def check_reno_options(reward: Reward | None, *, iterations: int, lr: float, reg_weight: float, grad_clip: float,
                       momentum: float) -> None:
    """The checks of ReNO's options and reward (None: not loaded yet), which need no model
    (`steering.steer.check_steering`)."""
    terms = [] if reward is None else getattr(reward, "rewards", [reward])
    blocked = [term.name for term in terms if not term.differentiable]
    if blocked:
        raise ValueError(f"ReNO needs differentiable rewards; {', '.join(blocked)} is not (gradients cannot reach "
                         "the pixels)")
    if not is_whole_number(iterations) or iterations < 0:
        raise ValueError(f"iterations must be a whole number >= 0, got {iterations!r}")
    for name, value in {"lr": lr, "reg_weight": reg_weight}.items():
        if not 0 <= value < math.inf:  # also refuses NaN
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not 0 < grad_clip < math.inf:  # a negative clip lowers the reward, 0 freezes the noise
        raise ValueError(f"grad_clip must be a finite number > 0, got {grad_clip}")
    if not 0 <= momentum < 1:  # from 1 on, the steps grow without end
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")


def reno(
    adapter: PipelineAdapter,
    prompts: list[str],
    reward: Reward,
    *,
    iterations: int = 50,
    lr: float = 5.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    grad_clip: float = 0.1,
    reg_weight: float = 0.01,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    seed: int = 0,
    first_index: int = 0,
    gradient_checkpointing: bool = True,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[SteeringResult]:
    """ReNO for each prompt (prompt j of the run is number `first_index + j`, its initial noise the plain sample's);
    ODE sampling with `num_inference_steps` (default DEFAULT_STEPS; 1–4 is the method's regime) and the model's
    guidance by default."""
    check_reno_options(reward, iterations=iterations, lr=lr, reg_weight=reg_weight, grad_clip=grad_clip,
                       momentum=momentum)
    prompts = prompt_list(prompts)
    settings = resolve_settings(adapter, "ode", steps_per_iterate(num_inference_steps), guidance_scale, None, height,
                                width)
    check_guidance(adapter, settings.guidance_scale, negative_prompt)
    batch = len(prompts)
    budgets = [Budget() for _ in prompts]
    timer = Timer(Budget())
    with timer, _frozen(*adapter.pipe.components.values(), reward):
        generators = [candidate_generators(seed, first_index + j, 1)[0] for j in range(batch)]
        noise = adapter.initial_noise(generators, settings.height, settings.width).requires_grad_(True)
        # Nesterov's look-ahead needs momentum to look ahead by: without it, plain SGD (torch refuses the pair)
        optimizer = torch.optim.SGD([noise], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        with torch.no_grad():
            embeds = adapter.encode_prompt(prompts, settings.guidance_scale, negative_prompt=negative_prompt)
        schedule = adapter.schedule(settings.num_inference_steps, settings.height, settings.width)
        autocast = (torch.autocast(adapter.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())

        def denoise(x, i):
            prediction = adapter.predict(x, schedule.timesteps[i], embeds, settings.guidance_scale)
            return take_step(adapter, "ode", prediction, x, schedule, i, 0.0).prev_sample

        def stage(function, *args):  # recomputed in the backward pass when checkpointing, to save memory
            return checkpoint(function, *args, use_reentrant=False) if gradient_checkpointing else function(*args)

        def render(x):
            for i in range(settings.num_inference_steps):
                x = stage(denoise, x, i)
            return stage(adapter.decode, x)

        best_reward = torch.full((batch,), float("-inf"))
        best_image = [None] * batch
        best_iteration = [0] * batch
        unscorable_from = [None] * batch  # the iteration at which each prompt's image stopped being scorable
        trace = []
        for iteration in tqdm(range(iterations + 1), desc="reno iterations", leave=False, disable=not progress):
            with autocast:
                images = render(noise)
                scores = stage(reward, images, prompts)
            for j, budget in enumerate(budgets):
                if unscorable_from[j] is None:
                    budget.model_evals += settings.num_inference_steps
                    budget.reward_evals += 1
            current = unscored_if_infinite(scores.detach().float().cpu())  # as the trainer reads an infinite score
            if iteration == 0 and torch.isnan(current).any():
                failed = [prompts[j] for j in torch.isnan(current).nonzero().flatten().tolist()]
                raise RewardError(f"{reward.name} could not score the initial images of {failed} (NaN or infinite), "
                                  "so ReNO has no iterate to start from")
            for j in torch.isnan(current).nonzero().flatten().tolist():
                if unscorable_from[j] is None:
                    unscorable_from[j] = iteration
            trace.append(current.tolist())
            for j in (current > best_reward).nonzero().flatten().tolist():
                best_reward[j], best_iteration[j] = current[j], iteration
                best_image[j] = images[j].detach().float().cpu()
            frozen = torch.tensor([start is not None for start in unscorable_from], device=noise.device)
            if iteration == iterations or frozen.all():
                break
            loss = (-scores.float() + reg_weight * noise_norm_regularizer(noise)).sum()
            optimizer.zero_grad()
            loss.backward()
            with torch.no_grad():
                # Images do not share noise: each gradient is clipped on its own, and a frozen prompt's (NaN where
                # its reward was) stays in its own row, whose noise is put back after the step.
                norms = noise.grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                noise.grad *= (grad_clip / norms).clamp(max=1.0).view(-1, *[1] * (noise.ndim - 1))
                kept = noise[frozen].clone()
                optimizer.step()
                noise[frozen] = kept
    for budget in budgets:
        budget.seconds = timer.budget.seconds / batch
    results = []
    for j, prompt in enumerate(prompts):
        details = {"rewards_per_iteration": [row[j] for row in trace]}
        if unscorable_from[j] is not None:  # its trace ends there, as it would have alone
            details = {"rewards_per_iteration": details["rewards_per_iteration"][: unscorable_from[j] + 1],
                       "unscorable_from": unscorable_from[j]}
        results.append(SteeringResult(prompt, seed + first_index + j, "reno", best_image[j], float(best_reward[j]),
                                      best_iteration[j], budgets[j], details))
    return results
