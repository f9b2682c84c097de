"""Reward transforms against values worked out by hand (in the comments next to each expectation)."""

import math

import pytest
import torch
from torch.testing import assert_close

from align_diffusion.rewards.transforms import (
    combine,
    estimate_bnpo_params,
    group_advantages,
    log_tame,
    median_normalize,
)
from align_diffusion.training.advantages import best_worst_mask

nan = math.nan


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


# --- weighted sum and its errors ---------------------------------------------------------------------------------


def test_weighted_sum():
    rewards = {"a": t(1, 2, 3), "b": t(0.5, 0, 1)}
    # 2·a - b = [2 - 0.5, 4 - 0, 6 - 1]
    assert_close(combine(rewards, {"a": 2.0, "b": -1.0}), t(1.5, 4, 5))


def test_combine_keeps_float32():
    out = combine({"a": torch.tensor([1.0, 2.0])}, {"a": 1.0})
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "rewards, weights, match",
    [
        ({"a": t(1, 2)}, {"a": 1.0, "clip": 1.0}, "absent.*clip"),
        ({"a": t(1, 2), "b": t(1, 2)}, {"a": 1.0}, "no weight.*'b'"),
        ({"a": t(1, 2), "b": t(1, 2, 3)}, {"a": 1.0, "b": 1.0}, "3 entries for a batch of 2"),
        ({"a": torch.ones(2, 2)}, {"a": 1.0}, "1-D"),
        ({}, {}, "no rewards"),
    ],
)
def test_combine_errors(rewards, weights, match):
    with pytest.raises(ValueError, match=match):
        combine(rewards, weights)


def test_combine_needs_group_ids_to_normalize_each():
    with pytest.raises(ValueError, match="group_ids"):
        combine({"a": t(1, 2)}, {"a": 1.0}, normalize_each=True)
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        combine({"a": t(1, 2)}, {"a": 1.0}, normalize_each=True, group_ids=torch.tensor([0, 0, 1]))


# --- per-reward normalization (GDPO) -----------------------------------------------------------------------------


def test_normalize_each_then_global_std_is_gdpo():
    groups = torch.tensor([0, 0, 1, 1])
    rewards = {"a": t(1, 3, 2, 2), "b": t(0, 1, 1, 3)}
    # a: group 0 mean 2, std 1 -> [-1, 1]; group 1 does not vary -> [0, 0]
    # b: group 0 mean 0.5, std 0.5 -> [-1, 1]; group 1 mean 2, std 1 -> [-1, 1]
    # a + 0.5·b = [-1.5, 1.5, -0.5, 0.5]
    combined = combine(rewards, {"a": 1.0, "b": 0.5}, group_ids=groups, normalize_each=True)
    assert_close(combined, t(-1.5, 1.5, -0.5, 0.5))
    # batch normalization: mean 0, variance (2.25 + 2.25 + 0.25 + 0.25) / 4 = 1.25
    out = group_advantages(combined, groups, "global_std")
    s = math.sqrt(1.25)
    assert_close(out.advantages, t(-1.5 / s, 1.5 / s, -0.5 / s, 0.5 / s))
    assert out.num_zero_variance_groups == 0


def test_normalize_each_keeps_reward_combinations_apart():
    # GDPO's motivating case: two binary rewards, two images per prompt. Summing first maps (0,1)-vs-(0,0) and
    # (1,1)-vs-(0,0) to the same advantages; normalizing each reward first keeps them apart.
    groups = torch.tensor([0, 0, 1, 1])
    rewards = {"format": t(0, 0, 1, 0), "correct": t(1, 0, 1, 0)}
    summed = combine(rewards, {"format": 1.0, "correct": 1.0})
    assert_close(group_advantages(summed, groups).advantages, t(1, -1, 1, -1))
    decoupled = combine(rewards, {"format": 1.0, "correct": 1.0}, group_ids=groups, normalize_each=True)
    # group 0: format does not vary -> 0, correct -> [1, -1]; group 1: both -> [1, -1], summed [2, -2]
    assert_close(decoupled, t(1, -1, 2, -2))


