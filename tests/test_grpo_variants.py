"""The GRPO variants on the one trainer, and GDRO: hand-worked advantages and losses, ψ(t) calibration, and short
runs of each variant on the tiny SD3 pipeline."""

import copy
import json
import math
import re
import shutil

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from training_helpers import metrics, tiny_overrides

from align_diffusion.cli import main
from align_diffusion.rewards.base import Reward
from align_diffusion.rewards.dense import dense_step_rewards
from align_diffusion.rewards.spec import WeightedRewards
from align_diffusion.models import load_adapter
from align_diffusion.sampling.loop import sample, step_log_prob
from align_diffusion.training.advantages import best_worst_mask, dense_advantages
from align_diffusion.training.config import ConfigError, load_config, to_dict
from align_diffusion.training.gdro import GROUPS_FILE, GDROTrainer, gdro_loss
from align_diffusion.training.grpo import SHARED_NOISE_STREAM, GRPOTrainer, gaussian_kl, train
from align_diffusion.training.noise_table import calibrate_step, read_table, write_table
from align_diffusion.training.prompts import ReferenceSource

# --- hand-worked values ------------------------------------------------------------------------------------------


def zscore_by_hand(values: torch.Tensor, group_size: int, rewards: torch.Tensor | None = None,
                   eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """The trainer's GRPO advantages written out: each group of `group_size` consecutive rows normalized column by
    column, (x − mean) / population std, and NaN (masked out of the loss) where the std is at most eps · max(1, |m|)
    (group_advantages' documented 1e-6), m the group's mean of `rewards` (the rewards step rewards are differences
    of) or else of the values; also the number of (group, column) pairs that did not vary."""
    x = values.double().reshape(len(values) // group_size, group_size, -1)
    mean, std = x.mean(dim=1, keepdim=True), x.std(dim=1, unbiased=False, keepdim=True)
    size = mean if rewards is None else rewards.double().reshape(-1, group_size, 1).abs().mean(dim=1, keepdim=True)
    flat = std <= eps * size.abs().clamp(min=1)
    return torch.where(flat, math.nan, (x - mean) / std).reshape(values.shape), int(flat.sum())


def test_best_worst_mask_hand_worked():
    rewards = torch.tensor([0.1, 0.5, 0.3, float("nan"), 2.0, 2.0, 1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert best_worst_mask(rewards, groups).tolist() == [True, True, False, False, False, False, True, True]


def test_dense_advantages_normalize_each_step_within_each_group():
    deltas = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, -1.0], [2.0, 1.0]])
    advantages, zero_variance, zero = dense_advantages(deltas, torch.tensor([0, 0, 1, 1]))
    # Step 0: group 0 has mean 2, std 1; group 1 does not vary. Step 1: means 2 and 0, stds 2 and 1.
    assert torch.allclose(advantages, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, -1.0], [0.0, 1.0]]))
    assert zero_variance.tolist() == [[False, False], [False, False], [True, False], [True, False]] and zero == 1


def test_groups_without_spread_are_masked_out_of_the_loss(saved, prompt_file, tmp_path):
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1)))
    rollouts = trainer.rollout(0)
    rollouts.rewards[:4] = -3.0  # the first group's images all score alike
    advantages, stats = trainer.advantages(rollouts)
    assert torch.isnan(advantages[:4]).all() and stats["zero_std_fraction"] == 0.5
    torch.testing.assert_close(advantages[4:], zscore_by_hand(rollouts.rewards[4:], 4)[0].float())
    update = trainer.update(rollouts, advantages, 1)
    assert update["trained_fraction"] == 0.5  # half the images, at each trained step
    # No group varies: no optimizer step (weight decay and momentum would move the weights), no schedule step.
    rollouts.rewards[:] = -3.0
    advantages, stats = trainer.advantages(rollouts)
    assert torch.isnan(advantages).all() and stats["zero_std_fraction"] == 1.0
    before = [p.detach().clone() for p in trainer.params]
    scheduled = trainer.lr_schedule.scheduler.last_epoch
    update = trainer.update(rollouts, advantages, 2)
    assert update["trained_fraction"] == 0 and math.isnan(update["grad_norm"]) and math.isnan(update["ratio_mean"])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert trainer.lr_schedule.scheduler.last_epoch == scheduled
    # The value-anchored term λ (R − anchor) gives such a group a signal of its own, so it stays in the loss.
    trainer.config.grpo.value_weight, trainer.config.grpo.value_anchor = 0.5, -1.0
    anchored, _ = trainer.advantages(rollouts)
    torch.testing.assert_close(anchored[:4], torch.full((4,), 0.5 * (-3.0 + 1.0)))


@pytest.mark.parametrize("advantage", ["zscore", "global_std"])
def test_an_infinite_reward_counts_as_unscored(saved, prompt_file, tmp_path, advantage):
    """An infinite reward cannot be normalized: it is masked like a NaN one, and the rest of its group and the other
    groups train as without it (rather than its group's advantages, or by the batch std every group's, turning
    NaN)."""
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{
        "grpo.advantage": advantage})))
    rollouts = trainer.rollout(0)
    rollouts.rewards[0] = math.nan
    expected, _ = trainer.advantages(rollouts)
    for infinite in (math.inf, -math.inf):
        rollouts.rewards[0] = infinite
        advantages, stats = trainer.advantages(rollouts)
        assert stats["nan_rewards"] == 1 and math.isfinite(stats["reward_mean"])
        torch.testing.assert_close(advantages, expected, equal_nan=True)
        assert torch.isnan(advantages[0]) and torch.isfinite(advantages[1:]).all()


