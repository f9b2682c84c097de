"""Steering: ReNO's regularizer and best iterate, FK's potentials, weights, schedule and resampling, TTSnap's pruning
and pick, best-of-N, exact budgets (denoiser images counted by a hook), and the `steer` command."""

import copy
import inspect
import json
import math
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from align_diffusion.cli import main
from align_diffusion.models import adapter_for, load_adapter
from align_diffusion.models.tiny import tiny_pipeline
from align_diffusion.rewards.base import Reward, RewardError
from align_diffusion.sampling.loop import sample
from align_diffusion.rewards.clip import OpenClipScore
from align_diffusion.rewards.spec import load_reward
from align_diffusion.steering import best_of_n, compile_models, fk_steering, reno, steer, steer_to_folder, ttsnap
from align_diffusion.steering.candidates import SEED_STRIDE
from align_diffusion.steering.fk import (
    effective_sample_size,
    log_potential,
    resample_indices,
    resampling_steps,
)
from align_diffusion.steering.reno import DEFAULT_STEPS, noise_norm_regularizer
from align_diffusion.steering.ttsnap import kept, model_evals, seeds_for_budget

SIZE = dict(height=32, width=32)
GUIDANCE = 3.0


class Darkness(Reward):
    """1 − mean intensity: prefers dark images; differentiable; counts its calls."""

    differentiable = True

    def __init__(self):
        super().__init__("darkness")
        self.calls = []

    def score(self, images, prompts, metadata):
        self.calls.append(len(images))
        return 1 - images.mean((1, 2, 3))


class Constant(Reward):
    """The same score for every image, with a zero gradient: ReNO's noise then moves by its regularizer alone."""

    differentiable = True

    def __init__(self):
        super().__init__("constant")

    def score(self, images, prompts, metadata):
        return images.mean((1, 2, 3)) * 0 + 0.5


class PartlyUnscorable(Darkness):
    """Darkness that cannot score chosen images of chosen calls: `failing` maps a call number (from 1) to the
    indices of the images in that call that get NaN."""

    value = math.nan

    def __init__(self, failing: dict[int, list[int]]):
        super().__init__()
        self.failing = failing

    def score(self, images, prompts, metadata):
        scores = super().score(images, prompts, metadata)
        scores[self.failing.get(len(self.calls), [])] = self.value
        return scores


class PartlyMinusInfinite(PartlyUnscorable):
    """The same images scored −∞ instead, which counts as no score, as in training."""

    value = -math.inf


class PartlyPlusInfinite(PartlyUnscorable):
    """The same images scored +∞ instead, which counts as no score too: it wins nothing."""

    value = math.inf


@pytest.fixture
def adapter(tiny_pipes):
    return adapter_for(tiny_pipes["sd3"])