# --- log-taming (PaCo-RL) ----------------------------------------------------------------------------------------


def test_log_taming_hand_values():
    # r1 = [1, 3]: mean 2, std 1 -> CV 0.5.  r2 = [0, 8]: mean 4, std 4 -> CV 1.
    rewards = {"r1": t(1, 3), "r2": t(0, 8)}
    weights = {"r1": 1.0, "r2": 1.0}
    # δ = 0.75 tames r2 only: [1 + log 1, 3 + log 9]
    expected = t(1, 3 + math.log(9))
    assert_close(combine(rewards, weights, log_tame_cv=0.75), expected)
    # "mean" and "median" of the CVs are both 0.75 here
    assert_close(combine(rewards, weights, log_tame_cv="mean"), expected)
    assert_close(combine(rewards, weights, log_tame_cv="median"), expected)
    # δ = 0.4 tames both: [log 2 + log 1, log 4 + log 9]
    assert_close(combine(rewards, weights, log_tame_cv=0.4), t(math.log(2), math.log(4) + math.log(9)))
    # δ = 1 tames neither (strictly greater)
    assert_close(combine(rewards, weights, log_tame_cv=1.0), t(1, 11))


def test_log_taming_refuses_negative_rewards():
    with pytest.raises(ValueError, match="'aesthetic'.*-0.5"):
        combine({"clip": t(1, 2), "aesthetic": t(-0.5, 2)}, {"clip": 1.0, "aesthetic": 1.0}, log_tame_cv=0.1)
    with pytest.raises(ValueError, match="'mean' or 'median'"):
        log_tame({"a": t(1, 2)}, "max")


def test_log_taming_keeps_each_rewards_order():
    torch.manual_seed(0)
    rewards = {"heavy": torch.rand(32, dtype=torch.float64) ** 4 * 100, "flat": 5 + torch.rand(32, dtype=torch.float64)}
    tamed = log_tame(rewards, 0.5)
    assert not torch.equal(tamed["heavy"], rewards["heavy"])  # it was tamed
    assert torch.equal(tamed["flat"], rewards["flat"])  # CV ≈ 0.05: left alone
    for name, original in rewards.items():
        assert torch.equal(torch.argsort(tamed[name]), torch.argsort(original))


def test_log_taming_ignores_nan_in_cv_and_keeps_it():
    # without the NaN, [0, 8] has CV 1 > 0.75 and is tamed; the NaN stays NaN
    tamed = log_tame({"r": t(0, nan, 8)}, 0.75)["r"]
    assert_close(tamed, t(0, nan, math.log(9)), equal_nan=True)


@pytest.mark.parametrize("threshold", ["mean", "median"])
def test_log_taming_passes_a_batch_with_no_score_through(threshold):
    out = combine({"a": t(nan, nan), "b": t(nan, nan)}, {"a": 1.0, "b": 1.0}, log_tame_cv=threshold)
    assert torch.isnan(out).all() and out.shape == (2,)


# --- cross-source median normalization (MedGRPO) -----------------------------------------------------------------


def test_median_normalization_hand_values():
    sources = ["a"] * 5 + ["b"] * 3
    x = t(1, 2, 3, 4, 5, 10, 20, 40)
    out = median_normalize(x, sources)
    # a: median 3, q25 2, q75 4, IQR 2 -> sigmoid(3 (x - 3) / 2)
    # b: median 20, q25 15, q75 30, IQR 15 -> sigmoid(3 (x - 20) / 15): 10 -> sigmoid(-2), 40 -> sigmoid(4)
    expected = [sigmoid(-3), sigmoid(-1.5), 0.5, sigmoid(1.5), sigmoid(3), sigmoid(-2), 0.5, sigmoid(4)]
    assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert out[2].item() == 0.5 and out[6].item() == 0.5  # each source's median maps to exactly 0.5


