"""The Flow-GRPO trainer: its loss on hand-worked values, config errors, the on-policy ratio, LoRA export into
the stock pipeline, exact resume, and two CPU processes against one."""

import dataclasses
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from align_diffusion.cli import main
from align_diffusion.models import adapter_for, load_adapter
from align_diffusion.models.tiny import tiny_pipeline
from align_diffusion.rewards.base import Reward, RewardError
from align_diffusion.rewards.server import make_server
from align_diffusion.rewards.spec import load_reward
from align_diffusion.sampling.loop import sample_images, step_log_prob
from align_diffusion.training import checkpoint
from align_diffusion.training.config import ConfigError, describe_config, load_config, validate
from align_diffusion.training.grpo import (
    EMA,
    GRPOTrainer,
    StopSignals,
    TrainingInterrupted,
    clipped_policy_loss,
    gaussian_kl,
    train,
    trained_step_count,
)
from align_diffusion.world.evaluate import score_image
from training_helpers import interrupted_halfway, metrics, skipped_clip_embeds, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# The size the tiny pipelines sample by default, but FLUX's: its stock default is 256² (4096 image tokens)
TINY_SIZE = {"sampling.height": 32, "sampling.width": 32}


# --- the objective on hand-worked values -------------------------------------------------------------------------


def test_trained_step_count_is_the_ceiling_of_the_share():
    # 0.28 · 25 is 7.000000000000001 in floats: its ceiling, unrounded, would be 8.
    assert [trained_step_count(f, n) for f, n in [(0.28, 25), (0.5, 3), (0.01, 10), (1.0, 10), (0.99, 10)]] == [
        7, 2, 1, 10, 10]


def test_clipped_policy_loss_hand_worked():
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5), 0.0])
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, 1.0, -2.0, 10.0])
    loss, ratio = clipped_policy_loss(log_prob, old, advantages, clip_range=0.2, adv_clip_max=5.0)
    # ratios 1, 1.5, 0.5, 1; max(-A r, -A clip(r, 0.8, 1.2)); the last advantage is clipped to 5.
    assert torch.allclose(ratio, torch.tensor([1.0, 1.5, 0.5, 1.0]))
    assert torch.allclose(loss, torch.tensor([-1.0, -1.2, 1.6, -5.0]))


def test_clipped_policy_loss_gradient_is_zero_outside_the_clip():
    log_prob = torch.tensor([math.log(1.5), math.log(1.1)], requires_grad=True)
    loss, _ = clipped_policy_loss(log_prob, torch.zeros(2), torch.ones(2), clip_range=0.2, adv_clip_max=5.0)
    loss.sum().backward()
    # d(-r)/d log p = -r inside the clip range; the clipped branch has no gradient.
    assert torch.allclose(log_prob.grad, torch.tensor([0.0, -1.1]))


def test_gaussian_kl_hand_worked():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.zeros(2, 2)
    # ((1 + 4) / 2) / (2 · 0.25) = 5; identical means give 0.
    assert torch.allclose(gaussian_kl(mean, ref, torch.tensor(0.5)), torch.tensor([5.0, 0.0]))
    # Against the closed form KL of diagonal Gaussians summed over dims, divided by the dimension count.
    p = torch.distributions.Normal(mean[0], 0.5)
    q = torch.distributions.Normal(ref[0], 0.5)
    assert torch.isclose(gaussian_kl(mean[:1], ref[:1], torch.tensor(0.5))[0],
                         torch.distributions.kl_divergence(p, q).mean())


# --- configs fail before any compute -----------------------------------------------------------------------------


def test_unknown_key_is_named(saved):
    with pytest.raises(ConfigError, match="grpo.clip_rnage"):
        load_config(None, [f"model={saved['sd3']}", "grpo.clip_rnage=0.2"])


def test_group_size_must_divide_the_batch(saved):
    with pytest.raises(ConfigError, match="grpo.group_size 3 does not divide grpo.batch_size 8"):
        load_config(None, [f"model={saved['sd3']}", "grpo.group_size=3", "grpo.batch_size=8"])


def test_sampler_must_fit_the_model(saved):
    with pytest.raises(ConfigError, match="sampling.sampler 'ddim' does not fit a flow model"):
        load_config(None, [f"model={saved['sd3']}", "sampling.sampler=ddim"])
    with pytest.raises(ConfigError, match="sampling.sampler 'flow-sde' does not fit a diffusion"):
        load_config(None, [f"model={saved['sd']}"])
    with pytest.raises(ConfigError, match=r"sampling.sampler 'ode': GRPO trains on .* use one of \('ddim',\)"):
        load_config(None, [f"model={saved['sd']}", "sampling.sampler=ode"])


