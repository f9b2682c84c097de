"""Reward transforms: several rewards per image into one reward, then rewards into group advantages.

Pure tensor math on (B,) tensors, no models. The transforms always run in this order:

`combine(rewards, weights, ...)`, one reward per image:
  1. log-taming (PaCo-RL): a reward whose coefficient of variation over the batch exceeds δ becomes log(1 + R);
  2. per-reward group normalization (GDPO): each reward becomes its z-score within its group;
  3. weighted sum Σ_k w_k R_k;
  4. cross-source median normalization (MedGRPO): 1 / (1 + exp(-3 (R - median_s) / IQR_s)) per data source s.
`group_advantages(reward, group_ids, method, ...)`, one advantage per image:
  5. a group normalizer: "zscore" (GRPO), "global_std" (Flow-GRPO's global std, GDPO's batch normalization)
     or "bnpo" (Beta normalization);
  6. optionally a value-anchored absolute term λ (R - anchor) (VGPO-style).

Conventions:
- Standard deviations are population ones (divide by n, as Flow-GRPO's numpy std): a binary group with success
  rate p has std sqrt(p (1 - p)), which is what makes BNPO with α = β = 3/2 equal GRPO.
- NaN marks a reward that failed on an image. It stays NaN through every transform (the combined reward and the
  advantage of that image are NaN; the trainer masks and counts them) and is left out of every statistic
  (group means and stds, batch std, coefficients of variation, medians and IQRs, BNPO's Beta fit).
  It is never replaced by a default. An infinite reward (a log-likelihood of 0, an FK weight of nothing) counts as
  NaN too (`unscored_if_infinite`): in a mean or std it would turn its whole group, or batch, into NaN.
- A group whose rewards do not vary (std <= eps, a single scored image included) gives relative advantage 0 to its
  images, is flagged in `zero_variance` and counted in `num_zero_variance_groups`; it never yields NaN.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

METHODS = ("zscore", "global_std", "bnpo")
MEDIAN_SLOPE = 3.0  # MedGRPO: one IQR above the median maps to sigmoid(3) ≈ 0.95
GRPO_BETA_SCALE = 8 / math.pi  # 1 / B(3/2, 3/2): the Beta(3/2, 3/2) density is (8/π) sqrt(p (1 - p))


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # (B,); NaN where the reward is NaN
    zero_variance: torch.Tensor  # (B,) bool: scored images whose group's rewards do not vary
    num_zero_variance_groups: int
    bnpo_params: tuple[float, float] | None = None  # (α, β) used by "bnpo", estimated or given


def unscored_if_infinite(rewards: torch.Tensor) -> torch.Tensor:
    """`rewards` with ±inf read as NaN, the mark of an image no reward could score."""
    return rewards.masked_fill(torch.isinf(rewards), math.nan)


def _check_batch(x, name: str, size: int | None = None) -> int:
    if not isinstance(x, torch.Tensor) or x.ndim != 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor of shape (B,), got {shape}")
    if size is not None and len(x) != size:
        raise ValueError(f"{name} has {len(x)} entries for a batch of {size}")
    return len(x)


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def _population_std(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()).pow(2).mean().sqrt()


def _group_stats(x: torch.Tensor, group_ids: torch.Tensor):
    """Each sample's group index, and per group: count, mean and population std of its non-NaN rewards."""
    _, index = torch.unique(group_ids, return_inverse=True)
    valid = ~torch.isnan(x)
    zeros = x.new_zeros(int(index.max()) + 1 if len(index) else 0)
    count = zeros.index_add(0, index, valid.to(x.dtype))
    mean = zeros.index_add(0, index, torch.where(valid, x, 0.0)) / count  # NaN for a group with no scored image
    deviation = torch.where(valid, x - mean[index], 0.0)
    std = (zeros.index_add(0, index, deviation**2) / count).sqrt()
    return index, count, mean, std


def _does_not_vary(std: torch.Tensor, size: torch.Tensor, eps: float) -> torch.Tensor:
    """Which groups do not vary: std <= eps · max(1, size), `size` the magnitude of the rewards the values come from.
    Relative, because float32 rewards of size 20 that differ by rounding alone (a few units of 1.9e-6) carry no
    signal, and normalized by their std they would get advantages of ±1."""
    return std <= eps * torch.nan_to_num(size.abs(), nan=1.0).clamp(min=1)


