"""Flow-GRPO: fine-tune a text-to-image model toward rewards with group-relative policy optimization.

Each training step draws `batch_size / group_size` prompts, samples `group_size` images of each with a stochastic
sampler (Flow-SDE / CPS / Dance-SDE for flow models, DDIM-η for ε-models) while recording every transition's
log-prob, scores the images, turns rewards into group advantages, and then, for a subset of the stochastic steps,
recomputes each transition's log-prob under the current weights and descends

    loss = E[max(-A·r, -A·clip(r, 1 - ε, 1 + ε))] + β·KL,   r = exp(log p_θ - log p_old),

where KL is the closed-form KL between the Gaussian steps of the policy and of the reference model (the denoiser
with its LoRA disabled; a frozen copy for full fine-tuning): ‖μ_θ - μ_ref‖² / (2σ²), averaged over dimensions
like the log-probs. With one optimizer step per batch every ratio is 1 on the first pass (`ratio` statistics are
logged every step to check it).

The GRPO variants are options of this one loop: DanceGRPO (`sampling.sampler: dance-sde`, `sampling.shared_noise`,
`grpo.best_worst_only`, `grpo.timestep_fraction`), DenseGRPO (`grpo.dense`: per-step advantages from step rewards;
`sampling.noise_table`: the calibrated ψ(t)), Adv-GRPO (a trainable `adv-dino` reward co-trained against
`references`), value-anchored (`grpo.value_weight`) and Beta-normalized (`grpo.advantage: bnpo`) advantages.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import convert_outputs_to_fp32, gather_object, set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from align_diffusion.files import folder_problem, write_folder_atomically, write_text_atomically
from align_diffusion.launch import WORLD_SIZES, launched_processes
from align_diffusion.gallery.run import EVAL_DIR, build_run_page, eval_folder, eval_folders, read_metrics
from align_diffusion.models import PipelineAdapter, PromptEmbeds, adapter_for, load_adapter
from align_diffusion.models.base import DTYPES, compile_repeated_blocks, native_bf16, recorded_model_options
from align_diffusion.names import SEED_LIMIT
from align_diffusion.rewards import Reward, load_reward
from align_diffusion.rewards.simple import ShapesReward
from align_diffusion.rewards.spec import WeightedRewards, score_terms
from align_diffusion.rewards.transforms import combine, group_advantages, unscored_if_infinite
from align_diffusion.sampling.folder import SampleFolder, json_safe, reward_record, settings_record
from align_diffusion.sampling.loop import (
    DEFAULT_NOISE_LEVEL,
    LARGEST_NOISE_LEVEL,
    Trajectory,
    check_guidance,
    noisy_steps,
    resolve_settings,
    sample,
    sample_images,
    step_log_prob,
)
from align_diffusion.training import checkpoint
from align_diffusion.rewards.dense import dense_step_rewards
from align_diffusion.training.advantages import best_worst_mask, dense_advantages
from align_diffusion.training.config import (
    MODEL_OPTION_FIELDS, ConfigError, TrainConfig, model_options, noise_drawing_steps, save_config, to_dict, validate,
)
from align_diffusion.training.lora import add_lora, export_lora
from align_diffusion.training.noise_table import calibrate_step, read_table
from align_diffusion.training.prompts import PromptSource, ReferenceSource

# Seed offset of the groups' shared initial noise, apart from every image's own stream: torch's CPU generator reads a
# seed's low 32 bits (2**40 gave a group's first image its own stream, whose first SDE noise then equalled its start).
SHARED_NOISE_STREAM = 2**31


# --- the objective -----------------------------------------------------------------------------------------------


def trained_step_count(fraction: float, stochastic_steps: int) -> int:
    """⌈fraction · stochastic_steps⌉, at least 1; the product is rounded first, so that 0.28 · 25 (7.000000000000001
    in floats) trains 7 steps, not 8."""
    return max(1, math.ceil(round(fraction * stochastic_steps, 9)))


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range: float, adv_clip_max: float):
    """Per-image PPO loss max(-A·r, -A·clip(r, 1 ± ε)) with A clipped to ±adv_clip_max; also returns r."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def gaussian_kl(mean, ref_mean, std) -> torch.Tensor:
    """Per-image KL(N(mean, σ²) ‖ N(ref_mean, σ²)) = (mean - ref_mean)² / (2σ²), averaged over dimensions."""
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean) ** 2).mean(dim=dims) / (2 * torch.as_tensor(std).reshape(-1) ** 2)


# --- pieces of the loop ------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One process's share of a step's images, their trajectories concatenated."""

    trajectory: Trajectory
    rewards: torch.Tensor  # (B_local,) combined reward; NaN where a reward could not score an image
    each: dict[str, torch.Tensor]  # each reward's own scores
    prompts: list[str]  # the prompt of every image of the step, all processes
    step_deltas: torch.Tensor | None = None  # (B_local, T) step rewards ΔR_t, with grpo.dense



def set_aside_diverged(rollouts: Rollouts) -> None:
    """Images whose trajectory left the finite numbers (a diverged sample) get NaN rewards, so are masked out of the
    loss, and zeros for latents and log-probs: a masked image still runs through the training forward pass, where a
    NaN would poison every weight's gradient (0 · NaN is NaN)."""
    trajectory = rollouts.trajectory
    steps = trajectory.log_probs[:, trajectory.stochastic_steps]
    # min and max are non-finite when any value is: no per-value mask of every latent of every step
    extremes = torch.cat([torch.stack(torch.aminmax(trajectory.latents.flatten(1), dim=1), 1), steps], 1)
    diverged = ~torch.isfinite(extremes).all(1)
    if not diverged.any():
        return
    rollouts.rewards[diverged] = math.nan
    for scores in rollouts.each.values():
        scores[diverged] = math.nan
    if rollouts.step_deltas is not None:
        rollouts.step_deltas[diverged] = math.nan
    trajectory.latents[diverged] = 0.0
    trajectory.log_probs[diverged.nonzero(), torch.tensor(trajectory.stochastic_steps, dtype=torch.long)] = 0.0


def _joined(layout: dict) -> str:
    """A `GRPOTrainer.layout` in words."""
    return f"under DeepSpeed on {layout['num_processes']} processes" if layout["deepspeed"] else "without DeepSpeed"


def _cat_embeds(parts: list[PromptEmbeds]) -> PromptEmbeds:
    def cat(dicts):
        return {name: torch.cat([d[name] for d in dicts]) for name in dicts[0]}

    uncond = None if parts[0].uncond is None else cat([p.uncond for p in parts])
    return PromptEmbeds(cat([p.cond for p in parts]), uncond)


def _cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]
    return Trajectory(
        prompts=[p for t in parts for p in t.prompts],
        latents=torch.cat([t.latents for t in parts]),
        log_probs=torch.cat([t.log_probs for t in parts]),
        pred_x0=torch.cat([t.pred_x0 for t in parts]),
        stochastic_steps=first.stochastic_steps,
        schedule=first.schedule,
        embeds=_cat_embeds([t.embeds for t in parts]),
        sampler=first.sampler,
        noise_level=first.noise_level,
        guidance_scale=first.guidance_scale,
        images=torch.cat([t.images for t in parts]),
    )