def test_wrong_type_is_named(saved, tmp_path):
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        load_config(None, [f"model={saved['sd3']}", "optim.lr=fast"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- model: x\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of keys to values at the top level, got a"):
        load_config(listed, ["max_steps=2"])


@pytest.mark.parametrize("override, message", [
    ("sampling.noise_level=0", "sampling.noise_level: GRPO trains on stochastic steps"),
    ("sampling.noise_level=.nan", "sampling.noise_level must be a finite number"),
    ("optim.warmup_steps=-2", "optim.warmup_steps must be >= 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be > 0"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers"),
    ("lora.alpha=0", "lora.alpha must be > 0"),
    ("optim.ema_every=0", "optim.ema_every must be >= 1, got 0"),
    ("optim.ema_every=8", "optim.ema_every: 8 sets how often an EMA updates, and optim.ema_decay is 0"),
    ("grpo.clip_range=.nan", "grpo.clip_range must be a finite number"),
    ("grpo.clip_range=1.5", "grpo.clip_range must lie in (0, 1), got 1.5"),
    ("model=''", "model is empty"),  # failed after loading, as a malformed hub id
    ("lora.target_modules=[]", "lora.target_modules is empty"),  # failed in peft after the model loaded
    ("grpo.reward_range=[0, 100]", "grpo.reward_range: only bnpo reads it, and grpo.advantage is zscore"),
    ("grpo.value_anchor=0.7", "grpo.value_anchor: only the value-anchored term reads it"),
    (["grpo.advantage=bnpo", "reward=jpeg"], "grpo.reward_range: bnpo maps [0, 1] to [0, 1], and jpeg scores −kB"),
    (["grpo.advantage=bnpo", "reward=jpeg:50=-1,jpeg=0.5"], "grpo.reward_range: bnpo maps [0, 1] to [0, 1]"),
    # The README's regularized reward sums to [0, 1.5], and stopped the run at its first image above 1
    (["grpo.advantage=bnpo", "reward=shapes,artifact:A=0.5"], "grpo.reward_range: bnpo maps [0, 1] to [0, 1], and "
                                                              "'shapes,artifact:A=0.5' scores in [0, 1.5]"),
    (["grpo.advantage=bnpo", "grpo.reward_range=[-1, 1]", "reward=clip:C,shapes=-1"], "and 'clip:C,shapes=-1' "
                                                                                       "scores in [-1, 2.5]"),
    (["grpo.advantage=bnpo", "reward=shapes,adv-dino:D=0.3", "references=shapes"],
     "grpo.advantage: bnpo maps rewards from a fixed grpo.reward_range, and 'shapes,adv-dino:D=0.3' holds a head"),
    ("gdro.beta=.nan", "gdro: tau and beta must be finite"),
    (["grpo.best_worst_only=true", "grpo.value_weight=0.5"], "grpo.best_worst_only: the value-anchored term keeps"),
    (["reward=shapes,adv-dino:D=0.3", "references=shapes", "reward_updates=0"], "reward_updates must be >= 1, got 0"),
    ("max_minutes=1:30", "max_minutes: expected float, got '1:30'"),  # not YAML 1.1's base-60 number 90
    ("sampling.negative_prompt=blurry #2", "override sampling.negative_prompt: YAML reads what follows '#' as a "
                                           "comment; quote the value to keep it"),  # not "blurry"
    ("sampling.negative_prompt=#2", "YAML reads what follows '#' as a comment"),  # not null
    ("grpo.reward_range=[1, 0]", "grpo.reward_range must be"),
    ("grpo.reward_range=[0, .inf]", "grpo.reward_range must be"),
    ("grpo.value_weight=.nan", "grpo.value_weight must be a finite number >= 0"),
    ("grpo.value_anchor=.nan", "grpo.value_anchor must be a finite number"),
    ("grpo.adv_clip_max=0", "grpo.adv_clip_max must be a finite number > 0, got 0.0"),
    ("max_minutes=.nan", "max_minutes must be a finite number > 0"),
    (f"optim.lr={10**400}", "optim.lr: an integer of 1329 bits is beyond any float"),  # an OverflowError traceback
    ("optim.lr=1" + "0" * 5000, "override optim.lr: Exceeds the limit (4300 digits)"),  # Python's int refuses it
    ("seed=-1", "seed must lie in [0, 2**32), got -1"),
    ("seed=4294967296", "seed must lie in [0, 2**32), got 4294967296"),
    ("eval.seed=-1", "eval.seed must lie in [0, 2**32), got -1"),
    (f"eval.seed={2**63}", f"eval.seed must lie in [0, 2**32), got {2**63}"),
    ("sampling.guidance_scale=.inf", "sampling.guidance_scale must be a finite number >= 0"),
    ("sampling.guidance_scale=-3", "sampling.guidance_scale must be a finite number >= 0"),
    ("eval.every=-1", "eval.every must be >= 0"),
    ("checkpoint_every=-5", "checkpoint_every must be >= 0"),
    ("grpo.ratio_warn=-1", "grpo.ratio_warn must be a finite number >= 0, got -1"),
    ("sampling.height=0", "sampling.height must be a positive number of pixels"),
    ("device=bogus", "device: "),
    ("eval.rewards=bogus", "eval.rewards: reward term 'bogus': unknown reward"),
    ("model=/no/such/folder", "model: /no/such/folder is no folder"),
    ("max_sequence_length=0", "max_sequence_length: must lie in [1, 512] (T5 tokens per prompt), got 0"),
    ("max_sequence_length=513", "max_sequence_length: must lie in [1, 512] (T5 tokens per prompt), got 513"),
    ("clip_skip=-1", "clip_skip: must be >= 0 (CLIP layers skipped from the end), got -1"),
    ("sampling.guidance_rescale=1.5", "sampling.guidance_rescale: must lie in [0, 1], got 1.5"),
    ("sampling.guidance_rescale=0.5", "sampling.guidance_rescale: StableDiffusion3Pipeline has no guidance_rescale"),
    ("sampling.true_cfg_scale=2", "sampling.true_cfg_scale: StableDiffusion3Pipeline has no true_cfg_scale"),
    (["sampling.sampler=cps", "sampling.noise_level=1.5"], "cps noise levels a must lie in [0, 1]"),
    (["algorithm=gdro", "sampling.sampler=ode", "sampling.noise_level=0.7"],
     "sampling.noise_level: the ode sampler draws no noise"),
    (["algorithm=gdro", "sampling.sampler=ode", "sampling.noise_window=[0,4]"],
     "sampling.noise_window: the ode sampler draws no noise, so a window would change nothing"),
    (["sampling.sampler=cps", "sampling.num_steps=3", "sampling.noise_window=[2,3]"], "CPS's last step draws no noise"),
])
def test_out_of_range_values_are_named(saved, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"model={saved['sd3']}", *(override if isinstance(override, list) else [override])])


def test_bnpo_takes_a_signed_reward_weighted_below_zero(saved):
    """jpeg=-0.01 scores +kB/100, never below 0: only bnpo's range check of the scores themselves applies."""
    load_config(None, [f"model={saved['sd3']}", "grpo.advantage=bnpo", "reward=jpeg=-0.01"])
    load_config(None, [f"model={saved['sd3']}", "grpo.advantage=bnpo", "reward=shapes,artifact:A=0.5",
                       "grpo.reward_range=[0, 1.5]"])  # the range that holds it
    # Weights summing to 1 in decimals: their floats' sum passes 1 by a rounding, which the scores' check allows too
    load_config(None, [f"model={saved['sd3']}", "grpo.advantage=bnpo",
                       "reward=shapes=0.34,shapes:strict=0.56,artifact:A=0.1"])


def test_a_sequence_length_for_a_model_without_t5_is_named(saved):
    load_config(None, [f"model={saved['sd3']}", "max_sequence_length=64"])
    with pytest.raises(ConfigError, match="StableDiffusionPipeline has no T5 text encoder: a max_sequence_length"):
        load_config(None, [f"model={saved['sd']}", "sampling.sampler=ddim", "max_sequence_length=64"])


def test_a_rescale_the_guidance_would_ignore_is_named(saved):
    sd = [f"model={saved['sd']}", "sampling.sampler=ddim", "sampling.guidance_rescale=0.5"]
    load_config(None, sd)  # at the default guidance, 4.5
    with pytest.raises(ConfigError, match="sampling.guidance_rescale: guidance 1.0 runs no classifier-free guidance"):
        load_config(None, [*sd, "sampling.guidance_scale=1"])


def test_compile_without_a_compiler_is_named(saved, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    with pytest.raises(ConfigError, match="optim.compile: torch.compile builds its kernels with a C/C"):
        load_config(None, [f"model={saved['sd3']}", "optim.compile=true"])
    load_config(None, [f"model={saved['sd3']}", "optim.compile=false"])


def test_combinations_that_cannot_run_are_named(saved, tmp_path):
    table = tmp_path / "psi.json"
    table.write_text(json.dumps({"noise_levels": [0.0, 0.0, 0.5, 0.5]}))
    with pytest.raises(ConfigError, match=re.escape("sampling.noise_table: GRPO trains on stochastic steps, and every "
                                                    "noise level within the noise window [0, 2) is 0")):
        load_config(None, [f"model={saved['sd3']}", f"sampling.noise_table={table}", "sampling.num_steps=4",
                           "sampling.noise_window=[0, 2]"])
    load_config(None, [f"model={saved['sd3']}", f"sampling.noise_table={table}", "sampling.num_steps=4"])
    with pytest.raises(ConfigError, match="grpo.advantage: bnpo normalizes rewards within grpo.reward_range"):
        load_config(None, [f"model={saved['sd3']}", "grpo.advantage=bnpo", "grpo.dense=x0"])
    with pytest.raises(ConfigError, match="algorithm: gdro runs in one process, got 2"):
        validate(load_config(None, [f"model={saved['sd3']}", "algorithm=gdro"]), num_processes=2)
    # An indexed device pins every process's models to one device, where accelerate gives each its own.
    with pytest.raises(ConfigError, match="device: cpu:0 would put every one of the 2 processes' models on one"):
        validate(load_config(None, [f"model={saved['sd3']}", "device=cpu:0"]), num_processes=2)
    validate(load_config(None, [f"model={saved['sd3']}", "device=cpu"]), num_processes=2)


def test_yaml_file_and_overrides(saved, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"# align-diffusion train {path}\nmodel: {saved['sd3']}\ngrpo:\n  group_size: 4\n")
    config = load_config(path, ["grpo.batch_size=16", "sampling.noise_window=[1, 3]"])
    assert (config.grpo.group_size, config.grpo.batch_size, config.sampling.noise_window) == (4, 16, [1, 3])
    assert load_config(path, "grpo.batch_size=32").grpo.batch_size == 32  # one string: one override, not letters


def test_yaml_reads_no_as_a_string_and_names_what_it_cannot_parse(saved, tmp_path):
    """`optim.mixed_precision=no` is what the presets tell CPUs without bfloat16 support to pass; YAML 1.1 would
    read it as False."""
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {saved['sd3']}\noptim:\n  mixed_precision: no\n")
    assert load_config(path).optim.mixed_precision == "no"
    config = load_config(None, [f"model={saved['sd3']}", "optim.mixed_precision=no", "async_rewards=false"])
    assert config.optim.mixed_precision == "no" and config.async_rewards is False
    with pytest.raises(ConfigError, match="optim.compile: expected bool, got 'yes'"):
        load_config(None, [f"model={saved['sd3']}", "optim.compile=yes"])
    with pytest.raises(ConfigError, match=r"override max_steps: not valid YAML"):
        load_config(None, [f"model={saved['sd3']}", "max_steps=[1"])
    path.write_text("max_steps: [1\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not valid YAML"):
        load_config(path)
    # A key given twice (a repeated section replaced the earlier one whole); YAML 1.1's octal 0123 (read as 83)
    # and its dates are no numbers or dates here
    path.write_text(f"model: {saved['sd3']}\nsampling: {{num_steps: 4}}\nmax_steps: 5\n"
                    "sampling: {guidance_scale: 2}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: key 'sampling' given twice\n  in .*, line 4"):
        load_config(path)
    with pytest.raises(ConfigError, match="seed: expected int, got '0123'"):
        load_config(None, [f"model={saved['sd3']}", "seed=0123"])
    assert load_config(None, [f"model={saved['sd3']}", "output_dir=2024-01-01"]).output_dir == "2024-01-01"
    path.write_text("1: a\nfoo: b\n")  # a number as a key: a TypeError sorting the unknown keys
    with pytest.raises(ConfigError, match="unknown key 1; valid keys here"):
        load_config(path)


def test_an_override_merges_into_its_section_and_refuses_what_yaml_would_drop(saved):
    base = [f"model={saved['sd3']}"]
    assert load_config(None, [*base, "seed=1", "seed=2"]).seed == 2  # the later one, as with flags
    merged = load_config("configs/shapes_grpo.yaml", ["sampling={num_steps: 4}"]).sampling
    assert merged == dataclasses.replace(load_config("configs/shapes_grpo.yaml").sampling, num_steps=4)
    for text, message in [("blurry\n#2", "YAML reads what follows '#' as a comment"),
                          ("blurry\n  more", "YAML folds the lines of an unquoted value into one")]:
        with pytest.raises(ConfigError, match=f"override sampling.negative_prompt: {message}"):
            load_config(None, [*base, f"sampling.negative_prompt={text}"])


def test_cuda_on_a_machine_without_it_is_named(saved):
    if torch.cuda.is_available():
        load_config(None, [f"model={saved['sd3']}", "device=cuda"])
    else:
        with pytest.raises(ConfigError, match="device: 'cuda', but torch sees no CUDA GPU"):
            load_config(None, [f"model={saved['sd3']}", "device=cuda"])
    # Devices torch parses but cannot run a model on here (they failed after the model loaded)
    with pytest.raises(ConfigError, match="device: 'meta' holds no data"):
        load_config(None, [f"model={saved['sd3']}", "device=meta"])
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="device: 'mps', but torch sees no mps device on this machine"):
            load_config(None, [f"model={saved['sd3']}", "device=mps"])


def test_a_launcher_precision_the_config_does_not_set_is_refused(saved, prompt_file, tmp_path, monkeypatch):
    """An explicit Accelerator argument overrides `accelerate launch --mixed_precision`: it must not be lost."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    config = load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run"))
    with pytest.raises(ConfigError, match="optim.mixed_precision is 'no', but the launcher asks for 'fp16'"):
        GRPOTrainer(config)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default: the config decides
    assert GRPOTrainer(config).accelerator.mixed_precision == "no"


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_and_the_run_records_which(saved, prompt_file,
                                                                                          tmp_path, capsys):
    """bfloat16 autocast on a CPU that emulates it (AVX2 only) made a shapes_grpo step over 12× slower than float32."""
    flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    expected = "bf16" if flags & {"avx512_bf16", "amx_tile"} else "no"
    config = load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, checkpoint_every=0,
                                              **{"optim.mixed_precision": "auto"}))
    # This process's own Accelerator (accelerate fixes the mixed-precision mode once per process): what is checked
    # is the config the run goes by and records.
    GRPOTrainer(config, accelerator=Accelerator(cpu=True)).train()
    assert f"optim.mixed_precision auto: {expected} " in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["mixed_precision"] == expected


def test_cli_reports_bad_config_without_traceback(saved):
    with pytest.raises(SystemExit, match="bad config: grpo.group_size 3 does not divide"):
        main(["train", f"model={saved['sd3']}", "grpo.group_size=3", "grpo.batch_size=8"])


def test_reward_and_prompt_errors_come_before_the_model_loads(saved, prompt_file, tmp_path, monkeypatch):
    """A pipeline folder with its model_index.json but no weights validates and would fail to load; the errors of
    the reward and of the eval prompts must come first, naming their fields."""
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    (hollow / "model_index.json").write_text((Path(saved["sd3"]) / "model_index.json").read_text())
    monkeypatch.delenv("ALIGN_DIFFUSION_REWARD_TOKEN", raising=False)
    overrides = tiny_overrides(hollow, prompt_file, tmp_path / "run")
    with pytest.raises(ConfigError, match="reward: .*no token"):
        GRPOTrainer(load_config(None, [*overrides, "reward=remote:http://127.0.0.1:9"]))
    with pytest.raises(ConfigError, match="reward: reward term 'jpeg:0': JPEG quality must be an integer from 1 to 95"):
        GRPOTrainer(load_config(None, [*overrides, "reward=jpeg:0"]))
    with pytest.raises(ConfigError, match="eval.rewards: .*no/such/artifact"):
        GRPOTrainer(load_config(None, [*overrides, "eval.every=5", "eval.rewards=artifact:/no/such/artifact"]))
    with pytest.raises(ConfigError, match="eval.prompts: '/no/prompts.txt' is neither"):  # in the config's check
        GRPOTrainer(load_config(None, [*overrides, "eval.prompts=/no/prompts.txt"]))
    outside = tmp_path / "outside.txt"
    outside.write_text("a red circle\na photo of a cat\n")
    with pytest.raises(ConfigError, match="prompts: reward shapes: not a shapes-world prompt: 'a photo of a cat'"):
        GRPOTrainer(load_config(None, [*overrides, "reward=jpeg,shapes=0.5", f"prompts={outside}"]))
    with pytest.raises(ConfigError, match="eval.prompts: reward shapes:strict: not a shapes-world prompt"):
        GRPOTrainer(load_config(None, [*overrides, "eval.every=5", "eval.rewards=shapes:strict",
                                       f"eval.prompts={outside}"]))
    with pytest.raises(OSError):  # and the hollow folder itself cannot load
        GRPOTrainer(load_config(None, overrides))
    with pytest.raises(OSError):  # a run that never evaluates loads no eval reward: the model is what fails
        GRPOTrainer(load_config(None, [*overrides, "eval.every=0", "eval.rewards=artifact:/no/such/artifact"]))


def test_a_size_the_model_cannot_take_fails_before_the_model_loads(saved, prompt_file, tmp_path):
    """Read from the model's configs: the tiny SD3 transformer's position table holds 96 × 96 patches of 2 × 2
    pixels."""
    for side, pixels, problem in (("height", 200, "must be at most 192 for this transformer (pos_embed_max_size 96)"),
                                  ("width", 33, "must be a positive multiple of 2 for this transformer (its patches)")):
        with pytest.raises(ConfigError, match=re.escape(f"sampling.{side}: {problem}, got {pixels} (model")):
            load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{f"sampling.{side}": pixels}))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_size_shapes_eval_cannot_judge_and_prompts_it_cannot_read_fail_before_any_rollout(saved, tmp_path):
    """The tiny SD3 samples 32×32, and ShapesEval judges 64×64 images of the world's grammar: the shapes reward, a
    watched shapes term and eval.shapes_eval each refuse it as the model loads, before any image."""
    world_prompts = tmp_path / "world.txt"
    world_prompts.write_text("a red circle\na green triangle\n")
    overrides = tiny_overrides(saved["sd3"], world_prompts, tmp_path)
    with pytest.raises(ConfigError, match=r"^reward: ShapesEval judges 64×64 shapes-world images, got 32×32 "
                                          r"\(sampling.height and sampling.width, or the model's default size"):
        GRPOTrainer(load_config(None, [*overrides, "reward=jpeg,shapes=0.5"]))
    with pytest.raises(ConfigError, match="^eval.rewards: ShapesEval judges 64×64 shapes-world images, "
                                          "got 32×48"):
        GRPOTrainer(load_config(None, [*overrides, "eval.every=5", "eval.rewards=shapes:strict",
                                       "sampling.width=48"]))
    with pytest.raises(ConfigError, match="^eval.shapes_eval: ShapesEval judges 64×64 shapes-world images"):
        GRPOTrainer(load_config(None, [*overrides, "eval.every=5", "eval.shapes_eval=true"]))
    outside = tmp_path / "outside.txt"
    outside.write_text("a red circle\na photo of a cat\n")
    with pytest.raises(ConfigError, match="^eval.shapes_eval judges shapes-world prompts only: eval.prompts: reward "
                                          "shapes: not a shapes-world prompt: 'a photo of a cat'"):
        GRPOTrainer(load_config(None, [*overrides, "eval.every=5", "eval.shapes_eval=true", f"eval.prompts={outside}"]))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_trainer_encodes_prompts_to_the_configured_t5_length(saved, prompt_file, tmp_path):
    config = load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_sequence_length=8))
    trainer = GRPOTrainer(config)
    assert trainer.adapter.max_sequence_length == 8
    with pytest.raises(ConfigError, match="max_sequence_length 8 asks for an adapter with max_sequence_length=8; "
                                          "the adapter given has max_sequence_length=256"):
        GRPOTrainer(config, adapter=adapter_for(trainer.adapter.pipe))
    unset = load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path))  # the pipeline's 256
    with pytest.raises(ConfigError, match="max_sequence_length None asks for an adapter with max_sequence_length="
                                          "256; the adapter given has max_sequence_length=8"):
        GRPOTrainer(unset, adapter=adapter_for(trainer.adapter.pipe, max_sequence_length=8))
    with pytest.raises(ConfigError, match="clip_skip 0 asks for an adapter with clip_skip=None; the adapter given "
                                          "has clip_skip=1"):
        GRPOTrainer(unset, adapter=adapter_for(trainer.adapter.pipe, clip_skip=1))


def test_clip_skip_and_guidance_rescale_condition_rollouts_and_evaluations(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd"], prompt_file, tmp_path, max_steps=1, clip_skip=1, **{
        "sampling.sampler": "ddim", "sampling.guidance_scale": 6.0, "sampling.guidance_rescale": 0.7,
        "eval.every": 1, "eval.num_steps": 2, "eval.num_images_per_prompt": 1})
    trainer = GRPOTrainer(load_config(None, overrides))
    assert (trainer.adapter.clip_skip, trainer.adapter.guidance_rescale) == (1, 0.7)
    # A rollout's prompts are encoded with the layer skipped, and its steps were drawn with the rescaled guidance.
    trajectory = trainer.rollout(0).trajectory
    step = trajectory.stochastic_steps[0]
    with torch.no_grad():
        expected = skipped_clip_embeds(trainer.adapter.pipe, trajectory.prompts, 1)
        rescaled = step_log_prob(trainer.adapter, trajectory, step).log_prob
        unrescaled = step_log_prob(adapter_for(trainer.adapter.pipe, clip_skip=1), trajectory, step).log_prob
    torch.testing.assert_close(trajectory.embeds.cond["encoder_hidden_states"], expected)
    torch.testing.assert_close(rescaled, trajectory.log_probs[:, step])
    assert (unrescaled - trajectory.log_probs[:, step]).abs().max() > 1e-3
    trainer.train()
    assert metrics(tmp_path)[-1]["first_ratio_max_deviation"] <= 1e-5
    # Step 0's evaluation, before any update, is the base model's ODE sample with both options.
    records = [json.loads(line) for line in (tmp_path / "eval/step-000000/metadata.jsonl").read_text().splitlines()]
    height, width = trainer.adapter.default_size  # as resolved, so that the page compares with `sample` folders'
    assert {key: records[0][key] for key in ("sampler", "noise_level", "steps", "guidance", "height", "width",
                                             "reward", "clip_skip", "guidance_rescale", "true_cfg_scale")} == {
        "sampler": "ode", "noise_level": 0.0, "steps": 2, "guidance": 6.0, "height": height, "width": width,
        "reward": "jpeg", "clip_skip": 1, "guidance_rescale": 0.7, "true_cfg_scale": None}
    saved_images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "eval/step-000000" / r["file"]),
                                                            dtype=np.float32) / 255).permute(2, 0, 1)
                                for r in records])
    options = dict(seed=10_000, num_inference_steps=2, guidance_scale=6.0)
    base = load_adapter(str(saved["sd"])).pipe  # loaded once, wrapped with each option set
    for clip_skip, rescale in [(1, 0.7), (None, 0.7), (1, None)]:
        images = sample_images(adapter_for(base, clip_skip=clip_skip, guidance_rescale=rescale),
                               [r["prompt"] for r in records], **options)
        assert ((saved_images - images).abs().max() <= 1 / 255) == ((clip_skip, rescale) == (1, 0.7))


def test_a_negative_prompt_conditions_rollouts_and_evaluations(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, **{
        "sampling.negative_prompt": "blurry", "eval.every": 1, "eval.num_steps": 2, "eval.num_images_per_prompt": 1})
    trainer = GRPOTrainer(load_config(None, overrides))
    trajectory = trainer.rollout(0).trajectory
    with torch.no_grad():  # the stock pipeline's own encoding of the negative prompt, as its __call__ makes it
        expected = trainer.adapter.pipe.encode_prompt(prompt=trajectory.prompts, prompt_2=None, prompt_3=None,
                                                      negative_prompt="blurry", do_classifier_free_guidance=True)[1]
    torch.testing.assert_close(trajectory.embeds.uncond["encoder_hidden_states"], expected)
    trainer.train()
    assert metrics(tmp_path)[-1]["first_ratio_max_deviation"] <= 1e-5
    # Step 0's evaluation, before any update, is the base model's ODE sample with the negative prompt.
    records = [json.loads(line) for line in (tmp_path / "eval/step-000000/metadata.jsonl").read_text().splitlines()]
    base = load_adapter(str(saved["sd3"]))
    options = dict(seed=10_000, num_inference_steps=2, guidance_scale=2.0)
    with_negative = sample_images(base, [r["prompt"] for r in records], negative_prompt="blurry", **options)
    without = sample_images(base, [r["prompt"] for r in records], **options)
    saved_images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "eval/step-000000" / r["file"]),
                                                            dtype=np.float32) / 255).permute(2, 0, 1)
                                for r in records])
    assert (saved_images - with_negative).abs().max() <= 1 / 255
    assert (saved_images - without).abs().max() > 2 / 255
    with pytest.raises(ConfigError, match="sampling.negative_prompt: guidance 1.0 runs no classifier-free guidance"):
        GRPOTrainer(load_config(None, [*overrides, "sampling.guidance_scale=1", f"output_dir={tmp_path / 'b'}"]))


def test_flux_trains_with_true_cfg_away_from_the_negative_prompt(prompt_file, tmp_path):
    model = tmp_path / "flux"
    tiny_pipeline("flux").save_pretrained(model)
    overrides = tiny_overrides(model, prompt_file, tmp_path / "run", max_steps=1, **{
        "sampling.guidance_scale": 3.5, "sampling.true_cfg_scale": 3.0, "sampling.negative_prompt": "blurry",
        "grpo.group_size": 2, "grpo.batch_size": 4, "grpo.train_batch_size": 2, "checkpoint_every": 0,
        "eval.every": 1, "eval.num_steps": 2, "eval.num_images_per_prompt": 1, **TINY_SIZE})
    trainer = GRPOTrainer(load_config(None, overrides))
    trainer.train()
    assert metrics(tmp_path / "run")[-1]["first_ratio_max_deviation"] <= 1e-5
    step0 = tmp_path / "run/eval/step-000000"
    records = [json.loads(line) for line in (step0 / "metadata.jsonl").read_text().splitlines()]
    saved_images = torch.stack([torch.from_numpy(np.asarray(Image.open(step0 / r["file"]), dtype=np.float32) / 255)
                                .permute(2, 0, 1) for r in records])
    options = dict(seed=10_000, num_inference_steps=2, guidance_scale=3.5, height=32, width=32)
    prompts = [r["prompt"] for r in records]
    base = load_adapter(str(model)).pipe
    true_cfg = sample_images(adapter_for(base, true_cfg_scale=3.0), prompts, negative_prompt="blurry", **options)
    distilled = sample_images(adapter_for(base), prompts, **options)
    assert (saved_images - true_cfg).abs().max() <= 1 / 255
    assert (saved_images - distilled).abs().max() > 2 / 255
    unset = [o for o in overrides if not o.startswith("sampling.negative_prompt")]
    with pytest.raises(ConfigError, match=re.escape("sampling.true_cfg_scale: FLUX's true classifier-free guidance "
                                                    "(3.0) steers away from a negative prompt, and none was given")):
        load_config(None, unset)


def test_print_config_prints_the_checked_config_with_its_documentation_and_trains_nothing(capsys, tmp_path,
                                                                                          monkeypatch):
    main(["train", str(REPO / "configs/shapes_grpo.yaml"), f"output_dir={tmp_path / 'run'}", "max_steps=5",
          "--print-config"])
    printed = capsys.readouterr().out
    assert "max_steps: 5  # training steps (one batch of rollouts each)\n" in printed
    assert "\n  clip_range: 0.0001  # PPO ratio clip ε\n" in printed
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="bad config: grpo.group_size 3 does not divide"):
        main(["train", str(REPO / "configs/shapes_grpo.yaml"), "grpo.group_size=3", "--print-config"])
    with pytest.raises(SystemExit, match="bad config: eval.prompts: .*nope.txt' is neither shapes:SPLIT nor a file"):
        main(["train", str(REPO / "configs/shapes_grpo.yaml"), f"eval.prompts={tmp_path / 'nope.txt'}",
              "--print-config"])
    # The first word is an override when no file has its name (as a path it lost the // in its value), and a
    # config file whose folder holds an '=' is a file
    capsys.readouterr()
    main(["train", "sampling.negative_prompt=low quality // blurry/", f"model={REPO / 'assets/world/sd3'}",
          "--print-config"])
    assert 'negative_prompt: "low quality // blurry/"' in capsys.readouterr().out
    (tmp_path / "lr=1").mkdir()
    shutil.copy(REPO / "configs/shapes_grpo.yaml", tmp_path / "lr=1" / "c.yaml")
    main(["train", str(tmp_path / "lr=1" / "c.yaml"), "--print-config"])
    assert "\nmax_steps: 100  #" in capsys.readouterr().out
    # Checked for the processes a launch starts: 4 of them share shapes_grpo's batch of 64 as 16 each, which its
    # train batch of 32 does not divide
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit, match="bad config: grpo.train_batch_size 32 does not divide the 16 images per"):
        main(["train", str(REPO / "configs/shapes_grpo.yaml"), "--print-config"])


def test_shipped_configs_load(tmp_path):
    # The GPU presets name prompt files the user supplies; their models are checked when they load (GPU runs).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    loaded = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert path.read_text().startswith("# "), f"{path.name} must start with the command that runs it"
        supplied = [] if "shapes" in path.name else [f"prompts={prompts}", f"eval.prompts={prompts}"]
        loaded[path.stem] = load_config(path, supplied)
        described = tmp_path / path.name  # what train --print-config prints reads back as the same config
        described.write_text(describe_config(loaded[path.stem]))
        assert load_config(described) == loaded[path.stem]
    unusual = load_config(None, ['sampling.negative_prompt="😀 \\"blurry\\" é\\t#x"', "optim.lr=1e-05"])
    described.write_text(describe_config(unusual))
    assert load_config(described) == unusual and unusual.sampling.negative_prompt == '😀 "blurry" é\t#x'
    assert len(loaded) == 9
    # The header's "paper's defaults": Flow-GRPO on SD3.5-M (group 24, 10 train / 40 eval steps, a = 0.7,
    # clip 1e-4, KL β 0.04, LoRA r32 / α64, lr 3e-4).
    sd35m = loaded["sd35m_grpo_geneval"]
    assert (sd35m.grpo.group_size, sd35m.sampling.num_steps, sd35m.eval.num_steps) == (24, 10, 40)
    assert (sd35m.sampling.sampler, sd35m.sampling.noise_level) == ("flow-sde", 0.7)
    assert (sd35m.grpo.clip_range, sd35m.grpo.kl_beta, sd35m.optim.lr) == (1e-4, 0.04, 3e-4)
    assert (sd35m.lora.rank, sd35m.lora.alpha) == (32, 64)
    assert sd35m.max_sequence_length == 128  # the T5 length Flow-GRPO's SD3 script encodes prompts with
    assert loaded["sd15_grpo_aesthetic"].sampling.sampler == "ddim"
    # Its header's Flow-GRPO pickscore_flux settings: group 24, 6 train / 28 eval steps, a = 0.9, no KL term,
    # advantages by the std over all images, EMA (Flow-GRPO's decay 0.9, updated every 8 steps).
    flux = loaded["flux_dev_grpo_pickscore"]
    assert (flux.grpo.group_size, flux.sampling.num_steps, flux.eval.num_steps) == (24, 6, 28)
    assert (flux.sampling.noise_level, flux.grpo.kl_beta, flux.grpo.advantage) == (0.9, 0.0, "global_std")
    assert (flux.optim.ema_decay, flux.optim.ema_every) == (0.9, 8) == (sd35m.optim.ema_decay, sd35m.optim.ema_every)
    assert (flux.lora.rank, flux.lora.alpha, len(flux.lora.target_modules)) == (64, 128, 12)
    assert flux.max_sequence_length == 128


# --- the loop ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(saved, prompt_file, tmp_path_factory):
    """Two steps on the tiny SD3 pipeline with a LoRA, a checkpoint after each."""
    out = tmp_path_factory.mktemp("run")
    config = load_config(None, tiny_overrides(saved["sd3"], prompt_file, out))
    trainer = GRPOTrainer(config)
    trainer.train()
    return trainer, out


def test_first_ratio_is_one_and_metrics_are_complete(trained):
    trainer, out = trained
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    lr = trainer.config.optim.lr
    assert lr == 1e-2 and trainer.config.optim.warmup_steps == 0  # tiny_overrides' rate, no warm-up
    for row in rows:
        assert row["first_ratio_max_deviation"] <= 1e-5
        for key in ("reward_mean", "reward_std", "advantage_abs_mean", "zero_std_fraction", "trained_fraction", "kl",
                    "clip_fraction", "ratio_mean", "grad_norm", "lr", "seconds", "reward/jpeg_mean"):
            assert key in row
        assert row["reward_mean"] == row["reward/jpeg_mean"]  # JPEG is the only reward term, weight 1
        # One update per step: every ratio is taken before the weights move, so none is clipped.
        assert row["clip_fraction"] == 0 and row["ratio_mean"] == pytest.approx(1, abs=1e-5)
        assert row["lr"] == lr  # no warm-up: the configured rate
    assert rows[0]["kl"] == 0  # a fresh LoRA is the reference model
    assert rows[1]["kl"] > 0


def test_lora_round_trip_into_the_stock_pipeline(trained, saved):
    trainer, out = trained
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key)
    generator = torch.Generator().manual_seed(3)
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, height=32, width=32, output_type="pt")
    ours = trainer.adapter.pipe("a red circle", generator=generator, **kwargs).images
    stock = load_adapter(str(saved["sd3"])).pipe
    plain = stock("a red circle", generator=torch.Generator().manual_seed(3), **kwargs).images
    stock.load_lora_weights(str(out / "lora"))
    reloaded = stock("a red circle", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert (reloaded - ours).abs().max() <= 1e-4
    assert (plain - ours).abs().max() > 1e-3  # the LoRA changed the model
    # diffusers passes the metadata whole to LoraConfig: fields of peft's newest config would fail in an older peft
    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as weights:
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert {key.removeprefix("transformer.") for key in metadata} <= {
        "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias"}
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (trainer.config.lora.rank,
                                                                               trainer.config.lora.alpha)


@pytest.mark.parametrize("family, sampler, guidance", [("flux", "flow-sde", 3.5), ("sdxl", "ddim", 2.0),
                                                      ("sd", "ddim", 2.0)])
def test_the_other_families_train_on_policy_and_their_lora_round_trips(prompt_file, tmp_path, family, sampler,
                                                                       guidance):
    model = tmp_path / family
    tiny_pipeline(family).save_pretrained(model)
    config = load_config(None, tiny_overrides(model, prompt_file, tmp_path / "run", max_steps=1, **{
        "sampling.sampler": sampler, "sampling.guidance_scale": guidance, **TINY_SIZE}))
    trainer = GRPOTrainer(config)
    trainer.train()
    assert metrics(tmp_path / "run")[-1]["first_ratio_max_deviation"] <= 1e-5  # rollout and recompute agree
    kwargs = dict(num_inference_steps=3, guidance_scale=guidance, height=32, width=32, output_type="pt")
    ours = trainer.adapter.pipe("a red circle", generator=torch.Generator().manual_seed(3), **kwargs).images
    stock = load_adapter(str(model)).pipe
    plain = stock("a red circle", generator=torch.Generator().manual_seed(3), **kwargs).images
    stock.load_lora_weights(str(tmp_path / "run" / "lora"))
    reloaded = stock("a red circle", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert (reloaded - ours).abs().max() <= 1e-4
    assert (plain - ours).abs().max() > 1e-3  # the LoRA changed the model
    if family == "flux":  # distilled guidance has no unconditional branch: refused before the model loads
        with pytest.raises(ConfigError, match=re.escape("sampling.negative_prompt: FLUX runs classifier-free guidance "
                                                        "only as true CFG (a true_cfg_scale > 1)")):
            load_config(None, tiny_overrides(model, prompt_file, tmp_path / "negative", **{
                "sampling.sampler": sampler, "sampling.guidance_scale": guidance, "sampling.negative_prompt": "x"}))


def test_resume_gives_identical_weights(trained, saved, prompt_file, tmp_path):
    _, straight = trained
    first = tmp_path / "halves"
    GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, first, max_steps=1))).train()
    GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, first, resume_from="latest"))).train()
    a = load_file(str(straight / "checkpoints" / "step-000002" / "trained.safetensors"))
    b = load_file(str(first / "checkpoints" / "step-000002" / "trained.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(first)] == [1, 2]
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume_from=latest"):
        GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, first, max_steps=3))).train()
    assert [r["step"] for r in metrics(first)] == [1, 2]


def test_a_folder_of_another_commands_output_is_refused_as_output_dir(saved, prompt_file, tmp_path):
    """A sample folder took the run's files beside its own, and its review page was replaced by the run's."""
    sample = tmp_path / "sample"
    (sample / "images").mkdir(parents=True)
    (sample / "metadata.jsonl").write_text("{}\n")
    (sample / "index.html").write_text("the samples' page")
    with pytest.raises(ConfigError, match="output_dir: .*sample holds index.html but no config.yaml, so no run of "
                                          "this trainer"):
        train(load_config(None, tiny_overrides(saved["sd3"], prompt_file, sample, max_steps=1)))
    assert sorted(path.name for path in sample.iterdir()) == ["images", "index.html", "metadata.jsonl"]
    assert (sample / "index.html").read_text() == "the samples' page"


def signalled_during_step(trainer: GRPOTrainer, step: int, times: int, seconds_apart: float = 0) -> None:
    """Sends SIGINT to this process `times` times as the trainer begins `step` (from 0), as Ctrl-C would."""
    run_step = trainer.training_step

    def training_step(index):
        for k in range(times if index == step else 0):
            time.sleep(seconds_apart if k else 0)
            signal.raise_signal(signal.SIGINT)
        return run_step(index)

    trainer.training_step = training_step


def test_ctrl_c_finishes_the_step_checkpoints_it_and_the_resumed_run_matches_a_straight_one(
        trained, saved, prompt_file, tmp_path):
    _, straight = trained
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, checkpoint_every=0)))
    signalled_during_step(trainer, 0, times=2)  # the second at once: a launcher forwarding the terminal's Ctrl-C
    with pytest.raises(TrainingInterrupted, match="SIGINT received: stopped after step 1") as stopped:
        trainer.train()
    assert stopped.value.step == 1 and stopped.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert [r["step"] for r in metrics(tmp_path)] == [1] and not (tmp_path / "lora").exists()
    GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, checkpoint_every=0,
                                                 resume_from="latest"))).train()
    a = load_file(str(straight / "checkpoints" / "step-000002" / "trained.safetensors"))
    b = load_file(str(tmp_path / "checkpoints" / "step-000002" / "trained.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_ctrl_c_during_an_evaluation_stops_after_its_step_not_the_next(saved, prompt_file, tmp_path):
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3,
                                                           checkpoint_every=0, **{"eval.every": 1,
                                                                                  "eval.num_steps": 2})))
    evaluate = trainer.evaluate

    def signalled_evaluation():
        if trainer.step == 1:
            signal.raise_signal(signal.SIGINT)
        return evaluate()

    trainer.evaluate = signalled_evaluation
    with pytest.raises(TrainingInterrupted, match="stopped after step 1"):
        trainer.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1] and "eval/reward_mean" in metrics(tmp_path)[1]


def test_resuming_another_runs_checkpoint_into_a_folder_holding_a_run_is_refused_before_loading(
        trained, saved, prompt_file, tmp_path):
    _, other = trained
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    # Refused before the reward (PickScore, not on this machine: loading it would fail) or the model loads.
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, reward="pickscore")
    with pytest.raises(ConfigError, match="resume_from: .* is not a checkpoint of the run output_dir .* continue"):
        train(load_config(None, [*overrides, f"resume_from={other / 'checkpoints' / 'step-000001'}"]))
    with pytest.raises(ConfigError, match="output_dir: .* already holds a run"):
        train(load_config(None, overrides))
    (tmp_path / "a file").write_text("")
    with pytest.raises(ConfigError, match="output_dir: .*out cannot be a folder: .*a file is a file"):
        train(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path / "a file" / "out")))
    # A trainer that does not train (gradient_signal.py, calibrate-noise) may read the config of a run that trained.
    GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path)))


def test_a_torn_last_metrics_line_does_not_block_a_resume(trained, saved, prompt_file, tmp_path):
    _, straight = trained
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step-000003.partial").mkdir()  # a checkpoint cut short (a full disk)
    (tmp_path / "checkpoints" / "step-000003.partial" / checkpoint.STATE).write_text("{}")  # just before its rename
    # A user's copy of a checkpoint, a note and a folder of their own: not the trainer's, so neither read nor removed
    # (the copy's name raised a ValueError from `latest`, the note stopped the resume, the folder was deleted).
    shutil.copytree(tmp_path / "checkpoints" / "step-000002", tmp_path / "checkpoints" / "step-000002 copy")
    (tmp_path / "checkpoints" / "step-notes.txt").write_text("lr 3e-4 looked best")
    (tmp_path / "checkpoints" / "step-best-by-hand").mkdir()
    assert checkpoint.resolve_resume("latest", tmp_path).name == "step-000002"
    rows = (straight / "metrics.jsonl").read_text().splitlines()
    older = rows[0].replace('"loss": ', '"loss": NaN, "was": ', 1)  # a bare NaN, as a hand-edited file may hold
    (tmp_path / "metrics.jsonl").write_text(older + "\n" + '{"ste')  # the disk filled up mid-line
    GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=2,
                                                 resume_from=tmp_path / "checkpoints" / "step-000001"))).train()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2] and metrics(tmp_path)[0]["loss"] is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000001", "step-000002", "step-000002 copy", "step-best-by-hand", "step-notes.txt"]


def test_a_resume_after_the_prompt_file_changed_is_refused(trained, saved, prompt_file, tmp_path):
    _, straight = trained
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    edited = tmp_path / "prompts.txt"
    edited.write_text(Path(prompt_file).read_text() + "a yellow star\n")
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3, resume_from="latest")
    with pytest.raises(ConfigError, match="prompts: "):  # the path differs too
        GRPOTrainer(load_config(None, [*overrides, f"prompts={edited}"]))
    shutil.copy(prompt_file, edited)
    checkpoint_state = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(checkpoint_state.read_text())
    state["config"]["prompts"] = str(edited)
    checkpoint_state.write_text(json.dumps(state))
    GRPOTrainer(load_config(None, [*overrides, f"prompts={edited}"]))  # the same prompts at another path: accepted
    edited.write_text(Path(prompt_file).read_text() + "a yellow star\n")
    with pytest.raises(ConfigError, match="prompts_sha256: the run that wrote"):
        GRPOTrainer(load_config(None, [*overrides, f"prompts={edited}"]))


def test_a_resume_launched_otherwise_than_its_deepspeed_checkpoint_is_refused(
        trained, saved, prompt_file, tmp_path):
    """A DeepSpeed checkpoint is DeepSpeed's own files, its optimizer state sharded over its processes: resumed
    without DeepSpeed it failed on a missing optimizer.bin, and a DDP one under DeepSpeed on an assertion, both after
    the model had loaded."""
    _, straight = trained
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    checkpoint_state = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(checkpoint_state.read_text())
    assert state["layout"] == {"deepspeed": False, "num_processes": None}  # a plain run's resumes on any count
    checkpoint_state.write_text(json.dumps({**state, "layout": {"deepspeed": True, "num_processes": 8}}))
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3, resume_from="latest")
    with pytest.raises(ConfigError, match="resume_from: .*step-000002 was written under DeepSpeed on 8 processes, "
                                          "and this run is launched without DeepSpeed"):
        GRPOTrainer(load_config(None, overrides))


def test_a_checkpoint_that_cannot_be_written_is_named_and_leaves_no_partial_folder(saved, prompt_file, tmp_path):
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1)))

    def full_disk(folder):  # what torch.save raises on a full disk
        Path(folder, "model.safetensors").write_bytes(b"12")
        raise RuntimeError("basic_ios::clear: iostream error")

    trainer.accelerator.save_state = full_disk
    with pytest.raises(OSError, match="writing the checkpoint of step 1 to .*step-000001.partial failed"):
        trainer.train()
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_an_export_cut_short_leaves_the_earlier_lora_whole(saved, prompt_file, tmp_path, monkeypatch):
    import safetensors.torch

    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1)))
    trainer.train()
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    before = lora.read_bytes()
    # diffusers writes the LoRA with safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_halfway(safetensors.torch.save_file))
    with pytest.raises(KeyboardInterrupt):
        trainer.export()
    assert lora.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_prompt_files_keep_unicode_line_separators_drop_a_byte_order_mark_and_must_be_utf8(saved, tmp_path):
    from align_diffusion.training.prompts import PromptSource

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red\u2028circle\r\n\n  a blue square  \n".encode())
    assert PromptSource(str(prompts)).all() == ["a red\u2028circle", "a blue square"]
    prompts.write_bytes("un cercle \u00e9".encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match="eval.prompts: .*prompts.txt is not UTF-8 text"):
        PromptSource(str(prompts), "eval.prompts")
    with pytest.raises(SystemExit, match="--prompts-file: .*prompts.txt is not UTF-8 text"):
        main(["sample", "--model", str(saved["sd3"]), "--prompts-file", str(prompts), "--out", str(tmp_path / "out")])


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """A job started with `&` from a script ignores Ctrl-C: the terminal's Ctrl-C must not stop its training."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals(print) as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signals.handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_stops_at_once(saved, prompt_file, tmp_path):
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path)))
    signalled_during_step(trainer, 0, times=2, seconds_apart=1.1)
    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer.train()
    assert not isinstance(stopped.value, TrainingInterrupted)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_train_command_stops_on_sigint_with_a_checkpoint_and_exit_status_130(saved, prompt_file, tmp_path):
    command = [sys.executable, "-m", "align_diffusion", "train",
               *tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=500, checkpoint_every=0)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (tmp_path / "metrics.jsonl").is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=200)
    assert process.returncode == 130, stderr[-3000:]
    last = metrics(tmp_path)[-1]["step"]
    assert f"SIGINT received: stopped after step {last} with its checkpoint" in stderr
    assert "resume_from=latest" in stderr and "Traceback" not in stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step-{last:06d}"]


