"""Dense step rewards (DenseGRPO): a reward for every denoising step of a trajectory, not just its end.

R_t is the reward of the image the state before step t leads to: its deterministic ODE completion, decoded
(`mode="ode"`), or, cheaper, the decoded x̂0 the model predicted at step t (`mode="x0"`, as in VGPO; no extra
model calls). R_T is the reward of the sample itself. Step t earns ΔR_t = R_{t+1} − R_t, so the steps' rewards
sum to R_T − R_0.

The ODE completions are batched: the completion that starts at step t joins the batch at iteration t, so at
every iteration all running completions sit at the same step and one denoiser call serves them all. T calls in
total instead of T (T + 1) / 2 (more when `max_batch` splits a call). Only states up to the last stochastic step
need one: every later step is the ODE step, so the completion from any later state is the sample itself
(R_t = R_T there, and those steps earn 0). A noise window on the first steps thus saves most of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align_diffusion.models.base import PipelineAdapter
from align_diffusion.rewards.base import Reward
from align_diffusion.sampling.loop import Trajectory, check_count, take_step


@dataclass
class DenseRewards:
    rewards: torch.Tensor  # (B, T + 1): R_t for t < T from the state before step t; R_T of the sample
    deltas: torch.Tensor  # (B, T): ΔR_t = R_{t+1} − R_t, what step t earned
    model_calls: int  # denoiser calls (`adapter.predict`) spent on completions


@torch.no_grad()
def _ode_completions(adapter: PipelineAdapter, trajectory: Trajectory, count: int, max_batch: int | None):
    """Clean latents of the ODE completion from each state 0 … count − 1: (count, B, ...), and the calls it took."""
    schedule, batch = trajectory.schedule, len(trajectory.prompts)
    running = trajectory.latents[:, :0].transpose(0, 1)  # (0, B, ...): no completion has started yet
    calls = 0
    for step in range(schedule.num_steps if count else 0):
        if step < count:
            running = torch.cat([running, trajectory.latents[:, step].unsqueeze(0)])  # the completion from `step`
        flat = running.flatten(0, 1)
        embeds = trajectory.embeds.select(torch.arange(batch).repeat(len(running)))
        chunk = max_batch or len(flat)
        predictions = []
        for start in range(0, len(flat), chunk):
            part = slice(start, start + chunk)
            predictions.append(adapter.predict(flat[part], schedule.timesteps[step], embeds.select(part),
                                               trajectory.guidance_scale))
            calls += 1
        flat = take_step(adapter, "ode", torch.cat(predictions), flat, schedule, step, 0.0).prev_sample
        running = flat.view_as(running)
    return running, calls


def dense_step_rewards(adapter: PipelineAdapter, trajectory: Trajectory, reward: Reward, *, mode: str = "ode",
                       max_batch: int | None = None) -> DenseRewards:
    """Per-step rewards of a sampled trajectory (see the module docstring); `max_batch` caps images per call."""
    if mode not in ("ode", "x0"):
        raise ValueError(f"dense reward mode must be 'ode' or 'x0', got {mode!r}")
    if max_batch is not None:
        check_count("max_batch", max_batch)
    prompts = trajectory.prompts
    steps = trajectory.schedule.num_steps
    if mode == "ode":
        completed = max(trajectory.stochastic_steps) + 1 if trajectory.stochastic_steps else 0
        clean, calls = _ode_completions(adapter, trajectory, completed, max_batch)
    else:
        clean, calls = trajectory.pred_x0.transpose(0, 1), 0

    def score(images):  # in the reward's own dtype, also inside a trainer's autocast: as the sample's own reward
        with torch.autocast(images.device.type, enabled=False):
            return reward(images, prompts)

    with torch.no_grad():
        final = trajectory.images if trajectory.images is not None else adapter.decode(trajectory.final_latents)
        final_reward = score(final)
        per_step = [score(adapter.decode(latents)) for latents in clean]
        per_step += [final_reward] * (steps + 1 - len(per_step))  # the sample's own reward from `completed` on
        # float64, so the deltas of float32 scores telescope exactly: Σ_t ΔR_t = R_T − R_0.
        rewards = torch.stack(per_step, dim=1).double()
    return DenseRewards(rewards, rewards[:, 1:] - rewards[:, :-1], calls)
