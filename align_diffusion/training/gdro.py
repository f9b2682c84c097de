"""GDRO: offline group reward optimization. The base model generates groups of images once (`gdro.num_groups`
prompts × `gdro.group_size` images, scored by the reward and saved in `OUTPUT_DIR/gdro_groups.pt`); training then
needs no rollouts.

For a group, every image's clean latent is noised to one shared level with one shared noise, and its implicit
reward is Diffusion-DPO's

    r̂_k = −β · (e_θ(x_k) − e_ref(x_k)),   e = mean squared error of the denoiser's prediction target,

against the frozen reference (the LoRA disabled). The loss is the cross-entropy from the target distribution
softmax(R / τ) of the rewards to softmax(r̂), plus `sft_weight` times e_θ of the group's best image, which keeps the
model able to produce what it ranks first. With two images and τ → 0 the target is one-hot on the better image and
the loss is −log σ(r̂_w − r̂_l), Diffusion-DPO's pairwise loss.

Checkpoints, evaluation, galleries and the LoRA export are the GRPO trainer's.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from align_diffusion.rewards.spec import score_terms
from align_diffusion.sampling.loop import sample
from align_diffusion.training.checkpoint import atomic_torch_save
from align_diffusion.training.config import MODEL_OPTION_FIELDS, model_options, to_dict
from align_diffusion.training.grpo import SHARED_NOISE_STREAM, GRPOTrainer, changed_settings

GROUPS_FILE = "gdro_groups.pt"


def gdro_loss(implicit: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy from softmax(rewards / tau) to softmax(implicit) over one group; images whose reward is NaN
    are left out (a group needs two scored images)."""
    scored = ~torch.isnan(rewards)
    if int(scored.sum()) < 2:
        raise ValueError("a GDRO group needs at least two scored images")
    target = torch.softmax(rewards[scored].double() / tau, dim=0).to(implicit.dtype)
    return -(target * F.log_softmax(implicit[scored], dim=0)).sum()