def test_median_normalization_in_combine_and_fixed_stats():
    x = {"r": t(2, 4, 0)}
    out = combine(x, {"r": 1.0}, sources=["a", "a", "b"], source_stats={"a": (2.0, 4.0), "b": (0.0, 1.0)})
    # a: sigmoid(3 (2 - 2) / 4) = 0.5, sigmoid(3 (4 - 2) / 4) = sigmoid(1.5); b: at its median
    assert_close(out, t(0.5, sigmoid(1.5), 0.5))
    with pytest.raises(ValueError, match="source 'b'"):
        combine(x, {"r": 1.0}, sources=["a", "a", "b"], source_stats={"a": (2.0, 4.0)})
    with pytest.raises(ValueError, match="3 data-source names"):
        combine(x, {"r": 1.0}, sources=["a", "b"])


def test_median_normalization_zero_iqr_and_nan():
    # IQR 0: the sigmoid's limit, a step around the median
    assert_close(median_normalize(t(1, 1, 1, 2, 0), ["s"] * 5), t(0.5, 0.5, 0.5, 1, 0))
    # NaN is left out: stats of [1, 2, 3] are median 2, IQR 2.5 - 1.5 = 1
    out = median_normalize(t(1, nan, 2, 3), ["s"] * 4)
    assert_close(out, t(sigmoid(-3), nan, 0.5, sigmoid(3)), equal_nan=True)
    # a source whose every reward failed stays NaN
    assert torch.isnan(median_normalize(t(1, nan), ["s", "dead"])[1])


def test_median_normalization_keeps_nan_when_iqr_is_zero():
    # a mostly-passing strict reward: quartiles of [1, 1, 1, 0, 1] are all 1, so IQR 0; the failed image stays NaN
    out = median_normalize(t(1, 1, 1, 0, 1, nan), ["s"] * 6)
    assert_close(out, t(0.5, 0.5, 0.5, 0, 0.5, nan), equal_nan=True)
    out = median_normalize(t(0.2, nan, 0.7), ["s"] * 3, stats={"s": (0.5, 0.0)})
    assert_close(out, t(0, nan, 1), equal_nan=True)
    for stats in ((nan, 0.0), (0.5, nan), (0.5, -1.0)):  # a NaN median scored every image 0.5
        with pytest.raises(ValueError, match="source 's' needs a finite median and a finite IQR >= 0"):
            median_normalize(t(0.2, 0.7), ["s"] * 2, stats={"s": stats})


def test_median_normalization_of_half_precision_rewards():
    # stats of [1, 2, 3]: median 2, IQR 1, computed in float64 whatever the rewards' dtype
    out = median_normalize(torch.tensor([1, 2, 3], dtype=torch.float16), ["s"] * 3)
    assert out.dtype == torch.float16
    assert_close(out.double(), t(sigmoid(-3), 0.5, sigmoid(3)), atol=1e-3, rtol=0)


# --- group normalizers -------------------------------------------------------------------------------------------


def test_zscore_uses_population_std_and_counts_flat_groups():
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    out = group_advantages(t(1, 2, 3, 5, 5, 7), groups)
    # group 0: mean 2, population std sqrt(2/3) -> ±1/sqrt(2/3) = ±1.2247; groups 1 and 2 (single image) do not vary
    s = math.sqrt(2 / 3)
    assert_close(out.advantages, t(-1 / s, 0, 1 / s, 0, 0, 0))
    assert out.zero_variance.tolist() == [False, False, False, True, True, True]
    assert out.num_zero_variance_groups == 2
    assert out.bnpo_params is None


