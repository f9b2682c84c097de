"""The adversarial DINO reward on the world's DINO-format encoder: formula, gradients, schedule, training, state."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, Dinov2Model

from align_diffusion.rewards.adversarial import AdversarialDino, AdversarialSchedule
from align_diffusion.rewards.spec import load_reward
from align_diffusion.world.prompts import split_prompts
from align_diffusion.world.render import render_prompt

DINO = "assets/world/dino"


def renders(prompts, seed=0) -> torch.Tensor:
    arrays = np.stack([render_prompt(p, seed + k) for k, p in enumerate(prompts)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def smeared(images: torch.Tensor) -> torch.Tensor:
    """A generator-like failure: blurred, noisy, desaturated scenes."""
    blurred = F.avg_pool2d(images, 5, 1, 2)
    noise = 0.08 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    return (0.7 * blurred + 0.3 * blurred.mean(1, keepdim=True) + noise).clamp(0, 1)


def test_reward_is_the_stated_mix_of_cls_and_patch_scores():
    reward = load_reward(f"adv-dino:{DINO}")
    assert isinstance(reward, AdversarialDino) and reward.trainable and reward.stateful
    images = renders(["a red circle", "three squares"])
    # A head whose CLS and patch scores lie far apart, so that the mix's weights show in the score.
    torch.nn.init.normal_(reward.head[2].weight, std=1.0, generator=torch.Generator().manual_seed(0))
    backbone = Dinov2Model.from_pretrained(DINO, dtype=torch.float32).eval()  # stored in float16
    pixels = AutoImageProcessor.from_pretrained(DINO)(images=list((images * 255).round().byte().permute(0, 2, 3, 1)
                                                                  .numpy()), return_tensors="pt").pixel_values
    with torch.no_grad():
        tokens = F.normalize(backbone(pixel_values=pixels).last_hidden_state, dim=-1)
        cls, patches = reward.head(tokens[:, 0]).squeeze(-1), reward.head(tokens[:, 1:]).squeeze(-1).mean(1)
    assert ((cls - patches).abs() > 0.1).all()  # so a weight 0.01 off moves the score by more than the tolerance
    expected = 0.7 * cls + 0.3 * patches
    pixels_in = images.clone().requires_grad_(True)
    scores = reward(pixels_in, ["", ""])
    scores.sum().backward()
    assert torch.isfinite(pixels_in.grad).all() and pixels_in.grad.abs().sum() > 0
    np.testing.assert_allclose(scores.detach(), expected, atol=1e-4)


def test_schedule_every_k_and_overtake_trigger():
    every_three = AdversarialSchedule(every=3, on_overtake=False)
    assert [every_three.should_update(1.0, 0.0) for _ in range(7)] == [False, False, True, False, False, True, False]
    triggered = AdversarialSchedule(every=100, on_overtake=True)
    assert [triggered.should_update(g, 0.5) for g in (0.1, 0.6, 0.5, 0.9)] == [False, True, False, True]
    with pytest.raises(ValueError, match="at least 1"):
        AdversarialSchedule(every=0)


def test_training_moves_the_margin_and_state_round_trips():
    prompts = split_prompts("train")[:16]
    references, generated = renders(prompts), smeared(renders(prompts, seed=100))
    reward = AdversarialDino(DINO, lr=1e-3, schedule=AdversarialSchedule(every=3, on_overtake=False))
    with torch.no_grad():
        before = (reward(references, prompts) - reward(generated, prompts)).mean()
    losses = [reward.train_step(generated, references) for _ in range(10)]
    with torch.no_grad():
        after = (reward(references, prompts) - reward(generated, prompts)).mean()
    assert losses[-1] < losses[0] and after > before

    restored = AdversarialDino(DINO, lr=1e-3, seed=7)
    saved = io.BytesIO()  # as a checkpoint keeps it: the optimizer's moments are not shared with the original
    torch.save(reward.reward_state(), saved)
    restored.load_reward_state(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert restored.schedule == reward.schedule
    torch.testing.assert_close(restored(references, prompts), reward(references, prompts))
    # A step's loss is computed before its update, so the second step's loss and the weights after it are what
    # tell whether the optimizer's moments came back too.
    for _ in range(2):
        assert restored.train_step(generated, references) == pytest.approx(reward.train_step(generated, references))
    for (name, ours), theirs in zip(reward.head.state_dict().items(), restored.head.state_dict().values()):
        torch.testing.assert_close(theirs, ours, msg=name)


def test_maybe_update_follows_the_schedule():
    reward = AdversarialDino(DINO, schedule=AdversarialSchedule(every=2, on_overtake=False))
    images = renders(["a red circle", "a blue square"])
    low = torch.full((2,), -10.0)
    assert reward.maybe_update(images, images, low) == []
    assert len(reward.maybe_update(images, images, low, steps=3)) == 3
    assert reward.schedule.rounds == 2
    # On overtake: the generated images' mean reward against the references' mean under the current head.
    overtaken = AdversarialDino(DINO, schedule=AdversarialSchedule(every=100, on_overtake=True))
    with torch.no_grad():
        reference_mean = overtaken(images, ["", ""]).mean()
    assert overtaken.maybe_update(images, images, torch.full((2,), reference_mean - 1)) == []
    assert len(overtaken.maybe_update(images, images, torch.full((2,), reference_mean + 1))) == 1


def test_trained_head_tells_clean_renders_from_the_world_generators_samples():
    """The acceptance bar: after training at the paper's lr on 64 renders against 64 base-model samples, the sign
    of the reward classifies 64 held-out renders and 64 held-out samples (of other prompts) with accuracy ≥ 0.8."""
    from align_diffusion.models import load_adapter
    from align_diffusion.sampling.loop import sample

    prompts = split_prompts("train")
    chosen = [prompts[i] for i in np.random.default_rng(0).integers(0, len(prompts), 128)]
    adapter = load_adapter("assets/world/sd3")
    generators = [torch.Generator().manual_seed(k) for k in range(128)]
    samples = torch.cat([sample(adapter, chosen[start : start + 64], generators=generators[start : start + 64]).images
                         for start in (0, 64)])
    references = renders(chosen, seed=50_000)
    reward = AdversarialDino(DINO)
    assert reward.optimizer.defaults["lr"] == 1e-4 and reward.optimizer.defaults["betas"] == (0.5, 0.999)
    for _ in range(10):
        reward.maybe_update(samples[:64], references[:64], torch.full((64,), float("nan")), steps=250)
    with torch.no_grad():
        on_renders, on_samples = reward(references[64:], chosen[64:]), reward(samples[64:], chosen[64:])
    accuracy = ((on_renders > 0).float().mean() + (on_samples < 0).float().mean()) / 2
    assert accuracy >= 0.8