class GDROTrainer(GRPOTrainer):
    """The offline trainer: the GRPO trainer's model, optimizer, checkpoints and eval, with GDRO's step."""

    def __init__(self, config, accelerator=None):
        super().__init__(config, accelerator)  # its validation refuses several processes
        self.groups = None

    # --- the offline set ---------------------------------------------------------------------------------------
    def offline_groups(self) -> dict:
        """The generated groups: loaded from OUTPUT_DIR/gdro_groups.pt, or generated (and saved) when missing."""
        path = self.output_dir / GROUPS_FILE
        config, gdro = self.config, self.config.gdro
        made_by = self.offline_set_settings()
        if path.exists():
            groups = torch.load(path, weights_only=False)
            if (len(groups["prompts"]), groups["latents"].shape[1]) != (gdro.num_groups, gdro.group_size):
                raise ValueError(f"{path} holds {len(groups['prompts'])} groups of {groups['latents'].shape[1]}, "
                                 f"but gdro asks for {gdro.num_groups} of {gdro.group_size}; move it away to "
                                 "generate a new set")
            earlier = groups.get("made_by", made_by)  # sets saved before they recorded this are taken as they are
            changed = changed_settings(earlier, made_by)
            if changed:
                raise ValueError(f"{path} was generated with " + ", ".join(
                    f"{key}={earlier[key]!r}" for key in changed) + ", this run has " + ", ".join(
                    f"{key}={made_by[key]!r}" for key in changed) + "; move it away to generate a new set")
            return groups
        prompts = self.prompts.draw(config.seed, 0, gdro.num_groups)
        sampling = config.sampling
        window = None if sampling.noise_window is None else range(*sampling.noise_window)
        latents, rewards = [], []
        self.adapter.denoiser.eval()
        for number, prompt in enumerate(prompts):
            first = (config.seed * 1_000_003 + number) * gdro.group_size  # distinct for every (seed, group, image)
            generators = [torch.Generator().manual_seed(first + k) for k in range(gdro.group_size)]
            shared = None
            if sampling.shared_noise:  # one initial noise for the group, from a stream of its own
                shared = self.adapter.initial_noise([torch.Generator().manual_seed(first + SHARED_NOISE_STREAM)
                                                     for _ in range(gdro.group_size)], *self._size())
            finals, images = [], []
            for start in range(0, gdro.group_size, sampling.batch_size):
                part = slice(start, start + sampling.batch_size)
                with torch.no_grad():
                    chunk = sample(self.adapter, [prompt] * len(generators[part]), sampler=sampling.sampler,
                                   noise_level=self.noise_levels, num_inference_steps=sampling.num_steps,
                                   guidance_scale=sampling.guidance_scale, generators=generators[part],
                                   latents=None if shared is None else shared[part], noise_window=window,
                                   height=sampling.height, width=sampling.width,
                                   negative_prompt=sampling.negative_prompt)
                finals.append(chunk.final_latents.cpu())
                images.append(chunk.images)
            latents.append(torch.cat(finals))
            rewards.append(score_terms(self.reward, torch.cat(images), [prompt] * gdro.group_size)[0])
            self.log(f"generated group {number + 1}/{len(prompts)}: rewards {rewards[-1].tolist()}")
        groups = {"prompts": prompts, "latents": torch.stack(latents), "rewards": torch.stack(rewards),
                  "made_by": made_by}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(groups, path)
        return groups

    def offline_set_settings(self) -> dict:
        """The settings the offline set is generated under: the model and its options, prompts, reward, seed, dtype
        and sampling (its batch size aside; a noise table's levels as the run read them)."""
        config = self.config
        sampling = {f"sampling.{key}": value for key, value in to_dict(config)["sampling"].items()
                    if key != "batch_size"}
        encoding = {MODEL_OPTION_FIELDS[option]: value for option, value in model_options(config).items()}
        made_by = {"model": config.model, **encoding, "prompts": config.prompts, "reward": config.reward,
                   "seed": config.seed, "dtype": config.dtype, **sampling}
        if config.sampling.noise_table:
            made_by["sampling.noise_table_levels"] = self.noise_levels
        return made_by

    # --- one step ----------------------------------------------------------------------------------------------
    def denoising_errors(self, latents: torch.Tensor, prompt: str, generator: torch.Generator):
        """Per-image prediction errors of the model (with grad) and the reference at one shared noise level and
        noise, and the level's step index."""
        schedule = self.adapter.schedule(self.config.sampling.num_steps, *self._size())
        step = int(torch.randint(schedule.num_steps, (), generator=generator))
        noise = torch.randn(latents.shape[1:], generator=generator).expand_as(latents).to(latents.device)
        if self.adapter.is_flow:
            sigma = schedule.sigmas[step]
            noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
        else:
            alpha = schedule.alphas_cumprod[step]
            noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
            target = noise if self.adapter.prediction_type == "epsilon" else alpha.sqrt() * noise - (
                1 - alpha).sqrt() * latents
        sampling = self.config.sampling
        embeds = self.adapter.encode_prompt([prompt], sampling.guidance_scale, len(latents), sampling.negative_prompt)
        guidance = sampling.guidance_scale
        timestep = schedule.timesteps[step]
        error = ((self.adapter.predict(noisy, timestep, embeds, guidance) - target) ** 2).flatten(1).mean(1)
        with torch.no_grad(), self.reference_model():
            reference = ((self.adapter.predict(noisy, timestep, embeds, guidance) - target) ** 2).flatten(1).mean(1)
        return error, reference

    def _size(self) -> tuple[int, int]:
        sampling = self.config.sampling
        return sampling.height or self.adapter.default_size[0], sampling.width or self.adapter.default_size[1]

    def training_step(self, step: int) -> dict:
        if self.groups is None:
            self.groups = self.offline_groups()
        gdro = self.config.gdro
        rng = random.Random(self.config.seed * 1_000_003 + step)
        chosen = rng.sample(range(len(self.groups["prompts"])), min(gdro.groups_per_step, len(self.groups["prompts"])))
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        device = self.accelerator.device
        self.adapter.denoiser.train()
        ranking, regularizer, accuracy = [], [], []
        for group in chosen:
            rewards = self.groups["rewards"][group]
            latents = self.groups["latents"][group].to(device)
            with self.accelerator.autocast():
                error, reference = self.denoising_errors(latents, self.groups["prompts"][group], generator)
                implicit = -gdro.beta * (error.float() - reference.float())
                rank_loss = gdro_loss(implicit, rewards.to(device), gdro.tau)
                best = int(torch.nan_to_num(rewards, nan=float("-inf")).argmax())
                loss = (rank_loss + gdro.sft_weight * error[best]) / len(chosen)
            self.accelerator.backward(loss)
            ranking.append(rank_loss.item())
            regularizer.append(error[best].item())
            accuracy.append(float(int(implicit.detach().argmax()) == best))
        norm = self.accelerator.clip_grad_norm_(self.params, self.config.optim.max_grad_norm or float("inf"))
        lr = self.lr_schedule.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return {
            "loss": sum(ranking) / len(ranking) + gdro.sft_weight * sum(regularizer) / len(regularizer),
            "ranking_loss": sum(ranking) / len(ranking),
            "best_error": sum(regularizer) / len(regularizer),
            "implicit_top1_accuracy": sum(accuracy) / len(accuracy),
            "grad_norm": float(norm),
            "lr": lr,
        }
