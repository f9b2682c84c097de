"""Sampler steps against independently written references: torch's Normal density, the papers' formulas
in other algebraic arrangements, and diffusers' own schedulers."""

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from align_diffusion.models import adapter_for
from align_diffusion.sampling.loop import check_noise_level, sample, step_log_prob
from align_diffusion.sampling.steps import (
    cps_step,
    dance_sde_step,
    ddim_step,
    flow_ode_step,
    flow_sde_step,
    gaussian_log_prob,
)

SHAPE = (3, 4, 5, 5)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(3)]  # v, x, noise


def normal_log_prob(x, mean, std):
    return Normal(mean, std * torch.ones_like(mean)).log_prob(x).mean(dim=(1, 2, 3))


# (sigma, sigma_next) pairs, including the t = 1 guard and the last step to 0
SIGMA_PAIRS = [(1.0, 0.9), (0.7, 0.55), (0.2, 0.0)]


@pytest.mark.parametrize("sigma,sigma_next", SIGMA_PAIRS)
def test_flow_sde_matches_flow_grpo_form(sigma, sigma_next):
    v, x, noise = inputs()
    a = 0.7
    out = flow_sde_step(v, x, sigma, sigma_next, a, noise=noise)
    # Flow-GRPO writes the mean as x·(1 + s²/(2t)·dt) + v·(1 + s²(1-t)/(2t))·dt, with the t = 1 guard on 1 - t.
    denominator = 1 - (sigma_next if sigma == 1 else sigma)
    s = a * math.sqrt(sigma / denominator)
    dt = sigma_next - sigma
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * math.sqrt(-dt)
    torch.testing.assert_close(out.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.prev_sample, mean + std * noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_prob, normal_log_prob(out.prev_sample, out.mean, std), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred_x0, x - sigma * v)


@pytest.mark.parametrize("sigma,sigma_next", SIGMA_PAIRS)
def test_dance_sde_matches_score_form(sigma, sigma_next):
    v, x, noise = inputs(1)
    eta = 0.3
    out = dance_sde_step(v, x, sigma, sigma_next, eta, noise=noise)
    # DanceGRPO: Euler step plus -η²/2 · score · dt, with the score -(x - (1 - t)·x̂0)/t².
    dt = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - (1 - sigma) * x0) / sigma**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    std = eta * math.sqrt(-dt)
    torch.testing.assert_close(out.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_prob, normal_log_prob(out.prev_sample, out.mean, std), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sigma,sigma_next", SIGMA_PAIRS[:2])
def test_cps_matches_its_definition(sigma, sigma_next):
    v, x, noise = inputs(2)
    a = 0.8
    out = cps_step(v, x, sigma, sigma_next, a, noise=noise)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    s = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s**2) * x1
    torch.testing.assert_close(out.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_prob, normal_log_prob(out.prev_sample, out.mean, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_and_normal_density(prediction_type, eta):
    eps, x, noise = inputs(3)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    t_prev = t - 100
    expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    out = ddim_step(eps, x, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev], eta, prediction_type,
                    noise=noise)
    torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=1e-6)
    if eta > 0:
        std = eta * math.sqrt(scheduler._get_variance(t, t_prev))
        torch.testing.assert_close(out.log_prob, normal_log_prob(out.prev_sample, out.mean, std), atol=1e-5, rtol=1e-5)
    else:
        assert out.log_prob is None


@pytest.mark.parametrize("sigma,sigma_next", SIGMA_PAIRS)
def test_noise_level_zero_is_exactly_the_ode_step(sigma, sigma_next):
    v, x, noise = inputs(4)
    ode = flow_ode_step(v, x, sigma, sigma_next).prev_sample
    for step in (flow_sde_step, dance_sde_step, cps_step):
        out = step(v, x, sigma, sigma_next, 0.0, noise=noise)
        assert torch.equal(out.prev_sample, ode), step.__name__
        assert out.log_prob is None