def test_a_spread_of_float32_rounding_is_no_variation_at_the_rewards_size():
    """Float32 rewards near 21.5 step in units of 1.9e-6: a group that differs by two of them has no signal (normalized
    by its std it got advantages of ±1.7); the threshold is eps · max(1, |mean|), so near 0 it stays 1e-6."""
    one_ulp = torch.tensor([21.5, 21.5000038], dtype=torch.float32)  # 21.5 and the next float32 but one
    rounding = group_advantages(torch.cat([one_ulp, t(21.5, 21.5).float()]), torch.zeros(4))
    assert rounding.advantages.tolist() == [0] * 4 and rounding.num_zero_variance_groups == 1
    # std 5e-5 > 1e-6 · 21.5: a spread of some thirty units is a signal
    varied = group_advantages(t(21.5, 21.5 + 4 * 5e-5 / math.sqrt(3), 21.5, 21.5), torch.zeros(4))
    assert varied.num_zero_variance_groups == 0
    # near 0 the absolute 1e-6: std of [0, 1e-5, 0, 0] = 1e-5 · sqrt(3) / 4 = 4.3e-6 varies
    assert group_advantages(t(0, 1e-5, 0, 0), torch.zeros(4)).num_zero_variance_groups == 0
    # DenseGRPO's step rewards are differences of rewards of size 21.5: the same rounding, around 0
    deltas = (torch.cat([one_ulp, t(21.5, 21.5).float()]) - 21.5).double()
    assert group_advantages(deltas, torch.zeros(4)).num_zero_variance_groups == 0  # judged by their own size
    assert group_advantages(deltas, torch.zeros(4), scale=t(21.5, 21.5, 21.5, 21.5)).num_zero_variance_groups == 1


def test_global_std():
    # group means 2 and 4 -> deviations [-1, 1, -2, 2]; batch [1, 3, 2, 6]: mean 3, variance (4+0+1+9)/4 = 3.5
    out = group_advantages(t(1, 3, 2, 6), torch.tensor([0, 0, 1, 1]), "global_std")
    s = math.sqrt(3.5)
    assert_close(out.advantages, t(-1 / s, 1 / s, -2 / s, 2 / s))
    # a batch that does not vary at all: every group is zero-variance
    flat = group_advantages(t(2, 2, 2, 2), torch.tensor([0, 0, 1, 1]), "global_std")
    assert flat.advantages.tolist() == [0, 0, 0, 0] and flat.num_zero_variance_groups == 2
    # group 0 = [0, 3e-6] varies (std 1.5e-6 > eps) but the batch does not: one 3e-6 among ten values has
    # std 3e-6 · sqrt(0.1 · 0.9) = 9e-7 <= eps = 1e-6, so no group gets a relative advantage
    noise = group_advantages(t(0, 3e-6, *[0] * 8), torch.arange(5).repeat_interleave(2), "global_std")
    assert noise.advantages.tolist() == [0] * 10 and noise.num_zero_variance_groups == 5


BINARY_GROUPS = t(1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1)
BINARY_IDS = torch.arange(5).repeat_interleave(4)


def test_bnpo_three_halves_is_grpo_on_binary_rewards():
    bnpo = group_advantages(BINARY_GROUPS, BINARY_IDS, "bnpo", bnpo_alpha=1.5, bnpo_beta=1.5)
    grpo = group_advantages(BINARY_GROUPS, BINARY_IDS, "zscore")
    assert_close(bnpo.advantages, grpo.advantages)
    # spot values: p = 0.25, std sqrt(0.1875) -> 0.75 / 0.4330 = 1.7321
    assert_close(bnpo.advantages[4], torch.tensor(0.75 / math.sqrt(0.1875), dtype=torch.float64))
    assert bnpo.num_zero_variance_groups == grpo.num_zero_variance_groups == 2  # all-0 and all-1 groups
    assert not torch.isnan(bnpo.advantages).any()