@pytest.mark.parametrize("log_with", ["[wandb]", "[tensorboard,wandb]"])
def test_a_run_that_names_wandb_where_it_is_not_installed_logs_to_tensorboard(saved, prompt_file, tmp_path,
                                                                              monkeypatch, log_with):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    config = load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1, log_with=log_with))
    with pytest.warns(UserWarning, match=r"^log_with names wandb, which is not installed \(pip install wandb\); "
                                         "logging to tensorboard only$"):
        trainer = GRPOTrainer(config)
    trainer.train()
    logged = EventAccumulator(str(tmp_path / "grpo")).Reload().Scalars("reward_mean")
    assert [event.step for event in logged] == [1]
    assert logged[0].value == pytest.approx(metrics(tmp_path)[-1]["reward_mean"])


def test_a_second_ctrl_c_stops_the_command_at_once_and_names_the_checkpoint_to_go_on_from(saved, prompt_file, tmp_path,
                                                                                          monkeypatch, capsys):
    """The first Ctrl-C asks for a stop after the step in progress; one more a second later stops it mid-step, and
    the command says which checkpoint resume_from=latest goes on from (that of step 1, the run's last)."""
    run_step = GRPOTrainer.training_step

    def training_step(self, index):
        if index == 1:  # as step 2 begins
            signal.raise_signal(signal.SIGINT)
            time.sleep(1.1)
            signal.raise_signal(signal.SIGINT)
        return run_step(self, index)

    monkeypatch.setattr(GRPOTrainer, "training_step", training_step)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3)])
    assert stopped.value.code == 130
    assert [record["step"] for record in metrics(tmp_path)] == [1]  # step 2 did not finish
    assert capsys.readouterr().err.strip().endswith(
        f"align-diffusion train: interrupted; its last checkpoint is step 1 ({tmp_path / 'checkpoints' / 'step-000001'}"
        "), and the same command with resume_from=latest goes on after it")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_eval_seeds_past_the_generators_range_are_named_before_the_model_loads(saved, prompt_file, tmp_path):
    """Eval image k is seeded eval.seed + k: a seed near 2**32 failed at the first evaluation, named as `seed`."""
    prompts = len([line for line in prompt_file.read_text().splitlines() if line.strip()])
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{
        "eval.every": 1, "eval.num_images_per_prompt": 4, "eval.seed": 2**32 - 4 * prompts + 1})
    with pytest.raises(ConfigError, match=f"eval.seed: the {4 * prompts} eval images are seeded eval.seed \\+ k"):
        GRPOTrainer(load_config(None, overrides))