@pytest.fixture
def denoised_images(adapter):
    """Images through the denoiser (a CFG pair counted once), counted by a hook on the real module."""
    counted = []

    def hook(module, args, kwargs):
        counted.append(len(kwargs["hidden_states"]) // 2)  # guidance > 1: conditional and unconditional halves

    handle = adapter.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    yield counted
    handle.remove()


# --- ReNO --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(lr=math.nan), "lr must be a finite number >= 0, got nan"),
    (dict(grad_clip=-0.1), "grad_clip must be a finite number > 0, got -0.1"),
    (dict(grad_clip=0.0), "grad_clip must be a finite number > 0, got 0.0"),
    (dict(reg_weight=-1.0), "reg_weight must be a finite number >= 0, got -1.0"),
    (dict(num_inference_steps=0), "num_inference_steps must be a whole number >= 1, got 0"),
    (dict(momentum=5.0), "momentum must lie in [0, 1), got 5.0"),  # accepted, and the noise diverged
])
def test_reno_refuses_settings_that_would_not_raise_the_reward(adapter, denoised_images, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        reno(adapter, ["a red circle"], Darkness(), iterations=1, **SIZE, **options)
    assert denoised_images == []  # before any compute


def test_reno_runs_with_momentum_0(adapter):
    """Momentum 0 is in range: with the default Nesterov on, torch's SGD refused it after the checks passed."""
    [result] = reno(adapter, ["a red circle"], Darkness(), iterations=2, momentum=0.0, **SIZE)
    assert math.isfinite(result.reward)


def test_steer_takes_one_prompt_string_and_the_one_prompt_methods_refuse_a_list(adapter):
    results = list(steer(adapter, "a red circle", Darkness(), "best-of-n", num_candidates=1, num_inference_steps=2,
                         progress=False, **SIZE))
    assert [r.prompt for r in results] == ["a red circle"]
    for method in (best_of_n, fk_steering):
        with pytest.raises(TypeError, match="prompt must be one string"):
            method(adapter, ["a red circle"], Darkness(), num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number >= 1, got 0"):
        steer(adapter, ["a red circle"], Darkness(), "reno", budget=8, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"fk takes no option 'num_candidates'; its options are \['adaptive_thr"):
        steer(adapter, ["a red circle"], Darkness(), "fk", num_candidates=2)
    with pytest.raises(ValueError, match="reno takes no option 'first_index'"):  # the run's to set
        steer(adapter, ["a red circle"], Darkness(), "reno", first_index=2)
    with pytest.raises(ValueError, match="got 3 noise levels for 4 steps"):  # before FK reads them
        steer(adapter, ["a red circle"], Darkness(), "fk", num_inference_steps=4, noise_level=[0.0] * 3)
    for option, value in (("resample_interval", 2.5), ("lam", "10")):  # a TypeError deep in range() or math
        with pytest.raises(ValueError, match=f"{option}.* must be a whole number of steps, got 2.5|lam .*got '10'"):
            steer(adapter, ["a red circle"], Darkness(), "fk", num_inference_steps=4, **{option: value})
    with pytest.raises(TypeError, match=r"reward must be a Reward \(load_reward\(spec\) makes one"):  # not a spec
        steer(adapter, ["a red circle"], "shapes", "best-of-n", budget=8)
    with pytest.raises(ValueError, match="height"):  # when steer is called, not on the iterator's first step
        steer(adapter, ["a red circle"], Darkness(), "best-of-n", num_candidates=1, height=31, width=32)
    # A numpy seed, which the methods take, is recorded as an int (json.dumps refused np.int64).
    result = best_of_n(adapter, "a red circle", Darkness(), num_candidates=1, seed=np.int64(3),
                       num_inference_steps=2, **SIZE)
    assert type(result.seed) is int and result.seed == 3


def test_noise_norm_regularizer_value_and_gradient():
    d = 64
    noise = torch.full((1, 4, 4, 4), 0.5, requires_grad=True)  # ‖ε‖² = 64 · 0.25 = 16
    value = noise_norm_regularizer(noise)
    assert value.item() == pytest.approx(0.5 * 16 - (d - 1) * math.log(4.0))
    value.sum().backward()
    assert torch.allclose(noise.grad, noise.detach() * (1 - (d - 1) / 16))
    on_shell = torch.randn(3, d)
    on_shell = (on_shell / on_shell.norm(dim=1, keepdim=True) * math.sqrt(d - 1)).requires_grad_(True)
    noise_norm_regularizer(on_shell).sum().backward()
    assert on_shell.grad.abs().max() < 1e-4  # the minimum sits at ‖ε‖² = d − 1


def test_renos_defaults_are_the_papers():
    # ReNO (Eyring et al., NeurIPS 2024, arXiv:2406.04312) and its released code (arguments.py, training/optim.py):
    # SGD with lr 5, momentum 0.9 and Nesterov, 50 iterations, gradient norm clipped to 0.1, regularizer weight 0.01.
    defaults = {name: parameter.default for name, parameter in inspect.signature(reno).parameters.items()}
    assert {name: defaults[name] for name in ("lr", "momentum", "nesterov", "iterations", "grad_clip", "reg_weight")} \
        == dict(lr=5.0, momentum=0.9, nesterov=True, iterations=50, grad_clip=0.1, reg_weight=0.01)


def test_reno_steps_left_at_none_are_renos_default_not_the_models(adapter, denoised_images):
    # None, the way every option asks for its default (and left out of a run's records), is ReNO's four steps.
    assert adapter.default_steps != DEFAULT_STEPS == 4
    options = dict(num_inference_steps=None, guidance_scale=GUIDANCE, progress=False, **SIZE)
    (plain,) = steer(adapter, ["a red circle"], Darkness(), "reno", iterations=0, **options)
    assert plain.budget.model_evals == sum(denoised_images) == 4
    (budgeted,) = steer(adapter, ["a red circle"], Darkness(), "reno", budget=12, **options)
    assert len(budgeted.details["rewards_per_iteration"]) == 3 and budgeted.budget.model_evals == 12


def reno_iterates(adapter, prompts, reward, **options):
    """Each of ReNO's iterates' initial noise, (iterations + 1, prompts, ...): with one step and no gradient
    checkpointing each iterate is one denoiser call, whose input holds the noise (twice: the guidance pair)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["hidden_states"][: len(prompts)].detach().clone())

    handle = adapter.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        reno(adapter, prompts, reward, num_inference_steps=1, guidance_scale=GUIDANCE, gradient_checkpointing=False,
             **SIZE, **options)
    finally:
        handle.remove()
    return torch.stack(seen).double()


def regularizer_gradients(noise, reg_weight):
    """w · ε (1 − (d − 1) / ‖ε‖²) per image: the regularizer's gradient, worked out by hand (d: the noise's size)."""
    flat = noise.flatten(1)
    squared = (flat**2).sum(dim=1, keepdim=True)
    return (reg_weight * flat * (1 - (flat.shape[1] - 1) / squared)).view_as(noise)


def nesterov_sgd_on_the_regularizer(noise, iterations, lr, momentum, reg_weight, grad_clip):
    """The iterates of Nesterov SGD on the regularizer alone, each image's gradient clipped to norm `grad_clip` on its
    own, written out: g clipped; b = g at the first step, μ · b + g after; ε ← ε − lr · (g + μ · b)."""
    iterates, buffer = [noise], None
    for _ in range(iterations):
        gradient = regularizer_gradients(noise, reg_weight)
        norms = gradient.flatten(1).norm(dim=1)
        gradient = gradient * torch.where(norms > grad_clip, grad_clip / norms, 1.0).view(-1, 1, 1, 1)
        buffer = gradient if buffer is None else momentum * buffer + gradient
        noise = noise - lr * (gradient + momentum * buffer)
        iterates.append(noise)
    return torch.stack(iterates)


def test_reno_regularizer_pulls_the_noise_norm_to_the_shell(adapter):
    # A constant reward leaves the regularizer's gradient w · ε (1 − (d − 1) / ‖ε‖²), unclipped at norm <= 0.13 here;
    # Nesterov's first step moves by lr · (1 + μ) times it, so ε scales by 1 − 9.5 · w · (1 − (d − 1) / ‖ε‖²).
    w = 0.05
    first, second = reno_iterates(adapter, ["a red circle", "two squares"], Constant(), iterations=1, reg_weight=w,
                                  grad_clip=1.0)
    d = first[0].numel()
    squared = (first.flatten(1) ** 2).sum(dim=1)
    assert squared.tolist() == pytest.approx([1082.05, 1107.23], abs=0.01)  # 6 % and 8 % above the shell, d − 1 = 1023
    factor = 1 - 9.5 * w * (1 - (d - 1) / squared)
    torch.testing.assert_close(second, first * factor.view(-1, 1, 1, 1), atol=1e-5, rtol=0)
    # One step takes each noise norm more than nine tenths of the way to the shell.
    moved = (second.flatten(1) ** 2).sum(dim=1)
    assert ((moved - (d - 1)).abs() < 0.1 * (squared - (d - 1)).abs()).all()


def test_reno_clips_each_images_gradient_on_its_own(adapter):
    # With w = 0.05 the regularizer's gradient has norm 0.090 for one image and 0.127 for the other: the paper's clip,
    # 0.1, shortens only the second, as it would if each prompt ran alone (one clip on the batch shortens both).
    w, clip = 0.05, 0.1
    iterates = reno_iterates(adapter, ["a red circle", "two squares"], Constant(), iterations=1, reg_weight=w)
    norms = regularizer_gradients(iterates[0], w).flatten(1).norm(dim=1)
    assert norms.tolist() == pytest.approx([0.0898, 0.1266], abs=1e-4)
    expected = nesterov_sgd_on_the_regularizer(iterates[0], 1, lr=5.0, momentum=0.9, reg_weight=w, grad_clip=clip)
    torch.testing.assert_close(iterates, expected, atol=1e-5, rtol=0)


def test_reno_takes_nesterov_momentum_steps_with_the_papers_settings(adapter):
    # The defaults, two steps: the second moves by the gradient plus momentum carried from the first.
    iterates = reno_iterates(adapter, ["a red circle", "two squares"], Constant(), iterations=2)
    expected = nesterov_sgd_on_the_regularizer(iterates[0], 2, lr=5.0, momentum=0.9, reg_weight=0.01, grad_clip=0.1)
    torch.testing.assert_close(iterates, expected, atol=1e-5, rtol=0)


def test_reno_returns_the_best_iterate_and_batches_like_single_prompts(adapter, denoised_images):
    prompts = ["a red circle", "two squares"]
    options = dict(iterations=4, num_inference_steps=2, guidance_scale=GUIDANCE, lr=5.0, **SIZE)
    results = reno(adapter, prompts, Darkness(), **options)
    for result in results:
        trace = result.details["rewards_per_iteration"]
        assert len(trace) == 5 and result.reward == pytest.approx(max(trace))
        assert result.reward >= trace[0] and trace[result.winner] == pytest.approx(result.reward)
        assert result.reward > trace[0]  # gradient ascent found darker noise
        rescored = Darkness()(result.image[None], [result.prompt])
        assert rescored.item() == pytest.approx(result.reward, abs=1e-5)
        assert result.budget.model_evals == 5 * 2 and result.budget.reward_evals == 5
    # Two images, five forward passes of two steps, and the four backward passes recompute the two steps
    # (gradient checkpointing); the budget counts the forward passes.
    assert sum(denoised_images) == 2 * 5 * 2 + 2 * 4 * 2
    # Iteration 0 is the plain two-step sample of each prompt's seed.
    plain = sample(adapter, prompts, num_inference_steps=2, guidance_scale=GUIDANCE, **SIZE).images
    for result, image in zip(results, plain):
        assert result.details["rewards_per_iteration"][0] == pytest.approx(1 - image.mean().item(), abs=1e-5)
    # Per-image clipping and momentum: the batch gives what each prompt alone gives.
    alone = reno(adapter, prompts[1:], Darkness(), first_index=1, **options)[0]
    assert alone.details["rewards_per_iteration"] == pytest.approx(results[1].details["rewards_per_iteration"],
                                                                   abs=1e-4)


class DarknessUntil(Darkness):
    """Darkness (> 0), but times `factor` (NaN or ±inf) for `prompt` from call `call` on, reaching its gradient
    too. Without gradient checkpointing call k scores iteration k."""

    def __init__(self, prompt, call, factor=math.nan):
        super().__init__()
        self.prompt, self.call, self.factor = prompt, call, factor

    def score(self, images, prompts, metadata):
        lost = len(self.calls) >= self.call
        factor = torch.tensor([self.factor if lost and p == self.prompt else 1.0 for p in prompts])
        return super().score(images, prompts, metadata) * factor


def test_reno_goes_on_for_the_other_prompts_when_one_becomes_unscorable(adapter):
    prompts = ["a red circle", "two squares"]
    options = dict(iterations=4, num_inference_steps=2, guidance_scale=GUIDANCE, lr=5.0, gradient_checkpointing=False,
                   **SIZE)
    first, second = reno(adapter, prompts, DarknessUntil("two squares", 2), **options)
    first_alone = reno(adapter, prompts[:1], Darkness(), **options)[0]
    second_alone = reno(adapter, prompts[1:], Darkness(), first_index=1, **options)[0]
    assert "unscorable_from" not in first.details
    assert first.details["rewards_per_iteration"] == pytest.approx(first_alone.details["rewards_per_iteration"],
                                                                   abs=1e-4)
    assert first.reward == pytest.approx(first_alone.reward, abs=1e-4)
    # The second keeps its best of iterations 0 and 1, where it had been scored, and its image.
    trace = second.details["rewards_per_iteration"]
    assert second.details["unscorable_from"] == 2 and len(trace) == 3 and math.isnan(trace[2])
    assert trace[:2] == pytest.approx(second_alone.details["rewards_per_iteration"][:2], abs=1e-4)
    assert second.reward == pytest.approx(max(trace[:2]), abs=1e-6) and second.winner in (0, 1)
    assert Darkness()(second.image[None], prompts[1:]).item() == pytest.approx(second.reward, abs=1e-5)
    assert second.budget.model_evals == 3 * 2 and first.budget.model_evals == 5 * 2
    with pytest.raises(RewardError, match=r"initial images of \['two squares'\]"):
        reno(adapter, prompts, DarknessUntil("two squares", 0), **options)
    for infinite in (math.inf, -math.inf):  # counts as no score, as in training: neither a winner nor a dead end
        _, lost = reno(adapter, prompts, DarknessUntil("two squares", 2, infinite), **options)
        assert lost.details["unscorable_from"] == 2 and lost.reward == second.reward and lost.winner == second.winner
        assert torch.equal(lost.image, second.image)
        with pytest.raises(RewardError, match=r"initial images of \['two squares'\] \(NaN or infinite\)"):
            reno(adapter, prompts, DarknessUntil("two squares", 0, infinite), **options)


def test_steer_shows_renos_iterations(adapter, capsys):
    list(steer(adapter, ["a red circle"], Darkness(), "reno", iterations=2, num_inference_steps=1,
               guidance_scale=GUIDANCE, **SIZE))
    assert "reno iterations" in capsys.readouterr().err


def test_compiled_models_steer_like_eager(tiny_pipes):
    """`compile_models` (the steer command's --compile): ReNO through the compiled UNet, VAE decoder and open_clip
    image tower, gradients to the noise included, follows the eager run."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    open_clip.set_model_preprocess_cfg(clip, dict(size=32, mean=open_clip.OPENAI_DATASET_MEAN,
                                                  std=open_clip.OPENAI_DATASET_STD))
    reward = OpenClipScore("tiny-clip", clip, open_clip.get_tokenizer("ViT-B-32"))
    adapter = adapter_for(copy.deepcopy(tiny_pipes["sd"]))  # compiled in place: not the session's pipeline
    options = dict(iterations=2, num_inference_steps=1, guidance_scale=GUIDANCE, **SIZE)
    eager = reno(adapter, ["a red circle"], reward, **options)[0].details["rewards_per_iteration"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compile_models(adapter, reward) == ["UNet2DConditionModel", "Decoder", "VisionTransformer"]
    compiled = reno(adapter, ["a red circle"], reward, **options)[0].details["rewards_per_iteration"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs >= 3  # each module ran compiled
    assert len(set(eager)) == 3  # the noise moved, so the iterates' rewards differ
    assert compiled == pytest.approx(eager, abs=1e-5)


def test_reno_refuses_rewards_without_gradients(adapter):
    class Opaque(Darkness):
        differentiable = False

    with pytest.raises(ValueError, match="differentiable"):
        reno(adapter, ["a"], Opaque(), iterations=1, **SIZE)


# --- FK steering -------------------------------------------------------------------------------------------------


def test_potentials_hand_worked_and_the_difference_telescopes():
    history = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.1]])
    assert torch.allclose(log_potential(history, "max", 2.0), torch.tensor([1.8, 1.6]))
    assert torch.allclose(log_potential(history, "sum", 2.0), torch.tensor([3.6, 3.0]))
    assert torch.allclose(log_potential(history, "difference", 2.0), torch.tensor([1.2, -1.4]))
    assert torch.allclose(log_potential(history[:, :1], "difference", 2.0), torch.tensor([0.2, 0.8]))  # r_prev = 0
    product = sum(log_potential(history[:, : s + 1], "difference", 2.0) for s in range(history.shape[1]))
    assert torch.allclose(product, 2.0 * history[:, -1])  # exp(λ r_last): the lineage's weights target the tilt