def test_noise_calibration_moves_in_the_documented_direction():
    deltas = torch.tensor([[0.2, 0.3, 0.0, 0.1], [-0.1, 0.2, 0.0, 0.2], [0.3, 0.1, 0.0, -0.1], [-0.2, 0.4, 0.0, 0.3]])
    # Step 0 balances (2 up, 2 down) and step 2 never moves (no signal either way): more noise there. Step 1 only
    # gains and step 3 gains 3 : 1, beyond eps1 = 0.25: less noise, never below 0.
    assert calibrate_step([0.5, 0.5, 0.5, 0.05], deltas, eps1=0.25, eps2=0.1) == pytest.approx([0.6, 0.4, 0.6, 0.0])
    # A wider tolerance (|3 − 1| ≤ 0.5 · 4) counts step 3 as balanced.
    assert calibrate_step([0.5] * 4, deltas, eps1=0.5, eps2=0.1)[3] == pytest.approx(0.6)
    # Never above the sampler's largest valid level (CPS: a <= 1).
    assert calibrate_step([0.95] * 4, deltas, eps1=0.25, eps2=0.1, largest=1.0) == pytest.approx([1.0, 0.85, 1.0, 0.85])
    # Stepping down by eps2 reaches 0 exactly, not a float's leftover that would still count as noise.
    levels = [0.7, 0.5, 0.9]
    for _ in range(10):
        levels = calibrate_step(levels, torch.ones(4, 3), eps1=0.25, eps2=0.1)
        assert all(level == 0 or level > 0.05 for level in levels), levels
    # Unscored step rewards (NaN: a diverged trajectory) count neither way, and a step with none finite keeps its
    # level: NaN compares false both ways, which read as balanced and raised the noise that made samples diverge.
    nan = math.nan
    partly = torch.tensor([[nan, nan], [nan, 0.2], [nan, 0.3], [nan, -0.1]])
    assert calibrate_step([0.5, 0.5], partly, eps1=0.25, eps2=0.1) == pytest.approx([0.5, 0.4])


def test_gdro_loss_hand_worked_and_its_pairwise_limit_is_diffusion_dpo():
    implicit, rewards = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])
    target = [math.exp(r) / sum(math.exp(x) for x in (0, 1, 2)) for r in (0, 1, 2)]
    log_softmax = [i - math.log(sum(math.exp(x) for x in (1, 2, 3))) for i in (1, 2, 3)]
    assert gdro_loss(implicit, rewards, tau=1.0).item() == pytest.approx(-sum(t * ls for t, ls in
                                                                               zip(target, log_softmax)))
    # Two images, τ → 0: −log σ(r̂_w − r̂_l) with r̂ = −β (e_θ − e_ref), Diffusion-DPO's loss.
    beta = 50.0
    e_model, e_ref = torch.tensor([0.30, 0.20], dtype=torch.float64), torch.tensor([0.25, 0.26], dtype=torch.float64)
    implicit = -beta * (e_model - e_ref)
    pairwise = gdro_loss(implicit, torch.tensor([0.2, 0.9], dtype=torch.float64), tau=1e-4)
    dpo = -F.logsigmoid(-beta * ((e_model[1] - e_ref[1]) - (e_model[0] - e_ref[0])))
    assert pairwise.item() == pytest.approx(dpo.item(), rel=1e-9)
    # An unscored image is left out: the winner (implicit 0) against the loser (implicit 1), −log σ(0 − 1).
    assert gdro_loss(torch.tensor([0.0, 5.0, 1.0]), torch.tensor([1.0, float("nan"), 0.0]), 1e-4).item() == \
        pytest.approx(-F.logsigmoid(torch.tensor(-1.0)).item())
    with pytest.raises(ValueError, match="two scored"):
        gdro_loss(torch.zeros(2), torch.tensor([1.0, float("nan")]), 1.0)


def test_noise_table_is_checked_against_the_steps(saved, prompt_file, tmp_path):
    table = tmp_path / "table.json"
    write_table(table, [0.5, 0.5], sampler="flow-sde")
    assert read_table(table, 2, "flow-sde") == [0.5, 0.5]
    with pytest.raises(ValueError, match="calibrated for sampler flow-sde, not dance-sde"):
        read_table(table, 2, "dance-sde")
    write_table(table, [0.5, 0.5])  # a table written before tables named their sampler
    assert read_table(table, 2, "dance-sde") == [0.5, 0.5]
    with pytest.raises(ConfigError, match="sampling.noise_table"):
        load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{"sampling.noise_table": table}))
    for levels in ("[0.5, Infinity, 0.5]", "[0.5, true, 0.5]", "[0.5, NaN, 0.5]", f"[0.5, {10**400}, 0.5]"):
        table.write_text(f'{{"noise_levels": {levels}}}')
        with pytest.raises(ConfigError, match="sampling.noise_table: .*needs 3 finite, non-negative levels"):
            load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{"sampling.noise_table": table}))
    with pytest.raises(ConfigError, match="grpo.dense"):
        load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{"grpo.dense": "sde"}))
    with pytest.raises(ConfigError, match="references"):
        load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, reward="adv-dino:x"))