def test_resume_with_no_checkpoint_yet_starts_over(saved, prompt_file, tmp_path):
    """Interrupted before its first checkpoint, a run leaves metrics only; resume_from=latest starts over and does
    not log step 1 twice, nor step 0's evaluation (TensorBoard hides the first run's values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{
        "eval.every": 1, "eval.num_steps": 2, "eval.num_images_per_prompt": 1, "log_with": "[tensorboard]"})
    GRPOTrainer(load_config(None, [*overrides, "max_steps=1"])).train()
    shutil.rmtree(tmp_path / "checkpoints")
    GRPOTrainer(load_config(None, [*overrides, "resume_from=latest"])).train()
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]
    assert [event.step for event in EventAccumulator(str(tmp_path / "grpo")).Reload().Scalars("eval/reward_mean")] \
        == [0, 1, 2]


def test_resuming_an_older_checkpoint_drops_the_abandoned_later_ones(trained, saved, prompt_file, tmp_path):
    """Resumed at step 1 of a run that went on to step 2 (and stopping there), the run must not keep step 2's
    checkpoint, which `resume_from=latest` would pick next."""
    _, out = trained
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(out / "metrics.jsonl", tmp_path / "metrics.jsonl")
    GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=1,
                                                 resume_from=tmp_path / "checkpoints" / "step-000001"))).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert [r["step"] for r in metrics(tmp_path)] == [1]


def test_a_branch_resume_cut_short_leaves_one_run_that_latest_goes_on_from(trained, saved, prompt_file, tmp_path,
                                                                              monkeypatch):
    """Resumed at step 1 of a run with checkpoints 1 to 3 and stopped while dropping 2 and 3: the newest goes first,
    so what is left is the run up to step 2 with its metrics (dropped oldest first, and metrics first, `latest`
    went on from step 3 with step 2's row gone); a deletion cut short leaves no checkpoint, and the abandoned
    export goes before the abandoned checkpoints."""
    _, out = trained
    for name in ("checkpoints", "lora"):
        shutil.copytree(out / name, tmp_path / name)
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(out / name, tmp_path / name)
    third = tmp_path / "checkpoints" / "step-000003"
    shutil.copytree(tmp_path / "checkpoints" / "step-000002", third)
    (third / checkpoint.STATE).write_text(json.dumps({**checkpoint.read_trainer_state(third), "step": 3}))
    rmtree = shutil.rmtree

    def cut_short(path, ignore_errors=False, **kwargs):
        if str(path).endswith(f".discarded{checkpoint.TEMPORARY}") and not ignore_errors:
            raise KeyboardInterrupt  # the deletion of the first checkpoint to drop, after its rename
        rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", cut_short)
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3)
    with pytest.raises(KeyboardInterrupt):
        GRPOTrainer(load_config(None, [*overrides, f"resume_from={tmp_path / 'checkpoints' / 'step-000001'}"])).train()
    monkeypatch.undo()
    assert [p.name for p in checkpoint.completed_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2] and not (tmp_path / "lora").exists()
    trainer = GRPOTrainer(load_config(None, [*overrides, "resume_from=latest", "max_steps=2"]))
    trainer.train()
    assert trainer.resume_path.name == "step-000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_a_run_that_held_a_setting_it_never_read_resumes_without_it(trained, saved, prompt_file, tmp_path):
    """grpo.reward_range without bnpo and grpo.value_anchor without a value weight did nothing and are refused
    now: a run that held them resumes with them left out, as it could not keep them."""
    _, out = trained
    shutil.copytree(out / "checkpoints" / "step-000001", tmp_path / "step-000001")
    state = checkpoint.read_trainer_state(tmp_path / "step-000001")
    state["config"].update({"grpo.reward_range": "[0.0, 100.0]", "grpo.value_anchor": 0.7})
    (tmp_path / "step-000001" / checkpoint.STATE).write_text(json.dumps(state))
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run", max_steps=1)
    trainer = GRPOTrainer(load_config(None, [*overrides, f"resume_from={tmp_path / 'step-000001'}"]))
    assert trainer.resume_path == tmp_path / "step-000001"
    state["config"]["grpo.value_weight"] = 0.5  # read, with the anchor: a change
    (tmp_path / "step-000001" / checkpoint.STATE).write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="grpo.value_anchor: the run that wrote .* was trained with 0.7, not 0.0"):
        GRPOTrainer(load_config(None, [*overrides, f"resume_from={tmp_path / 'step-000001'}"]))


def test_resuming_an_older_checkpoint_hides_the_abandoned_steps_evaluations_and_logged_values(
        saved, prompt_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{
        "eval.every": 1, "eval.num_steps": 2, "eval.num_images_per_prompt": 1, "log_with": "[tensorboard]"})
    GRPOTrainer(load_config(None, overrides)).train()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [f"step-00000{k}" for k in range(3)]
    assert (tmp_path / "eval" / "step-000000" / "compare-step-000002.html").is_file()
    resume = f"resume_from={tmp_path / 'checkpoints' / 'step-000001'}"
    GRPOTrainer(load_config(None, [*overrides, resume, "max_steps=1"])).train()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step-000000", "step-000001"]
    assert sorted(p.name for p in (tmp_path / "eval" / "step-000000").glob("compare-*")) == ["compare-step-000001.html"]
    assert "step-000002" not in (tmp_path / "index.html").read_text()
    logged = EventAccumulator(str(tmp_path / "grpo")).Reload()
    assert [event.step for event in logged.Scalars("loss")] == [1]
    assert [event.step for event in logged.Scalars("eval/reward_mean")] == [0, 1]


def test_a_resumed_run_that_used_its_minutes_trains_no_step(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3, max_minutes=1e-6)
    GRPOTrainer(load_config(None, overrides)).train()
    assert [r["step"] for r in metrics(tmp_path)] == [1]
    GRPOTrainer(load_config(None, [*overrides, "resume_from=latest"])).train()
    assert [r["step"] for r in metrics(tmp_path)] == [1]


def test_best_worst_only_trains_whatever_micro_batch_holds_the_chosen_images(saved, prompt_file, tmp_path):
    """Only 2 of each group's 4 images train; with micro-batches of 1 some micro-batches hold none. Loss and
    gradient must not depend on the micro-batch size, and every ratio before the update is 1."""
    rows = {}
    for size in (1, 4):
        out = tmp_path / f"micro{size}"
        overrides = tiny_overrides(saved["sd3"], prompt_file, out, max_steps=2, **{
            "grpo.best_worst_only": "true", "grpo.train_batch_size": size})
        GRPOTrainer(load_config(None, overrides)).train()
        rows[size] = metrics(out)
    for one, four in zip(rows[1], rows[4]):
        assert one["loss"] == pytest.approx(four["loss"], rel=1e-4, abs=1e-7)
        assert one["grad_norm"] == pytest.approx(four["grad_norm"], rel=1e-4)
        assert one["first_ratio_max_deviation"] <= 1e-5 and four["first_ratio_max_deviation"] <= 1e-5


def test_a_diverged_image_is_masked_and_leaves_every_weight_finite(saved, prompt_file, tmp_path):
    """A sample whose latents turn NaN (as a diverging run's may) scores NaN and is left out; the other images
    train, and no weight turns NaN (a masked image's NaN forward pass would otherwise poison them all)."""
    trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run")))

    def diverge_the_first_image(module, inputs, output):
        output[0][0] = math.nan

    hook = trainer.adapter.denoiser.register_forward_hook(diverge_the_first_image)
    rollouts = trainer.rollout(0)
    hook.remove()
    assert torch.isnan(rollouts.rewards[0]) and torch.isfinite(rollouts.rewards[1:]).all()
    before = [p.detach().clone() for p in trainer.params]
    advantages, stats = trainer.advantages(rollouts)
    assert stats["nan_rewards"] == 1 and torch.isnan(advantages[0]) and torch.isfinite(advantages[1:]).all()
    stats = trainer.update(rollouts, advantages, 0)
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["trained_fraction"] == 7 / 8
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before))


ROLLOUT_REWARDS = """
import json, sys
from align_diffusion.training.config import load_config
from align_diffusion.training.grpo import GRPOTrainer
for overrides in json.loads(sys.argv[1]):
    print(json.dumps(GRPOTrainer(load_config(None, overrides)).rollout(0).rewards.tolist()))
"""


def test_rewards_score_alike_with_and_without_the_reward_thread_under_bf16(saved, prompt_file, tmp_path):
    """Autocast is per thread: scored in the rollout's own thread, a reward must still run in its own dtype.
    (A process of its own: accelerate fixes the mixed-precision mode once per process.)"""
    runs = [tiny_overrides(saved["sd3"], prompt_file, tmp_path / overlap, **{
        "async_rewards": overlap, "optim.mixed_precision": "bf16", "reward": "clip:assets/world/clip"})
        for overlap in ("true", "false")]
    result = subprocess.run([sys.executable, "-c", ROLLOUT_REWARDS, json.dumps(runs, default=str)],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    threaded, unthreaded = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert threaded == unthreaded


def test_resume_refuses_another_lora_rank_or_algorithm_by_name(trained, saved, prompt_file, tmp_path):
    _, out = trained
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(out / "config.yaml", tmp_path / "config.yaml")
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, resume_from="latest", max_steps=3)
    with pytest.raises(ConfigError, match="lora.rank: the run that wrote .* was trained with 4, not 8"):
        GRPOTrainer(load_config(None, [*overrides, "lora.rank=8"])).train()
    gdro = tiny_overrides(saved["sd3"], prompt_file, tmp_path, resume_from="latest", max_steps=3, algorithm="gdro")
    with pytest.raises(ConfigError, match="algorithm: the run that wrote .* was trained with grpo, not gdro"):
        GRPOTrainer(load_config(None, gdro)).train()
    # The optimizer's state comes from the checkpoint: a new lr would be written to config.yaml but not used.
    with pytest.raises(ConfigError, match=r"optim.lr: .* trained with 0.01, not 0.5; .*optim.weight_decay: "):
        GRPOTrainer(load_config(None, [*overrides, "optim.lr=0.5", "optim.weight_decay=0.1"])).train()
    with pytest.raises(ConfigError, match="max_steps: 1 is below the step of .*step-000002, 2; resume from an"):
        GRPOTrainer(load_config(None, [*overrides, "max_steps=1"])).train()
    # A checkpoint with no EMA (one copied in part, or of a run without it): named before the model loads.
    with pytest.raises(ConfigError, match="step-000002 has no ema.safetensors, which this run's EMA"):
        GRPOTrainer(load_config(None, [*overrides, "optim.ema_decay=0.9"])).train()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lora"]["rank"] == 4  # not overwritten
    # Another run's checkpoint, named by path into a new output_dir: the checkpoint's own run is compared.
    other = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "other", max_steps=3, **{
        "lora.rank": 8, "resume_from": tmp_path / "checkpoints" / "step-000002"})
    with pytest.raises(ConfigError, match="lora.rank: the run that wrote .*step-000002 was trained with 4, not 8"):
        GRPOTrainer(load_config(None, other)).train()
    # A checkpoint of a version without a setting was trained with its default: only that resumes it.
    state_file = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["max_sequence_length"], state["config"]["sampling.negative_prompt"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="max_sequence_length: the run that wrote .* was trained with None, not 8"):
        GRPOTrainer(load_config(None, [*overrides, "max_sequence_length=8"]))
    # Where, how long and what it evaluates may change, the micro-batch (a resume on more processes may need a
    # smaller one), and the order LoRA's target modules are listed in.
    GRPOTrainer(load_config(None, [*overrides, "eval.every=0", "checkpoints_kept=3", "async_rewards=true",
                                   "grpo.train_batch_size=2", "lora.target_modules=[to_out.0,to_v,to_k,to_q,to_k]"])
                ).train()
    assert [r["step"] for r in metrics(tmp_path)] == [3]