def test_effective_sample_size_and_resampling():
    assert effective_sample_size(torch.zeros(4)) == pytest.approx(4)
    assert effective_sample_size(torch.tensor([0.0, -1e9, -1e9, -1e9])) == pytest.approx(1)
    weights = torch.tensor([0.5, 0.25, 0.125, 0.125])
    cumulative = [0.5, 0.75, 0.875, 1.0]
    for seed in range(20):
        indices = resample_indices(weights.log(), "systematic", torch.Generator().manual_seed(seed))
        counts = torch.bincount(indices, minlength=4)
        # Systematic resampling gives each particle floor or ceil of k · W copies: 2, 1, 0–1, 0–1.
        assert counts[0] == 2 and counts[1] == 1 and counts.sum() == 4
        # Written out: one uniform u (the generator's first float64 draw), positions (u + i) / k, and each position
        # takes the first particle whose cumulative weight reaches it.
        u = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()
        assert indices.tolist() == [next(j for j, c in enumerate(cumulative) if c >= (u + i) / 4) for i in range(4)]
    # Multinomial: over many draws, the weights' frequencies.
    generator = torch.Generator().manual_seed(0)
    many = torch.cat([resample_indices(weights.log(), "multinomial", generator) for _ in range(2000)])
    frequencies = torch.bincount(many, minlength=4) / len(many)  # 8000 draws: standard errors of at most 0.006
    assert torch.allclose(frequencies, weights, atol=0.025)


def test_schedule_of_scored_steps():
    assert resampling_steps(10, 1, 3, 8) == [1, 4, 7, 9]
    assert resampling_steps(10, 0, 5, None) == [0, 5, 9]
    # The default window is the paper's: 20 % to 80 % of the steps, so 100 steps every 20 score 20, 40, 60, 80.
    assert resampling_steps(100, None, 20, None) == [20, 40, 60, 80, 99]
    assert resampling_steps(28, None, 5, None) == [5, 10, 15, 20, 27]
    assert resampling_steps(2, None, 5, None) == [0, 1]
    with pytest.raises(ValueError, match="does not fit"):
        resampling_steps(10, 12, 3, None)


def test_fk_scores_exactly_on_the_schedule_and_counts_the_budget(adapter, denoised_images):
    reward = Darkness()
    result = fk_steering(adapter, "a red circle", reward, num_particles=3, num_inference_steps=10, resample_start=1,
                         resample_interval=3, resample_end=8, guidance_scale=GUIDANCE, **SIZE)
    assert result.details["scored_steps"] == [1, 4, 7, 9]
    assert reward.calls == [3, 3, 3, 3]
    assert result.budget.reward_evals == 12
    assert result.budget.model_evals == sum(denoised_images) == 30
    assert result.reward == max(result.details["candidate_rewards"])


class RecordingDarkness(Darkness):
    """Darkness that keeps every score it gives."""

    def __init__(self):
        super().__init__()
        self.scores = []

    def score(self, images, prompts, metadata):
        scores = super().score(images, prompts, metadata)
        self.scores.append(scores.clone())
        return scores