class EMA:
    """Exponential moving average of the trained parameters, updated every `every` optimizer steps. Its decay warms
    up as diffusers' `EMAModel` and Flow-GRPO's do: min(decay, (1 + n) / (10 + n)) at optimizer step n (from 0), so
    the average does not stay near the initial weights for the first ~1 / (1 - decay) updates."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1):
        self.params, self.decay, self.every = params, decay, every
        self.shadow = [p.detach().clone() for p in params]
        self.optimizer_steps = 0

    @torch.no_grad()
    def update(self):
        """Called after each optimizer step."""
        n, self.optimizer_steps = self.optimizer_steps, self.optimizer_steps + 1
        if self.optimizer_steps % self.every:
            return
        decay = min(self.decay, (1 + n) / (10 + n))
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach(), 1 - decay)

    def save(self, path: Path, names: list[str]) -> None:
        save_file({n: s.cpu().contiguous() for n, s in zip(names, self.shadow)}, str(path),
                  metadata={"optimizer_steps": str(self.optimizer_steps)})

    def load(self, path: Path, names: list[str]) -> None:
        with safe_open(str(path), "pt") as saved:
            steps = (saved.metadata() or {}).get("optimizer_steps")
            if steps is None:  # its decay had no warm-up: the average would go on otherwise than it began
                raise ValueError(f"{path} was written before the EMA counted its optimizer steps; resume it with "
                                 "the version that wrote it, or start a new output_dir")
            for shadow, name in zip(self.shadow, names):
                shadow.copy_(saved.get_tensor(name))
        self.optimizer_steps = int(steps)

    @contextmanager
    def applied(self):
        """The EMA weights swapped in for the duration (exchanged a tensor at a time, so full fine-tuning holds no
        third copy of the trained weights)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self):
        for param, shadow in zip(self.params, self.shadow):
            held = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(held)


# --- the trainer -------------------------------------------------------------------------------------------------


# What a resumed run may set otherwise than the run that wrote its checkpoint: where it writes, how long it runs,
# what it logs and evaluates, and settings that leave its results as they were. Any other change would make the
# resumed run a different run than its checkpoint's, so it is refused.
RESUME_MAY_CHANGE = ("output_dir", "resume_from", "max_steps", "max_minutes", "checkpoint_every", "checkpoints_kept",
                     "log_with", "device", "async_rewards", "sampling.batch_size", "grpo.train_batch_size",
                     "optim.gradient_checkpointing", "optim.compile", "grpo.ratio_warn")


def changed_settings(earlier: dict, current: dict) -> list[str]:
    """The flat setting keys whose values differ, each compared as a tracker holds it (a list or None as its text,
    which is how a checkpoint records it; a GDRO set of an earlier version held them as they are). A record an
    earlier version wrote may lack keys added since: their settings had the default then. A key derived from others
    (a noise table's levels) is compared where both hold it. LoRA's target modules are compared as a set: peft wraps
    every module whose name matches one of them, in the model's order, whatever order the list has."""
    earlier, current, defaults = (json.loads(json.dumps(_flat(settings)))
                                  for settings in (earlier, current, to_dict(TrainConfig())))
    for settings in (earlier, current, defaults):
        if isinstance(settings.get("lora.target_modules"), str):
            settings["lora.target_modules"] = sorted(set(ast.literal_eval(settings["lora.target_modules"])))
    keys = earlier.keys() & current.keys() | current.keys() & defaults.keys()
    return [key for key in sorted(keys) if earlier.get(key, defaults.get(key)) != current[key]]