def group_zscore(x: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - group mean) / group std, 0 in groups that do not vary (`_does_not_vary`); also the (B,) zero-variance
    mask."""
    index, _, mean, std = _group_stats(x, group_ids)
    zero_variance = ~torch.isnan(x) & _does_not_vary(std, mean, eps)[index]
    return torch.where(zero_variance, 0.0, (x - mean[index]) / std[index]), zero_variance


def coefficient_of_variation(x: torch.Tensor) -> float:
    """Population std / mean of the non-NaN values; 0 when they are all 0, NaN when there are none."""
    x = x[~torch.isnan(x)].double()
    if len(x) == 0:
        return math.nan
    mean = x.mean().item()
    return 0.0 if mean == 0 else _population_std(x).item() / mean


def log_tame(rewards: Mapping[str, torch.Tensor], threshold: float | str) -> dict[str, torch.Tensor]:
    """PaCo-RL's log-taming: log(1 + R) for each reward whose batch coefficient of variation exceeds `threshold`.

    `threshold` is δ, or "mean" / "median" of all the rewards' coefficients (the PaCo-GRPO code's options).
    The coefficient of variation only means something for non-negative rewards, so a negative one is refused.
    """
    for name, r in rewards.items():
        negative = r[r < 0]
        if len(negative):
            raise ValueError(f"log-taming needs non-negative rewards; {name!r} has {negative.min().item():g}")
    cv = {name: coefficient_of_variation(r) for name, r in rewards.items()}
    if threshold in ("mean", "median"):
        finite = torch.tensor([c for c in cv.values() if not math.isnan(c)], dtype=torch.float64)
        if len(finite) == 0:  # no reward scored a single image: nothing to tame, the NaNs pass through
            threshold = math.nan
        else:
            threshold = finite.mean().item() if threshold == "mean" else torch.quantile(finite, 0.5).item()
    elif isinstance(threshold, str):
        raise ValueError(f"log-taming threshold must be a number, 'mean' or 'median', got {threshold!r}")
    return {name: torch.log1p(r) if cv[name] > threshold else r for name, r in rewards.items()}


def median_normalize(
    x: torch.Tensor,
    sources: Sequence[str],
    stats: Mapping[str, tuple[float, float]] | None = None,
    slope: float = MEDIAN_SLOPE,
) -> torch.Tensor:
    """MedGRPO's cross-source normalization: 1 / (1 + exp(-slope (x - median_s) / IQR_s)) for each source s.

    median_s and IQR_s (75th minus 25th percentile, linear interpolation) come from `stats[s]` = (median, IQR)
    or, without `stats`, from the batch's non-NaN values of that source. Each source's median maps to 0.5.
    IQR_s = 0 takes the sigmoid's limit: 0 below the median, 0.5 at it, 1 above.
    """
    size = _check_batch(x, "rewards")
    if isinstance(sources, str) or len(sources) != size:
        raise ValueError(f"sources must be a list of {size} data-source names, one per sample")
    out = torch.full_like(x, math.nan)
    for source in dict.fromkeys(sources):
        where = torch.tensor([s == source for s in sources], device=x.device)
        values = x[where]
        if stats is not None:
            if source not in stats:
                raise ValueError(f"median normalization: no (median, IQR) given for source {source!r}")
            median, iqr = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in stats[source])
            if not (torch.isfinite(median) and torch.isfinite(iqr) and iqr >= 0):
                raise ValueError(f"median normalization: source {source!r} needs a finite median and a finite IQR "
                                 f">= 0, got {tuple(stats[source])}")
        else:
            scored = values[~torch.isnan(values)]
            if len(scored) == 0:
                continue  # every reward of this source failed: they stay NaN
            quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=x.device)
            q25, median, q75 = torch.quantile(scored.double(), quartiles).to(x.dtype)
            iqr = q75 - q25
        if iqr > 0:
            out[where] = torch.sigmoid(slope * (values - median) / iqr)
        else:  # torch.sign(NaN) is 0, which would score a failed image as the median
            out[where] = torch.where(torch.isnan(values), values, 0.5 * (1 + torch.sign(values - median)))
    return out


def combine(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    group_ids: torch.Tensor | None = None,
    log_tame_cv: float | str | None = None,
    normalize_each: bool = False,
    sources: Sequence[str] | None = None,
    source_stats: Mapping[str, tuple[float, float]] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One reward per image from several, by steps 1-4 of the module docstring, in that order.

    rewards: name -> (B,) scores; weights: name -> weight, exactly one per reward. log_tame_cv: δ (or "mean",
    "median") turns on log-taming. normalize_each: z-score each reward within its group (needs group_ids) before
    the sum (GDPO; follow with group_advantages(method="global_std") for GDPO's batch normalization).
    sources: each sample's data source, turns on median normalization (source_stats: fixed (median, IQR) per source).
    """
    if not rewards:
        raise ValueError("no rewards to combine")
    size = None
    for name, r in rewards.items():
        size = _check_batch(r, f"reward {name!r}", size)
    absent = sorted(set(weights) - set(rewards))
    if absent:
        raise ValueError(f"weights name rewards that are absent: {absent}; rewards are {sorted(rewards)}")
    unweighted = sorted(set(rewards) - set(weights))
    if unweighted:
        raise ValueError(f"no weight given for rewards {unweighted}")
    if group_ids is not None:
        _check_batch(group_ids, "group_ids", size)
    if source_stats is not None and sources is None:
        raise ValueError("source_stats given without sources")
    dtype = _out_dtype(*rewards.values())
    values = {name: unscored_if_infinite(r.double()) for name, r in rewards.items()}

    if log_tame_cv is not None:
        values = log_tame(values, log_tame_cv)
    if normalize_each:
        if group_ids is None:
            raise ValueError("normalize_each needs group_ids")
        values = {name: group_zscore(r, group_ids, eps)[0] for name, r in values.items()}
    total = sum(float(weights[name]) * r for name, r in values.items())
    if sources is not None:
        total = median_normalize(total, sources, source_stats)
    return total.to(dtype)