class FixedScores(Reward):
    """Scores the particle slots of its call c with `table[c]`, whatever the images: a test double that makes FK's
    weights, and so its resampling, known in advance."""

    def __init__(self, table):
        super().__init__("fixed")
        self.table = table
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        return torch.tensor(self.table[self.calls - 1])


def test_fk_lineages_carry_their_history_and_start_afresh_after_resampling(adapter):
    # λ = 1, sum potential, steps 0 and 1 resampled, step 2 final. Weights that are multiples of 1/4 make systematic
    # resampling give each particle exactly 4 · W copies, in order, whatever its uniform draw.
    ln2, dead = math.log(2), -50.0
    reward = FixedScores([[ln2, 0.0, 0.0, dead], [-ln2, -ln2, ln2, dead], [0.1, 0.2, 0.4, 0.3]])
    result = fk_steering(adapter, "a red circle", reward, num_particles=4, lam=1.0, potential="sum",
                         resampling="systematic", num_inference_steps=3, resample_start=0, resample_interval=1,
                         guidance_scale=GUIDANCE, **SIZE)
    assert result.details["scored_steps"] == [0, 1, 2] and result.details["resampled"] == [True, True]
    # Step 0: W = (2, 1, 1, 0) / 4, ESS 1 / (1/4 + 1/16 + 1/16) = 8/3; ancestors 0, 0, 1, 2, so the histories
    # are (ln 2, ln 2, 0, 0). Step 1: fresh weights, the sums of the lineages' scores, (0, 0, ln 2, −50):
    # W = (1, 1, 2, 0) / 4, ESS 8/3 again; ancestors 0, 1, 2, 2, so the slots began as candidates 0, 0, 1, 1.
    # Histories left unpermuted would give sums (0, −ln 2, ln 2, −100), ESS 7/3; weights carried through the
    # resampling, (ln 2, ln 2, ln 2, −50), ESS 3.
    assert result.details["ess"] == pytest.approx([8 / 3, 8 / 3], abs=1e-6)
    assert result.details["ancestors"] == [0, 0, 1, 1]
    assert result.details["candidate_rewards"] == pytest.approx([0.1, 0.2, 0.4, 0.3])
    assert result.winner == 1 and result.reward == pytest.approx(0.4)  # slot 2 finished best; it began as candidate 1


def test_fk_adaptive_resampling_carries_weights(adapter):
    # A threshold no ESS falls below: the particles are never resampled, so each step's weights are the sum of the
    # potentials of all scored steps so far, computed here from the scores the reward gave.
    reward, lam = RecordingDarkness(), 1e3
    result = fk_steering(adapter, "a red circle", reward, num_particles=4, lam=lam, potential="sum",
                         num_inference_steps=8, resample_start=0, resample_interval=2, adaptive_threshold=1e-6,
                         guidance_scale=GUIDANCE, **SIZE)
    assert result.details["scored_steps"] == [0, 2, 4, 6, 7] and result.details["resampled"] == [False] * 4
    assert sorted(result.details["ancestors"]) == [0, 1, 2, 3]
    history = torch.stack(reward.scores, dim=1)
    potentials = [log_potential(history[:, : j + 1], "sum", lam) for j in range(4)]
    carried = [effective_sample_size(sum(potentials[: j + 1])) for j in range(4)]
    alone = [effective_sample_size(potential) for potential in potentials]
    assert result.details["ess"] == pytest.approx(carried, rel=1e-3)
    # Weights that were dropped instead of carried would give each step's own potential's ESS, far from these.
    assert all(abs(c - a) > 0.2 for c, a in zip(carried[1:], alone[1:]))


def test_fk_toward_dark_images_keeps_the_darkest_lineage_and_reports_its_candidate(adapter):
    options = dict(num_particles=6, num_inference_steps=8, resample_start=0, resample_interval=2,
                   guidance_scale=GUIDANCE, **SIZE)
    free = fk_steering(adapter, "a red circle", Darkness(), lam=0.0, **options)
    assert len(set(free.details["ancestors"])) > 1
    # The step-0 x̂0s differ by about 1e-4 here, so λ = 1e6 makes the first resampling keep only the darkest.
    tilted = fk_steering(adapter, "a red circle", Darkness(), lam=1e6, **options)
    generators = [torch.Generator().manual_seed(c * SEED_STRIDE) for c in range(6)]
    trajectory = sample(adapter, ["a red circle"] * 6, generators=generators, num_inference_steps=8,
                        guidance_scale=GUIDANCE, **SIZE)
    darkest = int(Darkness()(adapter.decode(trajectory.pred_x0[:, 0]), ["a red circle"] * 6).argmax())
    assert tilted.details["ancestors"] == [darkest] * 6
    # `winner` is the candidate whose noise began the winning lineage, as best-of-N and TTSnap report it, not the
    # particle slot that finished best.
    assert tilted.winner == darkest
    assert tilted.reward == max(tilted.details["candidate_rewards"])


def test_fk_resampling_draws_are_not_a_copy_of_a_particles_noise(adapter):
    # Two steps scored at 0 and 1 resample once, at step 0, among equal weights: one multinomial draw.
    options = dict(num_particles=6, lam=0.0, num_inference_steps=2, resample_interval=5, index=2, seed=5,
                   guidance_scale=GUIDANCE, **SIZE)
    result = fk_steering(adapter, "a red circle", Darkness(), **options)
    uniform = torch.softmax(torch.zeros(6, dtype=torch.float64), 0)
    for c in range(6):
        particle_stream = torch.Generator().manual_seed(5 + 2 + c * SEED_STRIDE)
        assert result.details["ancestors"] != torch.multinomial(uniform, 6, replacement=True,
                                                                generator=particle_stream).tolist()
    again = fk_steering(adapter, "a red circle", Darkness(), **options)
    assert again.details["ancestors"] == result.details["ancestors"] and torch.equal(again.image, result.image)


def test_fk_resamples_an_unscorable_particle_away_even_when_the_ess_is_high(adapter):
    # Particle 0 is unscorable at step 0: ESS 3 of 4 would carry the weights, but a dead particle must not live on.
    reward = PartlyUnscorable({1: [0]})
    result = fk_steering(adapter, "a red circle", reward, num_particles=4, lam=0.0, adaptive_threshold=0.5,
                         resample_interval=2, num_inference_steps=4, guidance_scale=GUIDANCE, **SIZE)
    assert result.details["ess"][0] == pytest.approx(3.0) and result.details["resampled"][0]
    assert 0 not in result.details["ancestors"]
    assert result.details["unscored"] == [1, 0, 0] and result.details["scored_steps"] == [0, 2, 3]


@pytest.mark.parametrize("reward_class", [PartlyMinusInfinite, PartlyPlusInfinite])
def test_fk_resamples_a_particle_scored_infinite_away_even_when_the_ess_is_high(adapter, reward_class):
    options = dict(num_particles=4, lam=1.0, resample_interval=2, num_inference_steps=4, guidance_scale=GUIDANCE,
                   **SIZE)
    result = fk_steering(adapter, "a red circle", reward_class({1: [0], 3: [1]}), adaptive_threshold=0.5, **options)
    assert result.details["ess"][0] == pytest.approx(3.0, abs=0.01) and result.details["resampled"][0]
    assert 0 not in result.details["ancestors"] and result.details["unscored"] == [1, 0, 1]
    assert math.isnan(result.details["candidate_rewards"][1]) and result.winner != 1 and math.isfinite(result.reward)
    with pytest.raises(RewardError, match="could not score any of the 4 candidates of 'a red circle'"):
        fk_steering(adapter, "a red circle", reward_class({1: [0, 1, 2, 3]}), **options)


