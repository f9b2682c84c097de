"""Dense step rewards: completions against ode_complete, telescoping, and the denoiser calls they cost."""

import pytest
import torch

from align_diffusion.models import adapter_for
from align_diffusion.rewards.base import Reward
from align_diffusion.rewards.dense import dense_step_rewards
from align_diffusion.sampling.loop import ode_complete, sample

STEPS = 4


class Brightness(Reward):
    """Mean red-channel intensity: cheap, and sensitive to every pixel."""

    def __init__(self):
        super().__init__("brightness")

    def score(self, images, prompts, metadata):
        return images[:, 0].mean((1, 2))


@pytest.fixture(scope="module")
def trajectory_and_adapter(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    trajectory = sample(adapter, ["a red circle", "a blue square", "two squares"], num_inference_steps=STEPS,
                        guidance_scale=3.0, sampler="flow-sde", height=32, width=32)
    return trajectory, adapter


def count_denoiser_calls(adapter):
    calls = []
    handle = adapter.denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("max_batch, expected_calls", [(None, STEPS), (3, STEPS * (STEPS + 1) // 2)])
def test_ode_mode_matches_separate_completions_and_counts_calls(trajectory_and_adapter, max_batch, expected_calls):
    trajectory, adapter = trajectory_and_adapter
    reward = Brightness()
    calls, handle = count_denoiser_calls(adapter)
    try:
        dense = dense_step_rewards(adapter, trajectory, reward, max_batch=max_batch)
    finally:
        handle.remove()
    # With CFG each denoiser call carries both branches: one forward per `adapter.predict`.
    assert dense.model_calls == len(calls) == expected_calls
    assert dense.rewards.shape == (3, STEPS + 1) and dense.deltas.shape == (3, STEPS)
    for step in range(STEPS):
        clean = ode_complete(adapter, trajectory.latents[:, step], step, trajectory.embeds, trajectory.schedule,
                             trajectory.guidance_scale)
        expected = reward(adapter.decode(clean), trajectory.prompts).double()
        torch.testing.assert_close(dense.rewards[:, step], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense.rewards[:, -1], reward(trajectory.images, trajectory.prompts).double())
    assert torch.equal(dense.deltas.sum(1), dense.rewards[:, -1] - dense.rewards[:, 0])


def test_x0_mode_costs_no_model_calls(trajectory_and_adapter):
    trajectory, adapter = trajectory_and_adapter
    calls, handle = count_denoiser_calls(adapter)
    try:
        dense = dense_step_rewards(adapter, trajectory, Brightness(), mode="x0")
    finally:
        handle.remove()
    assert dense.model_calls == len(calls) == 0
    expected = Brightness()(adapter.decode(trajectory.pred_x0[:, 2]), trajectory.prompts).double()
    torch.testing.assert_close(dense.rewards[:, 2], expected)
    assert torch.equal(dense.deltas.sum(1), dense.rewards[:, -1] - dense.rewards[:, 0])
    with pytest.raises(ValueError, match="mode"):
        dense_step_rewards(adapter, trajectory, Brightness(), mode="sde")
    for max_batch in (0, -1, 2.5):  # 0 meant no cap, -1 an empty concatenation, 2.5 a TypeError of range
        with pytest.raises(ValueError, match=f"max_batch must be a whole number >= 1, got {max_batch}"):
            dense_step_rewards(adapter, trajectory, Brightness(), max_batch=max_batch)


def test_completions_stop_at_the_last_stochastic_step(trajectory_and_adapter):
    _, adapter = trajectory_and_adapter
    reward = Brightness()
    windowed = sample(adapter, ["a red circle", "two squares"], num_inference_steps=STEPS, guidance_scale=3.0,
                      sampler="flow-sde", noise_window=range(2), height=32, width=32)
    calls, handle = count_denoiser_calls(adapter)
    try:
        dense = dense_step_rewards(adapter, windowed, reward)
    finally:
        handle.remove()
    assert dense.model_calls == len(calls) == STEPS  # two completions, batched, still one call per step
    for step in range(STEPS):  # from state 2 on, the separate completion is the sample's own ODE tail
        clean = ode_complete(adapter, windowed.latents[:, step], step, windowed.embeds, windowed.schedule,
                             windowed.guidance_scale)
        expected = reward(adapter.decode(clean), windowed.prompts).double()
        torch.testing.assert_close(dense.rewards[:, step], expected, atol=1e-5, rtol=0)
    assert torch.equal(dense.rewards[:, 2], dense.rewards[:, -1]) and not dense.deltas[:, 2:].any()

    deterministic = sample(adapter, ["a red circle"], num_inference_steps=STEPS, guidance_scale=3.0, height=32,
                           width=32)
    calls, handle = count_denoiser_calls(adapter)
    try:
        dense = dense_step_rewards(adapter, deterministic, reward)
    finally:
        handle.remove()
    assert dense.model_calls == len(calls) == 0 and not dense.deltas.any()