def test_paths_starting_with_a_tilde_are_read_from_the_home_folder(saved, prompt_file, tmp_path, monkeypatch):
    """As `model` and `prompts` are: the shell expands no ~ in a config file or a quoted override."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_table(tmp_path / "table.json", [0.5, 0.5, 0.5])
    config = load_config(None, tiny_overrides(saved["sd3"], prompt_file, "~/runs/a", **{
        "sampling.noise_table": "~/table.json", "resume_from": "~/runs/a/checkpoints/step-000001"}))
    assert (config.output_dir, config.sampling.noise_table, config.resume_from) == (
        str(tmp_path / "runs" / "a"), str(tmp_path / "table.json"), str(tmp_path / "runs/a/checkpoints/step-000001"))


# --- the variants run --------------------------------------------------------------------------------------------


def test_dance_grpo_shares_noise_within_groups_and_trains_on_best_and_worst(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{
        "sampling.sampler": "dance-sde", "sampling.shared_noise": "true", "grpo.best_worst_only": "true",
        "grpo.timestep_fraction": 0.5})
    trainer = GRPOTrainer(load_config(None, overrides))
    rollouts = trainer.rollout(0)
    start = rollouts.trajectory.latents[:, 0]
    for group in range(2):
        members = start[4 * group : 4 * group + 4]
        assert all(torch.equal(members[0], m) for m in members)
    assert not torch.equal(start[0], start[4])
    images = rollouts.trajectory.images
    assert (images[0] - images[1]).abs().max() > 1e-4  # the SDE noise is each image's own
    # The shared start comes from a stream of its own, not any image's generator (whose first SDE noise would then
    # repeat it: torch reads a seed's low 32 bits only, so an offset of 2**40 named the leader's own stream).
    own = trainer.adapter.initial_noise([torch.Generator().manual_seed(seed) for seed in trainer.image_seeds(0, 8)],
                                        *trainer.adapter.image_size(None, None))
    assert all(not torch.allclose(start[k], own[j]) for k in (0, 4) for j in range(8))
    advantages, _ = trainer.advantages(rollouts)
    kept = ~torch.isnan(advantages)
    by_group = rollouts.rewards.view(2, 4)
    expected = torch.zeros(2, 4, dtype=torch.bool)
    expected[torch.arange(2), by_group.argmax(1)] = True
    expected[torch.arange(2), by_group.argmin(1)] = True
    assert int(expected.sum()) == 4 and kept.tolist() == expected.flatten().tolist()
    # The kept images keep their advantage within the whole group.
    torch.testing.assert_close(advantages[kept], zscore_by_hand(rollouts.rewards, 4)[0][kept].float())
    trainer.train()
    row = metrics(tmp_path)[0]
    assert row["first_ratio_max_deviation"] <= 1e-5 and row["train_timesteps"] == 2


def test_best_worst_images_weigh_the_same_whatever_micro_batch_they_fall_in(saved, prompt_file, tmp_path):
    """One image per micro-batch: the update's gradient is that of the mean loss over the kept (best and worst)
    images, not over the micro-batches, so the masked-out ones do not dilute it."""
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{
        "grpo.best_worst_only": "true", "grpo.train_batch_size": 1, "grpo.kl_beta": 0, "optim.max_grad_norm": "null",
        "optim.lr": 0})
    trainer = GRPOTrainer(load_config(None, overrides))
    gradients = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: gradients.append(torch.cat([p.grad.flatten().double() for p in trainer.params])))
    rollouts = trainer.rollout(0)
    advantages, _ = trainer.advantages(rollouts)
    stats = trainer.update(rollouts, advantages, 0)
    assert math.isnan(stats["kl"])  # no KL term (kl_beta 0): none logged

    kept = ~torch.isnan(advantages)
    assert int(kept.sum()) == 4  # the best and the worst of each of the two groups of 4
    steps = rollouts.trajectory.stochastic_steps
    clip, loss = trainer.config.grpo.adv_clip_max, 0
    for j in steps:
        log_prob = step_log_prob(trainer.adapter, rollouts.trajectory, j, torch.nonzero(kept).flatten()).log_prob
        ratio = torch.exp(log_prob - rollouts.trajectory.log_probs[kept, j])
        loss = loss - (advantages[kept].clamp(-clip, clip) * ratio).mean() / len(steps)
    loss.backward()
    by_hand = torch.cat([p.grad.flatten().double() for p in trainer.params])
    assert float(by_hand.norm()) > 0
    assert torch.allclose(gradients[0], by_hand, rtol=1e-4, atol=1e-6 * float(by_hand.abs().max()))


def test_the_logged_kl_is_that_of_the_images_in_the_loss(saved, prompt_file, tmp_path):
    """Images whose advantage is NaN (unscored, in a group without spread, DanceGRPO's middle ones) are left out of
    the KL statistic as of the loss. Kept here: the two images of the largest KL."""
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{"grpo.kl_beta": 0.1,
                                                                                     "optim.lr": 0})
    trainer = GRPOTrainer(load_config(None, overrides))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in trainer.params:
            param.normal_(std=0.05)  # a policy away from the reference
    rollouts = trainer.rollout(0)
    with torch.no_grad():
        per_step = []
        for j in trainer.train_timesteps(0, rollouts.trajectory.stochastic_steps):
            out = step_log_prob(trainer.adapter, rollouts.trajectory, j)
            with trainer.reference_model():
                ref = step_log_prob(trainer.adapter, rollouts.trajectory, j)
            per_step.append(gaussian_kl(out.mean, ref.mean, out.std))
    kl = torch.stack(per_step, dim=1)
    advantages = torch.full((len(kl),), math.nan)
    advantages[kl.mean(1).topk(2).indices] = torch.tensor([1.0, -1.0])
    stats = trainer.update(rollouts, advantages, 0)
    kept = ~torch.isnan(advantages)
    assert stats["kl"] == pytest.approx(float(kl[kept].mean()), rel=1e-4)
    assert stats["kl"] != pytest.approx(float(kl.mean()), rel=1e-2)


def test_bnpo_maps_the_configured_reward_range_to_the_unit_interval(saved, prompt_file, tmp_path):
    """JPEG rewards are negative; with grpo.reward_range = [-20, 0] BNPO sees (R + 20) / 20."""
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{
        "grpo.advantage": "bnpo", "grpo.reward_range": "[-20, 0]"})
    trainer = GRPOTrainer(load_config(None, overrides))
    rollouts = trainer.rollout(0)
    assert float(rollouts.rewards.max()) < 0
    advantages, _ = trainer.advantages(rollouts)
    # BNPO written out: u = (R + 20) / 20, p its group mean; Beta(a, b) fitted to the p's by moments (unbiased
    # variance) gives α = max(1 + a/3, 1), β = max(1 + b/3, 1); advantage (u − p) / f(p; α, β) · 8/π, with f
    # scipy's Beta density.
    u = ((rollouts.rewards.double() + 20) / 20).view(2, 4)
    p = u.mean(1)
    m, v = float(p.mean()), float(p.var())
    k = m * (1 - m) / v - 1
    alpha, beta = max(1 + k * m / 3, 1.0), max(1 + k * (1 - m) / 3, 1.0)
    density = torch.tensor(scipy.stats.beta.pdf(p.numpy(), alpha, beta))
    expected = (8 / math.pi) * (u - p[:, None]) / density[:, None]
    # The group means nearly agree (α, β ~ 1e6), so the advantages are ~1e-6: compared relatively.
    torch.testing.assert_close(advantages, expected.flatten().float(), rtol=1e-5, atol=0)


class Brightness(Reward):
    """(10 × mean pixel value) ** `power`: non-negative terms of different spread, large enough for log(1 + R) to
    bend them."""

    def __init__(self, power: int):
        super().__init__(f"brightness{power}")
        self.power = power

    def score(self, images, prompts, metadata):
        return (10 * images.mean((1, 2, 3))) ** self.power


def test_gdpo_normalizes_each_reward_term_in_its_group_before_the_sum(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, reward="jpeg=1,jpeg:50=0.5", **{
        "grpo.normalize_each": "true", "grpo.advantage": "global_std"})
    trainer = GRPOTrainer(load_config(None, overrides))
    rollouts = trainer.rollout(0)
    advantages, stats = trainer.advantages(rollouts)
    # GDPO by hand: each term's z-score within its group of 4 (population std), their weighted sum, then the
    # group-centred sum over the batch's std.
    z = {}
    for name, scores in rollouts.each.items():
        groups = scores.double().view(2, 4)
        z[name] = (groups - groups.mean(1, keepdim=True)) / groups.std(1, unbiased=False, keepdim=True)
    total = z["jpeg"] + 0.5 * z["jpeg:50"]
    expected = (total - total.mean(1, keepdim=True)).flatten() / total.std(unbiased=False)
    torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-6)
    unnormalized = rollouts.each["jpeg"] + 0.5 * rollouts.each["jpeg:50"]
    assert stats["reward_mean"] == pytest.approx(float(unnormalized.mean()))  # what is logged stays the sum
    plain = GRPOTrainer(load_config(None, [*overrides, "grpo.normalize_each=false", f"output_dir={tmp_path / 'b'}"]))
    assert (plain.advantages(rollouts)[0] - advantages).abs().max() > 1e-3


def test_log_taming_takes_the_log_of_the_terms_that_spread_most(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1,
                               reward="clip:assets/world/clip,pickscore:assets/world/clip",
                               **{"grpo.log_tame": "mean"})
    trainer = GRPOTrainer(load_config(None, overrides))
    trainer.reward = WeightedRewards([Brightness(1), Brightness(2)], [1.0, 2.0])  # terms that vary on tiny images
    rollouts = trainer.rollout(0)
    advantages, _ = trainer.advantages(rollouts)
    # By hand: the coefficient of variation (population std / mean) of each term over the 8 images; the terms above
    # their mean CV become log(1 + R); then the weighted sum (in the rewards' float32, as combined rewards are) and
    # its z-score within each group.
    each = {name: scores.double() for name, scores in rollouts.each.items()}
    cv = {name: float(r.std(unbiased=False) / r.mean()) for name, r in each.items()}
    assert cv["brightness2"] > cv["brightness1"]  # squaring spreads them: the second is tamed
    total = (each["brightness1"] + 2 * torch.log1p(each["brightness2"])).float().double().view(2, 4)
    expected = ((total - total.mean(1, keepdim=True)) / total.std(1, unbiased=False, keepdim=True)).flatten()
    torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-6)


def test_reward_transforms_are_refused_where_they_do_not_apply(saved, prompt_file, tmp_path):
    for extra, message in (({"grpo.log_tame": "mode"}, "grpo.log_tame must be a number >= 0, mean or median"),
                           ({"grpo.log_tame": -1}, "grpo.log_tame must be a finite number >= 0"),
                           ({"grpo.normalize_each": "true", "grpo.dense": "ode"}, "grpo.normalize_each: the reward "
                            "transforms combine one reward per image"),
                           ({"grpo.normalize_each": "true", "grpo.advantage": "bnpo"}, "grpo.normalize_each: bnpo "
                            "maps grpo.reward_range"),
                           ({"grpo.normalize_each": "true", "grpo.value_weight": 0.5}, "grpo.normalize_each: the "
                            "value-anchored term"),
                           ({"grpo.log_tame": "mean", "reward": "shapes"}, "grpo.log_tame: mean compares the spreads"),
                           ({"grpo.log_tame": 0.5}, "grpo.log_tame: log-taming needs non-negative rewards, and jpeg"),
                           ({"algorithm": "gdro", "sampling.sampler": "ode", "sampling.shared_noise": "true"},
                            "sampling.shared_noise: with no noise drawn after the shared start"),
                           ({"grpo.log_tame": 0.5, "reward": "adv-dino:assets/world/dino,shapes", "references":
                             "shapes"}, "grpo.log_tame: log-taming needs non-negative rewards, and adv-dino's head"),
                           # GDRO reads no grpo.* setting, GRPO no gdro.* one, and GDRO scores its set once.
                           ({"grpo.log_tame": 0.5, "algorithm": "gdro"}, "grpo.log_tame: applies to algorithm grpo, "
                            "not gdro; leave it out"),
                           ({"grpo.kl_beta": 0.1, "algorithm": "gdro"}, "grpo.kl_beta: applies to algorithm grpo"),
                           ({"gdro.tau": 0.5}, "gdro.tau: applies to algorithm gdro, not grpo; leave it out"),
                           ({"algorithm": "gdro", "reward": "adv-dino:assets/world/dino", "references": "shapes"},
                            "reward: 'adv-dino:assets/world/dino' trains against the policy's samples as they come, "
                            "and GDRO scores its offline set once"),
                           ({"references": "shapes"}, "references: only a reward that trains against them (adv-dino) "
                            "reads reference images, and reward 'jpeg' has none"),
                           ({"reward_updates": 20}, "reward_updates: only a reward that trains (adv-dino) is updated"),
                           ({"eval.rewards": "jpeg,adv-dino:assets/world/dino"}, "eval.rewards: "
                            "adv-dino:assets/world/dino trains against reference images, which only the training"),
                           ({"algorithm": "gdro", "gdro.num_groups": 3, "gdro.groups_per_step": 4},
                            "gdro.groups_per_step (4) must be at most gdro.num_groups (3)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **extra))


def test_dense_grpo_gives_each_step_its_group_normalized_advantage(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1,
                               **{"grpo.dense": "ode", "sampling.batch_size": 4})
    trainer = GRPOTrainer(load_config(None, overrides))
    rows = []
    trainer.adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["hidden_states"])), with_kwargs=True)
    rollouts = trainer.rollout(0)
    # The ODE completions too call the denoiser with at most sampling.batch_size images (twice the rows with CFG),
    # not all 3 states' completions of a chunk's 4 images at once.
    assert max(rows) == 2 * 4
    advantages, stats = trainer.advantages(rollouts)
    assert advantages.shape == (8, 3)
    reference = dense_step_rewards(trainer.adapter, rollouts.trajectory, trainer.reward, mode="ode").deltas
    assert rollouts.trajectory.stochastic_steps == [0, 1, 2]
    expected, zero = zscore_by_hand(reference, 4, rollouts.rewards)
    torch.testing.assert_close(advantages, expected.float(), equal_nan=True)
    assert stats["zero_std_fraction"] == zero / (2 * 3)
    trainer.train()
    assert metrics(tmp_path)[0]["first_ratio_max_deviation"] <= 1e-5


def test_dense_grpo_with_a_noise_window_counts_only_the_noisy_steps(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1,
                               **{"grpo.dense": "ode", "sampling.noise_window": "[0, 2]"})
    trainer = GRPOTrainer(load_config(None, overrides))
    rollouts = trainer.rollout(0)
    advantages, stats = trainer.advantages(rollouts)
    assert rollouts.trajectory.stochastic_steps == [0, 1] and not advantages[:, 2].any()
    expected, zero = zscore_by_hand(rollouts.step_deltas[:, :2], 4, rollouts.rewards)
    torch.testing.assert_close(advantages[:, :2], expected.float(), equal_nan=True)
    assert stats["zero_std_fraction"] == zero / (2 * 2)  # 2 groups × 2 noisy steps; the ODE step is not counted
    assert stats["nan_step_rewards"] == 0
    rollouts.step_deltas[0, 1] = rollouts.step_deltas[1, 2] = math.nan  # unscored: a noisy step's, and the ODE step's
    advantages, stats = trainer.advantages(rollouts)
    assert stats["nan_step_rewards"] == 1 and math.isnan(advantages[0, 1])


def test_noise_table_sets_each_steps_level_and_log_probs_follow(saved, prompt_file, tmp_path):
    table = tmp_path / "table.json"
    write_table(table, [0.9, 0.4, 0.0])
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1,
                               **{"sampling.noise_table": table})
    trainer = GRPOTrainer(load_config(None, overrides))
    trajectory = trainer.rollout(0).trajectory
    assert trajectory.stochastic_steps == [0, 1]  # level 0 makes the last step deterministic
    assert [trajectory.level_at(i) for i in range(3)] == [0.9, 0.4, 0.0]
    trainer.train()
    assert metrics(tmp_path)[0]["first_ratio_max_deviation"] <= 1e-5  # recomputed with each step's level
    # The table's file rewritten under the same path: a resume would sample with other levels.
    write_table(table, [0.9, 0.5, 0.0])
    with pytest.raises(ConfigError, match=r"sampling.noise_table_levels: .* trained with \[0.9, 0.4, 0.0\], not "):
        GRPOTrainer(load_config(None, [*overrides, "resume_from=latest", "max_steps=2"]))


def test_calibrate_noise_command_writes_a_table(saved, prompt_file, tmp_path, capsys, monkeypatch):
    config, gdro_config = tmp_path / "config.yaml", tmp_path / "gdro.yaml"
    settings = {"model": str(saved["sd3"]), "prompts": str(prompt_file), "output_dir": str(tmp_path / "run"),
                "reward": "jpeg", "device": "cpu", "async_rewards": False, "lora": {"rank": 4, "alpha": 8},
                "sampling": {"num_steps": 5, "batch_size": 8, "guidance_scale": 2.0}}
    config.write_text(yaml.safe_dump({**settings, "grpo": {"group_size": 4, "batch_size": 8, "train_batch_size": 4}}))
    gdro_config.write_text(yaml.safe_dump({**settings, "algorithm": "gdro"}))
    out = tmp_path / "psi.json"
    (tmp_path / "run").mkdir()  # the config's run has already trained: calibrating neither reads nor writes it
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    # An override after the options, as after train's: 3 steps, not the file's 5.
    main(["calibrate-noise", str(config), "--rounds", "1", "--eps2", "0.05", "--out", str(out), "sampling.num_steps=3"])
    levels = read_table(out, 3, "flow-sde")
    # One round from Flow-SDE's a = 0.7: each step's level moves by eps2, up where that step's rewards of the run's
    # first rollout (the same seed, so the same rollout) are balanced, down where they are not.
    same_run = load_config(config, ["log_with=[]", "sampling.num_steps=3", "grpo.dense=ode",
                                     f"output_dir={tmp_path / 'again'}"])
    deltas = GRPOTrainer(same_run).rollout(0).step_deltas
    assert levels == pytest.approx(calibrate_step([0.7] * 3, deltas, 0.1, 0.05))
    assert all(level == pytest.approx(0.75) or level == pytest.approx(0.65) for level in levels)
    assert json.loads(out.read_text())["rounds"] == 1 and json.loads(out.read_text())["sampler"] == "flow-sde"
    assert "wrote" in capsys.readouterr().out
    # A step that drew no noise keeps its level: one outside the noise window, and CPS's last.
    main(["calibrate-noise", str(config), "--rounds", "1", "--eps2", "0.05", "--out", str(out), "sampling.num_steps=3",
          "sampling.noise_window=[0,2]"])
    assert read_table(out, 3, "flow-sde")[2] == 0.7
    main(["calibrate-noise", str(config), "--rounds", "1", "--eps2", "0.05", "--out", str(out), "sampling.num_steps=3",
          "sampling.sampler=cps"])
    assert read_table(out, 3, "cps")[2] == 0.8  # CPS's default level
    # A level 0 where noise can be drawn is calibrated, so that it can rise again: its deterministic step's rewards
    # differ by nothing, which balances. CPS's last step draws none at any level: its 0 stays.
    start = tmp_path / "start.json"
    for sampler, moved in (("flow-sde", 0.05), ("cps", 0.0)):
        write_table(start, [0.5, 0.5, 0.0], sampler=sampler)
        main(["calibrate-noise", str(config), "--rounds", "1", "--eps2", "0.05", "--out", str(out),
              "sampling.num_steps=3", f"sampling.sampler={sampler}", f"sampling.noise_table={start}",
              "sampling.noise_level=null"])
        assert read_table(out, 3, sampler)[2] == pytest.approx(moved), sampler
    # A table train would refuse is not written: every level that draws noise calibrated to 0 (from a = 0.05, eps1 0:
    # no step's signs balance exactly).
    zero = tmp_path / "new" / "zero.json"  # nor its folder made
    with pytest.raises(SystemExit, match=r"every level that draws noise calibrated to 0 \(\[0.0, 0.0, 0.0\]\)"):
        main(["calibrate-noise", str(config), "--rounds", "1", "--eps1", "0", "--eps2", "0.05", "--out", str(zero),
              "sampling.num_steps=3", "sampling.noise_level=0.05"])
    assert not zero.parent.exists()
    # A round in which every sample diverged moves no level; it stops the calibration, naming the cause.
    with pytest.raises(SystemExit, match="calibration round 1: every trajectory diverged or went unscored"):
        main(["calibrate-noise", str(config), "--rounds", "1", "--out", str(zero), "sampling.num_steps=3",
              "sampling.noise_level=1e8"])
    # A setting dense step rewards do not take is named as the reason calibration (which sets grpo.dense) stops.
    with pytest.raises(SystemExit, match="runs the config with grpo.dense=ode, which it does not take: "
                                         "grpo.value_weight"):
        main(["calibrate-noise", str(config), "--out", str(zero), "grpo.value_weight=0.5"])
    with pytest.raises(SystemExit, match="--out: .* is a folder; name the JSON file"):  # before any round
        main(["calibrate-noise", str(config), "--rounds", "1", "--out", str(tmp_path)])
    (tmp_path / "eval.json").write_text('{"overall_strict": 0.4}')  # someone else's file: not replaced
    with pytest.raises(SystemExit, match="--out: .*eval.json exists and is no noise table"):
        main(["calibrate-noise", str(config), "--rounds", "1", "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text()) == {"overall_strict": 0.4}
    hollow = tmp_path / "hollow"  # a model folder that validates and would fail to load: refused before it loads
    hollow.mkdir()
    (hollow / "model_index.json").write_text((saved["sd3"] / "model_index.json").read_text())
    with monkeypatch.context() as launched:  # checked for the launch's processes, as train checks it
        launched.setenv("WORLD_SIZE", "3")
        with pytest.raises(SystemExit, match="grpo.batch_size 8 is not a multiple of the 3 processes"):
            main(["calibrate-noise", str(config), "--out", str(zero), f"model={hollow}"])
    with pytest.raises(SystemExit, match="sampling.sampler: noise calibration balances the noise a stochastic"):
        main(["calibrate-noise", str(gdro_config), "--out", str(out), "sampling.sampler=ode", f"model={hollow}"])
    with pytest.raises(SystemExit, match="algorithm gdro: calibration runs GRPO's rollouts"):
        main(["calibrate-noise", str(gdro_config), "--out", str(out), f"model={hollow}"])


def test_adv_grpo_references_that_cannot_be_drawn_are_refused_before_any_rollout(saved, tmp_path):
    """Both failed at the first head update, after the step's rollouts and policy update."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    overrides = tiny_overrides(saved["sd3"], prompts, tmp_path / "run", **{
        "reward": "adv-dino:assets/world/dino", "references": "shapes", "sampling.height": 64,
        "sampling.width": 64})
    with pytest.raises(ConfigError, match="references: shapes renders shapes-world prompts only: .*'a photo of a cat'"):
        GRPOTrainer(load_config(None, overrides))
    folder = tmp_path / "references"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    Image.new("RGB", (80, 48)).save(folder / "b.png")
    with pytest.raises(ValueError, match=re.escape(f"references: {str(folder)!r} holds images of several sizes "
                                                   "(a.png is 64×64, b.png 80×48); give one size")):
        ReferenceSource(str(folder))
    (folder / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="references: .*b.png is no image"):
        ReferenceSource(str(folder))


