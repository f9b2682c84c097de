"""Advantage variants of the GRPO family on top of `rewards.transforms.group_advantages`:

- DanceGRPO trains on the best and the worst image of each group only (`best_worst_mask`);
- DenseGRPO gives every denoising step its own advantage: the step rewards ΔR_t (`rewards.dense`) normalized within
  each group separately for every step t (`dense_advantages`).
"""

from __future__ import annotations

import torch

from align_diffusion.rewards.transforms import group_advantages, unscored_if_infinite


def best_worst_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the highest- and the lowest-reward image of each group (the first one on ties; NaN and infinite
    rewards, unscored, never)."""
    rewards = unscored_if_infinite(rewards)
    keep = torch.zeros(len(rewards), dtype=torch.bool)
    for group in torch.unique(group_ids):
        members = (group_ids == group).nonzero().flatten()
        scores = rewards[members]
        scored = members[~torch.isnan(scores)]
        if len(scored) == 0:
            continue
        values = rewards[scored]
        keep[scored[values.argmax()]] = True
        keep[scored[values.argmin()]] = True
    return keep


def dense_advantages(deltas: torch.Tensor, group_ids: torch.Tensor, method: str = "zscore",
                     rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, T) advantages from step rewards (B, T): for each step, the group normalizer of `method` over the images
    of each group; also (B, T) which of them lie in a group whose step rewards did not vary (advantage 0), and the
    number of such (group, step) pairs. `rewards` (B,), the rewards the steps' differences are of, sets how small a
    spread counts as no variation (`group_advantages`' scale; float32 rounding of rewards of size 20 is 1.9e-6)."""
    columns, zero_variance, zero = [], [], 0
    for t in range(deltas.shape[1]):
        result = group_advantages(deltas[:, t], group_ids, method, scale=rewards)
        columns.append(result.advantages)
        zero_variance.append(result.zero_variance)
        zero += result.num_zero_variance_groups
    return torch.stack(columns, dim=1), torch.stack(zero_variance, dim=1), zero