def test_bnpo_three_halves_is_grpo_on_random_binary_groups_and_other_ranges():
    torch.manual_seed(0)
    ids = torch.arange(16).repeat_interleave(8)
    rewards = (torch.rand(128) < torch.rand(16).repeat_interleave(8)).double()
    grpo = group_advantages(rewards, ids).advantages
    assert_close(group_advantages(rewards, ids, "bnpo", bnpo_alpha=1.5, bnpo_beta=1.5).advantages, grpo)
    # rewards in {-1, 1} with their range given
    pm = group_advantages(2 * rewards - 1, ids, "bnpo", bnpo_alpha=1.5, bnpo_beta=1.5, reward_range=(-1.0, 1.0))
    assert_close(pm.advantages, grpo)


def test_bnpo_other_parameters_by_hand():
    ids = torch.tensor([0, 0, 0, 0])
    # α = β = 1: density 1 -> (8/π)(R - p); p = 0.25
    out = group_advantages(t(1, 0, 0, 0), ids, "bnpo", bnpo_alpha=1.0, bnpo_beta=1.0)
    assert_close(out.advantages, 8 / math.pi * t(0.75, -0.25, -0.25, -0.25))
    # α = 2, β = 1: density 2p; rewards [0.2, 0.6] -> p = 0.4, density 0.8 -> (8/π)(±0.2)/0.8
    out = group_advantages(t(0.2, 0.6), torch.tensor([0, 0]), "bnpo", bnpo_alpha=2.0, bnpo_beta=1.0)
    assert_close(out.advantages, 8 / math.pi * t(-0.25, 0.25))


def test_bnpo_estimated_parameters():
    # group means 0.25, 0.5, 0.75: m = 0.5, unbiased v = 0.0625, m(1-m)/v - 1 = 3 -> a = b = 1.5 -> α = β = 1.5
    rewards = t(1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0)
    ids = torch.arange(3).repeat_interleave(4)
    out = group_advantages(rewards, ids, "bnpo")
    assert out.bnpo_params == pytest.approx((1.5, 1.5))
    assert_close(out.advantages, group_advantages(rewards, ids).advantages)
    # means 0.2, 0.4: m = 0.3, v = 0.02, k = 0.21/0.02 - 1 = 9.5 -> α = 1 + 9.5·0.3/3 = 1.95, β = 1 + 9.5·0.7/3
    assert estimate_bnpo_params(t(0.2, 0.4)) == pytest.approx((1.95, 1 + 9.5 * 0.7 / 3))
    # widely spread means (v > m(1-m)) clamp to 1; nothing to fit -> (1, 1)
    assert estimate_bnpo_params(t(0, 1, 0, 1)) == (1.0, 1.0)
    assert estimate_bnpo_params(t(0.5)) == (1.0, 1.0)
    assert estimate_bnpo_params(t(0.5, 0.5)) == (1.0, 1.0)


def test_bnpo_errors():
    ids = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="reward_range"):
        group_advantages(t(0.5, 1.5), ids, "bnpo")
    # three weighted [0, 1] terms that all score 1 sum, in float32, to 1.0000001: rounding, not a reward out of range
    rounded = torch.tensor([0.27, 0.66, 0.07]).sum().expand(2).clone()
    assert rounded[0].item() > 1
    assert group_advantages(torch.cat([rounded, t(0.5, 0.5).float()]), torch.tensor([0, 0, 1, 1]), "bnpo",
                            bnpo_alpha=1.5, bnpo_beta=1.5).num_zero_variance_groups == 2
    with pytest.raises(ValueError, match="both bnpo_alpha and bnpo_beta"):
        group_advantages(t(0.5, 1.0), ids, "bnpo", bnpo_alpha=1.5)


