"""Rewards: one interface (`Reward`), loaded by spec (`load_reward("shapes=1.0,clip:PATH=0.2")`)."""

from align_diffusion.rewards.base import Reward, RewardError
from align_diffusion.rewards.spec import WeightedRewards, load_reward, parse_spec

__all__ = ["Reward", "RewardError", "WeightedRewards", "load_reward", "parse_spec"]