def test_adv_grpo_resume_refuses_a_reference_folder_that_changed(saved, tmp_path):
    """Every draw of references depends on the folder's files: one added since the checkpoint changed them all."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo squares\n")
    folder = tmp_path / "references"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (64, 64), (40 * k, 0, 0)).save(folder / f"{k}.png")
    overrides = tiny_overrides(saved["sd3"], prompts, tmp_path / "run", max_steps=1, **{
        "reward": "adv-dino:assets/world/dino", "references": folder, "sampling.height": 64, "sampling.width": 64})
    train(load_config(None, overrides))
    Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / "2.png")
    with pytest.raises(ConfigError, match="references_sha256: the run that wrote .* was trained with"):
        GRPOTrainer(load_config(None, [*overrides, "resume_from=latest", "max_steps=2"]))


def test_adv_grpo_co_trains_the_dino_head_and_checkpoints_it(saved, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo squares\n")
    overrides = tiny_overrides(saved["sd3"], prompts, tmp_path / "run", max_steps=2, **{
        "reward": "adv-dino:assets/world/dino", "references": "shapes", "sampling.height": 64,
        "sampling.width": 64})
    trainer = GRPOTrainer(load_config(None, overrides))
    head_before = {k: v.clone() for k, v in trainer.reward.head.state_dict().items()}
    trainer.train()
    rows = metrics(tmp_path / "run")
    assert all(row["reward/adv-dino_updated"] == 1 for row in rows)  # every round by default (every = 1)
    assert all(math.isfinite(row["reward/adv-dino_loss"]) for row in rows)
    saved_state = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "reward_state.pt", weights_only=False)
    for key, value in trainer.reward.head.state_dict().items():
        assert torch.equal(saved_state["head"][key], value)
    assert any(not torch.equal(head_before[k], v) for k, v in trainer.reward.head.state_dict().items())
    # Stopped after step 1 and resumed, the run ends with the straight run's head and weights.
    halves = tmp_path / "halves"
    GRPOTrainer(load_config(None, [*overrides, f"output_dir={halves}", "max_steps=1"])).train()
    incomplete = tmp_path / "incomplete"  # a copy of step 1 without the head: resuming it is refused
    shutil.copytree(halves / "checkpoints" / "step-000001", incomplete)
    (incomplete / "reward_state.pt").unlink()
    GRPOTrainer(load_config(None, [*overrides, f"output_dir={halves}", "resume_from=latest"])).train()
    resumed = halves / "checkpoints" / "step-000002"
    resumed_head = torch.load(resumed / "reward_state.pt", weights_only=False)["head"]
    for key, value in saved_state["head"].items():
        assert torch.equal(resumed_head[key], value), key
    straight = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "trained.safetensors"))
    for key, value in load_file(str(resumed / "trained.safetensors")).items():
        assert torch.equal(straight[key], value), key
    with pytest.raises(ConfigError, match="has no reward_state.pt, which the reward adv-dino:assets/world/dino"):
        GRPOTrainer(load_config(None, [*overrides, f"output_dir={tmp_path / 'other'}",
                                       f"resume_from={incomplete}"])).train()


def test_gdro_generates_its_set_with_the_negative_prompt(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{
        "algorithm": "gdro", "sampling.sampler": "ode", "gdro.num_groups": 1, "gdro.group_size": 2,
        "gdro.groups_per_step": 1, "sampling.negative_prompt": "blurry"})
    train(load_config(None, overrides))
    groups = torch.load(tmp_path / GROUPS_FILE, weights_only=False)
    prompts = [groups["prompts"][0]] * 2
    # Seed 0's first group: its images are seeded 0 and 1.
    expected = sample(load_adapter(str(saved["sd3"])), prompts, generators=[torch.Generator().manual_seed(k)
                      for k in range(2)], num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry")
    torch.testing.assert_close(groups["latents"][0], expected.final_latents, atol=1e-4, rtol=0)


def test_gdro_generates_its_set_with_the_noise_window_and_shared_noise_in_batches(saved, prompt_file, tmp_path):
    """With an SDE noisy on the last step only, a group sharing its initial noise holds the images sample() makes from
    the shared noise with that window; batches of 2 change nothing beyond float rounding."""
    settings = {"algorithm": "gdro", "gdro.num_groups": 2, "gdro.group_size": 3, "gdro.groups_per_step": 1,
                "sampling.shared_noise": "true", "sampling.batch_size": 2}
    sde = tmp_path / "sde"
    overrides = tiny_overrides(saved["sd3"], prompt_file, sde, max_steps=1, **settings,
                               **{"sampling.sampler": "flow-sde", "sampling.noise_window": "[2, 3]"})
    train(load_config(None, overrides))
    groups = torch.load(sde / GROUPS_FILE, weights_only=False)
    adapter = load_adapter(str(saved["sd3"]))
    # Seed 0's first group: its images are seeded 0, 1 and 2, its shared noise 0 + SHARED_NOISE_STREAM.
    shared = adapter.initial_noise([torch.Generator().manual_seed(SHARED_NOISE_STREAM)], 32, 32).expand(3, -1, -1, -1)
    expected = sample(adapter, [groups["prompts"][0]] * 3, sampler="flow-sde", noise_window=range(2, 3),
                      latents=shared, generators=[torch.Generator().manual_seed(k) for k in range(3)],
                      num_inference_steps=3, guidance_scale=2.0).final_latents
    torch.testing.assert_close(groups["latents"][0], expected, atol=1e-4, rtol=0)
    assert (groups["latents"][0, 0] - groups["latents"][0, 1]).abs().max() > 1e-2  # the last step's noise
    del groups["made_by"]["generation"]  # as an earlier version wrote it, which ignored both settings
    torch.save(groups, sde / GROUPS_FILE)
    with pytest.raises(ValueError, match="generated by an earlier version, which ignored sampling.shared_noise"):
        train(load_config(None, [*overrides, "resume_from=latest", "max_steps=2"]))


def test_gdro_denoising_errors_are_those_of_the_prediction_guided_away_from_the_negative_prompt(saved, prompt_file,
                                                                                                tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{
        "algorithm": "gdro", "sampling.sampler": "ode", "sampling.negative_prompt": "blurry"})
    trainer = GDROTrainer(load_config(None, overrides))
    latents = torch.randn(2, *trainer.adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error, reference = trainer.denoising_errors(latents, "a red circle", torch.Generator().manual_seed(5))
    # By hand: the step and the shared noise drawn in that order, then the stock transformer on the stock encoding.
    generator = torch.Generator().manual_seed(5)
    step = int(torch.randint(3, (), generator=generator))
    noise = torch.randn(latents.shape[1:], generator=generator).expand_as(latents)
    pipe = trainer.adapter.pipe
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(3)
    sigma = scheduler.sigmas[step]
    noisy = (1 - sigma) * latents + sigma * noise
    for negative, equal in (("blurry", True), ("", False)):
        with torch.no_grad():
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=["a red circle"] * 2, prompt_2=None, prompt_3=None, negative_prompt=negative,
                do_classifier_free_guidance=True)
            unguided, conditional = (pipe.transformer(hidden_states=noisy, timestep=scheduler.timesteps[step].expand(2),
                                                      encoder_hidden_states=e, pooled_projections=p)[0]
                                     for e, p in ((negative_embeds, negative_pooled), (embeds, pooled)))
        guided = unguided + 2.0 * (conditional - unguided)
        expected = ((guided - (noise - latents)) ** 2).flatten(1).mean(1)
        assert torch.allclose(error, expected, rtol=1e-4, atol=0) == equal
    torch.testing.assert_close(reference, error)  # the LoRA starts at zero: the model is the reference


def test_gdro_generates_once_then_trains_offline(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=2, **{
        "algorithm": "gdro", "sampling.sampler": "ode", "gdro.num_groups": 2, "gdro.group_size": 3,
        "gdro.groups_per_step": 2, "gdro.beta": 10.0})
    train(load_config(None, overrides))
    groups = torch.load(tmp_path / GROUPS_FILE, weights_only=False)
    assert groups["latents"].shape[:2] == (2, 3) and groups["rewards"].shape == (2, 3)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    # Step 1 is measured before its update, with the fresh LoRA (B = 0) equal to the reference: every implicit
    # reward is 0, softmax(r̂) is uniform and the cross-entropy from any target is log(group_size). The all-zero
    # implicit rewards rank image 0 first (argmax takes the first), so top-1 is right where image 0 is the best.
    assert rows[0]["ranking_loss"] == pytest.approx(math.log(3), abs=1e-6)
    assert rows[0]["implicit_top1_accuracy"] == sum(float(int(r.argmax()) == 0) for r in groups["rewards"]) / 2
    assert abs(rows[1]["ranking_loss"] - math.log(3)) > 1e-5  # the first update moved the LoRA
    assert all(math.isfinite(r["ranking_loss"]) and 0 <= r["implicit_top1_accuracy"] <= 1 for r in rows)
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key)
    # A second run reuses the set; a set of another shape is refused rather than silently mixed.
    modified = (tmp_path / GROUPS_FILE).stat().st_mtime_ns
    train(load_config(None, overrides + ["resume_from=latest", "max_steps=3"]))
    assert (tmp_path / GROUPS_FILE).stat().st_mtime_ns == modified
    with pytest.raises(ConfigError, match="gdro.group_size: the run that wrote .* was trained with 3, not 2"):
        train(load_config(None, overrides + ["gdro.group_size=2", "max_steps=4", "resume_from=latest"]))
    # A set found in a new run's output_dir is used only when made under this run's settings.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(tmp_path / GROUPS_FILE, fresh / GROUPS_FILE)
    other = [o if not o.startswith("output_dir=") else f"output_dir={fresh}" for o in overrides]
    with pytest.raises(ValueError, match="holds 2 groups of 3, but gdro asks for 2 of 2; move it away"):
        train(load_config(None, other + ["gdro.group_size=2"]))
    with pytest.raises(ValueError, match="generated with reward='jpeg', this run has reward='jpeg:50'; move it away"):
        train(load_config(None, other + ["reward=jpeg:50"]))
    # A set of the previous version (its settings as the config holds them, without the settings added since) made
    # under this run's settings is used.
    config = load_config(None, other)
    sampling = {f"sampling.{key}": value for key, value in to_dict(config)["sampling"].items()
                if key not in ("batch_size", "negative_prompt")}
    groups = torch.load(fresh / GROUPS_FILE, weights_only=False)
    groups["made_by"] = {"model": config.model, "prompts": config.prompts, "reward": config.reward,
                         "seed": config.seed, "dtype": config.dtype, **sampling}
    torch.save(groups, fresh / GROUPS_FILE)
    modified = (fresh / GROUPS_FILE).stat().st_mtime_ns
    train(config)
    assert (fresh / GROUPS_FILE).stat().st_mtime_ns == modified


def test_gdro_trains_the_denoiser_alone_and_generates_its_set_with_the_reference(saved, prompt_file, tmp_path):
    """The prompt encoding GDRO backpropagates through leaves no gradient on the encoders (they piled up, step after
    step); a set generated after a resume (into a new folder, or once the old set was moved away) is the base
    model's, as the first run's was, not the trained policy's."""
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "first", max_steps=2, **{
        "algorithm": "gdro", "sampling.sampler": "ode", "gdro.num_groups": 1, "gdro.group_size": 2,
        "gdro.groups_per_step": 1, "optim.lr": 0.3})
    trainer = GDROTrainer(load_config(None, overrides))
    trainer.train()
    denoiser = trainer.adapter.denoiser
    held = [name for name, component in trainer.adapter.pipe.components.items()
            if isinstance(component, torch.nn.Module) and component is not denoiser
            and any(p.grad is not None or p.requires_grad for p in component.parameters())]
    assert held == []
    first = torch.load(tmp_path / "first" / GROUPS_FILE, weights_only=False)
    resumed = [o if not o.startswith("output_dir=") else f"output_dir={tmp_path / 'resumed'}" for o in overrides]
    train(load_config(None, [*resumed, f"resume_from={tmp_path / 'first' / 'checkpoints' / 'step-000002'}",
                             "max_steps=3"]))
    again = torch.load(tmp_path / "resumed" / GROUPS_FILE, weights_only=False)
    assert torch.equal(again["latents"], first["latents"]) and torch.equal(again["rewards"], first["rewards"])