def test_an_evaluation_a_stop_signal_cut_short_runs_when_the_run_resumes(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=3, checkpoint_every=0, **{
        "eval.every": 2, "eval.num_steps": 2, "eval.num_images_per_prompt": 1})
    trainer = GRPOTrainer(load_config(None, overrides))
    signalled_during_step(trainer, 1, times=1)
    with pytest.raises(TrainingInterrupted, match="stopped after step 2"):
        trainer.train()
    assert [(r["step"], "eval/reward_mean" in r) for r in metrics(tmp_path)] == [(0, True), (1, False), (2, False)]
    GRPOTrainer(load_config(None, [*overrides, "resume_from=latest"])).train()
    rows = metrics(tmp_path)
    assert [(r["step"], "eval/reward_mean" in r) for r in rows] == [(0, True), (1, False), (2, True), (3, True)]
    assert rows[2]["reward_mean"] is not None  # the step's training row kept, the evaluation added to it
    assert (tmp_path / "eval" / "step-000002" / "metadata.jsonl").is_file()


def test_the_last_evaluation_of_a_run_out_of_time_runs_when_a_stop_signal_cut_it_short(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=5, max_minutes=1e-6, **{
        "eval.every": 4, "eval.num_steps": 2, "eval.num_images_per_prompt": 1})
    trainer = GRPOTrainer(load_config(None, overrides))
    signalled_during_step(trainer, 0, times=1)
    with pytest.raises(TrainingInterrupted, match="stopped after step 1"):
        trainer.train()
    assert [(r["step"], "eval/reward_mean" in r) for r in metrics(tmp_path)] == [(0, True), (1, False)]
    GRPOTrainer(load_config(None, [*overrides, "resume_from=latest"])).train()  # out of time: evaluates, exports
    assert [(r["step"], "eval/reward_mean" in r) for r in metrics(tmp_path)] == [(0, True), (1, True)]