def test_ode_step_equals_diffusers_euler_scheduler():
    v, x, _ = inputs(5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    sample = x
    for i, t in enumerate(scheduler.timesteps):
        ours = flow_ode_step(v, sample, scheduler.sigmas[i], scheduler.sigmas[i + 1]).prev_sample
        sample = scheduler.step(v, t, sample).prev_sample
        assert torch.equal(ours, sample)


def test_per_sample_noise_levels_broadcast():
    v, x, noise = inputs(6)
    sigmas = torch.tensor([0.9, 0.5, 0.3])
    batched = flow_sde_step(v, x, sigmas, sigmas - 0.1, 0.7, noise=noise)
    for k in range(3):
        single = flow_sde_step(v[k : k + 1], x[k : k + 1], sigmas[k], sigmas[k] - 0.1, 0.7, noise=noise[k : k + 1])
        torch.testing.assert_close(batched.prev_sample[k : k + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[k : k + 1], single.log_prob)


STEPS_BY_LEVEL = {
    "flow-sde": lambda v, x, level, **kw: flow_sde_step(v, x, 0.7, 0.55, level, **kw),
    "dance-sde": lambda v, x, level, **kw: dance_sde_step(v, x, 0.7, 0.55, level, **kw),
    "cps": lambda v, x, level, **kw: cps_step(v, x, 0.7, 0.55, level, **kw),
    "ddim": lambda v, x, level, **kw: ddim_step(v, x, 0.3, 0.5, level, **kw),
}


@pytest.mark.parametrize("sampler", list(STEPS_BY_LEVEL))
def test_per_sample_noise_levels_act_row_by_row_and_a_noiseless_row_has_no_log_prob(sampler):
    """Levels (0.7, 0, 0.3): each row steps as the same step at its own level would alone; the level-0 row is the
    deterministic step, and its log-prob is NaN (a point mass). A (batch,) level broadcast to (batch, 1, 1, batch)
    before, or failed in CPS and DanceGRPO's steps."""
    step = STEPS_BY_LEVEL[sampler]
    v, x, noise = inputs(9)
    levels = torch.tensor([0.7, 0.0, 0.3])
    batched = step(v, x, levels, noise=noise)
    assert batched.prev_sample.shape == x.shape and batched.log_prob.shape == (3,)
    for k, level in enumerate(levels.tolist()):
        alone = step(v[k : k + 1], x[k : k + 1], level, noise=noise[k : k + 1])
        torch.testing.assert_close(batched.prev_sample[k : k + 1], alone.prev_sample)
        if level == 0:
            assert alone.log_prob is None and math.isnan(batched.log_prob[k])
        else:
            torch.testing.assert_close(batched.log_prob[k : k + 1], alone.log_prob)
    # A loss that leaves the noiseless row out has a finite gradient (its density taken at std 0 made it NaN).
    output = v.clone().requires_grad_(True)
    step(output, x, levels, prev_sample=batched.prev_sample).log_prob[[0, 2]].sum().backward()
    assert torch.isfinite(output.grad).all()
    for same_levels in (levels.view(3, 1, 1, 1), levels[None]):  # one per sample, in the shapes diffusers uses
        torch.testing.assert_close(step(v, x, same_levels, noise=noise).prev_sample, batched.prev_sample)
    with pytest.raises(ValueError, match=r"must hold one value or 3 \(one per sample\), got shape \(2,\)"):
        step(v, x, torch.tensor([0.7, 0.3]), noise=noise)


def test_log_prob_sum_is_mean_times_dims():
    x, mean, _ = inputs(7)
    dims = math.prod(SHAPE[1:])
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3, "sum"), gaussian_log_prob(x, mean, 0.3) * dims)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mean, 0.3, "max")


def test_stochastic_step_without_noise_is_refused():
    v, x, _ = inputs(8)
    with pytest.raises(ValueError, match="noise"):
        flow_sde_step(v, x, 0.5, 0.4, 0.7)


