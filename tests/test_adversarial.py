"""The adversarial DINO reward on the world's DINO-format encoder: formula, gradients, schedule, training, state."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

from align_diffusion.rewards.adversarial import AdversarialDino, AdversarialSchedule, discriminator_loss
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


def save_tiny_dino(folder) -> str:
    """A random Dinov2 with facebook/dinov2's preprocessing scaled down: shortest side 73 and a center crop of 64,
    as 256 and 224 (the model's input 64, patch 8)."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=64)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)


def paint_border(images: torch.Tensor, width: int) -> torch.Tensor:
    """The images with a band of `width` pixels on every side painted: where a center crop would not look."""
    painted = images.clone()
    painted[..., :width, :] = 1.0
    painted[..., -width:, :] = 0.0
    painted[..., :, :width] = 0.5
    painted[..., :, -width:] = 0.25
    return painted


def test_the_reward_sees_the_whole_image(tmp_path):
    """Adv-GRPO resizes the whole image to the backbone's input (518²), no crop: the processor's resize to 73 and
    center crop to 64 would hide the outer 8 px of a 128² image, where a generator could then do anything."""
    reward = AdversarialDino(save_tiny_dino(tmp_path))
    torch.nn.init.normal_(reward.head[2].weight, std=1.0, generator=torch.Generator().manual_seed(0))  # scores ~0.1
    images = renders(["a red circle", "three squares"]).repeat_interleave(2, -1).repeat_interleave(2, -2)  # 128²
    pixels = images.clone().requires_grad_(True)
    reward(pixels, ["", ""]).sum().backward()
    assert (pixels.grad.abs().sum(1) > 0).all()  # every pixel reaches the reward
    with torch.no_grad():
        painted = reward(paint_border(images, 8), ["", ""]) - reward(images, ["", ""])
    assert (painted.abs() > 1e-4).all()


def test_discriminator_loss_is_per_token_hinge_by_hand():
    """Adv-GRPO's train_dino: 0.5·[mean relu(1 − real) + mean relu(1 + fake)] on the CLS logits, plus 0.3 × the same
    on the patch logits; the reference's CLS logit is past the margin, but its patches still call it fake."""
    real_cls, fake_cls = torch.tensor([3.0, 0.5]), torch.tensor([-2.0, 0.0])
    real_patches = torch.tensor([[-1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    fake_patches = torch.tensor([[0.5, -3.0], [-1.0, -1.0]])
    # CLS: real relu(1 - 3) = 0 and relu(1 - 0.5) = 0.5, mean 0.25; fake relu(1 - 2) = 0 and relu(1) = 1, mean 0.5.
    # Patches: real 2, 2, 0, 1, mean 1.25; fake 1.5, 0, 0, 0, mean 0.375.
    # 0.5 · (0.25 + 0.5) + 0.3 · 0.5 · (1.25 + 0.375) = 0.375 + 0.24375
    loss = discriminator_loss(real_cls, real_patches, fake_cls, fake_patches)
    assert loss.item() == pytest.approx(0.61875)
    loss.backward()
    # Each real patch logit under the margin gets −0.3 · 0.5 / 4; the first image's patches too, whose CLS logit of
    # 3 would carry the 0.7 / 0.3 mix past the margin.
    torch.testing.assert_close(real_patches.grad, torch.tensor([[-0.0375, -0.0375], [0.0, -0.0375]]))


def test_training_draws_64_patch_tokens_per_image_with_replacement():
    """As Adv-GRPO's train_dino does: 64 uniform draws from the world backbone's 64 patch tokens repeat some."""
    reward = AdversarialDino(DINO)
    tokens = torch.eye(64).expand(8, -1, -1)  # token k of each image is the one-hot vector k
    counts = reward._random_patches(tokens).sum(1)  # (8, 64): how often each image drew each token
    assert (counts.sum(1) == 64).all() and (counts.amax(1) > 1).all()


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


def test_a_diverged_sample_is_left_out_of_the_head_update():
    """A NaN image among a round's samples scores NaN and trains the head as if it were not there."""
    references = renders(["a red circle", "a blue square"])
    generated = smeared(renders(["a red circle", "a blue square"], seed=100))
    diverged = torch.cat([generated, generated[:1]])
    diverged[2, :, 5:9, 5:9] = float("nan")
    alone, with_nan = (AdversarialDino(DINO, schedule=AdversarialSchedule(every=1)) for _ in range(2))
    scores = with_nan(diverged, ["", "", ""])
    assert torch.isnan(scores[2]) and torch.isfinite(scores[:2]).all()
    expected = alone.maybe_update(generated, references, scores[:2], steps=2)
    assert with_nan.maybe_update(diverged, references, scores, steps=2) == pytest.approx(expected)
    torch.testing.assert_close(with_nan(references, ["", ""]), alone(references, ["", ""]))
    all_diverged = torch.full_like(generated, float("nan"))
    assert with_nan.maybe_update(all_diverged, references, torch.full((2,), float("nan"))) == []


def test_trained_head_tells_clean_renders_from_the_world_generators_samples():
    """The acceptance bar: after training at the paper's lr on 64 renders against 64 base-model samples (at the
    world presets' 20 steps, guidance 2), the sign of the reward classifies 64 held-out renders and 64 held-out
    samples (of other prompts) with accuracy ≥ 0.8 (0.844 measured; 0.82 with samples at SD3's 28 steps, guidance 7)."""
    from align_diffusion.models import load_adapter
    from align_diffusion.sampling.loop import sample

    prompts = split_prompts("train")
    chosen = [prompts[i] for i in np.random.default_rng(0).integers(0, len(prompts), 128)]
    adapter = load_adapter("assets/world/sd3")
    generators = [torch.Generator().manual_seed(k) for k in range(128)]
    samples = torch.cat([sample(adapter, chosen[start : start + 64], num_inference_steps=20, guidance_scale=2.0,
                                generators=generators[start : start + 64]).images for start in (0, 64)])
    references = renders(chosen, seed=50_000)
    reward = AdversarialDino(DINO)
    assert reward.optimizer.defaults["lr"] == 1e-4 and reward.optimizer.defaults["betas"] == (0.5, 0.999)
    for _ in range(10):
        reward.maybe_update(samples[:64], references[:64], torch.full((64,), float("nan")), steps=250)
    with torch.no_grad():
        on_renders, on_samples = reward(references[64:], chosen[64:]), reward(samples[64:], chosen[64:])
    accuracy = ((on_renders > 0).float().mean() + (on_samples < 0).float().mean()) / 2
    assert accuracy >= 0.8