def test_gdro_ranks_only_scored_images_and_skips_groups_with_fewer_than_two(saved, prompt_file, tmp_path):
    """A diverged image (NaN latents, NaN reward) stays out of its group's ranking and out of the forward pass, whose
    NaN would otherwise reach every weight, and so does an infinite reward; a group left with one scored image is
    not drawn at all."""
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{
        "algorithm": "gdro", "sampling.sampler": "ode", "gdro.num_groups": 3, "gdro.group_size": 3,
        "gdro.groups_per_step": 3})
    GDROTrainer(load_config(None, overrides)).offline_groups()
    groups = torch.load(tmp_path / GROUPS_FILE, weights_only=False)
    groups["latents"][0, 0] = math.nan
    groups["rewards"][0, 0] = math.nan
    groups["rewards"][1, :2] = math.nan
    groups["rewards"][2, 0] = math.inf  # no more a score than NaN
    torch.save(groups, tmp_path / GROUPS_FILE)
    train(load_config(None, overrides))
    # The fresh LoRA is the reference: softmax(r̂) is uniform over a group's scored images, and the cross-entropy
    # from any target is the log of their number: 2 in groups 0 and 2.
    assert metrics(tmp_path)[0]["ranking_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics(tmp_path)[0]["usable_groups"] == 2
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(value).all() for value in lora.values())
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key)
    groups["rewards"][[0, 2], 1:] = math.nan
    torch.save(groups, tmp_path / GROUPS_FILE)
    with pytest.raises(ValueError, match="no group of .* has two scored images"):
        train(load_config(None, [*overrides, "resume_from=latest", "max_steps=2"]))
