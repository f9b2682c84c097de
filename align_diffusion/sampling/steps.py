"""Stateless sampler steps: each maps (model output, x_t, noise levels) to the next sample and its log-prob.

Every step works in float32 whatever the model's dtype, returns a `StepOutput`, and keeps no state between calls, so
a step can be replayed from a stored trajectory (to recompute its log-prob under new weights) or taken from any
intermediate state. Flow steps use the rectified-flow convention x_t = (1 - t) x_0 + t ε with t = σ running from 1 to
0 (dt = σ_next - σ < 0) and a velocity prediction v ≈ ε - x_0.

Log-probs are the Gaussian log-density of `prev_sample` under the step's transition, averaged over every non-batch
dimension (Flow-GRPO's convention, which keeps their scale independent of resolution); pass `reduce="sum"` for the
summed density. Times and noise levels are each a number or a tensor of one value per sample ((batch,), or
diffusers' (batch, 1, 1, 1)); a row whose level draws no noise takes the deterministic step, and its log-prob is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # the next state x_{t-1}, float32
    log_prob: torch.Tensor | None  # (batch,) log-density of prev_sample, NaN in deterministic rows; None if all are
    mean: torch.Tensor  # mean of the transition
    std: torch.Tensor  # std of the transition (broadcastable to the sample); 0 for deterministic steps
    pred_x0: torch.Tensor  # the model's clean-sample estimate at this step


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Log N(x; mean, std²) per element, reduced over all non-batch dims by `reduce` ("mean" or "sum")."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, x.ndim))
    if reduce == "mean":
        return log_density.mean(dim=dims)
    if reduce == "sum":
        return log_density.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A number, or a tensor of one value or one per sample ((batch,), (batch, 1, 1, 1)), of times or noise levels, as
    float32 broadcastable against `like`; ValueError for any other shape (a (batch,) level against (batch, 1, 1, 1)
    times would broadcast to (batch, 1, 1, batch))."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    if value.numel() not in (1, len(like)) or value.squeeze().ndim > 1:
        raise ValueError(f"a per-sample time or noise level must hold one value or {len(like)} (one per sample), got "
                         f"shape {tuple(value.shape)}")
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def _finish(mean, std, x0, noise, prev_sample, reduce) -> StepOutput:
    """Draws prev_sample = mean + std·noise (unless given) and scores it; a zero std makes the step deterministic."""
    deterministic = bool((std == 0).all())
    if prev_sample is None:
        if deterministic:
            prev_sample = mean
        elif noise is None:
            raise ValueError("a stochastic step needs `noise` (or the stored `prev_sample` to score)")
        else:
            prev_sample = mean + std * noise.to(mean)
    prev_sample = prev_sample.to(torch.float32)
    log_prob = None
    if not deterministic:
        noiseless = (std == 0).expand_as(mean)
        if noiseless.any():  # a point mass has no density: NaN, scored on stand-ins so that no gradient is NaN
            mean_or_sample, std_or_one = torch.where(noiseless, prev_sample, mean), torch.where(noiseless, 1.0, std)
            log_prob = gaussian_log_prob(prev_sample, mean_or_sample, std_or_one, reduce)
            log_prob = log_prob.masked_fill(noiseless.flatten(1).any(1), math.nan)
        else:
            log_prob = gaussian_log_prob(prev_sample, mean, std, reduce)
    return StepOutput(prev_sample, log_prob, mean, std, x0)


def flow_ode_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> StepOutput:
    """Euler step of the probability-flow ODE; the same update as diffusers' FlowMatchEulerDiscreteScheduler."""
    v, x = v.float(), x.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    mean = x + (sigma_next - sigma) * v
    return StepOutput(mean, None, mean, torch.zeros_like(sigma), x - sigma * v)