def estimate_bnpo_params(group_means: torch.Tensor, eps: float = 1e-6) -> tuple[float, float]:
    """BNPO's (α, β) from the batch's group success rates p in [0, 1].

    Fits Beta(a, b) to the p's by moments (mean m, unbiased variance v: a = (m(1-m)/v - 1) m, b = (m(1-m)/v - 1)(1-m))
    and takes α = max(1 + a/3, 1), β = max(1 + b/3, 1), as the BNPO authors' code does. With fewer than two groups
    or std(p) <= eps there is nothing to fit and (1, 1) is returned (no normalization: REINFORCE with baseline).
    """
    p = group_means[~torch.isnan(group_means)].double()
    if len(p) < 2 or p.var().sqrt() <= eps:
        return 1.0, 1.0
    m, v = p.mean().item(), p.var().item()
    k = m * (1 - m) / v - 1
    return max(1 + k * m / 3, 1.0), max(1 + k * (1 - m) / 3, 1.0)


BNPO_ROUNDING = 1e-6  # how far outside reward_range (a share of its width) a reward may be rounded


def _bnpo(x, index, mean, alpha, beta, reward_range, eps):
    """BNPO's (R - p) / f_N(p; α, β) on rewards mapped to [0, 1], times the constant 8/π (see group_advantages)."""
    low, high = reward_range
    if not high > low:
        raise ValueError(f"reward_range must be (low, high) with high > low, got {reward_range}")
    u, p = (x - low) / (high - low), (mean - low) / (high - low)
    # Float32 sums of in-range terms may land a few units of rounding outside (three weighted 1s sum to 1.0000001)
    outside = x[(u < -BNPO_ROUNDING) | (u > 1 + BNPO_ROUNDING)]
    if len(outside):
        raise ValueError(f"bnpo needs rewards within reward_range={reward_range}; got {outside[0].item()!r}")
    u, p = u.clamp(0, 1), p.clamp(0, 1)
    if (alpha is None) != (beta is None):
        raise ValueError("give both bnpo_alpha and bnpo_beta, or neither (to estimate them)")
    if alpha is None:
        alpha, beta = estimate_bnpo_params(p, eps)
    log_beta_fn = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    log_density = torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_beta_fn
    return GRPO_BETA_SCALE * (u - p[index]) / log_density.exp()[index], (float(alpha), float(beta))


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    method: str = "zscore",
    *,
    eps: float = 1e-6,
    bnpo_alpha: float | None = None,
    bnpo_beta: float | None = None,
    reward_range: tuple[float, float] = (0.0, 1.0),
    absolute_weight: float = 0.0,
    anchor: float | torch.Tensor = 0.0,
    scale: torch.Tensor | None = None,
) -> GroupAdvantages:
    """Advantages from one reward per image; images of the same prompt share a group id (steps 5-6).

    method:
      "zscore"     (R - group mean) / group std (GRPO).
      "global_std" (R - group mean) / std of the whole batch (Flow-GRPO's global_std). After
                   combine(normalize_each=True) the group means are 0, so this is GDPO's batch normalization.
                   If the batch std itself is <= eps, every group counts as zero-variance.
      "bnpo"       (R - p) / f_N(p; α, β) · 8/π, with R mapped from reward_range to [0, 1], p the group mean and
                   f_N the Beta(α, β) density (BNPO, arXiv 2506.02864). α, β: bnpo_alpha/bnpo_beta, or estimated
                   per batch by estimate_bnpo_params. Since f_N(p; 3/2, 3/2) = (8/π) sqrt(p (1-p)), α = β = 3/2
                   gives exactly GRPO's advantages on binary rewards; the paper's equivalence holds up to that
                   constant, which we fold in (α = β = 1 then gives (8/π)(R - p), REINFORCE with baseline scaled).
    absolute_weight λ > 0 adds λ (R - anchor) to every scored image, zero-variance groups included, so a group
    that no longer varies still gets a signal (VGPO's value anchor, in a simplified form; anchor: a number or a
    (B,) tensor such as a reference model's reward for each prompt).

    A group counts as zero-variance (advantage 0) when its std is at most eps times the size of its rewards (at
    least 1; see `_does_not_vary`): the size of its mean, or of the group's mean of `scale` (B,) where the rewards
    are differences of rewards of that size (DenseGRPO's step rewards). With global_std the batch std is compared
    so.
    """
    if method not in METHODS:
        raise ValueError(f"unknown advantage method {method!r}; choose from {METHODS}")
    size = _check_batch(rewards, "rewards")
    _check_batch(group_ids, "group_ids", size)
    x = unscored_if_infinite(rewards.double())
    valid = ~torch.isnan(x)
    index, _, mean, std = _group_stats(x, group_ids)
    if scale is None:
        magnitude = mean
    else:
        _check_batch(scale, "scale", size)
        magnitude = _group_stats(unscored_if_infinite(scale.double()).abs(), group_ids)[2]
    zero_variance = valid & _does_not_vary(std, magnitude, eps)[index]
    params = None
    if method == "zscore":
        relative = (x - mean[index]) / std[index]
    elif method == "global_std":
        batch_std = _population_std(x[valid])
        relative = (x - mean[index]) / batch_std
        if _does_not_vary(batch_std, torch.nanmean(magnitude.abs()), eps) or not batch_std > 0:
            zero_variance = valid.clone()
    else:
        relative, params = _bnpo(x, index, mean, bnpo_alpha, bnpo_beta, reward_range, eps)
    advantages = torch.where(zero_variance, 0.0, relative)
    if absolute_weight:
        anchor = torch.as_tensor(anchor, dtype=x.dtype, device=x.device)
        if anchor.ndim:
            _check_batch(anchor, "anchor", size)
        advantages = advantages + absolute_weight * (x - anchor)
    return GroupAdvantages(
        advantages=advantages.to(_out_dtype(rewards)),
        zero_variance=zero_variance,
        num_zero_variance_groups=int(torch.unique(index[zero_variance]).numel()),
        bnpo_params=params,
    )