def test_resume_refuses_a_checkpoint_that_lacks_weights_this_run_trains(trained, saved, prompt_file, tmp_path):
    _, out = trained
    older = tmp_path / "older"  # as an earlier version wrote it: no record of its run's settings to compare
    shutil.copytree(out / "checkpoints" / "step-000001", older)
    state = json.loads((older / "trainer_state.json").read_text())
    (older / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "config"}))
    modules = {"lora.target_modules": "[to_q,to_k,to_v,to_out.0,add_q_proj]"}
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run", resume_from=older, **modules)
    with pytest.raises(ValueError, match=r"lacks weights this run trains: .*add_q_proj"):
        GRPOTrainer(load_config(None, overrides)).train()
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run", resume_from=out / "checkpoints" /
                               "step-000001", **modules)
    with pytest.raises(ConfigError, match=r"lora.target_modules: the run that wrote .* was trained with \["):
        GRPOTrainer(load_config(None, overrides)).train()


def test_checkpoints_are_pruned_and_never_partial(trained, tmp_path):
    _, out = trained
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000002"]
    assert json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["step"] == 2
    for step in (1, 2, 3):  # a third commit with two kept removes the oldest
        partial = checkpoint.partial_dir(tmp_path, step)
        checkpoint.begin(partial)
        checkpoint.commit(partial, {"step": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_checkpoints_and_the_exported_lora_are_readable_as_any_new_file_is(trained):
    _, out = trained  # safetensors >= 0.8.1 writes 0600, so another account could not load the LoRA
    umask = os.umask(0)
    os.umask(umask)
    written = [*(out / "checkpoints" / "step-000002").rglob("*.safetensors"), *(out / "lora").iterdir()]
    assert {path.name for path in written} >= {"trained.safetensors", "pytorch_lora_weights.safetensors"}
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {
        path.name: oct(0o666 & ~umask) for path in written}


def test_a_checkpoint_deletion_cut_short_leaves_no_checkpoint_that_latest_picks(tmp_path, monkeypatch):
    for step in (1, 2):
        partial = checkpoint.partial_dir(tmp_path, step)
        checkpoint.begin(partial)
        (partial / "trained.safetensors").write_bytes(b"weights")
        checkpoint.commit(partial, {"step": step}, keep=3)
    assert checkpoint.resolve_resume("latest", tmp_path).name == "step-000002"

    def interrupted(path, ignore_errors=False):  # Ctrl-C after the deletion of the old step-2 folder took one file
        if not ignore_errors:
            (Path(path) / "trained.safetensors").unlink()
            raise KeyboardInterrupt

    partial = checkpoint.partial_dir(tmp_path, 2)  # step 2 saved again (a run resumed from step 1)
    checkpoint.begin(partial)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.commit(partial, {"step": 2}, keep=3)
    half_deleted = tmp_path / "checkpoints" / f"step-000002.discarded{checkpoint.TEMPORARY}"
    assert half_deleted.is_dir() and not (tmp_path / "checkpoints" / "step-000002").exists()
    assert checkpoint.resolve_resume("latest", tmp_path).name == "step-000001"


def test_ddim_rollouts_on_an_epsilon_model_and_eval_galleries(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd"], prompt_file, tmp_path, max_steps=1, **{
        "sampling.sampler": "ddim", "eval.every": 1, "eval.num_images_per_prompt": 1, "eval.num_steps": 2,
        "eval.rewards": "artifact:assets/world/artifact"})
    GRPOTrainer(load_config(None, overrides)).train()
    rows = metrics(tmp_path)
    assert rows[1]["first_ratio_max_deviation"] <= 1e-5
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # Each evaluation leaves its samples, scored, with a review page; the run page links them and the plots.
    for row in rows:
        folder = tmp_path / "eval" / f"step-{row['step']:06d}"
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in records] == prompt_file.read_text().split("\n")[:3]
        assert [r["seed"] for r in records] == [10_000, 10_001, 10_002]
        assert sum(r["rewards"]["jpeg"] for r in records) / 3 == pytest.approx(row["eval/reward_mean"])
        # The watched reward scores the samples (saved as 8-bit PNGs, hence the tolerance) and stays out of the
        # trained total.
        saved_images = [Image.open(folder / r["file"]) for r in records]
        watched = load_reward("artifact:assets/world/artifact")(saved_images, [r["prompt"] for r in records])
        assert [r["rewards"]["artifact"] for r in records] == pytest.approx(watched.tolist(), abs=1e-3)
        assert row["eval/artifact_mean"] == pytest.approx(watched.mean().item(), abs=1e-3)
        assert (folder / "index.html").is_file()
    run_page = (tmp_path / "index.html").read_text()
    for target in ("plots/reward.png", "eval/step-000000/index.html", "eval/step-000000/compare-step-000001.html"):
        assert f'"{target}"' in run_page and (tmp_path / target).is_file()
    # Watching a reward leaves the run as it was without it.
    unwatched = tmp_path / "unwatched"
    GRPOTrainer(load_config(None, [o for o in overrides if not o.startswith(("eval.rewards=", "output_dir="))]
                            + [f"output_dir={unwatched}"])).train()
    watched_lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    unwatched_lora = load_file(str(unwatched / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(watched_lora[key], unwatched_lora[key]) for key in watched_lora)


def test_a_noise_window_whose_only_step_draws_no_noise_with_the_models_scheduler_is_named(prompt_file, tmp_path):
    """DDIM's last step draws no noise where the scheduler sets ᾱ_prev to 1: a window of that step alone has nothing
    to train on, which is refused when the model loads, before any rollout."""
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline("sd")
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "set_alpha_to_one": True})
    pipe.save_pretrained(tmp_path / "model")
    for window, trains in (("[2, 3]", False), ("[1, 3]", True)):
        config = load_config(None, tiny_overrides(tmp_path / "model", prompt_file, tmp_path / window, **{
            "sampling.sampler": "ddim", "sampling.noise_window": window}))
        if trains:
            GRPOTrainer(config)
        else:
            with pytest.raises(ConfigError, match=r"sampling.noise_window: no step in \[2, 3\) draws noise"):
                GRPOTrainer(config)