def _flow_sde_mean(v, x, sigma, sigma_next, noise_std):
    """Drift of the marginal-preserving reverse SDE: x + [v + s²/(2t)·(x + (1-t)·v)]·dt, s the diffusion coefficient."""
    dt = sigma_next - sigma
    return x + (v + noise_std**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt


def flow_sde_step(
    v, x, sigma, sigma_next, noise_level: float, noise=None, prev_sample=None, reduce: str = "mean"
) -> StepOutput:
    """Flow-GRPO's SDE step with σ_t = a·√(t/(1-t)) and std σ_t·√|dt|.

    At t = 1 the denominator uses 1 - t_next instead of 0 (Flow-GRPO's guard), so the first step stays finite.
    `noise_level` a = 0 gives exactly the ODE step.
    """
    v, x = v.float(), x.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    sigma_for_ratio = torch.where(sigma == 1, sigma_next, sigma)
    noise_std = _per_sample(noise_level, x) * torch.sqrt(sigma / (1 - sigma_for_ratio))
    mean = _flow_sde_mean(v, x, sigma, sigma_next, noise_std)
    std = noise_std * torch.sqrt(sigma - sigma_next)
    return _finish(mean, std, x - sigma * v, noise, prev_sample, reduce)


def dance_sde_step(
    v, x, sigma, sigma_next, eta: float, noise=None, prev_sample=None, reduce: str = "mean"
) -> StepOutput:
    """DanceGRPO's SDE step: the Flow-SDE drift with a constant diffusion coefficient σ_t = η, std η·√|dt|."""
    v, x = v.float(), x.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    noise_std = _per_sample(eta, x)
    mean = _flow_sde_mean(v, x, sigma, sigma_next, noise_std)
    std = noise_std * torch.sqrt(sigma - sigma_next)
    return _finish(mean, std, x - sigma * v, noise, prev_sample, reduce)


def cps_step(
    v, x, sigma, sigma_next, noise_level: float, noise=None, prev_sample=None, reduce: str = "mean"
) -> StepOutput:
    """Coefficients-preserving sampling: x̂0 = x - t·v, x̂1 = x + (1-t)·v, s = t_next·sin(aπ/2) with a in [0, 1],
    mean = (1 - t_next)·x̂0 + √(t_next² - s²)·x̂1, std s.

    The noise share does not shrink with the step size, so the marginals are exact only when x̂0 is sharp; with a
    spread-out posterior the sample variance shrinks as `noise_level` grows (tests/test_marginals.py measures it).
    """
    v, x = v.float(), x.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    x0 = x - sigma * v
    x1 = x + (1 - sigma) * v
    std = sigma_next * _per_sample(torch.sin(torch.as_tensor(noise_level, dtype=torch.float64) * math.pi / 2), x)
    # (1 - t_next)·x̂0 + t_next·x̂1 is exactly the Euler step; writing the mean as that plus a correction makes
    # noise level 0 reproduce the ODE step bit for bit.
    mean = x + (sigma_next - sigma) * v + (torch.sqrt(sigma_next**2 - std**2) - sigma_next) * x1
    return _finish(mean, std, x0, noise, prev_sample, reduce)


def ddim_pred_x0_and_eps(model_output, x, alpha_prod_t, prediction_type: str):
    """The clean sample and the noise implied by an ε- or v-prediction at cumulative alpha ᾱ_t."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (x - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5, model_output
    if prediction_type == "v_prediction":
        x0 = alpha_prod_t**0.5 * x - beta_prod_t**0.5 * model_output
        return x0, alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * x
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def ddim_variance(alpha_prod_t, alpha_prod_t_prev):
    """DDPM's posterior variance between cumulative alphas ᾱ_t and ᾱ_prev: the DDIM step's σ² at η = 1."""
    return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddim_eps_share(alpha_prod_t, alpha_prod_t_prev, eta):
    """1 - ᾱ_prev - σ² of a DDIM step at η, the square of its mean's ε̂ coefficient, in closed form: taken as that
    difference it rounded one unit below 0 at η = 1 where ᾱ_t = 0 (a zero-terminal-SNR schedule's first step)."""
    return (1 - alpha_prod_t_prev) * (1 - eta**2 * (1 - alpha_prod_t / alpha_prod_t_prev) / (1 - alpha_prod_t))


def ddim_step(
    model_output,
    x,
    alpha_prod_t,
    alpha_prod_t_prev,
    eta: float,
    prediction_type: str = "epsilon",
    noise=None,
    prev_sample=None,
    reduce: str = "mean",
) -> StepOutput:
    """DDIM step with stochasticity η: posterior mean √ᾱ_prev·x̂0 + √(1 - ᾱ_prev - σ²)·ε̂ and std
    σ = η·√((1 - ᾱ_prev)/(1 - ᾱ_t)·(1 - ᾱ_t/ᾱ_prev)); η = 0 is diffusers' DDIMScheduler step.

    The mean needs σ² ≤ 1 - ᾱ_prev, which every η ≤ 1 meets (since ᾱ_t ≤ ᾱ_prev ≤ 1) and a larger η at some steps.
    """
    model_output, x = model_output.float(), x.float()
    alpha_prod_t, alpha_prod_t_prev = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_t_prev, x)
    x0, eps = ddim_pred_x0_and_eps(model_output, x, alpha_prod_t, prediction_type)
    if isinstance(eta, torch.Tensor):  # a number stays one: its square in the ε̂ share is then taken in float64
        eta = _per_sample(eta, x)
    std = eta * ddim_variance(alpha_prod_t, alpha_prod_t_prev) ** 0.5
    mean = alpha_prod_t_prev**0.5 * x0 + ddim_eps_share(alpha_prod_t, alpha_prod_t_prev, eta) ** 0.5 * eps
    return _finish(mean, std, x0, noise, prev_sample, reduce)
