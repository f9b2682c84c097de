"""The adversarial DINO reward of Adv-GRPO ("The Image as Its Own Reward"): a frozen Dinov2-format backbone and a
small head trained, as a discriminator, to score reference images above generated ones.

The backbone sees the whole image, resized to its processor's crop size with no crop, so no border is left where a
generator could change pixels unseen. (Adv-GRPO resizes to 518², 1369 patch tokens; the hub Dinov2 processors' crop
is 224², 256 tokens, which see less of a 512² sample's fine texture.) The head Linear(d→512)–GELU–Linear(512→1) is
shared by the CLS token and the patch tokens, all L2-normalized; reward = 0.7·head(CLS) + 0.3·mean head(patches),
over every patch token, so it is deterministic. Training follows Adv-GRPO's `train_dino`: hinge losses per token,
0.5·[mean relu(1 − logit(reference)) + mean relu(1 + logit(generated))], on the CLS logits plus 0.3 times the same
on `num_patches` patch tokens per image drawn with replacement. The head updates on its own schedule
(`AdversarialSchedule`) while the policy trains against it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, Dinov2Model

from align_diffusion.rewards.base import Reward, images_to_tensor
from align_diffusion.rewards.preprocess import TorchImageTransform

CLS_WEIGHT = 0.7  # of the reward
PATCH_LOSS_WEIGHT = 0.3  # of the patch tokens' hinge loss against the CLS tokens' in training


def hinge_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5·[mean relu(1 − real) + mean relu(1 + fake)] over discriminator logits of any shape."""
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def discriminator_loss(real_cls, real_patches, fake_cls, fake_patches) -> torch.Tensor:
    """Adv-GRPO's loss of the head's logits: per-token hinge losses, CLS (B,) plus 0.3 × patches (B, n)."""
    return hinge_loss(real_cls, fake_cls) + PATCH_LOSS_WEIGHT * hinge_loss(real_patches, fake_patches)


@dataclass
class AdversarialSchedule:
    """When the head updates: every `every` rounds, or (with `on_overtake`) in any round where the generated
    images' mean reward exceeds the references'. `rounds` counts the rounds seen so far."""

    every: int = 1
    on_overtake: bool = True
    rounds: int = 0

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"the adversarial head's update interval must be at least 1, got {self.every}")

    def should_update(self, generated_mean: float, reference_mean: float) -> bool:
        """Advances one round; True when the head should train in it."""
        self.rounds += 1
        return self.rounds % self.every == 0 or (self.on_overtake and generated_mean > reference_mean)


class AdversarialDino(Reward):
    """Spec `adv-dino:BACKBONE` (a Dinov2Model id or path with its image processor)."""

    differentiable = True
    trainable = True
    stateful = True

    def __init__(self, backbone: str, *, num_patches: int = 64, lr: float = 1e-4,
                 schedule: AdversarialSchedule | None = None, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__("adv-dino")
        self.backbone = Dinov2Model.from_pretrained(backbone, dtype=dtype).to(device).eval().requires_grad_(False)
        self.transform = TorchImageTransform.from_processor(AutoImageProcessor.from_pretrained(backbone), squash=True)
        width = self.backbone.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        self.head = torch.nn.Sequential(torch.nn.Linear(width, 512), torch.nn.GELU(), torch.nn.Linear(512, 1))
        for layer in (self.head[0], self.head[2]):  # seeded init, so two runs with one seed train identically
            bound = 1 / layer.in_features**0.5
            layer.weight.data = torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator)
            layer.bias.data = torch.empty_like(layer.bias).uniform_(-bound, bound, generator=generator)
        self.head.to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr, betas=(0.5, 0.999))
        self.schedule = schedule or AdversarialSchedule()
        self.num_patches = num_patches
        self.patch_generator = generator

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized CLS (B, d) and patch tokens (B, N, d) of the frozen backbone."""
        device = next(self.head.parameters()).device
        pixels = self.transform(images.to(device, torch.float32)).to(self.backbone.dtype)
        tokens = F.normalize(self.backbone(pixel_values=pixels).last_hidden_state.float(), dim=-1)
        return tokens[:, 0], tokens[:, 1:]

    def head_reward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return CLS_WEIGHT * self.head(cls).squeeze(-1) + (1 - CLS_WEIGHT) * self.head(patches).squeeze(-1).mean(-1)

    def image_networks(self):
        return [self.backbone]  # not the head, which trains

    def score(self, images, prompts, metadata):
        return self.head_reward(*self.features(images))

    def _random_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """`num_patches` (at most as many as there are) patch tokens of each image, drawn with replacement."""
        count = min(self.num_patches, patches.shape[1])
        pick = torch.randint(patches.shape[1], (len(patches), count), generator=self.patch_generator)
        return torch.gather(patches, 1, pick.to(patches.device).unsqueeze(-1).expand(-1, -1, patches.shape[-1]))

    def train_step(self, generated, references) -> float:
        """One hinge-loss update of the head: references are positives, generated images negatives."""
        return self._update(self._frozen_features(references), self._frozen_features(generated))

    @torch.no_grad()
    def _frozen_features(self, images):
        return self.features(images_to_tensor(images).detach())

    def _update(self, real_features, fake_features) -> float:
        tokens = (real_features[0], self._random_patches(real_features[1]),
                  fake_features[0], self._random_patches(fake_features[1]))
        # one head call for all four sets: a CPU's matrix multiply runs faster on one large batch than four
        logits = self.head(torch.cat([t.flatten(0, -2) for t in tokens])).squeeze(-1)
        logits = logits.split([t.shape[:-1].numel() for t in tokens])
        loss = discriminator_loss(*(part.view(t.shape[:-1]) for part, t in zip(logits, tokens)))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def maybe_update(self, generated, references, generated_rewards: torch.Tensor, steps: int = 1) -> list[float]:
        """A round of co-training: `steps` head updates when the schedule says so (given the generated images'
        rewards this round and the references' current scores); returns the losses (empty when skipped).
        Generated images with a non-finite pixel (diverged samples, which the reward scores NaN) are left out of
        the update, which is skipped when none is left. The frozen backbone runs once per image set, however many
        steps."""
        real_features = self._frozen_features(references)
        with torch.no_grad():
            reference_mean = self.head_reward(*real_features).mean().item()
        if not self.schedule.should_update(torch.nanmean(generated_rewards.float()).item(), reference_mean):
            return []
        if isinstance(generated, torch.Tensor):
            generated = generated[torch.isfinite(generated.detach()).flatten(1).all(1)]
        if len(generated) == 0:
            return []
        fake_features = self._frozen_features(generated)
        return [self._update(real_features, fake_features) for _ in range(steps)]

    def reward_state(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": asdict(self.schedule), "patch_generator": self.patch_generator.get_state()}

    def load_reward_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule = AdversarialSchedule(**state["schedule"])
        self.patch_generator.set_state(state["patch_generator"])