def test_absolute_term():
    groups = torch.tensor([0, 0, 1, 1])
    out = group_advantages(t(1, 1, 0, 1), groups, absolute_weight=0.5, anchor=0.5)
    # group 0 does not vary: relative 0, absolute 0.5 (1 - 0.5) = 0.25 each
    # group 1: relative [-1, 1], absolute 0.5 (R - 0.5) = [-0.25, 0.25]
    assert_close(out.advantages, t(0.25, 0.25, -1.25, 1.25))
    assert out.num_zero_variance_groups == 1
    # a per-sample anchor, e.g. a reference model's reward per prompt
    out = group_advantages(t(1, 1, 0, 1), groups, absolute_weight=1.0, anchor=t(0, 0, 1, 1))
    assert_close(out.advantages, t(1, 1, -2, 1))


def test_group_advantage_errors():
    with pytest.raises(ValueError, match="unknown advantage method 'rloo'"):
        group_advantages(t(1, 2), torch.tensor([0, 0]), "rloo")
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        group_advantages(t(1, 2), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="anchor has 3 entries"):
        group_advantages(t(1, 2), torch.tensor([0, 0]), absolute_weight=1.0, anchor=t(0, 0, 0))


# --- NaN: a reward that failed on an image -----------------------------------------------------------------------


def test_nan_propagates_through_combine():
    rewards = {"a": t(1, nan, 3, 5), "b": t(1, 1, 1, 3)}
    assert_close(combine(rewards, {"a": 1.0, "b": 1.0}), t(2, nan, 4, 8), equal_nan=True)
    # GDPO: a's group 0 statistics come from [1, 3] only (mean 2, std 1)
    out = combine(rewards, {"a": 1.0, "b": 0.0}, group_ids=torch.tensor([0, 0, 0, 1]), normalize_each=True)
    assert_close(out, t(-1, nan, 1, 0), equal_nan=True)
    # a NaN inside a group that does not vary stays NaN (its neighbours get 0)
    out = combine({"a": t(2, nan, 2)}, {"a": 1.0}, group_ids=torch.tensor([0, 0, 0]), normalize_each=True)
    assert_close(out, t(0, nan, 0), equal_nan=True)


@pytest.mark.parametrize("method", ["zscore", "global_std", "bnpo"])
def test_an_infinite_reward_counts_as_unscored_like_nan(method):
    """Left in, inf − inf in its group's std (and, for global_std, the batch's) would turn every advantage NaN."""
    ids, inf = torch.tensor([0, 0, 0, 1, 1]), math.inf
    kwargs = dict(bnpo_alpha=1.5, bnpo_beta=1.5)
    for bad in (inf, -inf):
        out = group_advantages(t(1, bad, 0, 1, 0), ids, method, **kwargs)
        # Groups [1, 0] and [1, 0] once it is out: means 0.5, every std (group and batch) 0.5; BNPO at α = β = 3/2 on
        # binary rewards is GRPO
        assert_close(out.advantages, t(1, nan, -1, 1, -1), equal_nan=True)
        assert_close(combine({"a": t(1, bad, 3), "b": t(1, 1, 1)}, {"a": 1.0, "b": 1.0}), t(2, nan, 4), equal_nan=True)
        assert best_worst_mask(t(1, bad, 0, 2), torch.tensor([0, 0, 0, 0])).tolist() == [False, False, True, True]


@pytest.mark.parametrize("method", ["zscore", "global_std", "bnpo"])
def test_nan_is_excluded_from_group_statistics(method):
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = group_advantages(t(1, nan, 0, 1, nan, nan, nan), ids, method, bnpo_alpha=1.5, bnpo_beta=1.5)
    # group 0 from [1, 0]: mean 0.5, std 0.5 -> [1, NaN, -1]; for global_std the batch is [1, 0, 1]: std sqrt(2/9)
    scale = 0.5 / math.sqrt(2 / 9) if method == "global_std" else 1.0
    assert_close(out.advantages, t(scale, nan, -scale, 0, nan, nan, nan), equal_nan=True)
    # group 1 (one scored image) is zero-variance, its failed image stays NaN and unflagged;
    # group 2 has no scored image and is not counted
    assert out.zero_variance.tolist() == [False, False, False, True, False, False, False]
    assert out.num_zero_variance_groups == 1