@pytest.mark.parametrize("sampler", ["flow-sde", "dance-sde", "cps", "ddim"])
def test_recomputed_log_prob_gives_ratio_one(tiny_pipes, sampler):
    adapter = adapter_for(tiny_pipes["sd" if sampler == "ddim" else "sd3"])
    trajectory = sample(adapter, ["a red circle", "a blue square"], num_images_per_prompt=2, num_inference_steps=4,
                        guidance_scale=3.0, sampler=sampler, height=32, width=32, decode=False)
    assert trajectory.stochastic_steps
    with torch.no_grad():
        for i in trajectory.stochastic_steps:
            ratio = torch.exp(step_log_prob(adapter, trajectory, i).log_prob - trajectory.log_probs[:, i])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
            subset = step_log_prob(adapter, trajectory, i, index=[1, 3]).log_prob
            torch.testing.assert_close(subset, trajectory.log_probs[[1, 3], i], atol=1e-5, rtol=0)
            one = step_log_prob(adapter, trajectory, i, index=2).log_prob  # a batch of one, as index=[2]
            torch.testing.assert_close(one, trajectory.log_probs[[2], i], atol=1e-5, rtol=0)


def test_noise_window_limits_the_stochastic_steps(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    trajectory = sample(adapter, ["a red circle"], num_inference_steps=6, sampler="flow-sde", noise_window=[1, 2],
                        height=32, width=32, decode=False)
    assert trajectory.stochastic_steps == [1, 2]
    assert torch.isnan(trajectory.log_probs[:, [0, 3, 4, 5]]).all()
    assert torch.isfinite(trajectory.log_probs[:, [1, 2]]).all()
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob(adapter, trajectory, 0)
    with pytest.raises(ValueError, match="noise_window"):
        sample(adapter, ["a red circle"], num_inference_steps=3, sampler="flow-sde", noise_window=[5], height=32,
               width=32)


def test_images_do_not_depend_on_batch_composition(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    kwargs = dict(num_inference_steps=4, sampler="flow-sde", height=32, width=32)
    both = sample(adapter, ["a red circle", "a blue square"], seed=3, **kwargs).images
    second = sample(adapter, ["a blue square"], seed=4, **kwargs).images
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=0)


def test_sampler_that_does_not_fit_the_model_is_refused(tiny_pipes):
    with pytest.raises(ValueError, match="flow-sde.*'ode', 'ddim'"):
        sample(adapter_for(tiny_pipes["sd"]), ["a"], sampler="flow-sde", num_inference_steps=2)
    with pytest.raises(ValueError, match="ddim"):
        sample(adapter_for(tiny_pipes["flux"]), ["a"], sampler="ddim", num_inference_steps=2, height=32, width=32)


@pytest.mark.parametrize("sampler,levels,message", [
    ("cps", 3.0, r"cps noise levels a must lie in \[0, 1\], got 3.0"),
    ("flow-sde", [0.7, 0.7, float("nan")], "finite number >= 0, got nan at step 2"),
    ("dance-sde", -0.1, "finite number >= 0"),
    ("ddim", 5.0, "DDIM η = 5.0 at step 0 makes σ² exceed 1 - ᾱ_prev"),
    ("flow-sde", "0.7", "a number or a sequence of one per step, got '0.7'"),
    ("flow-sde", torch.tensor(-1.0), "finite number >= 0, got -1.0"),  # a 0-d tensor is one level
])
def test_invalid_noise_levels_are_refused_before_any_model_call(tiny_pipes, sampler, levels, message):
    adapter = adapter_for(tiny_pipes["sd" if sampler == "ddim" else "sd3"])
    calls = []
    hook = adapter.denoiser.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            sample(adapter, ["a red circle"], num_inference_steps=3, sampler=sampler, noise_level=levels, height=32,
                   width=32, decode=False)
    finally:
        hook.remove()
    assert not calls


def test_ddim_eta_is_refused_exactly_where_the_step_breaks(tiny_pipes):
    # σ² ≤ 1 - ᾱ_prev holds for every η ≤ 1; above 1 it depends on the step.
    schedule = adapter_for(tiny_pipes["sd"]).schedule(4, 32, 32)
    eps, x, noise = inputs(9)
    breaking = {}
    for eta in (0.5, 1.0, 1.05, 1.2, 3.0):  # with 4 steps, 1.05 and 1.2 fit some steps and not others
        breaking[eta] = []
        for i in range(schedule.num_steps):
            out = ddim_step(eps, x, schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i], eta, noise=noise)
            breaks = bool(out.prev_sample.isnan().any())
            assert not breaks or eta > 1
            try:
                check_noise_level("ddim", eta, schedule, i)
                refused = False
            except ValueError:
                refused = True
            assert refused == breaks, (eta, i)
            if breaks:
                breaking[eta].append(i)
    # Where σ² = η² (1 − ᾱ_prev) / (1 − ᾱ) · (1 − ᾱ / ᾱ_prev) exceeds 1 − ᾱ_prev, from the schedule's ᾱ of
    # 0.0557, 0.275, 0.6722, 0.9983 and a final 0.9991: the factor (1 − ᾱ / ᾱ_prev) / (1 − ᾱ) is 0.844,
    # 0.815, 0.997 and 0.502 at steps 0–3, so η² > 1 / factor breaks 1.05 at step 2, 1.2 at steps 0–2, 3 at all.
    assert breaking == {0.5: [], 1.0: [], 1.05: [2], 1.2: [0, 1, 2], 3.0: [0, 1, 2, 3]}