def test_fk_names_potentials_that_overflow(adapter):
    class Huge(Darkness):
        def score(self, images, prompts, metadata):
            return super().score(images, prompts, metadata) * 0 + 3e38  # finite in float32; 10 times it is not

    with pytest.raises(RewardError, match=r"no finite weights .* at step 0 .*lam 10.0\): the tilted potentials "
                                          "overflow; lower lam"):
        fk_steering(adapter, "a red circle", Huge(), num_particles=2, lam=10.0, resample_interval=2,
                    num_inference_steps=4, guidance_scale=GUIDANCE, **SIZE)


def test_fk_raises_when_no_particle_can_be_scored(adapter):
    # Particle 0 is unscorable at step 0 (and resampled away), every particle at step 1.
    reward = PartlyUnscorable({1: [0], 2: [0, 1, 2, 3]})
    with pytest.raises(RewardError, match="could not score any of the 4 candidates of 'a red circle'"):
        fk_steering(adapter, "a red circle", reward, num_particles=4, adaptive_threshold=0.5, resample_interval=1,
                    num_inference_steps=4, guidance_scale=GUIDANCE, **SIZE)


@pytest.mark.parametrize("lam", [math.nan, math.inf, -1.0])
def test_fk_refuses_a_tilt_that_is_not_a_finite_number_at_least_0(adapter, denoised_images, lam):
    with pytest.raises(ValueError, match=r"lam \(the tilt λ\) must be a finite number >= 0"):
        fk_steering(adapter, "a red circle", Darkness(), lam=lam, num_inference_steps=2, **SIZE)
    assert denoised_images == []


@pytest.mark.parametrize("level", [-1.0, math.nan])
def test_fk_refuses_a_noise_level_that_would_silently_make_it_deterministic(adapter, denoised_images, level):
    with pytest.raises(ValueError, match="noise_level must be a finite number >= 0"):
        fk_steering(adapter, "a red circle", Darkness(), noise_level=level, num_inference_steps=2, **SIZE)
    assert denoised_images == []


def test_fk_takes_one_noise_level_per_step(adapter):
    options = dict(num_particles=3, resample_interval=1, num_inference_steps=3, **SIZE)
    per_step = fk_steering(adapter, "a red circle", Darkness(), noise_level=[0.7, 0.7, 0.7], **options)
    same = fk_steering(adapter, "a red circle", Darkness(), noise_level=0.7, **options)
    assert torch.equal(per_step.image, same.image) and per_step.details == same.details
    other = fk_steering(adapter, "a red circle", Darkness(), noise_level=[0.7, 0.2, 0.0], **options)
    assert not torch.equal(other.image, same.image)


def test_fk_refuses_a_deterministic_sampler(adapter):
    with pytest.raises(ValueError, match="stochastic sampler"):
        fk_steering(adapter, "a", Darkness(), num_particles=4, sampler="ode", **SIZE)
    # Noise only before the first resampling: its copies stayed identical to the end (three of four particles)
    with pytest.raises(ValueError, match=r"draw no noise after step 1, the first resampling: resampled copies"):
        fk_steering(adapter, "a", Darkness(), num_particles=4, noise_level=[0.7, 0, 0, 0, 0, 0], resample_start=1,
                    resample_interval=1, num_inference_steps=6, **SIZE)


def test_fk_and_ttsnap_check_every_steps_ddim_eta_before_the_first_model_call(tiny_pipes):
    """η = 1.1 breaks DDIM at some later step only: sample() refused it at once, FK and TTSnap after 5 steps."""
    sd = adapter_for(tiny_pipes["sd"])
    calls = []
    hook = sd.denoiser.register_forward_pre_hook(lambda *args: calls.append(1))
    common = dict(sampler="ddim", noise_level=1.1, num_inference_steps=6, **SIZE)
    try:
        with pytest.raises(ValueError, match="DDIM η = 1.1 at step"):
            fk_steering(sd, "a", Darkness(), num_particles=2, **common)
        with pytest.raises(ValueError, match="DDIM η = 1.1 at step"):
            ttsnap(sd, "a", Darkness(), num_seeds=2, prune_steps=[2], keep=[0.5], **common)
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("method", ["best-of-n", "fk", "ttsnap"])
def test_a_sampler_that_does_not_fit_the_model_is_named(adapter, method):
    schedule = {"prune_steps": [0], "keep": [0.5]} if method == "ttsnap" else {}  # one that fits 2 steps
    with pytest.raises(ValueError, match="sampler 'sde' does not fit a flow-matching"):
        list(steer(adapter, ["a"], Darkness(), method, budget=8, sampler="sde", num_inference_steps=2, **schedule,
                   **SIZE))


# --- TTSnap and best-of-N ----------------------------------------------------------------------------------------


def test_kept_counts_and_budgets_hand_worked():
    assert [kept(16, 0.4), kept(6, 0.4), kept(2, 0.5), kept(5, 0.5), kept(1, 0.1), kept(3, 0.1)] == [6, 2, 1, 3, 1, 1]
    assert [kept(90, 0.35), kept(50, 0.29), kept(25, 0.58)] == [32, 15, 15]  # halves in decimal, which binary misses
    # 16 seeds, 5 steps, pruned after steps 1, 2, 3: 16 + 16 + 6 + 2 + 1.
    assert model_evals(16, [1, 2, 3], [0.4, 0.4, 0.5], 5) == 41
    # 20 steps pruned after 2, 6, 11: 3N + 4·k1 + 5·k2 + 8·k3; N = 13 costs 39 + 20 + 10 + 8 = 77, N = 14 costs 84.
    assert model_evals(13, [2, 6, 11], [0.4, 0.4, 0.5], 20) == 77
    assert seeds_for_budget(80, [2, 6, 11], [0.4, 0.4, 0.5], 20) == 13


def test_ttsnap_prunes_by_the_x0_reward_and_picks_the_clean_best(adapter, denoised_images):
    prune, clean = Darkness(), Darkness()
    result = ttsnap(adapter, "a red circle", clean, prune, num_seeds=16, prune_steps=[1, 2, 3], keep=[0.5, 0.5, 1.0],
                    num_inference_steps=5, guidance_scale=GUIDANCE, **SIZE)
    assert [len(s) for s in result.details["survivors"]] == [8, 4, 4]
    assert prune.calls == [16, 8, 4] and clean.calls == [4]
    assert result.budget.model_evals == sum(denoised_images) == 16 + 16 + 8 + 4 + 4
    assert result.budget.reward_evals == 32
    # Reference: the same seeds through the plain sampler; the first prune keeps the 8 darkest x̂0s of step 1.
    generators = [torch.Generator().manual_seed(c * SEED_STRIDE) for c in range(16)]
    trajectory = sample(adapter, ["a red circle"] * 16, generators=generators, num_inference_steps=5,
                        guidance_scale=GUIDANCE, **SIZE)
    x0_scores = Darkness()(adapter.decode(trajectory.pred_x0[:, 1]), ["a red circle"] * 16)
    assert result.details["survivors"][0] == sorted(x0_scores.argsort(descending=True)[:8].tolist())
    finals = Darkness()(trajectory.images, ["a red circle"] * 16)
    survivors = result.details["survivors"][-1]
    assert result.winner == survivors[int(finals[survivors].argmax())]
    assert result.reward == pytest.approx(finals[result.winner].item(), abs=1e-5)
    alone = Darkness()  # no prune reward: the reward ranks the x̂0s too
    by_itself = ttsnap(adapter, "a red circle", alone, num_seeds=16, prune_steps=[1, 2, 3], keep=[0.5, 0.5, 1.0],
                       num_inference_steps=5, guidance_scale=GUIDANCE, **SIZE)
    assert alone.calls == [16, 8, 4, 4]
    assert (by_itself.details["survivors"], by_itself.winner) == (result.details["survivors"], result.winner)