def test_shapes_eval_of_the_world_generator_is_logged_per_category_with_pass_at_k(tmp_path):
    prompt_file = tmp_path / "shapes.txt"
    prompt_file.write_text("a circle\na square\na red square\ntwo triangles\n")
    overrides = tiny_overrides("assets/world/sd3", prompt_file, tmp_path / "run", max_steps=1, **{
        "eval.every": 1, "eval.shapes_eval": "true", "eval.num_images_per_prompt": 2, "eval.num_steps": 10})
    GRPOTrainer(load_config(None, overrides)).train()
    for row in metrics(tmp_path / "run"):
        folder = tmp_path / "run" / "eval" / f"step-{row['step']:06d}"
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        # The saved verdicts are ShapesEval's on the saved samples.
        assert [r["shapes_strict"] for r in records] == [
            score_image(r["prompt"], Image.open(folder / r["file"]).convert("RGB")).strict for r in records]
        verdicts = {}
        for record in records:
            verdicts.setdefault(record["prompt"], []).append(record["shapes_strict"])
        assert [len(v) for v in verdicts.values()] == [2, 2, 2, 2]
        # Overall: the mean over the categories present of each category's mean; with k = n = 2, pass@2 of a
        # prompt is whether either of its two images is right.
        single = verdicts["a circle"] + verdicts["a square"]
        assert row["eval/shapes_single_object"] == sum(single) / 4
        assert row["eval/shapes_colors"] == sum(verdicts["a red square"]) / 2
        assert row["eval/shapes_strict"] == pytest.approx(
            (sum(single) / 4 + sum(verdicts["a red square"]) / 2 + sum(verdicts["two triangles"]) / 2) / 3)
        assert row["eval/shapes_pass@2"] == pytest.approx(
            ((any(verdicts["a circle"]) + any(verdicts["a square"])) / 2 + any(verdicts["a red square"])
             + any(verdicts["two triangles"])) / 3)


def initial_weights(saved, prompt_file, out) -> dict[str, torch.Tensor]:
    """The LoRA a tiny run starts from: the same seed draws the same one, whatever the run's precision or launch."""
    return GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, out))).trained_state()


class CountedBrightness(Reward):
    """Mean brightness, counting the images it scores: served, it counts a whole run's, of all its processes. Smooth
    in the pixels, unlike the JPEG size: an image the two runs batch differently may differ by a level of rounding,
    which moved a JPEG size, and with it the advantages and the trained weights, by more than rounding (on AVX2 CPUs,
    measured)."""

    def __init__(self):
        super().__init__("brightness")
        self.images = 0

    def score(self, images, prompts, metadata):
        self.images += len(images)
        return images.float().mean(dim=(1, 2, 3))


class RefusingReward(Reward):
    """Refuses every batch it is sent (a 400 from a server: no retry), counting them."""

    def __init__(self):
        super().__init__("refusing")
        self.batches = 0

    def score(self, images, prompts, metadata):
        self.batches += 1
        raise ValueError("this batch cannot be scored")


def test_a_reward_that_fails_stops_the_step_without_sending_the_batches_behind_it(saved, prompt_file, tmp_path,
                                                                                  monkeypatch):
    """Scored beside sampling, the first batch fails while the second samples: the rollout stops there, and the
    batches not yet sent are not (with a dead server each would wait out its timeout)."""
    reward = RefusingReward()
    server = make_server(reward, token="secret")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("ALIGN_DIFFUSION_REWARD_TOKEN", "secret")
    try:
        trainer = GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{
            "reward": f"remote:{server.url}", "async_rewards": "true", "sampling.batch_size": 1,
            "sampling.num_steps": 10})))
        with pytest.raises(RewardError, match="this batch cannot be scored"):
            trainer.train()
    finally:
        server.shutdown()
        server.server_close()
    assert reward.batches in (1, 2)  # of the step's 8 images, one a batch: the second may be on its way


def test_two_cpu_processes_match_one(saved, prompt_file, tmp_path, monkeypatch):
    # The warm-up must advance once per optimizer step, whatever the processes; and each of a step's two updates
    # trains on one group of 4 in both runs (two processes each take 2 images of it), not on half of each group.
    # The two processes share each evaluation (at steps 0 and 2, 3 prompts × 3 images: 4 and 5), scoring each
    # image once.
    reward = CountedBrightness()
    server = make_server(reward, token="secret")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("ALIGN_DIFFUSION_REWARD_TOKEN", "secret")
    warmup = {"optim.warmup_steps": 3, "grpo.updates_per_step": 2, "grpo.train_batch_size": 2,
              "reward": f"remote:{server.url}", "eval.every": 2, "eval.num_images_per_prompt": 3}
    scored = []
    try:
        single = tmp_path / "single"
        GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, single, max_steps=2,
                                                     **warmup))).train()
        scored.append(reward.images)
        double = tmp_path / "double"
        # On a machine without GPUs `--multi_gpu` starts CPU processes joined by gloo (accelerate's `--cpu` alone
        # starts one process unless MPI is set up), with the default device as the README's command runs them.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "align_diffusion", "train", *tiny_overrides(saved["sd3"], prompt_file, double, max_steps=2,
                                                                      device="null", **warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=280)
        scored.append(reward.images - scored[0])
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert scored == [2 * 8 + 2 * 9] * 2  # 8 rollouts a step, 9 eval images twice: each scored once
    for step in (0, 2):  # batched differently, an image may differ by a level of rounding, and its JPEG size a little
        folder = f"eval/step-{step:06d}"
        records = [[json.loads(line) for line in (run / folder / "metadata.jsonl").read_text().splitlines()]
                   for run in (single, double)]
        assert [(r["prompt"], r["seed"]) for r in records[0]] == [(r["prompt"], r["seed"]) for r in records[1]]
        scores = [[score for r in run_records for score in r["rewards"].values()] for run_records in records]
        assert len(scores[0]) == 9 and scores[0] == pytest.approx(scores[1], rel=1e-2)
        for k in range(9):
            a, b = (np.asarray(Image.open(run / folder / f"images/{k:05d}.png"), dtype=int) for run in (single, double))
            assert np.abs(a - b).max() <= 1
    assert (double / "checkpoints" / "step-000002" / "random_states_1.pkl").is_file()  # two processes ran
    a = load_file(str(single / "checkpoints" / "step-000002" / "trained.safetensors"))
    b = load_file(str(double / "checkpoints" / "step-000002" / "trained.safetensors"))
    # Equal up to rounding, which Adam magnifies where a gradient is near 0 (its update is about lr · sign(g)): on an
    # AVX2 CPU the weights differed by up to 0.6 % of what training moved them; a run training on other images, or
    # on some of them twice, moves them otherwise by a large part of that.
    initial = initial_weights(saved, prompt_file, tmp_path / "initial")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 2e-2 * (a[key] - initial[key]).abs().max(), key
    evaluations = [[(r["step"], r["eval/reward_mean"]) for r in metrics(run) if "eval/reward_mean" in r]
                   for run in (single, double)]
    assert [step for step, _ in evaluations[0]] == [step for step, _ in evaluations[1]] == [0, 2]
    assert [mean for _, mean in evaluations[0]] == pytest.approx([mean for _, mean in evaluations[1]], rel=1e-2)
    single_rows, double_rows = ([r for r in metrics(run) if "reward_mean" in r] for run in (single, double))
    assert [r["reward_mean"] for r in single_rows] == pytest.approx([r["reward_mean"] for r in double_rows])
    # The training statistics are of both processes' images, not the main process's half: at step 2 the KL (and the
    # loss it dominates) differs between the halves. (The ratio statistics, reduced alongside, cannot tell here:
    # on-policy, every ratio is 1 in both runs.)
    for key in ("loss", "kl", "trained_fraction"):
        assert [r[key] for r in double_rows] == pytest.approx([r[key] for r in single_rows], rel=1e-3, abs=1e-7), key
    lr = load_config(None, tiny_overrides(saved["sd3"], prompt_file, single)).optim.lr
    for rows in (single_rows, double_rows):  # optimizer step s (from 0) uses the warm-up factor (s + 1) / (3 + 1);
        assert [r["lr"] for r in rows] == pytest.approx([lr * 3 / 8, lr * 7 / 8])  # a step logs its two updates' mean


def test_two_processes_stop_for_max_minutes_after_the_same_step(saved, prompt_file, tmp_path):
    """The main process evaluates after every step while the other waits in its next step, whose clock then runs
    ahead; both must still stop after the same step (one going on alone hangs at its first collective)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "align_diffusion", "train", *tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=40,
                                                                  max_minutes=0.05, checkpoint_every=0,
                                                                  **{"eval.every": 1})]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    last = metrics(tmp_path)[-1]["step"]
    assert 1 <= last < 40 and "max_minutes" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / f"step-{last:06d}" / "random_states_1.pkl").is_file()


def test_ctrl_c_under_the_launcher_stops_both_processes_after_the_same_step(saved, prompt_file, tmp_path):
    """Ctrl-C reaches the launcher and both processes, and the launcher forwards it to them once more."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "align_diffusion", "train", *tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=500,
                                                                  checkpoint_every=0, device="null")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 200
    while not (tmp_path / "metrics.jsonl").is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # as the terminal sends it: to the whole process group
    _, stderr = process.communicate(timeout=200)
    last = metrics(tmp_path)[-1]["step"]
    assert f"SIGINT received: stopped after step {last} with its checkpoint" in stderr, stderr[-3000:]
    assert (tmp_path / "checkpoints" / f"step-{last:06d}" / "random_states_1.pkl").is_file()