def zero_terminal_snr(pipe, prediction_type: str):
    """`pipe` with the zero-terminal-SNR DDIM schedule of v-prediction models (SD 2.x-v style, trailing spacing)."""
    pipe = copy.copy(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                               timestep_spacing="trailing", prediction_type=prediction_type)
    return pipe


def test_ddim_eta_one_runs_on_a_zero_terminal_snr_schedule(tiny_pipes):
    """At ᾱ = 0 (the first step) σ² at η = 1 is exactly 1 - ᾱ_prev; computed as a difference it came out one
    rounding unit above, and η = 1, the ddim default, was refused (or, in the step alone, NaN)."""
    adapter = adapter_for(zero_terminal_snr(tiny_pipes["sd"], "v_prediction"))
    schedule = adapter.schedule(6, 32, 32)
    assert schedule.alphas_cumprod[0] == 0
    out = sample(adapter, ["a red circle"], num_inference_steps=6, sampler="ddim", noise_level=1.0, height=32,
                 width=32, decode=False)
    assert out.final_latents.isfinite().all() and out.log_probs[:, :5].isfinite().all()
    # There the mean is √ᾱ_prev · x̂0, x̂0 = -v at ᾱ = 0: no ε̂ share is left.
    v, x, noise = inputs(3)
    step = ddim_step(v, x, torch.tensor(0.0), torch.tensor(0.3), 1.0, "v_prediction", noise=noise)
    torch.testing.assert_close(step.mean, -(0.3**0.5) * v)


def test_eps_prediction_on_a_zero_terminal_snr_schedule_is_refused(tiny_pipes):
    adapter = adapter_for(zero_terminal_snr(tiny_pipes["sd"], "epsilon"))
    with pytest.raises(ValueError, match="reaches ᾱ = 0 at its first step, where an ε-prediction implies no x̂0"):
        sample(adapter, ["a red circle"], num_inference_steps=4, sampler="ode", height=32, width=32, decode=False)


def test_a_level_is_checked_only_where_noise_is_drawn(tiny_pipes):
    """η = 1.05 breaks DDIM's step 2 of 4 (see above); outside the noise window that step runs at η = 0."""
    adapter = adapter_for(tiny_pipes["sd"])
    out = sample(adapter, ["a red circle"], num_inference_steps=4, sampler="ddim", noise_level=1.05,
                 noise_window=[0, 1, 3], height=32, width=32, decode=False)
    assert out.stochastic_steps == [0, 1, 3] and out.final_latents.isfinite().all()
    with pytest.raises(ValueError, match="DDIM η = 1.05 at step 2"):
        sample(adapter, ["a red circle"], num_inference_steps=4, sampler="ddim", noise_level=1.05, height=32,
               width=32, decode=False)


def test_zero_steps_or_size_is_refused_not_replaced_by_the_default(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number >= 1, got 0"):
        sample(adapter, ["a"], num_inference_steps=0, height=32, width=32)
    with pytest.raises(ValueError, match="height must be a whole number >= 1, got 0"):
        sample(adapter, ["a"], num_inference_steps=2, height=0, width=32)