def test_a_single_prompt_string_is_one_prompt_to_steer_to_folder(tmp_path):
    world = load_adapter(str(Path(__file__).resolve().parents[1] / "assets" / "world" / "sd3"))
    records = steer_to_folder(world, "a red circle", load_reward("jpeg"), "best-of-n", tmp_path / "out",
                              shapes_eval=True, num_candidates=1, num_inference_steps=1, progress=False)
    assert [record["prompt"] for record in records] == ["a red circle"]


def test_a_weighted_reward_records_its_terms_as_sample_does_and_the_sum_steered_by(adapter, tmp_path):
    reward = load_reward("jpeg,jpeg:50=0.5")
    [record] = steer_to_folder(adapter, ["a"], reward, "best-of-n", tmp_path / "out", num_candidates=2,
                               num_inference_steps=2, progress=False, **SIZE)
    rewards = record["rewards"]
    assert set(rewards) == {reward.name, "jpeg", "jpeg:50"}
    assert rewards[reward.name] == pytest.approx(rewards["jpeg"] + 0.5 * rewards["jpeg:50"], rel=1e-6)
    assert rewards[reward.name] == pytest.approx(max(record["details"]["candidate_rewards"]), rel=1e-6)


def test_every_prompts_candidate_seeds_are_checked_before_anything_is_replaced(adapter, saved, tmp_path,
                                                                              monkeypatch):
    """Prompt j's candidate c is seeded seed + j + c · 100000: a seed whose last prompt's would pass 2**32 failed at
    that prompt, after the first had replaced the earlier run; the command refuses it before the model loads."""
    steer_to_folder(adapter, ["a", "b"], Darkness(), "best-of-n", tmp_path / "out", num_candidates=1,
                    num_inference_steps=1, progress=False, **SIZE)
    with pytest.raises(ValueError, match=re.escape("seed must be a whole number in [0, 2**32 − 100002]")):
        steer_to_folder(adapter, ["a", "b"], Darkness(), "best-of-n", tmp_path / "out", overwrite=True,
                        num_candidates=2, seed=2**32 - 100_001, num_inference_steps=1, progress=False, **SIZE)
    assert len((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()) == 2

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr("align_diffusion.models.load_adapter", no_loading)
    with pytest.raises(SystemExit, match=re.escape("seed must be a whole number in [0, 2**32 − 100002]")):
        main(["steer", "--method", "best-of-n", "--model", str(saved["sd3"]), "--prompt", "a", "b", "--reward",
              "jpeg", "--num-candidates", "2", "--seed", str(2**32 - 100_001), "--out", str(tmp_path / "cli")])


def test_a_reno_batch_size_that_is_no_count_is_refused_before_anything_is_replaced(adapter, tmp_path):
    steer_to_folder(adapter, ["a"], Darkness(), "best-of-n", tmp_path / "out", num_candidates=1,
                    num_inference_steps=1, progress=False, **SIZE)
    for size in (-1, 0, 2.5):
        with pytest.raises(ValueError, match=f"reno_batch_size must be a whole number >= 1, got {size}"):
            steer_to_folder(adapter, ["a"], Darkness(), "reno", tmp_path / "out", overwrite=True, iterations=1,
                            reno_batch_size=size, **SIZE)
    assert len((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()) == 1


def test_ttsnap_prunes_the_seeds_it_could_not_score_first_and_counts_them(adapter):
    result = ttsnap(adapter, "a red circle", Darkness(), PartlyUnscorable({1: [0, 3]}), num_seeds=8,
                    prune_steps=[1, 2], keep=[0.75, 0.5], num_inference_steps=3, guidance_scale=GUIDANCE, **SIZE)
    assert not {0, 3} & set(result.details["survivors"][0]) and len(result.details["survivors"][0]) == 6
    assert result.details["unscored"] == [2, 0]


def test_best_of_n_picks_the_best_and_its_first_candidate_is_the_plain_sample(adapter, denoised_images):
    result = best_of_n(adapter, "two squares", Darkness(), num_candidates=5, index=3, seed=7, num_inference_steps=3,
                       guidance_scale=GUIDANCE, batch_size=2, **SIZE)
    assert result.budget.model_evals == sum(denoised_images) == 15 and result.budget.reward_evals == 5
    scores = result.details["candidate_rewards"]
    assert result.winner == scores.index(max(scores))
    plain = sample(adapter, ["two squares"], seed=10, num_inference_steps=3, guidance_scale=GUIDANCE, **SIZE)
    assert scores[0] == pytest.approx(Darkness()(plain.images, ["two squares"]).item(), abs=1e-6)


@pytest.mark.parametrize("method, options", [
    ("best-of-n", dict(num_candidates=1)),
    ("fk", dict(num_particles=1, sampler="ode")),
    ("ttsnap", dict(num_seeds=1, prune_steps=[1], keep=[1.0])),
    ("reno", dict(iterations=0)),
])
def test_every_method_takes_a_negative_prompt_as_sample_does(adapter, method, options):
    # One candidate (ReNO: iteration 0) is the plain sample of prompt 1, seeded 5 + 1, with the same negative prompt.
    prompts = ["a red circle", "two squares"]
    common = dict(seed=5, num_inference_steps=DEFAULT_STEPS, guidance_scale=GUIDANCE, **SIZE, **options)
    steered = list(steer(adapter, prompts, Darkness(), method, negative_prompt="blurry", progress=False, **common))
    plain = list(steer(adapter, prompts, Darkness(), method, progress=False, **common))
    reference = sample(adapter, prompts[1:], seed=6, num_inference_steps=DEFAULT_STEPS, guidance_scale=GUIDANCE,
                       negative_prompt="blurry", **SIZE).images[0]
    assert (steered[1].image - reference).abs().max() <= 1e-5
    assert (plain[1].image - reference).abs().max() > 1e-3
    with pytest.raises(ValueError, match="negative_prompt: guidance 1.0 runs no classifier-free guidance"):
        list(steer(adapter, prompts, Darkness(), method, negative_prompt="blurry", progress=False,
                   **{**common, "guidance_scale": 1.0}))


def test_best_of_n_raises_only_when_no_candidate_of_the_prompt_is_scored(adapter):
    options = dict(num_candidates=3, batch_size=2, num_inference_steps=2, guidance_scale=GUIDANCE, **SIZE)
    result = best_of_n(adapter, "two squares", PartlyUnscorable({2: [0]}), **options)  # the second batch fails
    scores = result.details["candidate_rewards"]
    assert math.isnan(scores[2]) and result.winner == scores.index(max(scores[:2]))
    with pytest.raises(RewardError, match="any of the 3 candidates"):
        best_of_n(adapter, "two squares", PartlyUnscorable({1: [0, 1], 2: [0]}), **options)
    for reward_class in (PartlyMinusInfinite, PartlyPlusInfinite):  # an infinite score is none: it never wins
        result = best_of_n(adapter, "two squares", reward_class({1: [1]}), **options)
        scores = result.details["candidate_rewards"]
        assert math.isnan(scores[1]) and result.winner == (0 if scores[0] > scores[2] else 2)
        with pytest.raises(RewardError, match="any of the 3 candidates"):
            best_of_n(adapter, "two squares", reward_class({1: [0, 1], 2: [0]}), **options)


def test_ttsnap_refuses_a_budget_below_one_run(adapter):
    assert seeds_for_budget(19, [2, 6, 11], [0.4, 0.4, 0.5], 20) == 0
    with pytest.raises(ValueError, match=r"keep fractions must lie in \(0, 1\], got \[nan\]"):
        seeds_for_budget(100, [2], [math.nan], 20)  # refused, not a conversion error deep in kept()
    with pytest.raises(ValueError, match=r"got \[2, 6, 11\] \(the defaults, made for 20 steps"):
        seeds_for_budget(100, [2, 6, 11], [0.4, 0.4, 0.5], 4)
    with pytest.raises(ValueError, match="budget of 3 model evaluations is less than one ttsnap run of 4 steps"):
        steer(adapter, ["a"], Darkness(), "ttsnap", budget=3, num_inference_steps=4, prune_steps=[1], keep=[0.5],
              progress=False, **SIZE)


def test_budgets_set_each_methods_size(adapter):
    options = dict(num_inference_steps=4, guidance_scale=GUIDANCE, progress=False, **SIZE)
    (bon,) = steer(adapter, ["a"], Darkness(), "best-of-n", budget=13, **options)
    assert len(bon.details["candidate_rewards"]) == 3
    (fk,) = steer(adapter, ["a"], Darkness(), "fk", budget=8, **options)
    assert fk.budget.model_evals == 8
    (snap,) = steer(adapter, ["a"], Darkness(), "ttsnap", budget=12, prune_steps=[0], keep=[0.5], **options)
    # N seeds cost N + 3 · round(N / 2): 4 seeds cost 10, 5 would cost 14.
    assert snap.budget.model_evals == 10 and len(snap.details["survivors"][0]) == 2
    with pytest.raises(ValueError, match="either a budget or num_candidates"):
        steer(adapter, ["a"], Darkness(), "best-of-n", budget=8, num_candidates=2, **options)
    with pytest.raises(ValueError, match="less than one"):
        steer(adapter, ["a"], Darkness(), "fk", budget=3, **options)
    for method, size, value in (("best-of-n", "budget", 8.0), ("best-of-n", "num_candidates", 2.0),
                                ("fk", "num_particles", 0), ("ttsnap", "num_seeds", True), ("ttsnap", "budget", 9.5),
                                ("reno", "iterations", 1.5), ("best-of-n", "batch_size", 0)):
        with pytest.raises(ValueError, match=re.escape(f"{size} must be a whole number >= ")):
            steer(adapter, ["a"], Darkness(), method, **{size: value}, **options,
                  **(dict(prune_steps=[0], keep=[0.5]) if method == "ttsnap" else {}))


@pytest.mark.parametrize("method, options", [
    ("best-of-n", dict(num_candidates=2)),
    ("fk", dict(num_particles=2, resample_interval=1)),
    ("ttsnap", dict(num_seeds=4, prune_steps=[1], keep=[0.5])),
    ("reno", dict(iterations=2)),
])
def test_steer_from_a_start_prompt_gives_the_whole_runs_later_results(adapter, method, options):
    prompts = ["a red circle", "two squares", "a triangle"]
    options = dict(num_inference_steps=3, guidance_scale=GUIDANCE, seed=5, progress=False, **SIZE, **options)
    whole = list(steer(adapter, prompts, Darkness(), method, **options))
    later = list(steer(adapter, prompts, Darkness(), method, start=2, **options))
    assert [(r.prompt, r.seed) for r in later] == [("a triangle", 7)] == [(r.prompt, r.seed) for r in whole[2:]]
    # ReNO optimizes the prompts in one batch in the whole run: equal up to float rounding.
    torch.testing.assert_close(later[0].image, whole[2].image, atol=1e-5, rtol=0)
    assert later[0].winner == whole[2].winner
    with pytest.raises(ValueError, match="start must be between 0 and the 3 prompts, got 4"):
        steer(adapter, prompts, Darkness(), method, start=4, **options)


def test_steer_command_writes_a_reviewable_folder(saved, tmp_path):
    out = tmp_path / "steered"
    main(["steer", "--method", "best-of-n", "--model", str(saved["sd3"]), "--prompt", "a red circle", "two squares",
          "--reward", "jpeg", "--budget", "6", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)])
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "two squares"] and [r["seed"] for r in records] == [0, 1]
    for record in records:
        assert record["budget"]["model_evals"] == 6 and record["budget"]["reward_evals"] == 3
        assert record["rewards"]["jpeg"] == max(record["details"]["candidate_rewards"])
        assert (out / record["file"]).is_file()
    page = (out / "index.html").read_text()
    assert page.count('class="card"') == 2 and "6 model evals" in page
    # Scores are kept under the reward's name, as `sample` keeps them: a side-by-side page takes their difference.
    plain = tmp_path / "plain"
    common = ["--model", str(saved["sd3"]), "--prompt", "a red circle", "--reward", "jpeg:50", "--steps", "2",
              "--height", "32", "--width", "32", "--seed", "3"]
    main(["sample", *common, "--out", str(plain)])
    main(["steer", "--method", "best-of-n", "--num-candidates", "1", *common, "--out", str(tmp_path / "best1")])
    (a,), (b,) = ([json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
                  for folder in (plain, tmp_path / "best1"))
    assert a["rewards"].keys() == b["rewards"].keys() == {"jpeg"}
    assert b["rewards"]["jpeg"] == pytest.approx(a["rewards"]["jpeg"], abs=1e-6)  # candidate 0 is the plain sample
    for flags, message in ((["--method", "ttsnap", "--potential", "max"], "--potential applies to fk"),
                           (["--method", "fk", "--batch-size", "4"], "--batch-size apply to reno, not fk"),
                           (["--method", "fk", "--prune-reward", "jpeg"], "--prune-reward applies to ttsnap"),
                           (["--method", "fk", "--budget", "8", "--num-particles", "2"],
                            "give either --budget or --num-particles, not both")):
        with pytest.raises(SystemExit, match=message):
            main(["steer", *flags, "--model", str(saved["sd3"]), "--prompt", "a", "--reward", "jpeg", "--out",
                  str(tmp_path / "other")])
    with pytest.raises(ValueError, match="prune_reward applies to ttsnap, not best-of-n"):  # the Python API too
        steer_to_folder(load_adapter(str(saved["sd3"])), ["a"], load_reward("jpeg"), "best-of-n", tmp_path / "api",
                        prune_reward=load_reward("jpeg"), num_candidates=1)


def test_a_python_resume_with_another_model_is_refused(saved, tmp_path):
    """From Python the folder recorded no model: a resume with another one went on, mixing two models' images."""
    out = tmp_path / "steered"
    options = dict(budget=4, num_inference_steps=2, height=32, width=32)
    steer_to_folder(load_adapter(str(saved["sd3"])), ["a red circle"], load_reward("jpeg"), "best-of-n", out,
                    **options)
    assert json.loads((out / "metadata.jsonl").read_text())["model"] == str(saved["sd3"])
    with pytest.raises(ValueError, match=f"resume: the earlier run's model was '{saved['sd3']}', this one's is "
                                         f"'{saved['sd']}'"):
        steer_to_folder(load_adapter(str(saved["sd"])), ["a red circle", "two squares"], load_reward("jpeg"),
                        "best-of-n", out, resume=True, **options)
    in_memory = adapter_for(tiny_pipeline("sd3"))  # no name or path: recorded as None, and resumed
    steer_to_folder(in_memory, ["a red circle"], load_reward("jpeg"), "best-of-n", tmp_path / "memory", **options)
    steer_to_folder(in_memory, ["a red circle", "two squares"], load_reward("jpeg"), "best-of-n",
                    tmp_path / "memory", resume=True, **options)
    assert len((tmp_path / "memory" / "metadata.jsonl").read_text().splitlines()) == 2


def test_a_run_scored_by_a_weighted_reward_resumes(saved, tmp_path):
    """Its records hold the sum and each term's score; the resume expected the sum alone and refused every one."""
    out, adapter, reward = tmp_path / "steered", load_adapter(str(saved["sd3"])), load_reward("jpeg,jpeg:5=0.5")
    options = dict(budget=4, num_inference_steps=2, height=32, width=32)
    steer_to_folder(adapter, ["a red circle"], reward, "best-of-n", out, **options)
    assert list(json.loads((out / "metadata.jsonl").read_text())["rewards"]) == [reward.name, "jpeg", "jpeg:5"]
    steer_to_folder(adapter, ["a red circle", "two squares"], reward, "best-of-n", out, resume=True, **options)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2


def test_a_rerun_that_fails_its_checks_leaves_the_earlier_results(saved, tmp_path):
    out = tmp_path / "steered"
    common = ["steer", "--model", str(saved["sd3"]), "--reward", "jpeg", "--height", "32", "--width", "32",
              "--out", str(out)]
    main([*common, "--method", "ttsnap", "--prompt", "a red circle", "--num-seeds", "2", "--steps", "4",
          "--prune-steps", "1", "--keep", "0.5"])
    before = {path.name: path.read_bytes() for path in [out / "metadata.jsonl", out / "index.html",
                                                         *sorted((out / "images").iterdir())]}
    with pytest.raises(SystemExit, match="prune steps"):  # checked by ttsnap itself, as it starts
        main([*common, "--method", "ttsnap", "--prompt", "a red circle", "--num-seeds", "2", "--steps", "4",
              "--prune-steps", "5", "--keep", "0.5", "--overwrite"])
    with pytest.raises(SystemExit, match="--shapes-eval judges shapes-world prompts only"):
        main([*common, "--method", "best-of-n", "--prompt", "a red circle", "two blue squares", "--shapes-eval",
              "--overwrite"])
    after = {path.name: path.read_bytes() for path in [out / "metadata.jsonl", out / "index.html",
                                                        *sorted((out / "images").iterdir())]}
    assert after == before


def test_steer_resume_goes_on_after_an_interrupted_run_as_if_it_had_not_stopped(saved, tmp_path, capsys,
                                                                                monkeypatch):
    shared = ["--model", str(saved["sd3"]), "--reward", "jpeg", "--steps", "4", "--height", "32", "--width", "32",
              "--seed", "3"]
    common = ["steer", "--method", "fk", "--num-particles", "2", "--resample-interval", "1", *shared]
    prompts = ["a red circle", "two squares", "a triangle", "a blue square"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main([*common, "--prompt", *prompts, "--out", str(straight)])
    main([*common, "--prompt", *prompts[:3], "--out", str(resumed)])  # the first three prompts of the same run
    metadata = resumed / "metadata.jsonl"
    lines = metadata.read_text().splitlines(keepends=True)
    # Killed just before the third record's newline: the record is complete, its image written before it.
    metadata.write_text(lines[0] + lines[1] + lines[2].rstrip("\n"))
    with pytest.raises(SystemExit, match="already holds results; pass --overwrite .* or --resume"):
        main([*common, "--prompt", *prompts, "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's options.lam was not given \\(the default\\), "
                                         "this one's is 5.0"):
        main([*common, "--prompt", *prompts, "--lam", "5", "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's max_sequence_length was not given "
                                         "\\(the default\\), this one's is 16"):
        main([*common, "--prompt", *prompts, "--max-sequence-length", "16", "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's options.negative_prompt was not given "
                                         "\\(the default\\), this one's is"):
        main([*common, "--prompt", *prompts, "--negative-prompt", "dark", "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's method was 'fk', this one's is 'best-of-n'"):
        main(["steer", "--method", "best-of-n", *shared, "--prompt", *prompts, "--resume", "--out", str(resumed)])
    # Checked before the model loads, the reward by its spec, not its name.
    with monkeypatch.context() as patched:
        patched.setattr("align_diffusion.cli.load_for_command", lambda args: pytest.fail("the model loaded"))
        with pytest.raises(SystemExit, match="resume: the earlier run's reward was 'jpeg', this one's is 'jpeg:5'"):
            main([*common, "--reward", "jpeg:5", "--prompt", *prompts, "--resume", "--out", str(resumed)])
        with pytest.raises(SystemExit, match="resume: the earlier run's shapes_eval was False, this one's is True"):
            main([*common, "--shapes-eval", "--prompt", *prompts, "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: image images/00001.png is of prompt 'two squares', seed 4; this "
                                         "run makes 'a triangle', seed 4 there"):
        main([*common, "--prompt", prompts[0], *prompts[2:], "--resume", "--out", str(resumed)])
    assert metadata.read_text() == lines[0] + lines[1] + lines[2].rstrip("\n")  # a refused resume changes nothing
    main([*common, "--prompt", *prompts, "--resume", "--out", str(resumed)])
    assert f"wrote 1 images to {resumed} after the 3 it had (of all 4: " in capsys.readouterr().out

    def without_seconds(folder):
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        for record in records:
            del record["budget"]["seconds"]
        return records

    assert without_seconds(resumed) == without_seconds(straight)
    assert [r["seed"] for r in without_seconds(resumed)] == [3, 4, 5, 6]
    for k in range(4):
        name = f"images/{k:05d}.png"
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name
    assert (resumed / "index.html").read_text().count('class="card"') == 4
    # The Python call with the same options finds the run done; the options the command left at their defaults
    # (given as None there) are not named here at all.
    again = steer_to_folder(load_adapter(str(saved["sd3"])), prompts, load_reward("jpeg"), "fk", resumed, resume=True,
                            extra_metadata={"model": str(saved["sd3"])}, num_particles=2, resample_interval=1,
                            num_inference_steps=4, height=32, width=32, seed=3)
    assert len(again) == 4 and (resumed / "metadata.jsonl").read_text().count("\n") == 4


def test_a_prompt_the_reward_cannot_score_fails_before_any_image(saved, adapter, tmp_path):
    out = tmp_path / "steered"
    for command in (["steer", "--method", "best-of-n", "--budget", "4"], ["sample", "--batch-size", "1"]):
        with pytest.raises(SystemExit, match="reward shapes: not a shapes-world prompt: 'a photo of a cat'"):
            main([*command, "--model", str(saved["sd3"]), "--prompt", "a red circle", "a photo of a cat",
                  "--reward", "jpeg,shapes=0.5", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)])
        assert not out.exists()
    with pytest.raises(ValueError, match="reward shapes:strict: not a shapes-world prompt: 'a photo of a cat'"):
        steer(adapter, ["a photo of a cat"], Darkness(), "ttsnap",
              prune_reward=load_reward("shapes:strict"))
    # ShapesEval's verdict, asked for in Python, refuses such a prompt before the first result too.
    with pytest.raises(ValueError, match="reward shapes: not a shapes-world prompt: 'a photo of a cat'"):
        steer_to_folder(adapter, ["a red circle", "a photo of a cat"], Darkness(), "best-of-n", out,
                        shapes_eval=True, num_candidates=1, num_inference_steps=2, **SIZE)
    assert not out.exists()


def test_steer_compile_without_a_compiler_fails_before_loading(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    with pytest.raises(SystemExit, match="--compile: torch.compile builds its kernels with a C/C"):
        main(["steer", "--method", "best-of-n", "--model", str(tmp_path / "no-model-here"), "--prompt", "a",
              "--reward", "jpeg", "--compile", "--out", str(tmp_path / "out")])


def test_compare_steering_script_keeps_earlier_results_unless_told(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_steering.py"
    parse_args = runpy.run_path(str(script))["parse_args"]  # in this process: the checks come before any loading

    def refused(*options: str) -> str:
        monkeypatch.setattr(sys, "argv", ["compare_steering.py", *options])
        with pytest.raises(SystemExit) as exit_info:
            parse_args()
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    (tmp_path / "results.json").write_text("{}")
    assert "already holds results; pass --overwrite" in refused("--out", str(tmp_path))
    assert (tmp_path / "results.json").read_text() == "{}"
    for options, message in ((["--methods", "bestofn"], "invalid choice: 'bestofn'"),
                             (["--steps", "5"], "--steps 5: TTSnap's default prune steps must be")):
        assert message in refused("--out", str(tmp_path / "new"), *options)
        assert not (tmp_path / "new").exists()
