"""Endpoint marginals of the SDE samplers on an analytic case: Gaussian data with the exact velocity.

Data x0 ~ N(m, s²) per dimension and x_t = (1 - t)·x0 + t·ε give x_t ~ N((1 - t)m, V_t), V_t = (1 - t)²s² + t², and
the exact velocity E[ε - x0 | x_t] = (t - (1 - t)s²)/V_t · (x_t - (1 - t)m) - m. Every sampler starts from the same
noise; its endpoint mean and variance must match the ODE's within a tolerance of four standard errors of the
difference of two independent estimates, plus the ODE's own discretization error against the exact N(m, s²).
"""

import math

import pytest
import torch

from align_diffusion.sampling.steps import cps_step, dance_sde_step, flow_ode_step, flow_sde_step

MEAN, STD = 1.5, 0.5
SAMPLES, DIMS, STEPS = 20000, 8, 200
N = SAMPLES * DIMS


def exact_velocity(x, t):
    variance = (1 - t) ** 2 * STD**2 + t**2
    return (t - (1 - t) * STD**2) / variance * (x - (1 - t) * MEAN) - MEAN


def endpoint(step, noise_level, seed=0):
    x = endpoint_samples(step, noise_level, seed)
    return x.mean().item(), x.var().item()


def endpoint_samples(step, noise_level, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, DIMS, generator=generator)
    sigmas = torch.linspace(1, 0, STEPS + 1)
    for i in range(STEPS):
        v = exact_velocity(x, sigmas[i])
        if step is flow_ode_step:
            x = step(v, x, sigmas[i], sigmas[i + 1]).prev_sample
        else:
            noise = torch.randn(SAMPLES, DIMS, generator=generator)
            x = step(v, x, sigmas[i], sigmas[i + 1], noise_level, noise=noise).prev_sample
    return x


@pytest.fixture(scope="module")
def ode():
    return endpoint(flow_ode_step, 0.0)


def tolerances(ode):
    mean_se = STD / math.sqrt(N)
    var_se = STD**2 * math.sqrt(2 / N)
    mean_tol = 4 * math.sqrt(2) * mean_se + abs(ode[0] - MEAN)
    var_tol = 4 * math.sqrt(2) * var_se + abs(ode[1] - STD**2)
    return mean_tol, var_tol


@pytest.mark.parametrize("step,noise_level", [(flow_sde_step, 0.7), (dance_sde_step, 0.3), (cps_step, 0.1)])
def test_sde_endpoint_matches_ode(ode, step, noise_level):
    mean, var = endpoint(step, noise_level, seed=1)
    mean_tol, var_tol = tolerances(ode)
    assert abs(mean - ode[0]) <= mean_tol, (mean, ode[0], mean_tol)
    assert abs(var - ode[1]) <= var_tol, (var, ode[1], var_tol)
    # From the ODE's starting noise, the injected noise moves each sample by a good share of the data's spread
    # (0.26–0.66 against its 0.5 here); a step that drew no noise would end on the ODE's samples, matching above.
    moved = endpoint_samples(step, noise_level, seed=0) - endpoint_samples(flow_ode_step, 0.0, seed=0)
    assert moved.std() > 0.2 * STD


def test_cps_keeps_the_mean_but_shrinks_the_variance_at_high_noise_level(ode):
    # CPS re-noises x̂0 with a fixed share sin(aπ/2) of the next noise level, which preserves the marginal only
    # when x̂0 is a sample rather than a posterior mean: with a = 0.8 the variance measurably shrinks.
    mean, var = endpoint(cps_step, 0.8, seed=2)
    mean_tol, var_tol = tolerances(ode)
    assert abs(mean - ode[0]) <= mean_tol
    assert ode[1] - var > var_tol