def test_deepspeed_zero2_config_trains_like_one_plain_process(trained, saved, prompt_file, tmp_path):
    """The shipped ZeRO-2 config, on one CPU process: DeepSpeed steps its optimizer inside the backward that ends an
    update, so the trainer's micro-batch and timestep accumulation must hold it back until then. (Accelerate runs
    DeepSpeed on the CPU as one process per launch, so several processes need GPUs.)"""
    _, straight = trained
    out = tmp_path / "zero2"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
               "--mixed_precision", "no", "-m", "align_diffusion", "train",
               *[o for o in tiny_overrides(saved["sd3"], prompt_file, out) if o != "device=cpu"]]
    # As many threads as the reference run in this process had: CPU reductions split by thread count, and a
    # difference in the last bits grows through Adam's steps.
    threads = str(torch.get_num_threads())
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "step-000002" / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint: it ran
    a = load_file(str(straight / "checkpoints" / "step-000002" / "trained.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-000002" / "trained.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    assert [r["grad_norm"] for r in metrics(out)] == pytest.approx([r["grad_norm"] for r in metrics(straight)])
    # Unclipped, the gradients are gone after DeepSpeed's step too: their norm is the engine's. Step 1's is the
    # unclipped norm either way.
    unclipped = tmp_path / "unclipped"
    command = [*[c for c in command if not c.startswith("output_dir=")], f"output_dir={unclipped}", "max_steps=1",
               "optim.max_grad_norm=null"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(unclipped)[0]["grad_norm"] == pytest.approx(metrics(straight)[0]["grad_norm"])


def test_processes_the_launcher_started_but_accelerate_did_not_join_are_refused(saved, prompt_file, tmp_path):
    """`accelerate launch` with a DeepSpeed config on the CPU (device unset) starts two processes that each think
    they are alone; both would run the whole job into one output_dir."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
               "--mixed_precision", "no",
               "-m", "align_diffusion", "train",
               *[o for o in tiny_overrides(saved["sd3"], prompt_file, tmp_path) if o != "device=cpu"]]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=280)
    assert result.returncode != 0
    assert "the launcher started 2 processes, but accelerate joined 1" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_cpu_launch_of_several_processes_that_starts_one_is_named(saved, prompt_file, tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs its simple launcher: one process, told only MASTER_ADDR."""
    for name, value in {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)  # what that launcher sets
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run")
    with pytest.warns(UserWarning, match="its simple launcher starts one: this run trains in that one"):
        GRPOTrainer(load_config(None, overrides))
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's, `--multi_gpu`: as many as it says
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GRPOTrainer(load_config(None, [*overrides, f"output_dir={tmp_path / 'again'}"]))
    assert not [warning for warning in caught if "simple launcher" in str(warning.message)]


def test_fsdp_is_refused_before_anything_loads(saved, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(ValueError, match="FSDP is not supported: it replaces the denoiser's parameters"):
        GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_ema_decay_warms_up_updates_every_nth_step_and_resumes_where_it_stopped(tmp_path):
    """Hand-worked: decay min(0.3, (1 + n) / (10 + n)) is 0.1, 2/11, 0.25, then 0.3 at steps 0-3. Without the warm-up
    the average of a LoRA trained 100 steps at decay 0.99 held 37 % of its weights."""
    param = torch.nn.Parameter(torch.zeros(()))
    ema = EMA([param], decay=0.3)
    for n, expected in enumerate([0.9, 1.8, 2.7, 3.61]):
        param.data.fill_(n + 1)
        ema.update()
        torch.testing.assert_close(ema.shadow[0], torch.tensor(expected), rtol=0, atol=1e-6)
    # Every 2nd step: steps 1 and 3 update, at decays 2/11 and 0.3 (step 3's warm-up 4/13 lies above 0.3).
    param.data.fill_(0)
    sparse = EMA([param], decay=0.3, every=2)
    for n, expected in enumerate([0.0, 18 / 11, 18 / 11, 0.3 * 18 / 11 + 0.7 * 4]):
        param.data.fill_(n + 1)
        sparse.update()
        torch.testing.assert_close(sparse.shadow[0], torch.tensor(expected), rtol=0, atol=1e-6)
    sparse.save(tmp_path / "ema.safetensors", ["w"])
    resumed = EMA([param], decay=0.3, every=2)
    resumed.load(tmp_path / "ema.safetensors", ["w"])
    assert resumed.optimizer_steps == 4 and torch.equal(resumed.shadow[0], sparse.shadow[0])
    for twin in (sparse, resumed):  # step 5 updates both alike, at decay 0.3
        param.data.fill_(6)
        twin.update()
        param.data.fill_(7)
        twin.update()
    assert torch.equal(resumed.shadow[0], sparse.shadow[0])
    torch.testing.assert_close(resumed.shadow[0], 0.3 * (0.3 * 18 / 11 + 2.8) + 0.7 * 7 * torch.ones(()))
    average = resumed.shadow[0].clone()
    with resumed.applied():  # the average in the model for the duration, the trained weight back after
        assert torch.equal(param.detach(), average)
    assert param.item() == 7 and torch.equal(resumed.shadow[0], average)
    save_file({"w": torch.zeros(())}, str(tmp_path / "old.safetensors"))  # an average with no count of its steps
    with pytest.raises(ValueError, match="old.safetensors was written before the EMA counted its optimizer steps"):
        resumed.load(tmp_path / "old.safetensors", ["w"])


def bf16_overrides(saved, prompt_file, out) -> list[str]:
    # a first step's warmed-up decay is 0.1, whatever decay above it is set
    return tiny_overrides(saved["sd3"], prompt_file, out, max_steps=1, **{
        "optim.ema_decay": 0.75, "optim.mixed_precision": "bf16", "optim.gradient_checkpointing": "true"})


@pytest.fixture(scope="module")
def bf16_run(saved, prompt_file, tmp_path_factory):
    """One step under bf16 autocast with EMA and checkpointing, in a process of its own: accelerate fixes the
    mixed-precision mode once per process. As many threads as this process has, for the DeepSpeed run to match."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    result = subprocess.run([sys.executable, "-m", "align_diffusion", "train",
                             *bf16_overrides(saved, prompt_file, out)], capture_output=True, text=True, timeout=280,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_deepspeed_bf16_autocasts_keeps_lora_weights_float32_and_checkpoints_only_them(saved, prompt_file, bf16_run,
                                                                                        tmp_path):
    """Accelerate leaves bf16 under DeepSpeed to DeepSpeed, which casts the whole model: the float32 inputs failed
    ("mat1 and mat2 must have the same dtype"), and with bf16 weights the LoRA trained in bf16. And DeepSpeed's own
    module file held every frozen base weight (gigabytes at full size)."""
    out = tmp_path / "zero2"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
               "--mixed_precision", "no", "-m", "align_diffusion", "train",
               *[o for o in bf16_overrides(saved, prompt_file, out) if o != "device=cpu"]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=280,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert result.returncode == 0, result.stderr[-3000:]
    step = out / "checkpoints" / "step-000001"
    trained, plain = (load_file(str(run / "trained.safetensors")) for run in (step, bf16_run / step.relative_to(out)))
    assert {value.dtype for value in trained.values()} == {torch.float32}
    for key in plain:  # the same autocast as a plain process, the denoiser's outputs float32 as accelerate makes them
        torch.testing.assert_close(trained[key], plain[key], rtol=1e-5, atol=1e-6)
    states = torch.load(next((step / "pytorch_model").glob("*model_states.pt")), weights_only=False)
    assert set(states["module"]) - set(states["buffer_names"]) == set(trained)


def test_fp16_or_gdro_under_deepspeed_is_refused_before_anything_loads(saved, prompt_file, tmp_path, monkeypatch):
    """fp16 would need DeepSpeed's loss scaling, which casts the trained weights to fp16 too."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run", **{"optim.mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match="optim.mixed_precision: fp16 under DeepSpeed"):
        GRPOTrainer(load_config(None, overrides))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="algorithm: gdro runs in one plain process"):
        GRPOTrainer(load_config(None, tiny_overrides(saved["sd3"], prompt_file, tmp_path / "run", algorithm="gdro")))
    assert not (tmp_path / "run").exists()


def test_ema_bf16_and_checkpointing_run_and_export_the_ema_weights(saved, prompt_file, bf16_run, tmp_path):
    out = bf16_run
    trained = load_file(str(out / "checkpoints" / "step-000001" / "trained.safetensors"))
    ema = load_file(str(out / "checkpoints" / "step-000001" / "ema.safetensors"))
    exported = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    # The LoRA the run started from: the same seed gives the same draw (mixed precision and checkpointing do not
    # touch the initialization, and this process keeps accelerate's default precision).
    initial = initial_weights(saved, prompt_file, tmp_path / "init")
    assert ema.keys() == trained.keys() == initial.keys()
    for name, value in ema.items():
        key = "transformer." + name.replace(".default.", ".")
        torch.testing.assert_close(exported[key], value)
        # One EMA step from the initial weights, at the warmed-up decay 0.1: 0.1 · initial + 0.9 · trained. B starts
        # at 0, so 0.9 of the trained B. A barely moves in the first step (no gradient reaches it while B = 0; only
        # the weight decay shrinks it), so A's check is of the starting point: from 0 it would be off by ~0.03.
        if "lora_B" in name:
            assert not initial[name].any() and trained[name].any(), name
            torch.testing.assert_close(value, 0.9 * trained[name], rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(value, 0.1 * initial[name] + 0.9 * trained[name], rtol=0, atol=1e-7)


def test_max_minutes_stops_with_a_checkpoint_and_an_export(saved, prompt_file, tmp_path):
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, max_steps=5, max_minutes=1e-6,
                               checkpoint_every=0)
    GRPOTrainer(load_config(None, overrides)).train()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1]  # the first step already took longer than the budget
    assert rows[0]["train_minutes"] == pytest.approx(rows[0]["seconds"] / 60, abs=1e-3)
    state = json.loads((tmp_path / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["train_seconds"] == pytest.approx(rows[0]["seconds"], abs=0.01)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_gradient_signal_script_measures_the_policy_gradient_without_moving_the_weights(saved, prompt_file, tmp_path):
    """scripts/gradient_signal.py: each captured gradient is the hand-written GRPO loss's gradient at the
    unchanged starting weights (lr 0), and independent batches give different gradients."""
    script = runpy.run_path(str(REPO / "scripts" / "gradient_signal.py"))
    measure, cosines_by_module = script["measure"], script["cosines_by_module"]
    overrides = tiny_overrides(saved["sd3"], prompt_file, tmp_path, **{"grpo.kl_beta": 0, "optim.max_grad_norm":
                                                                       "null", "checkpoint_every": 0})
    trainer, gradients = measure(None, overrides, 3)
    reference = GRPOTrainer(load_config(None, [*overrides, "optim.lr=0"]))
    assert all(torch.equal(a, b) for a, b in zip(trainer.trained_state().values(),
                                                 reference.trained_state().values()))
    rollouts = reference.rollout(0)
    advantages, _ = reference.advantages(rollouts)
    steps = rollouts.trajectory.stochastic_steps
    clip, loss = reference.config.grpo.adv_clip_max, 0
    for j in steps:
        log_prob = step_log_prob(reference.adapter, rollouts.trajectory, j).log_prob
        ratio = torch.exp(log_prob - rollouts.trajectory.log_probs[:, j])
        loss = loss - (advantages.clamp(-clip, clip) * ratio).mean() / len(steps)
    loss.backward()
    by_hand = torch.cat([p.grad.flatten().double() for p in reference.params])
    assert len(gradients) == 3 and float(by_hand.norm()) > 0
    # atol: the float32 sums run in another order than the trainer's; on some CPUs entries then differ by up to
    # 1.3e-6 of the largest one (7e-8 of it beyond rtol)
    assert torch.allclose(gradients[0], by_hand, rtol=1e-4, atol=1e-6 * float(by_hand.abs().max()))
    assert not torch.allclose(gradients[1], gradients[0])

    # --by-module on gradients built by hand: parallel on the parameters of peft's to_q layers, independent elsewhere
    to_q_params = {id(p) for name, module in trainer.adapter.denoiser.named_modules() if name.endswith(".to_q")
                   for p in module.parameters() if p.requires_grad}
    in_to_q = torch.cat([torch.full((p.numel(),), id(p) in to_q_params) for p in trainer.params])
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(len(in_to_q), generator=generator, dtype=torch.float64)
    built = [torch.where(in_to_q, scale * shared, torch.randn(len(in_to_q), generator=generator, dtype=torch.float64))
             for scale in (1.0, 2.0, 3.0)]
    by_module = cosines_by_module(trainer, built)
    assert set(by_module) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert by_module["to_q"][0] == pytest.approx(1.0)
    assert all(abs(cosine) < 0.2 for target, (cosine, _) in by_module.items() if target != "to_q")
    to_q_share = [float(g[in_to_q].square().sum() / g.square().sum()) for g in built]
    assert by_module["to_q"][1] == pytest.approx(sum(to_q_share) / 3)
    assert sum(share for _, share in by_module.values()) == pytest.approx(1.0)