NO_NOISE_TO_CALIBRATE = ("sampling.sampler: noise calibration balances the noise a stochastic sampler draws; the ode "
                         "sampler draws none")


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after finishing its step in progress and writing a checkpoint of it."""

    def __init__(self, signum: int | None, step: int, output_dir: Path, agreed: int | None = None):
        self.signum, self.step, self.output_dir = signum, step, output_dir  # signum None: another process's
        self.agreed = agreed or signum  # the signal every process of a run stops for (its exit status tells it)
        received = signal.Signals(signum).name if signum is not None else "another process's stop signal"
        super().__init__(f"{received} received: stopped after step {step} with its checkpoint; continue with "
                         f"resume_from=latest (output_dir {output_dir})")


class StopSignals:
    """While open, the first Ctrl-C (SIGINT) or SIGTERM only asks the loop to stop after the step in progress (which
    it checkpoints); one more, a second or longer after it, acts as it would have without this. Signals within that
    second count as one: a launcher forwards the Ctrl-C its processes also got from the terminal. Only the main
    thread takes signals: in any other thread this does nothing; nor for a signal the process was started ignoring
    (a job started with `&` from a script ignores Ctrl-C)."""

    def __init__(self, log):
        self.log = log
        self.received: int | None = None
        self.received_at = 0.0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGINT, signal.SIGTERM)
                             if signal.getsignal(signum) is not signal.SIG_IGN}
        return self

    def handle(self, signum, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self.received_at >= 1.0:
                self.restore()
                signal.raise_signal(signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        self.log(f"{signal.Signals(signum).name}: stopping after this step and checkpointing it "
                 f"(send it again to stop at once)")

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


class GRPOTrainer:
    """Holds the model, reward, optimizer and state of one run; `train()` runs it. `adapter`, when given, is the
    model to train instead of loading `config.model` (benchmarks build random-weight architectures in memory)."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None,
                 adapter: PipelineAdapter | None = None):
        self.config = config
        auto_precision = config.optim.mixed_precision == "auto"
        if auto_precision:  # resolved once, so the saved config and a resume hold which
            config.optim.mixed_precision = "bf16" if native_bf16(config.device) else "no"
        self.output_dir = Path(config.output_dir)
        trackers = usable_trackers(config.log_with)
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            raise ValueError("FSDP is not supported: it replaces the denoiser's parameters by sharded ones, which the "
                             "trainer's clipping, EMA and checkpoints do not read; train a LoRA under DDP, or "
                             "fine-tune fully under DeepSpeed ZeRO-2 (configs/accelerate/)")
        launched = launched_processes()
        asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` was given, or "no"
        if accelerator is None and asked not in ("no", config.optim.mixed_precision):
            raise ConfigError(f"optim.mixed_precision is {config.optim.mixed_precision!r}, but the launcher asks for "
                              f"{asked!r} (--mixed_precision or its config file): the training config decides, so set "
                              f"optim.mixed_precision={asked} or launch with --mixed_precision no")
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if deepspeed and config.algorithm == "gdro":  # DeepSpeed steps inside each of a GDRO step's group backwards
            raise ConfigError("algorithm: gdro runs in one plain process, where DeepSpeed brings nothing; launch it "
                              "without a DeepSpeed config")
        if deepspeed and config.optim.mixed_precision == "fp16":
            raise ConfigError("optim.mixed_precision: fp16 under DeepSpeed would need its loss scaling, which casts "
                              "the whole model (trained weights too) to fp16; use bf16 or no")
        self.accelerator = accelerator or Accelerator(
            # Under DeepSpeed accelerate autocasts nothing and has DeepSpeed cast the whole model to bf16 instead: the
            # float32 inputs then fail, and LoRA weights kept float32 would train in bf16. `autocast` does it there.
            mixed_precision="no" if deepspeed else config.optim.mixed_precision, log_with=trackers or None,
            project_dir=str(self.output_dir),
            # Several plain processes on a machine without CUDA are joined on the CPU, by gloo. DeepSpeed needs GPUs
            # to join them, and on the CPU would silently run each alone: that is refused below.
            cpu=config.device == "cpu" or (launched > 1 and not torch.cuda.is_available() and not deepspeed),
            step_scheduler_with_optimizer=False,  # else it steps once per process for each optimizer step
        )
        if auto_precision:
            self.log(f"optim.mixed_precision auto: {config.optim.mixed_precision} (bfloat16 "
                     f"{'computed in hardware' if config.optim.mixed_precision == 'bf16' else 'would be emulated'} "
                     f"on {self.accelerator.device})")
        if (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
                and not any(name in os.environ for name in WORLD_SIZES)):
            warnings.warn("`accelerate launch --cpu` was asked for several processes, and its simple launcher starts "
                          "one: this run trains in that one. To join several on the CPU, launch with --multi_gpu "
                          "(joined by gloo) instead of --cpu")
        if launched != self.accelerator.num_processes:  # each would run the whole job into the same output_dir
            raise ValueError(f"the launcher started {launched} processes, but accelerate joined "
                             f"{self.accelerator.num_processes} (DeepSpeed joins processes on GPUs; on the "
                             "CPU launch with --multi_gpu, which joins them by gloo)")
        validate(config, self.accelerator.num_processes)
        set_seed(config.seed)
        self.prompts = PromptSource(config.prompts)
        self.eval_prompts = PromptSource(config.eval.prompts, "eval.prompts")
        self.references = ReferenceSource(config.references) if config.references else None
        if self.references is not None:
            try:
                self.references.check_prompts(self.prompts.all())
            except ValueError as error:
                raise ConfigError(f"{error} (prompts {config.prompts!r})") from None

        device = config.device or self.accelerator.device
        self.reward = loaded_reward("reward", config.reward, device)  # before the model: its errors come sooner
        if self.reward.needs_reference:
            raise ValueError(f"reward {self.reward.name} needs reference images, which this trainer does not provide")
        terms = zip(self.reward.keys, self.reward.rewards) if isinstance(self.reward, WeightedRewards) else [
            (self.reward.name, self.reward)]
        self.trainable_rewards = {key: reward for key, reward in terms if reward.trainable}
        watched = config.eval.rewards if config.eval.every else None  # a run that never evaluates loads no model
        self.watched_reward = loaded_reward("eval.rewards", watched, device) if watched else None
        table = config.sampling.noise_table
        self.noise_levels = (read_table(table, config.sampling.num_steps, config.sampling.sampler) if table
                             else config.sampling.noise_level)
        self.resume_path = self.check_resume()  # before the model loads: a resume that cannot go on fails now
        self.eval_judge = ShapesReward() if config.eval.every and config.eval.shapes_eval else None
        checks = [("prompts", self.prompts, self.reward)]
        if config.eval.every:
            checks += [("eval.prompts", self.eval_prompts, r) for r in (self.reward, self.watched_reward) if r]
            eval_images = len(self.eval_prompts.all()) * config.eval.num_images_per_prompt
            if config.eval.seed + eval_images > SEED_LIMIT:  # eval image k is seeded eval.seed + k
                raise ConfigError(f"eval.seed: the {eval_images} eval images are seeded eval.seed + k, which must stay "
                                  f"below 2**32; give at most {SEED_LIMIT - eval_images}")
            if eval_images < self.accelerator.num_processes:
                raise ConfigError(f"eval.prompts: {eval_images} eval images for {self.accelerator.num_processes} "
                                  "processes, which share them; give more prompts or eval.num_images_per_prompt")
        if self.eval_judge is not None:
            checks.append(("eval.shapes_eval judges shapes-world prompts only: eval.prompts", self.eval_prompts,
                           self.eval_judge))
        for field, source, reward in checks:
            try:
                reward.check_prompts(source.all())
            except ValueError as error:
                raise ConfigError(f"{field}: {error}") from None
        if adapter is None:
            adapter = load_adapter(config.model, dtype=DTYPES[config.dtype], device=str(device),
                                   **model_options(config))
        else:
            options = model_options(config)
            configured = adapter_for(adapter.pipe, **options)
            for option, field in MODEL_OPTION_FIELDS.items():
                if getattr(configured, option) != getattr(adapter, option):
                    raise ConfigError(f"{field} {options[option]} asks for an adapter with {option}="
                                      f"{getattr(configured, option)}; the adapter given has {option}="
                                      f"{getattr(adapter, option)} (adapter_for(pipe, {option}=...))")
        self.adapter: PipelineAdapter = adapter
        sampling = config.sampling
        try:  # a size the model cannot take (SD3's position table, FLUX's patches) fails now, not at a rollout
            settings = resolve_settings(adapter, sampling.sampler, sampling.num_steps, sampling.guidance_scale,
                                        self.noise_levels, sampling.height, sampling.width)
        except ValueError as error:
            raise ConfigError(f"sampling: {error} (model {config.model})") from None
        for field, reward in (("reward", self.reward), ("eval.rewards", self.watched_reward),
                              ("eval.shapes_eval", self.eval_judge)):
            try:
                if reward is not None:
                    reward.check_size(settings.height, settings.width)
            except ValueError as error:
                raise ConfigError(f"{field}: {error} (sampling.height and sampling.width, or the model's default size; "
                                  f"model {config.model})") from None
        window = range(*sampling.noise_window) if sampling.noise_window is not None else range(sampling.num_steps)
        sampling_schedule = adapter.schedule(settings.num_inference_steps, settings.height, settings.width)
        noisy = noisy_steps(adapter, sampling.sampler, sampling_schedule, settings.levels(), window)
        if config.algorithm == "grpo" and not noisy:
            raise ConfigError(f"sampling.noise_window: no step in [{window.start}, {window.stop}) draws noise with "
                              f"this model's scheduler (DDIM's last step does not where it sets ᾱ_prev to 1), and "
                              f"GRPO trains on those that do (model {config.model})")
        try:
            check_guidance(adapter, sampling.guidance_scale, sampling.negative_prompt)
        except ValueError as error:  # its message starts with the field's name
            raise ConfigError(f"sampling.{error} (model {config.model})") from None
        denoiser = self.adapter.denoiser
        # Only the denoiser trains: the encoders and VAE take no gradients (GDRO encodes prompts with them enabled).
        for component in self.adapter.pipe.components.values():
            if isinstance(component, torch.nn.Module) and component is not denoiser:
                component.requires_grad_(False)
        if config.lora.enabled:
            self.params = add_lora(self.adapter, config.lora.rank, config.lora.alpha, config.lora.target_modules)
            self.reference = None
        else:
            self.reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
            self.params = [p for p in denoiser.parameters()]
            denoiser.requires_grad_(True)
        if config.optim.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if config.optim.compile:
            for model in (denoiser, self.reference):  # the reference: full fine-tuning's frozen copy
                if model is not None:
                    compile_repeated_blocks(model)
        optimizer = torch.optim.AdamW(self.params, lr=config.optim.lr, betas=tuple(config.optim.betas),
                                      weight_decay=config.optim.weight_decay)
        warmup = config.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.num_micro = config.grpo.batch_size // self.accelerator.num_processes // config.grpo.train_batch_size
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:
            # No dataloader tells DeepSpeed the micro-batch. The trainer accumulates over micro-batches itself
            # (`accumulating`), so DeepSpeed's own accumulation is 1; the run's config sets the clipping.
            deepspeed.deepspeed_config.update(
                train_micro_batch_size_per_gpu=config.grpo.train_batch_size, gradient_accumulation_steps=1,
                train_batch_size=config.grpo.train_batch_size * self.accelerator.num_processes,
                gradient_clipping=config.optim.max_grad_norm or 0.0,
            )
            if config.optim.mixed_precision == "bf16":  # as accelerate wraps a model it autocasts (see `autocast`)
                denoiser.forward = convert_outputs_to_fp32(self.autocast()(denoiser.forward))
        self.model, self.optimizer, self.lr_schedule = self.accelerator.prepare(denoiser, optimizer, schedule)
        self.adapter.forward_module = self.model  # the distributed wrapper, when there is one, syncs gradients
        self.accelerator.register_save_state_pre_hook(self._save_trained_only)
        self.accelerator.register_load_state_pre_hook(self._load_trained_only)
        ema_decay, ema_every = config.optim.ema_decay, config.optim.ema_every
        self.ema = EMA(self.params, ema_decay, ema_every) if ema_decay > 0 else None
        self.step = 0
        self.train_seconds = 0.0  # wall-clock seconds of training steps (evaluations excluded)

    # --- checkpoints: only the trained weights, not the frozen base model ---------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters by name, in `self.params` order (the EMA's order too)."""
        denoiser = self.adapter.denoiser
        return {n: p.detach().cpu().contiguous() for n, p in denoiser.named_parameters() if p.requires_grad}

    def trained_names(self) -> list[str]:
        return [n for n, p in self.adapter.denoiser.named_parameters() if p.requires_grad]

    def _save_trained_only(self, models, weights, output_dir):
        weights.clear()
        if self.accelerator.is_main_process:
            save_file(self.trained_state(), str(Path(output_dir) / "trained.safetensors"))
            if self.ema is not None:
                self.ema.save(Path(output_dir) / "ema.safetensors", self.trained_names())
            state = self.reward.reward_state()
            if state:
                torch.save(state, Path(output_dir) / "reward_state.pt")

    def _load_trained_only(self, models, input_dir):
        models.clear()
        trained = load_file(str(Path(input_dir) / "trained.safetensors"))
        named = dict(self.adapter.denoiser.named_parameters())
        unexpected = set(trained) - set(named)
        if unexpected:
            raise ValueError(f"checkpoint {input_dir} holds weights this model lacks: {sorted(unexpected)[:3]}")
        missing = set(self.trained_names()) - set(trained)
        if missing:
            raise ValueError(f"checkpoint {input_dir} lacks weights this run trains: {sorted(missing)[:3]} (was "
                             "lora.target_modules changed?)")
        for name, value in trained.items():
            if value.shape != named[name].shape:
                raise ValueError(f"checkpoint {input_dir} holds {name} of shape {tuple(value.shape)}, this run trains "
                                 f"it at {tuple(named[name].shape)} (was lora.rank changed?)")
        with torch.no_grad():
            for name, value in trained.items():
                named[name].copy_(value)
        if self.ema is not None:
            self.ema.load(Path(input_dir) / "ema.safetensors", self.trained_names())
        reward_state = Path(input_dir) / "reward_state.pt"
        if reward_state.exists():
            self.reward.load_reward_state(torch.load(reward_state, weights_only=False))

    def save_checkpoint(self) -> None:
        partial = checkpoint.partial_dir(self.output_dir, self.step)
        if self.accelerator.is_main_process:
            checkpoint.begin(partial)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(partial), **self.checkpoint_options(saving=True))
        except (OSError, RuntimeError) as error:  # torch names a full disk "basic_ios::clear: iostream error"
            shutil.rmtree(partial, ignore_errors=True)
            raise OSError(f"writing the checkpoint of step {self.step} to {partial} failed (disk full?): "
                          f"{error}") from error
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.commit(partial, {"step": self.step, "data_position": self.step,
                                        "train_seconds": self.train_seconds, "config": self.settings(),
                                        "layout": self.layout()}, self.config.checkpoints_kept)
        self.accelerator.wait_for_everyone()

    def settings(self) -> dict:
        """The run's flat settings as its checkpoints record them (JSON values): the config, and what the run read
        of files that may change while their paths stay: a noise table's levels, the training prompts and a
        reference folder's images (digests)."""
        settings = _flat(to_dict(self.config))
        if self.config.sampling.noise_table:
            settings["sampling.noise_table_levels"] = self.noise_levels
        settings["prompts_sha256"] = hashlib.sha256("\n".join(self.prompts.all()).encode()).hexdigest()
        if self.references is not None and self.references.digest is not None:
            settings["references_sha256"] = self.references.digest
        return json.loads(json.dumps(settings))

    def layout(self) -> dict:
        """How the run's processes were joined, as far as its checkpoints depend on it: DeepSpeed's are its own
        files, its optimizer state sharded over its processes; a plain or DDP checkpoint resumes on any count."""
        return {"deepspeed": self.under_deepspeed,
                "num_processes": self.accelerator.num_processes if self.under_deepspeed else None}

    def check_resume(self) -> Path | None:
        """The checkpoint `resume_from` names (None: none, or `latest` with none yet), once checked: it holds the
        state of a stateful reward, and the run that wrote it had this run's settings (RESUME_MAY_CHANGE aside)."""
        config = self.config
        if config.resume_from is None:
            return None
        try:
            path = checkpoint.resolve_resume(config.resume_from, self.output_dir)
        except FileNotFoundError as error:
            raise ConfigError(f"{error} (resume_from takes latest or a checkpoint folder)") from None
        if path is None:
            return None
        if self.reward.stateful and not (path / "reward_state.pt").is_file():  # a fresh head would replace it
            raise ConfigError(f"resume_from: {path} has no reward_state.pt, which the reward {config.reward} keeps; "
                              "resume from a checkpoint of this run")
        if config.optim.ema_decay > 0 and not (path / "ema.safetensors").is_file():
            raise ConfigError(f"resume_from: {path} has no ema.safetensors, which this run's EMA (optim.ema_decay) "
                              "goes on from; resume from a checkpoint of this run")
        # Checkpoints written before they recorded their run's settings are checked against output_dir's config.
        state, saved = checkpoint.read_trainer_state(path), self.output_dir / "config.yaml"
        written, current = state.get("layout", self.layout()), self.layout()  # no layout: written before they had one
        if written != current:
            raise ConfigError(f"resume_from: {path} was written {_joined(written)}, and this run is launched "
                              f"{_joined(current)}: launch it as its checkpoints were written")
        if state["step"] > config.max_steps:  # its weights went past this run's end: exporting them would mislead
            raise ConfigError(f"max_steps: {config.max_steps} is below the step of {path}, {state['step']}; resume "
                              "from an earlier checkpoint or raise max_steps")
        if "config" in state:
            run, settings = f"the run that wrote {path}", state["config"]
        elif saved.is_file():
            run = f"the run in {self.output_dir}"
            settings = _flat(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
        else:
            return path
        current = self.settings()
        # Settings the earlier run held but never read (refused since): leaving them out changes none of its steps
        unread = {"grpo.reward_range": settings.get("grpo.advantage") != "bnpo",
                  "grpo.value_anchor": not settings.get("grpo.value_weight")}
        changed = [key for key in changed_settings(settings, current)
                   if key not in RESUME_MAY_CHANGE and not key.startswith("eval.") and not unread.get(key)]
        if changed:
            raise ConfigError("; ".join(f"{key}: {run} was trained with {settings.get(key)}, not {current.get(key)}"
                                        for key in changed) + "; resume it with its own settings, or start a new "
                              "output_dir")
        return path

    def maybe_resume(self) -> None:
        """Loads the checkpoint `resume_from` names and drops what the run logged and saved after it (metrics,
        checkpoints, evaluations): those steps run again. `latest` with no checkpoint yet starts over."""
        if self.config.resume_from is None:
            return
        path = self.resume_path
        if path is not None:
            self.accelerator.load_state(str(path), **self.checkpoint_options(saving=False))
            state = checkpoint.read_trainer_state(path)
            self.step, self.train_seconds = state["step"], state.get("train_seconds", 0.0)
        metrics_file = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process:
            # The abandoned steps' export goes first (this run writes its own), then their checkpoints, newest
            # first (else `latest` would pick the abandoned run), then their metrics: cut short, what is left is one
            # run up to its newest checkpoint, which a resume from `latest` goes on from.
            later = [c for c in checkpoint.completed_checkpoints(self.output_dir)
                     if checkpoint.checkpoint_step(c) > self.step]
            if later:
                for export in ("lora", "pipeline"):
                    shutil.rmtree(self.output_dir / export, ignore_errors=True)
            for abandoned in reversed(later):
                checkpoint.discard(abandoned)
            checkpoint.clear_cut_short(self.output_dir)
            kept = []
            if metrics_file.exists():  # a row of step 0 (the first eval) is rewritten by a run that starts over
                kept = [row for row in read_metrics(self.output_dir) if path is not None and row["step"] <= self.step]
                write_text_atomically(metrics_file, "".join(json.dumps(json_safe(row), allow_nan=False) + "\n"
                                                            for row in kept))  # all rows, or none lost
            for step, folder in eval_folders(self.output_dir).items():
                if step > self.step:
                    shutil.rmtree(folder)
                    for page in (self.output_dir / EVAL_DIR).glob(f"step-*/compare-{folder.name}.html"):
                        page.unlink()  # the first evaluation's page of it
            if kept and (self.output_dir / "index.html").exists():
                build_run_page(self.output_dir, only_stale=True)  # its plots and rows, without the dropped steps
        self.accelerator.wait_for_everyone()
        self.log(f"resumed from {path} at step {self.step}" if path is not None else
                 f"no checkpoint in {self.output_dir} yet: starting over")

    # --- small helpers ------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    @property
    def under_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    def checkpoint_options(self, saving: bool) -> dict:
        """What `save_state` / `load_state` pass DeepSpeed for a LoRA run: its module file would hold the frozen
        base model too (gigabytes at full size), so it is left out, and loaded without (trained.safetensors holds
        the trained weights); nothing otherwise."""
        if not self.under_deepspeed or not self.config.lora.enabled:
            return {}
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}

    def autocast(self):
        """optim.mixed_precision's autocast: accelerate's, or under DeepSpeed (where accelerate's is off) torch's."""
        if self.under_deepspeed and self.config.optim.mixed_precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    @contextmanager
    def accumulating(self, last: bool):
        """A backward inside this block adds to the gradients; only the update's last one exchanges them between
        processes (DDP) and lets DeepSpeed, which steps its optimizer inside that backward, step."""
        if last:
            yield
            return
        state = self.accelerator.gradient_state
        with self.accelerator.no_sync(self.model):
            state._set_sync_gradients(False)  # what accelerate's DeepSpeed backward reads
            try:
                yield
            finally:
                state._set_sync_gradients(True)

    @contextmanager
    def reference_model(self):
        """The adapter predicts with the reference weights inside this block."""
        if self.reference is None:
            self.adapter.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.adapter.denoiser.enable_adapters()
        else:
            self.adapter.forward_module = self.reference
            try:
                yield
            finally:
                self.adapter.forward_module = self.model

    def owned_images(self, rank: int | None = None) -> list[range]:
        """The indices, within a step, of the images process `rank` (default this one) samples and trains on: its
        share of each update's images (`grpo.updates_per_step`), so that every update trains on the same images
        whatever the number of processes."""
        config, processes = self.config.grpo, self.accelerator.num_processes
        per_update = config.batch_size // config.updates_per_step
        share = per_update // processes
        rank = self.accelerator.process_index if rank is None else rank
        return [range(start, start + share) for start in range(rank * share, config.batch_size, per_update)]

    def gathered(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's `local` (B_local, …) on this process's device, in the step's image order."""
        together = self.accelerator.gather(local.to(self.accelerator.device))
        order = [i for rank in range(self.accelerator.num_processes) for images in self.owned_images(rank)
                 for i in images]
        in_order = torch.empty_like(together)
        in_order[torch.tensor(order, device=together.device)] = together
        return in_order

    def image_seeds(self, step: int, count: int, offset: int = 0) -> list[int]:
        """Seeds of images offset … offset + count of step `step`: distinct for every (seed, step, image)."""
        base = (self.config.seed * 1_000_003 + step) * self.config.grpo.batch_size
        return [base + offset + k for k in range(count)]

    # --- one step ------------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollouts:
        """Samples this process's share of the step's images and scores them (scoring overlaps sampling)."""
        config, sampling = self.config, self.config.sampling
        group = config.grpo.group_size
        prompts = self.prompts.draw(config.seed, step, config.grpo.batch_size // group)
        per_image = [p for p in prompts for _ in range(group)]
        window = None if sampling.noise_window is None else range(*sampling.noise_window)
        parts, futures, deltas = [], [], []
        # Dense step rewards score completions with the reward in this thread: no second thread beside it.
        overlap = config.async_rewards and config.grpo.dense is None
        executor = ThreadPoolExecutor(max_workers=1) if overlap else None
        self.adapter.denoiser.eval()
        try:
            with self.autocast():
                chunks = [(offset, min(sampling.batch_size, images.stop - offset)) for images in self.owned_images()
                          for offset in range(images.start, images.stop, sampling.batch_size)]
                for offset, count in chunks:
                    for future in futures:  # a batch the reward failed on stops the step now, not once all sampled
                        if future.done():
                            future.result()
                    chunk_prompts = per_image[offset : offset + count]
                    generators = [torch.Generator().manual_seed(s) for s in self.image_seeds(step, count, offset)]
                    latents = self.shared_noise(step, offset, count) if sampling.shared_noise else None
                    part = sample(
                        self.adapter, chunk_prompts, sampler=sampling.sampler, noise_level=self.noise_levels,
                        num_inference_steps=sampling.num_steps, guidance_scale=sampling.guidance_scale,
                        noise_window=window, generators=generators, latents=latents, height=sampling.height,
                        width=sampling.width, negative_prompt=sampling.negative_prompt,
                    )
                    parts.append(part)
                    if config.grpo.dense is not None:
                        deltas.append(dense_step_rewards(self.adapter, part, self.reward, mode=config.grpo.dense,
                                                         max_batch=sampling.batch_size).deltas)
                    if executor is None:  # out of autocast, like the worker thread (autocast is per thread) and eval
                        with torch.autocast(self.accelerator.device.type, enabled=False):
                            futures.append(_done(score_terms(self.reward, part.images, chunk_prompts)))
                    else:
                        futures.append(executor.submit(score_terms, self.reward, part.images, chunk_prompts))
            results = [f.result() for f in futures]
        finally:
            if executor is not None:  # after a failed batch, the ones queued behind it are not sent
                executor.shutdown(cancel_futures=True)
        each = {name: torch.cat([r[1][name] for r in results]) for name in results[0][1]}
        rollouts = Rollouts(_cat_trajectories(parts), torch.cat([r[0] for r in results]), each, per_image,
                            torch.cat(deltas) if deltas else None)
        set_aside_diverged(rollouts)
        return rollouts

    def shared_noise(self, step: int, offset: int, count: int) -> torch.Tensor:
        """Initial noise of images offset … offset + count where each group shares its first image's noise, drawn
        from a stream of its own (the images' generators then give only the SDE noise)."""
        group, sampling = self.config.grpo.group_size, self.config.sampling
        height, width = self.adapter.image_size(sampling.height, sampling.width)
        leaders = [(offset + k) // group * group for k in range(count)]
        generators = [torch.Generator().manual_seed(self.image_seeds(step, 1, leader)[0] + SHARED_NOISE_STREAM)
                      for leader in leaders]
        return self.adapter.initial_noise(generators, height, width)

    def advantages(self, rollouts: Rollouts) -> tuple[torch.Tensor, dict]:
        """Group advantages over the whole step (all processes), and this process's slice of them."""
        config = self.config.grpo
        # An infinite reward counts as unscored, like NaN, as the transforms read it: here so that it is counted in
        # nan_rewards and kept out of the logged reward means
        rewards = unscored_if_infinite(self.gathered(rollouts.rewards).cpu())
        group_ids = torch.arange(len(rewards)) // config.group_size
        num_groups = len(rewards) // config.group_size
        each = {name: unscored_if_infinite(self.gathered(scores).cpu()) for name, scores in rollouts.each.items()}
        raw = rewards  # the weighted sum, as logged
        if config.log_tame is not None or config.normalize_each:
            weighted = isinstance(self.reward, WeightedRewards)
            weights = dict(zip(self.reward.keys, self.reward.weights)) if weighted else {self.reward.name: 1.0}
            rewards = combine(each, weights, group_ids=group_ids, log_tame_cv=config.log_tame,
                              normalize_each=config.normalize_each)
        if config.dense is not None:  # (B, T): each stochastic step normalized within its group, 0 elsewhere
            deltas = unscored_if_infinite(self.gathered(rollouts.step_deltas).cpu())
            stochastic = rollouts.trajectory.stochastic_steps
            advantages = torch.zeros_like(deltas)
            zero_variance = torch.zeros_like(deltas, dtype=torch.bool)
            advantages[:, stochastic], zero_variance[:, stochastic], zero = dense_advantages(
                deltas[:, stochastic], group_ids, config.advantage, rewards=raw)
            zero_fraction = zero / (num_groups * max(1, len(stochastic)))
        else:
            result = group_advantages(rewards, group_ids, config.advantage, absolute_weight=config.value_weight,
                                      anchor=config.value_anchor, reward_range=tuple(config.reward_range))
            advantages, zero_fraction = result.advantages.clone(), result.num_zero_variance_groups / num_groups
            # The value-anchored term gives a group that does not vary a signal of its own: keep it in the loss.
            zero_variance = result.zero_variance & (config.value_weight == 0)
        # Masked out of the loss (NaN), as Flow-GRPO drops them: a group without spread has no policy signal, and
        # left in it would still pay the KL term and dilute the others' share of the mean.
        advantages[zero_variance] = float("nan")
        if config.best_worst_only:
            advantages[~best_worst_mask(rewards, group_ids)] = float("nan")  # masked out of the loss
        # Dense advantages are per step; the deterministic steps' are zeros that are never trained on.
        trained = advantages[:, rollouts.trajectory.stochastic_steps] if advantages.ndim == 2 else advantages
        stats = {
            "reward_mean": _nanmean(raw), "reward_std": _nanstd(raw),
            "nan_rewards": int(torch.isnan(raw).sum()),
            "zero_std_fraction": zero_fraction,
            "advantage_abs_mean": _nanmean(trained.abs()),
            "advantage_std": _nanstd(trained),
        }
        if config.dense is not None:  # a step reward of an unscored completion or x̂0: masked, and counted here
            stats["nan_step_rewards"] = int(torch.isnan(deltas[:, stochastic]).sum())
        for name, gathered in each.items():
            stats[f"reward/{name}_mean"], stats[f"reward/{name}_std"] = _nanmean(gathered), _nanstd(gathered)
        owned = [i for images in self.owned_images() for i in images]
        return advantages[owned].float(), stats

    def calibrate_noise(self, rounds: int, eps1: float, eps2: float) -> list[float]:
        """DenseGRPO's ψ(t) (see `training/noise_table.py`): `rounds` calibration rounds of this run's rollouts,
        starting from its noise levels; returns one level per step. Needs `grpo.dense`."""
        if self.config.grpo.dense is None:
            raise ValueError("noise calibration reads step rewards: set grpo.dense to ode or x0")
        if self.config.sampling.sampler == "ode":
            raise ValueError(NO_NOISE_TO_CALIBRATE)
        steps = self.config.sampling.num_steps
        levels = self.noise_levels
        if not isinstance(levels, list):
            levels = [DEFAULT_NOISE_LEVEL[self.config.sampling.sampler] if levels is None else levels] * steps
        drawing = noise_drawing_steps(self.config.sampling)
        for round_index in range(rounds):
            self.noise_levels = levels
            rollouts = self.rollout(round_index)
            deltas = unscored_if_infinite(self.gathered(rollouts.step_deltas).cpu())
            unscored = int((~deltas.isfinite()).all(dim=1).sum())
            if unscored == len(deltas):
                raise ValueError(f"calibration round {round_index + 1}: every trajectory diverged or went unscored, "
                                 "so no step reward says which way to move its noise level; lower the noise levels "
                                 "(sampling.noise_level or the table's) or the guidance")
            calibrated = calibrate_step(levels, deltas, eps1, eps2, LARGEST_NOISE_LEVEL[self.config.sampling.sampler])
            # A step that draws no noise at any level (outside the noise window, or CPS's last) says nothing of its
            # level; one at level 0 among those that can is calibrated, so that it can rise again.
            levels = [new if t in drawing else old for t, (old, new) in enumerate(zip(levels, calibrated))]
            left_out = f" ({unscored} of {len(deltas)} trajectories unscored: diverged or refused)" if unscored else ""
            self.log(f"round {round_index + 1}/{rounds}: ψ = [{', '.join(f'{v:.3f}' for v in levels)}]{left_out}")
        return levels

    def update_trainable_rewards(self, rollouts: Rollouts, step: int) -> dict:
        """A co-training round of each trainable reward (Adv-GRPO): the step's images of every process against
        references for its prompts, on the reward's own schedule; every process makes the same update."""
        if not self.trainable_rewards:
            return {}
        images = self.gathered(rollouts.trajectory.images)
        references = self.references.draw(rollouts.prompts, self.config.seed, step).to(images.device)
        stats = {}
        for key, reward in self.trainable_rewards.items():
            scores = self.gathered(rollouts.each[key])
            losses = reward.maybe_update(images, references, scores, steps=self.config.reward_updates)
            stats[f"reward/{key}_updated"] = int(bool(losses))
            if losses:
                stats[f"reward/{key}_loss"] = sum(losses) / len(losses)
        return stats

    def train_timesteps(self, step: int, stochastic: list[int]) -> list[int]:
        """The stochastic steps trained on this step: a random subset of `trained_step_count` of them."""
        count = trained_step_count(self.config.grpo.timestep_fraction, len(stochastic))
        order = torch.randperm(len(stochastic), generator=torch.Generator().manual_seed(self.config.seed + step))
        return sorted(stochastic[i] for i in order[:count].tolist())

    def update(self, rollouts: Rollouts, advantages: torch.Tensor, step: int) -> dict:
        """`updates_per_step` optimizer steps over the rollouts; returns loss, KL, ratio and clip statistics."""
        config = self.config.grpo
        trajectory = rollouts.trajectory
        timesteps = self.train_timesteps(step, trajectory.stochastic_steps)
        if advantages.ndim == 1:  # one advantage per image: the same for each of its steps
            advantages = advantages[:, None].expand(-1, trajectory.log_probs.shape[1])
        valid = ~torch.isnan(advantages)
        micro_per_update = self.num_micro // config.updates_per_step
        images_per_update = micro_per_update * config.train_batch_size
        processes = self.accelerator.num_processes
        ratios, clipped, kls, grad_norms, rates = [], [], [], [], []
        loss_sum, loss_count, trained_pairs = 0.0, 0.0, 0.0
        before_update = []  # the ratios of the first update, computed before any optimizer step: all exactly 1
        self.adapter.denoiser.train()
        for update in range(config.updates_per_step):
            # Each trained step averages over the update's valid images of all processes (the gradients are
            # averaged over processes, hence the factor), whatever micro-batch they fall in.
            update_valid = valid[update * images_per_update : (update + 1) * images_per_update][:, timesteps]
            counts = self.accelerator.reduce(update_valid.sum(0).float().to(self.accelerator.device), "sum").cpu()
            if not counts.sum():  # no process trains on any of this update's images: no optimizer step (Flow-GRPO
                continue  # drops them before batching), which every process, from the same counts, agrees on
            trained_pairs += float(counts.sum())
            for micro in range(micro_per_update):
                first = (update * micro_per_update + micro) * config.train_batch_size
                index = torch.arange(first, first + config.train_batch_size)
                for term, j in enumerate(timesteps):
                    mask = valid[index, j].float()
                    adv = torch.nan_to_num(advantages[index, j]).to(self.accelerator.device)
                    last = micro == micro_per_update - 1 and term == len(timesteps) - 1
                    with self.accumulating(last), self.autocast():
                        out = step_log_prob(self.adapter, trajectory, j, index)
                        old = trajectory.log_probs[index, j].to(out.log_prob)
                        policy, ratio = clipped_policy_loss(out.log_prob, old, adv, config.clip_range,
                                                            config.adv_clip_max)
                        loss_per_image = policy
                        if config.kl_beta > 0:
                            with torch.no_grad(), self.reference_model():
                                ref = step_log_prob(self.adapter, trajectory, j, index)
                            kl = gaussian_kl(out.mean, ref.mean, out.std)
                            loss_per_image = policy + config.kl_beta * kl
                            kls.append(kl.detach()[mask.bool()])
                        masked_sum = (loss_per_image * mask.to(loss_per_image.device)).sum()
                        loss = masked_sum * processes / max(1.0, float(counts[term])) / len(timesteps)
                        self.accelerator.backward(loss)
                    ratios.append(ratio.detach()[mask.bool()])
                    if update == 0:
                        before_update.append(ratios[-1])
                    clipped.append(((ratio.detach() - 1).abs() > config.clip_range)[mask.bool()].float())
                    loss_sum, loss_count = loss_sum + masked_sum.detach(), loss_count + float(mask.sum())
            # DeepSpeed has stepped (clipping as its config says) inside the last backward and freed the gradients:
            # only its engine knows their norm, which accelerate's clip_grad_norm_ returns.
            if self.config.optim.max_grad_norm is not None or self.under_deepspeed:
                norm = self.accelerator.clip_grad_norm_(self.params, self.config.optim.max_grad_norm or 0.0)
            else:
                self.accelerator.unscale_gradients()  # under fp16 the gradients hold the loss scale until now
                norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))
            grad_norms.append(float(norm))
            rates.append(self.lr_schedule.get_last_lr()[0])
            self.optimizer.step()
            self.lr_schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        # Statistics of what all processes trained on: NaN (null in metrics.jsonl) when nothing was.
        ratio = torch.cat(ratios) if ratios else torch.empty(0)
        first = torch.cat(before_update) if before_update else torch.ones(0)
        kl = torch.cat(kls) if kls else torch.empty(0)
        clip = torch.cat(clipped) if clipped else torch.empty(0)
        device = self.accelerator.device
        totals = self.accelerator.reduce(torch.tensor(
            [float(loss_sum), loss_count, float(kl.sum()), len(kl), float(clip.sum()), len(clip), float(ratio.sum()),
             len(ratio)], device=device), "sum").tolist()
        loss_total, loss_count, kl_total, kl_count, clip_total, clip_count, ratio_total, ratio_count = totals
        extremes = torch.tensor([float(ratio.max()) if len(ratio) else -math.inf,
                                 -float(ratio.min()) if len(ratio) else -math.inf,
                                 float((first - 1).abs().max()) if len(first) else 0.0], device=device)
        ratio_max, minus_ratio_min, deviation = self.accelerator.gather(extremes).view(-1, 3).amax(0).tolist()
        stats = {
            "loss": loss_total / loss_count if loss_count else math.nan,  # per trained (image, step)
            "kl": kl_total / kl_count if kl_count else math.nan,  # of the trained pairs; NaN without the KL term
            "clip_fraction": clip_total / clip_count if clip_count else math.nan,
            "ratio_mean": ratio_total / ratio_count if ratio_count else math.nan,
            "ratio_min": -minus_ratio_min if ratio_count else math.nan,
            "ratio_max": ratio_max if ratio_count else math.nan,
            "first_ratio_max_deviation": deviation,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else math.nan,
            "lr": sum(rates) / len(rates) if rates else self.lr_schedule.get_last_lr()[0],  # the rates it used
            "train_timesteps": len(timesteps),
            # The (image, step) pairs of all processes in the loss: NaN advantages (unscored images, groups
            # without spread, DanceGRPO's middle images) are masked out.
            "trained_fraction": trained_pairs / (len(valid) * self.accelerator.num_processes * len(timesteps)),
        }
        if deviation > config.ratio_warn and self.accelerator.is_main_process:
            warnings.warn(f"step {step}: the first ratio deviates from 1 by {deviation:.2e} (> grpo.ratio_warn "
                          f"{config.ratio_warn}): rollouts and training disagree (dtype, batch composition or "
                          "stale weights)", stacklevel=2)
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict:
        """ODE samples of the eval prompts at eval steps with fixed seeds: reward means and, optionally, ShapesEval.
        Each process samples and scores its share of the images; every process then holds all of them."""
        config, sampling = self.config.eval, self.config.sampling
        prompts = self.eval_prompts.all()
        per_image = [p for p in prompts for _ in range(config.num_images_per_prompt)]
        settings = resolve_settings(self.adapter, "ode", config.num_steps, sampling.guidance_scale, None,
                                    sampling.height, sampling.width)
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        first, end = len(per_image) * rank // processes, len(per_image) * (rank + 1) // processes
        mine = per_image[first:end]
        self.adapter.denoiser.eval()
        with self.ema.applied() if self.ema is not None else nullcontext(), self.autocast():
            images = sample_images(self.adapter, mine, seed=config.seed + first, batch_size=sampling.batch_size,
                                   sampler="ode", negative_prompt=sampling.negative_prompt, **asdict(settings))
        total, each = score_terms(self.reward, images, mine)
        if self.watched_reward is not None:  # a term of the trained reward keeps its own scores
            each = {**score_terms(self.watched_reward, images, mine)[1], **each}
        if processes > 1:  # the images travel at the 8-bit levels they are saved at, a quarter of their floats
            shares = gather_object([(PipelineAdapter.levels(images).to(torch.uint8), total.cpu(),
                                     {name: scores.cpu() for name, scores in each.items()})])
            images = torch.cat([levels for levels, _, _ in shares]) / 255
            total = torch.cat([scores for _, scores, _ in shares])
            each = {name: torch.cat([terms[name] for _, _, terms in shares]) for name in each}
        result = {"eval/reward_mean": _nanmean(total)}
        result.update({f"eval/{name}_mean": _nanmean(s) for name, s in each.items()})
        made_with = {"model": self.config.model, **settings_record("ode", settings, sampling.negative_prompt),
                     "reward": self.config.reward,
                     **recorded_model_options(type(self.adapter), model_options(self.config))}
        records = [{"prompt": p, "seed": config.seed + k, "rewards": reward_record(each, k), **made_with}
                   for k, p in enumerate(per_image)]
        if config.shapes_eval:
            from align_diffusion.world.evaluate import shapes_eval

            report = shapes_eval(per_image, self.adapter.as_saved(images))
            result["eval/shapes_strict"] = report["overall_strict"]
            result["eval/shapes_strict_se"] = report["overall_strict_se"]
            result["eval/shapes_graded"] = report["graded"]
            result.update({f"eval/shapes_{c}": v for c, v in report["per_category_strict"].items()})
            result.update({f"eval/shapes_pass@{k}": v["overall"] for k, v in report["pass_at_k"].items() if k != "1"})
            for record, judged in zip(records, report["per_image"]):
                record["shapes_strict"] = judged["strict"]
        if self.accelerator.is_main_process:
            with SampleFolder(eval_folder(self.output_dir, self.step)) as folder:
                for image, record in zip(self.adapter.to_pil(images), records):
                    folder.add(image, record)
        return result

    def training_step(self, step: int) -> dict:
        """Rollouts, advantages, the policy update and the trainable rewards' round; returns the step's stats."""
        rollouts = self.rollout(step)
        advantages, stats = self.advantages(rollouts)
        stats.update(self.update(rollouts, advantages, step))
        stats.update(self.update_trainable_rewards(rollouts, step))
        return stats

    # --- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Runs until `max_steps`; returns the folder of the exported LoRA (or full pipeline)."""
        config, accelerator = self.config, self.accelerator
        check_output_dir(config)
        saved = self.output_dir / "config.yaml"
        accelerator.wait_for_everyone()  # every process has looked before the main one writes
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, saved)
        self.maybe_resume()
        # A resumed run's TensorBoard writer hides the values the steps it runs again had logged (all of them when it
        # starts over).
        purge_step = self.step + 1 if self.resume_path is not None else 0
        tensorboard = {} if config.resume_from is None else {"tensorboard": {"purge_step": purge_step}}
        accelerator.init_trackers(config.algorithm, config=_flat(to_dict(config)), init_kwargs=tensorboard)
        metrics_file = self.output_dir / "metrics.jsonl"
        eval_every = config.eval.every
        if self.evaluation_missing(metrics_file):  # step 0's, or a resumed step's that a stop signal cut short
            self.record_evaluation(metrics_file, self.evaluate())
            if accelerator.is_main_process:
                build_run_page(self.output_dir, only_stale=True)
        steps = range(self.step, config.max_steps)
        if self.step >= config.max_steps:
            self.log(f"step {self.step} already reaches max_steps {config.max_steps}: no step to train")
        elif self.agreed_stop(None)[0]:  # a resumed run that had already used its time
            self.log(f"max_minutes {config.max_minutes} already reached at step {self.step}: no step to train")
            steps = range(0)
        with tqdm(initial=self.step, total=config.max_steps, desc=config.algorithm,
                  disable=not accelerator.is_main_process) as bar, StopSignals(self.log) as signals:
            for step in steps:
                started = time.monotonic()  # not the wall clock, which a clock sync may set back or forward
                stats = self.training_step(step)
                self.step = step + 1
                seconds = time.monotonic() - started
                self.train_seconds += seconds
                bar.update(1)
                out_of_time, stop = self.agreed_stop(signals.received)
                last = self.step == config.max_steps or out_of_time
                stats = {"step": self.step, **stats, "seconds": round(seconds, 2),
                         "train_minutes": round(self.train_seconds / 60, 3)}
                if eval_every and (self.step % eval_every == 0 or last) and not stop:
                    stats.update(self.evaluate())
                self.record(metrics_file, stats)
                if "eval/reward_mean" in stats and accelerator.is_main_process:
                    build_run_page(self.output_dir, only_stale=True)
                bar.set_postfix({key: f"{stats[key]:.3g}" for key in ("reward_mean", "loss", "kl") if key in stats})
                checkpointed = last or stop or (config.checkpoint_every and self.step % config.checkpoint_every == 0)
                if checkpointed:
                    self.save_checkpoint()
                if not (stop or last):  # a signal during this step's evaluation or checkpoint stops it here
                    stop = self.agreed_stop(signals.received)[1]
                    if stop and not checkpointed:
                        self.save_checkpoint()
                if stop:
                    accelerator.end_training()
                    raise TrainingInterrupted(signals.received, self.step, self.output_dir, stop)
                if out_of_time:
                    self.log(f"stopping after step {self.step}: {self.train_seconds / 60:.1f} training minutes "
                             f"reached max_minutes {config.max_minutes}")
                    break
        result = self.export()
        accelerator.end_training()
        return result

    def agreed_stop(self, received: int | None) -> tuple[bool, int | None]:
        """(out of time, the stop signal) as every process sees them, so that all stop after the same step: the
        main process's training seconds against max_minutes (the others' clocks also hold their waits for its
        evaluations), and the stop signal any process `received` (the larger number where two differ; None)."""
        if self.accelerator.num_processes == 1:
            spent, signum = self.train_seconds, received or 0
        else:
            seconds = self.train_seconds if self.accelerator.is_main_process else 0.0
            flags = self.accelerator.gather(torch.tensor([[seconds, float(received or 0)]],
                                                         device=self.accelerator.device))
            spent, signum = float(flags[:, 0].sum()), int(flags[:, 1].max())
        return self.config.max_minutes is not None and spent >= 60 * self.config.max_minutes, signum or None

    def evaluation_missing(self, metrics_file: Path) -> bool:
        """Whether the step the run starts from is due an evaluation (step 0, every eval.every steps, the last: by
        max_steps or, for a run already out of time, max_minutes) that its metrics row lacks, as the main process
        reads metrics.jsonl."""
        every = self.config.eval.every
        last = self.step == self.config.max_steps or (self.step > 0 and self.agreed_stop(None)[0])
        if not every or not (self.step % every == 0 or last):
            return False
        missing = 0.0
        if self.accelerator.is_main_process:
            rows = read_metrics(self.output_dir) if metrics_file.exists() else []
            missing = float(not any(row["step"] == self.step and "eval/reward_mean" in row for row in rows))
        if self.accelerator.num_processes > 1:  # every process takes part in the evaluation, or none
            flag = torch.tensor([missing], device=self.accelerator.device)
            missing = self.accelerator.reduce(flag, reduction="sum").item()
        return missing > 0

    def record_evaluation(self, metrics_file: Path, evaluation: dict) -> None:
        """Adds an evaluation of the current step to its metrics row (a new row at step 0)."""
        if not self.accelerator.is_main_process:
            return
        rows = read_metrics(self.output_dir) if metrics_file.exists() else []
        if not rows or rows[-1]["step"] != self.step:
            self.record(metrics_file, {"step": self.step, **evaluation})
            return
        rows[-1].update(json_safe(evaluation))
        write_text_atomically(metrics_file, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
        self.accelerator.log(evaluation, step=self.step)

    def record(self, metrics_file: Path, stats: dict) -> None:
        if self.accelerator.is_main_process:
            with metrics_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(stats), allow_nan=False) + "\n")  # NaN as null: strict JSON
            self.accelerator.log({k: v for k, v in stats.items() if k != "step"}, step=stats["step"])

    def export(self) -> Path:
        """The trained weights (EMA ones when EMA is on) as a diffusers LoRA folder, or the full pipeline."""
        folder = self.output_dir / ("lora" if self.config.lora.enabled else "pipeline")
        if not self.accelerator.is_main_process:
            return folder
        with self.ema.applied() if self.ema is not None else nullcontext():
            if self.config.lora.enabled:
                write_folder_atomically(folder, lambda partial: export_lora(self.adapter, partial))
            else:
                write_folder_atomically(folder, self.adapter.pipe.save_pretrained)
        self.log(f"saved {folder}")
        return folder


# What a run writes into output_dir besides checkpoints and metrics, after its config.yaml (written first).
RUN_OUTPUTS = ("index.html", EVAL_DIR, "plots", "lora", "pipeline")


def check_output_dir(config: TrainConfig) -> None:
    """Refuses an output_dir that cannot be a folder, and one that holds a run this one would mix with: any run when
    not resuming, another run's when resuming from a checkpoint elsewhere."""
    out, resume_from = Path(config.output_dir), config.resume_from
    if problem := folder_problem(out):
        raise ConfigError(f"output_dir: {problem}")
    if not (out / "config.yaml").is_file() and (clashing := [name for name in RUN_OUTPUTS if (out / name).exists()]):
        raise ConfigError(f"output_dir: {out} holds {', '.join(clashing)} but no config.yaml, so no run of this "
                          "trainer (a sample or eval folder, say), whose files the run would replace; choose another "
                          "output_dir")
    if not (checkpoint.completed_checkpoints(out) or (out / "metrics.jsonl").exists()):
        return
    if resume_from is None:  # its checkpoints would be pruned and its metrics mixed in
        raise ConfigError(f"output_dir: {out} already holds a run; continue it with resume_from=latest, or choose "
                          "another output_dir")
    if resume_from != "latest" and Path(resume_from).resolve().parent != (out / checkpoint.CHECKPOINTS).resolve():
        raise ConfigError(f"resume_from: {resume_from} is not a checkpoint of the run output_dir {out} holds, whose "
                          "steps after it would mix with this run's; continue that run with resume_from=latest, or "
                          "resume into another output_dir")


def train(config: TrainConfig) -> Path:
    """Runs the trainer `config.algorithm` names (grpo, or the offline gdro), once its output_dir is checked (before
    anything loads)."""
    check_output_dir(config)
    if config.algorithm == "gdro":
        from align_diffusion.training.gdro import GDROTrainer

        return GDROTrainer(config).train()
    return GRPOTrainer(config).train()


# --- utilities ----------------------------------------------------------------------------------------------------


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def loaded_reward(field: str, spec: str, device) -> Reward:
    """`load_reward(spec)`, its errors (a bad argument, a missing model folder) named as the config field."""
    try:
        return load_reward(spec, device=device)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{field}: {error}") from None


def _nanmean(x: torch.Tensor) -> float:
    return float(x[~torch.isnan(x)].float().mean()) if (~torch.isnan(x)).any() else float("nan")


def _nanstd(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)].float()
    return float(x.std(unbiased=False)) if len(x) else float("nan")


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested config as flat scalar key–values, for trackers' hyperparameter tables."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def usable_trackers(log_with: list[str]) -> list[str]:
    """The trackers of `log_with` that can log here: wandb only where it is installed, and TensorBoard in its place
    when it was the only one named, so that the run still logs its curves."""
    if "wandb" in log_with:
        try:
            import wandb  # noqa: F401
        except ImportError:
            others = [tracker for tracker in log_with if tracker != "wandb"] or ["tensorboard"]
            warnings.warn(f"log_with names wandb, which is not installed (pip install wandb); logging to "
                          f"{' and '.join(others)} only", stacklevel=3)
            return others
    return list(log_with)


