"""Typed trainer configs, mirrored by the YAML files in `configs/`.

A YAML file gives any subset of the fields, nested by section (`sampling: {noise_level: 0.7}`); command-line
overrides use dotted keys (`sampling.noise_level=0.5`, values parsed as YAML). Only true and false are booleans,
as in YAML 1.2, so `optim.mixed_precision=no` is the string it looks like. Unknown keys and values of the wrong
type fail with the key named; `validate` checks what can be checked before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from align_diffusion.files import home_expanded, write_text_atomically
from align_diffusion.models import adapter_class, missing_local_model, size_problem
from align_diffusion.models.base import missing_c_compiler, model_option_problem, unusable_device
from align_diffusion.rewards.spec import parse_spec
from align_diffusion.rewards.transforms import BNPO_ROUNDING, METHODS as ADVANTAGE_METHODS
from align_diffusion.sampling.loop import (
    DEFAULT_NOISE_LEVEL,
    DIFFUSION_SAMPLERS,
    FLOW_SAMPLERS,
    guidance_problem,
    noise_levels_problem,
)
from align_diffusion.training.noise_table import read_table

TRAINABLE_REWARDS = ("adv-dino",)  # reward specs whose model co-trains against references
SIGNED_REWARDS = {"jpeg": "jpeg scores −kB",  # rewards sure to score below 0, which log-taming cannot take
                  "adv-dino": "adv-dino's head learns to score the policy's images below 0"}
# The interval a reward's scores lie in, where it is fixed (shapes: graded or 0/1; clip: 2.5 · max(cos, 0); hpsv2: a
# cosine; jpeg: −kB): bnpo's grpo.reward_range must hold a weighted sum of them. The others' are checked as they come.
SCORE_RANGES = {"shapes": (0.0, 1.0), "artifact": (0.0, 1.0), "clip": (0.0, 2.5), "hpsv2": (-1.0, 1.0),
                "jpeg": (-math.inf, 0.0)}


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


def check_bnpo_range(reward: str, terms: list, reward_range: list[float], trainable: bool) -> None:
    """ConfigError when bnpo's fixed grpo.reward_range cannot hold the reward's scores: a co-trained head's scale
    moves, a weighted sum of rewards with fixed intervals (`SCORE_RANGES`) spans theirs, and one sure to score below
    0 needs a range reaching below 0."""
    if trainable:
        raise ConfigError(f"grpo.advantage: bnpo maps rewards from a fixed grpo.reward_range, and {reward!r} holds a "
                          "head that trains, moving its scores' scale; use zscore or global_std")
    low_given, high_given = reward_range
    given = f"bnpo maps [{low_given:g}, {high_given:g}] to [0, 1]"
    if below_zero := [term.name for term in terms if term.name in SIGNED_REWARDS and term.weight > 0]:
        if low_given >= 0:
            raise ConfigError(f"grpo.reward_range: {given}, and {SIGNED_REWARDS[below_zero[0]]}; give the range the "
                              "reward lies in")
    if any(term.name not in SCORE_RANGES for term in terms):
        return
    ends = [[term.weight * end for end in SCORE_RANGES[term.name]] for term in terms]
    low, high = math.fsum(min(pair) for pair in ends), math.fsum(max(pair) for pair in ends)
    slack = BNPO_ROUNDING * (high_given - low_given)  # weights summing to 1 in decimals miss it by a rounding
    # Scores without a bound (jpeg=-0.01's kB / 100) are checked as they come
    if not (math.isinf(low) or math.isinf(high)) and (low < low_given - slack or high > high_given + slack):
        raise ConfigError(f"grpo.reward_range: {given}, and {reward!r} scores in [{low:g}, {high:g}]; give a range "
                          "that holds it")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads yes / no / on / off as booleans, 1:30 as the base-60 number 90, 0123 as the octal 83 and
    2024-01-01 as a date; here only true and false are booleans, a number holds no colon, an integer starts with no
    0 (0123 is no number), no text is a date, and a key given twice in one mapping is refused (the last would
    silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _NoBase60:
    """A resolver's pattern that matches no text holding a colon (a base-60 number to YAML 1.1)."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern

    def match(self, text: str):
        return None if ":" in text else self.pattern.match(text)


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, _NoBase60(pattern) if tag == _FLOAT else pattern) for tag, pattern in resolvers
            if tag not in (_BOOL, _INT, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def _parse_yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None
    except ValueError as error:  # an integer of over 4300 digits, which Python's int does not read
        raise ConfigError(f"{where}: {error}") from None


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class SamplingConfig:
    sampler: str = _help("rollout sampler: flow-sde, dance-sde or cps for flow models, ddim for ε-models", "flow-sde")
    noise_level: float | None = _help("the sampler's a / η (default: the sampler's own)", None)
    num_steps: int = _help("denoising steps of a training rollout", 10)
    noise_window: list[int] | None = _help("[start, end) of the steps that draw SDE noise (default: all)", None)
    guidance_scale: float = _help("guidance of rollouts and the trained policy (1 = no CFG)", 4.5)
    negative_prompt: str | None = _help("what classifier-free guidance steers away from, in rollouts, evaluations "
                                        "and the trained policy (null: the empty prompt, as in Flow-GRPO)", None)
    guidance_rescale: float = _help("φ in [0, 1] of rescaled classifier-free guidance in rollouts, evaluations and "
                                    "the trained policy (SD 1.5 / 2.x, SDXL; 0: off)", 0.0)
    true_cfg_scale: float = _help("FLUX's true classifier-free guidance away from negative_prompt, beside its "
                                  "distilled guidance_scale (1: off)", 1.0)
    height: int | None = _help("image height (default: the model's)", None)
    width: int | None = _help("image width (default: the model's)", None)
    batch_size: int = _help("images per denoiser call while sampling", 16)
    shared_noise: bool = _help("the images of a group start from the same initial noise (DanceGRPO)", False)
    noise_table: str | None = _help("JSON file with one noise level per step, replacing noise_level (DenseGRPO's "
                                    "ψ(t), written by `align-diffusion calibrate-noise`)", None)


@dataclass
class GRPOConfig:
    group_size: int = _help("images per prompt; advantages are computed within each group", 8)
    batch_size: int = _help("images per training step over all processes (a multiple of group_size)", 32)
    train_batch_size: int = _help("images per forward/backward pass (gradients accumulate over them)", 8)
    timestep_fraction: float = _help("share of the stochastic steps trained on (1 = all): a random subset drawn "
                                     "each step for all its images (DanceGRPO draws one per image)", 1.0)
    updates_per_step: int = _help("optimizer steps per batch (1 keeps training on-policy)", 1)
    clip_range: float = _help("PPO ratio clip ε", 1e-4)
    adv_clip_max: float = _help("advantages are clipped to ±this", 5.0)
    kl_beta: float = _help("weight of the KL to the reference model (the adapter disabled)", 0.04)
    advantage: str = _help("zscore, global_std or bnpo", "zscore")
    reward_range: list[float] = _help("[low, high] the combined reward lies in; bnpo maps it to [0, 1]",
                                      factory=lambda: [0.0, 1.0])
    ratio_warn: float = _help("warn when the on-policy ratio drifts from 1 by more than this", 1e-3)
    best_worst_only: bool = _help("train only on the best and the worst image of each group (DanceGRPO)", False)
    dense: str | None = _help("per-step advantages from step rewards: 'ode' (ODE completions, DenseGRPO) or 'x0' "
                              "(decoded x̂0, cheaper); null: one advantage per image", None)
    value_weight: float = _help("λ of the value-anchored term λ·(R − value_anchor) added to every advantage "
                                "(VGPO-style; 0: off)", 0.0)
    value_anchor: float = _help("the anchor of the value-anchored term", 0.0)
    log_tame: float | str | None = _help("log-taming (PaCo-RL): each reward term whose coefficient of variation over "
                                         "the step's images exceeds this δ (or the mean / median of the terms' "
                                         "coefficients) becomes log(1 + R) before the sum; the rewards must be "
                                         "non-negative; null: off", None)
    normalize_each: bool = _help("z-score each reward term within its group before the weighted sum (GDPO; "
                                 "GDPO follows it with advantage: global_std)", False)


@dataclass
class LoraConfig:
    enabled: bool = _help("train a LoRA (false: full fine-tuning of the denoiser)", True)
    rank: int = _help("LoRA rank r", 32)
    alpha: float = _help("LoRA alpha (scale alpha / r)", 64.0)
    target_modules: list[str] = _help(
        "module names LoRA wraps", factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )


@dataclass
class OptimConfig:
    lr: float = _help("AdamW learning rate", 3e-4)
    weight_decay: float = _help("AdamW weight decay", 1e-4)
    betas: list[float] = _help("AdamW betas", factory=lambda: [0.9, 0.999])
    warmup_steps: int = _help("linear warm-up steps, then constant", 0)
    max_grad_norm: float | None = _help("gradient-norm clip (null: none)", 1.0)
    ema_decay: float = _help("EMA of the trained weights, used for eval and export (0: off); its decay warms up "
                             "as min(ema_decay, (1 + n) / (10 + n)) at optimizer step n", 0.0)
    ema_every: int = _help("optimizer steps between EMA updates (Flow-GRPO's presets: 8)", 1)
    mixed_precision: str = _help("no, fp16, bf16 (autocast; trained weights stay float32) or auto: bf16 where the "
                                 "device computes it in hardware (a CPU with AMX or AVX512-BF16, a GPU that has it), "
                                 "else no, as the run starts (its config.yaml records which)", "no")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass", False)
    compile: bool = _help("torch.compile the denoiser's repeated blocks: faster steps on GPU once the first ones "
                          "have compiled (minutes)", False)


@dataclass
class EvalConfig:
    every: int = _help("evaluate every this many steps, and at the start and the end (0: never)", 10)
    prompts: str = _help("prompt source: shapes:SPLIT or a text file with one prompt per line", "shapes:test")
    num_images_per_prompt: int = _help("images per eval prompt", 2)
    num_steps: int = _help("ODE steps at eval", 40)
    seed: int = _help("image k of an eval is seeded seed + k", 10_000)
    shapes_eval: bool = _help("score eval images with ShapesEval (shapes-world prompts only)", False)
    rewards: str | None = _help("reward spec also scored on eval images and never trained on, e.g. "
                                "artifact:assets/world/artifact to watch for reward hacking; a term named like a "
                                "term of `reward` is reported by that one", None)


@dataclass
class GDROConfig:
    num_groups: int = _help("prompts of the offline set, generated once by the base model", 64)
    group_size: int = _help("images per prompt in the offline set", 8)
    groups_per_step: int = _help("groups per optimizer step", 4)
    tau: float = _help("temperature of the target distribution softmax(reward / tau)", 0.1)
    beta: float = _help("scale of the implicit reward −beta·(error of the model − error of the reference)", 1000.0)
    sft_weight: float = _help("weight of the denoising loss on each group's best image (the regularizer)", 0.1)


@dataclass
class TrainConfig:
    algorithm: str = _help("grpo (online, the GRPO family) or gdro (offline, over groups generated once)", "grpo")
    model: str = _help("hub id or folder of a supported diffusers pipeline", "assets/world/sd3")
    max_sequence_length: int | None = _help("T5 tokens per prompt of SD3 / FLUX (default: the pipeline's, 256 / "
                                            "512; Flow-GRPO encodes SD3 prompts with 128)", None)
    clip_skip: int = _help("CLIP layers skipped from the end when encoding prompts (SD 1.5, SDXL, SD3; 0: none)", 0)
    output_dir: str = _help("where config, metrics, checkpoints and the LoRA go", "outputs/grpo")
    max_steps: int = _help("training steps (one batch of rollouts each)", 100)
    max_minutes: float | None = _help("also stop once training steps (evaluations excluded) took this many "
                                      "wall-clock minutes, for runs compared at equal time", None)
    seed: int = _help("seeds prompts, rollouts and timestep subsets", 0)
    prompts: str = _help("training prompts: shapes:SPLIT or a text file with one prompt per line", "shapes:train")
    reward: str = _help("reward spec, e.g. 'shapes' or 'pickscore=1.0,jpeg=0.1'", "shapes")
    dtype: str = _help("model weights dtype: float32, float16 or bfloat16", "float32")
    device: str | None = _help("device (default: accelerate's)", None)
    async_rewards: bool = _help("score a chunk in a thread while the next chunk samples", True)
    checkpoint_every: int = _help("save a resumable checkpoint every this many steps (0: only at the end)", 10)
    checkpoints_kept: int = _help("how many recent checkpoints to keep", 2)
    resume_from: str | None = _help("a checkpoint folder, or 'latest' in output_dir", None)
    log_with: list[str] = _help("trackers: tensorboard, wandb", factory=lambda: ["tensorboard"])
    references: str | None = _help("reference images for a trainable reward (adv-dino, Adv-GRPO): 'shapes' renders "
                                   "the prompts, or a folder of images", None)
    reward_updates: int = _help("updates of a trainable reward per step when its schedule fires", 1)
    sampling: SamplingConfig = _help("rollouts", factory=SamplingConfig)
    grpo: GRPOConfig = _help("the GRPO objective", factory=GRPOConfig)
    lora: LoraConfig = _help("the trained adapter", factory=LoraConfig)
    optim: OptimConfig = _help("the optimizer", factory=OptimConfig)
    eval: EvalConfig = _help("periodic evaluation", factory=EvalConfig)
    gdro: GDROConfig = _help("the offline GDRO objective (algorithm: gdro)", factory=GDROConfig)


# --- loading --------------------------------------------------------------------------------------------------


def _check_type(value, hint, key: str):
    """`value` as the annotated type (ints widen to floats); ConfigError naming `key` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner:  # the first type that takes it
            try:
                return _check_type(value, option, key)
            except ConfigError:
                if len(inner) == 1:
                    raise
        raise ConfigError(f"{key}: expected {' or '.join(a.__name__ for a in inner)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of over 308 digits
            raise ConfigError(f"{key}: an integer of {value.bit_length()} bits is beyond any float") from None
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)  # a YAML key may be a number
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def apply_override(values: dict, override: str) -> None:
    """Sets `a.b=value` (value parsed as YAML) in a nested dict."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value")
    *parents, leaf = key.split(".")
    node = values
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {parent} is not a section")
    value = _parse_yaml(text, f"override {key}")
    comment = next((match.start() for match in re.finditer(r"(?:^|\s)#", text)), -1)
    if comment >= 0:  # YAML drops a comment silently: `negative_prompt=blurry #2` would read as blurry
        try:
            dropped = _parse_yaml(text[:comment], "") == value
        except ConfigError:  # the # lies inside quotes
            dropped = False
        if dropped:
            raise ConfigError(f"override {key}: YAML reads what follows '#' as a comment; quote the value to keep "
                              f"it, {key}='\"{text}\"'")
    if "\n" in text.strip() and isinstance(value, str) and not text.lstrip().startswith(("'", '"')):
        raise ConfigError(f"override {key}: YAML folds the lines of an unquoted value into one; quote it to keep "
                          "them")
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):  # one key of a section: the others stay
        _merge(node[leaf], value)
    else:
        node[leaf] = value


def _merge(section: dict, values: dict) -> None:
    """`values` set in `section`, nested sections merged key by key."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            _merge(section[key], value)
        else:
            section[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] | str = (), num_processes: int = 1) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults) and dotted `key=value` overrides (one string: one
    override), validated for a launch of `num_processes`."""
    overrides = [overrides] if isinstance(overrides, str) else overrides
    values = {}
    if path is not None:
        values = _parse_yaml(Path(path).read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got a "
                              f"{type(values).__name__}")
    for override in overrides:  # in order: a later override of a key wins, as a later flag does
        apply_override(values, override)
    config = _build(TrainConfig, values)
    # Paths with a leading ~, which the shell does not expand in a config file or a quoted override, are read as
    # `model` and `prompts` are: from the home folder.
    for owner, name in ((config, "output_dir"), (config, "resume_from"), (config, "references"),
                        (config.sampling, "noise_table")):
        if getattr(owner, name) is not None:
            setattr(owner, name, home_expanded(getattr(owner, name)))
    validate(config, num_processes)
    return config


def to_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config: TrainConfig, path: Path) -> None:
    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _yaml_value(value) -> str:
    """`value` as one line of YAML: a string double-quoted by PyYAML (JSON's escapes split characters beyond
    U+FFFF into surrogates YAML does not join), anything else as JSON, which YAML reads (null, true, [lists])."""
    if isinstance(value, str):
        return yaml.safe_dump(value, default_style='"', width=math.inf).rstrip("\n")
    return json.dumps(value)


def describe_config(config, indent: str = "") -> str:
    """The config as YAML that `load_config` reads back, every key followed by its documentation as a comment."""
    lines = []
    for item in dataclasses.fields(config):
        value, note = getattr(config, item.name), item.metadata["help"]
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{item.name}:  # {note}")
            lines.append(describe_config(value, indent + "  "))
        else:
            lines.append(f"{indent}{item.name}: {_yaml_value(value)}  # {note}")
    return "\n".join(lines)


# --- validation ------------------------------------------------------------------------------------------------

# Where a config sets each option its adapter is built with (models.base.MODEL_OPTIONS).
MODEL_OPTION_FIELDS = {"max_sequence_length": "max_sequence_length", "clip_skip": "clip_skip",
                       "guidance_rescale": "sampling.guidance_rescale", "true_cfg_scale": "sampling.true_cfg_scale"}


def model_options(config: TrainConfig) -> dict:
    """The adapter options `config` sets, keyed as `load_adapter` takes them."""
    return {option: functools.reduce(getattr, path.split("."), config) for option, path in MODEL_OPTION_FIELDS.items()}


def _model_family(model: str):
    """The adapter class of a pipeline folder / cached hub id, from its model_index.json (None if unknown)."""
    if reason := missing_local_model(model):
        raise ConfigError(f"model: {reason}")
    try:
        return adapter_class(model)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def noise_drawing_steps(sampling: SamplingConfig) -> range:
    """The steps a level above 0 makes draw noise: the noise window (default: every step), less CPS's last step,
    which ends on σ = 0."""
    start, end = sampling.noise_window or (0, sampling.num_steps)
    return range(start, end - 1 if sampling.sampler == "cps" and end == sampling.num_steps else end)


def validate(config: TrainConfig, num_processes: int = 1) -> None:
    """Every check that needs no weights; ConfigError naming the field."""
    for key, text in {"model": config.model, "output_dir": config.output_dir, "prompts": config.prompts}.items():
        if not text.strip():
            raise ConfigError(f"{key} is empty")
    if config.lora.enabled and not config.lora.target_modules:
        raise ConfigError("lora.target_modules is empty: a LoRA needs at least one module to adapt")
    positive = {
        "max_steps": config.max_steps, "grpo.group_size": config.grpo.group_size,
        "grpo.batch_size": config.grpo.batch_size, "grpo.train_batch_size": config.grpo.train_batch_size,
        "grpo.updates_per_step": config.grpo.updates_per_step, "sampling.num_steps": config.sampling.num_steps,
        "sampling.batch_size": config.sampling.batch_size, "lora.rank": config.lora.rank,
        "eval.num_steps": config.eval.num_steps, "eval.num_images_per_prompt": config.eval.num_images_per_prompt,
        "checkpoints_kept": config.checkpoints_kept,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if not 0 <= config.seed < 2**32:  # the range of numpy's seed, which accelerate's set_seed also seeds
        raise ConfigError(f"seed must lie in [0, 2**32), got {config.seed}")
    if not 0 <= config.eval.seed < 2**32:  # torch's CPU generator reads a seed's low 32 bits
        raise ConfigError(f"eval.seed must lie in [0, 2**32), got {config.eval.seed}")
    if config.max_minutes is not None and not 0 < config.max_minutes < math.inf:  # also refuses NaN
        raise ConfigError(f"max_minutes must be a finite number > 0, got {config.max_minutes}")
    for key, value in {"checkpoint_every": config.checkpoint_every, "eval.every": config.eval.every}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0: never), got {value}")
    for key, value in {"sampling.height": config.sampling.height, "sampling.width": config.sampling.width}.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be a positive number of pixels (null: the model's), got {value}")
    if config.device is not None and (reason := unusable_device(config.device)):  # None: accelerate picks
        raise ConfigError(f"device: {reason}")
    if num_processes > 1 and config.device is not None and ":" in config.device:
        raise ConfigError(f"device: {config.device} would put every one of the {num_processes} processes' models on "
                          "one device, where accelerate trains each on its own; leave device unset (null)")
    if config.algorithm not in ("grpo", "gdro"):
        raise ConfigError(f"algorithm must be grpo or gdro, got {config.algorithm!r}")
    from align_diffusion.training.prompts import PromptSource

    for key, spec in (("prompts", config.prompts), ("eval.prompts", config.eval.prompts)):
        try:
            PromptSource(spec, key)  # a split that does not exist, a file that does not or holds no prompt
        except (ValueError, OSError) as error:
            raise ConfigError(str(error)) from None
    gdro = config.gdro
    for key, value, least in (("gdro.num_groups", gdro.num_groups, 1), ("gdro.group_size", gdro.group_size, 2),
                              ("gdro.groups_per_step", gdro.groups_per_step, 1)):
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, got {value}")
    if config.algorithm == "gdro" and gdro.groups_per_step > gdro.num_groups:  # a step would take each group once
        raise ConfigError(f"gdro.groups_per_step ({gdro.groups_per_step}) must be at most gdro.num_groups "
                          f"({gdro.num_groups}), the groups there are")
    if not (0 < gdro.tau < math.inf and 0 < gdro.beta < math.inf and 0 <= gdro.sft_weight < math.inf):
        raise ConfigError(f"gdro: tau and beta must be finite and > 0 and sft_weight >= 0, got tau={gdro.tau}, "
                          f"beta={gdro.beta}, sft_weight={gdro.sft_weight}")
    grpo = config.grpo
    if grpo.group_size < 2:
        raise ConfigError(f"grpo.group_size must be at least 2 (advantages compare images of a prompt), got "
                          f"{grpo.group_size}")
    if grpo.batch_size % grpo.group_size:
        raise ConfigError(f"grpo.group_size {grpo.group_size} does not divide grpo.batch_size {grpo.batch_size}")
    if config.algorithm == "gdro" and num_processes > 1:
        raise ConfigError(f"algorithm: gdro runs in one process, got {num_processes}")
    if grpo.batch_size % num_processes:
        raise ConfigError(f"grpo.batch_size {grpo.batch_size} is not a multiple of the {num_processes} processes")
    local = grpo.batch_size // num_processes
    if local % grpo.train_batch_size:
        raise ConfigError(f"grpo.train_batch_size {grpo.train_batch_size} does not divide the "
                          f"{local} images per process")
    if (local // grpo.train_batch_size) % grpo.updates_per_step:
        raise ConfigError(f"grpo.updates_per_step {grpo.updates_per_step} does not divide the "
                          f"{local // grpo.train_batch_size} micro-batches per process")
    if not 0 < grpo.timestep_fraction <= 1:
        raise ConfigError(f"grpo.timestep_fraction must lie in (0, 1], got {grpo.timestep_fraction}")
    if grpo.advantage not in ADVANTAGE_METHODS:
        raise ConfigError(f"grpo.advantage must be one of {ADVANTAGE_METHODS}, got {grpo.advantage!r}")
    if grpo.advantage == "bnpo" and grpo.dense is not None:
        raise ConfigError("grpo.advantage: bnpo normalizes rewards within grpo.reward_range, and dense step rewards "
                          "are signed differences; use zscore or global_std with grpo.dense")
    if len(grpo.reward_range) != 2 or not -math.inf < grpo.reward_range[0] < grpo.reward_range[1] < math.inf:
        raise ConfigError(f"grpo.reward_range must be [low, high], finite, with low < high, got {grpo.reward_range}")
    if grpo.advantage != "bnpo" and list(grpo.reward_range) != GRPOConfig().reward_range:
        raise ConfigError(f"grpo.reward_range: only bnpo reads it, and grpo.advantage is {grpo.advantage}; leave it "
                          "out")
    if not 0 < grpo.adv_clip_max < math.inf:  # 0 would clip every advantage to 0: nothing to train on
        raise ConfigError(f"grpo.adv_clip_max must be a finite number > 0, got {grpo.adv_clip_max}")
    for key, value in {"grpo.clip_range": grpo.clip_range, "grpo.kl_beta": grpo.kl_beta,
                       "grpo.value_weight": grpo.value_weight,
                       "sampling.guidance_scale": config.sampling.guidance_scale, "optim.lr": config.optim.lr,
                       "optim.weight_decay": config.optim.weight_decay, "grpo.ratio_warn": grpo.ratio_warn}.items():
        if not 0 <= value < math.inf:  # also refuses NaN
            raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
    if not math.isfinite(grpo.value_anchor):
        raise ConfigError(f"grpo.value_anchor must be a finite number, got {grpo.value_anchor}")
    if grpo.best_worst_only and grpo.value_weight:
        raise ConfigError("grpo.best_worst_only: the value-anchored term keeps groups whose rewards do not vary, whose "
                          "best and worst image are one (the first), which alone would carry the group's signal; use "
                          "grpo.best_worst_only or grpo.value_weight")
    if grpo.value_weight == 0 and grpo.value_anchor != GRPOConfig.value_anchor:
        raise ConfigError("grpo.value_anchor: only the value-anchored term reads it, and grpo.value_weight is 0; set "
                          "grpo.value_weight too, or leave the anchor out")
    if not 0 < grpo.clip_range < 1:  # 1 - ε < 0 would leave a ratio's fall unclipped
        raise ConfigError(f"grpo.clip_range must lie in (0, 1), got {grpo.clip_range}")
    # Each algorithm reads its own section only: a setting changed in the other would seem to take effect.
    unread, section = (grpo, GRPOConfig) if config.algorithm == "gdro" else (gdro, GDROConfig)
    for setting in dataclasses.fields(section):
        if getattr(unread, setting.name) != getattr(section(), setting.name):
            name = section.__name__.removesuffix("Config").lower()
            raise ConfigError(f"{name}.{setting.name}: applies to algorithm {name}, not {config.algorithm}; leave it "
                              "out")
    optim = config.optim
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if optim.max_grad_norm is not None and not 0 < optim.max_grad_norm < math.inf:
        raise ConfigError(f"optim.max_grad_norm must be > 0 (null: no clipping), got {optim.max_grad_norm}")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
    if not 0 < config.lora.alpha < math.inf:
        raise ConfigError(f"lora.alpha must be > 0 (the LoRA's scale is alpha / rank), got {config.lora.alpha}")
    if not 0 <= optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must lie in [0, 1), got {optim.ema_decay}")
    if optim.ema_every < 1:
        raise ConfigError(f"optim.ema_every must be >= 1, got {optim.ema_every}")
    if optim.ema_every != 1 and optim.ema_decay == 0:
        raise ConfigError(f"optim.ema_every: {optim.ema_every} sets how often an EMA updates, and optim.ema_decay is "
                          "0 (no EMA)")
    if optim.compile and (error := missing_c_compiler("optim.compile")):
        raise ConfigError(error)
    if optim.mixed_precision not in ("no", "fp16", "bf16", "auto"):
        raise ConfigError(f"optim.mixed_precision must be no, fp16, bf16 or auto, got {optim.mixed_precision!r}")
    if config.dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {config.dtype!r}")
    if not config.lora.enabled and config.dtype != "float32":
        raise ConfigError("dtype: full fine-tuning needs float32 weights (use a LoRA for half-precision models)")
    for tracker in config.log_with:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"log_with: unknown tracker {tracker!r}; use tensorboard and/or wandb")
    window = config.sampling.noise_window
    if window is not None and (len(window) != 2 or not 0 <= window[0] < window[1] <= config.sampling.num_steps):
        raise ConfigError(f"sampling.noise_window must be [start, end) within the {config.sampling.num_steps} "
                          f"steps, got {window}")
    if grpo.dense not in (None, "ode", "x0"):
        raise ConfigError(f"grpo.dense must be ode, x0 or null, got {grpo.dense!r}")
    if isinstance(grpo.log_tame, str) and grpo.log_tame not in ("mean", "median"):
        raise ConfigError(f"grpo.log_tame must be a number >= 0, mean or median (null: off), got {grpo.log_tame!r}")
    if isinstance(grpo.log_tame, float) and not 0 <= grpo.log_tame < math.inf:
        raise ConfigError(f"grpo.log_tame must be a finite number >= 0, mean or median, got {grpo.log_tame}")
    for key, on in {"grpo.log_tame": grpo.log_tame is not None, "grpo.normalize_each": grpo.normalize_each}.items():
        if on and grpo.dense is not None:
            raise ConfigError(f"{key}: the reward transforms combine one reward per image, not dense step rewards")
        if on and grpo.advantage == "bnpo":
            raise ConfigError(f"{key}: bnpo maps grpo.reward_range, the plain reward's, to [0, 1], which the "
                              "transformed reward leaves; use zscore or global_std")
        if on and grpo.value_weight:
            raise ConfigError(f"{key}: the value-anchored term λ·(R − value_anchor) needs the plain reward's scale "
                              "(after normalize_each every group's mean is 0, so no group would be told from another)")
    if grpo.dense is not None and grpo.value_weight:
        raise ConfigError("grpo.value_weight: the value-anchored term applies to one advantage per image, not to "
                          "dense per-step advantages")
    if config.reward_updates < 1:  # a head never updated would score by its random initial weights
        raise ConfigError(f"reward_updates must be >= 1, got {config.reward_updates}")
    sampling = config.sampling
    if sampling.noise_table is not None:
        if sampling.noise_level is not None:
            raise ConfigError("sampling.noise_table replaces sampling.noise_level; set only one")
        try:
            levels = read_table(sampling.noise_table, sampling.num_steps, sampling.sampler)
        except ValueError as error:
            raise ConfigError(f"sampling.noise_table: {error}") from None
        key = "sampling.noise_table"
    else:
        if sampling.noise_level is not None and not 0 <= sampling.noise_level < math.inf:
            raise ConfigError(f"sampling.noise_level must be a finite number >= 0, got {sampling.noise_level}")
        level = DEFAULT_NOISE_LEVEL.get(sampling.sampler, 0.0) if sampling.noise_level is None else sampling.noise_level
        levels = [level] * sampling.num_steps
        key = "sampling.noise_level"
    try:
        terms = parse_spec(config.reward)
    except ValueError as error:
        raise ConfigError(f"reward: {error}") from None
    if config.eval.rewards is not None:
        try:
            watched = parse_spec(config.eval.rewards)
        except ValueError as error:
            raise ConfigError(f"eval.rewards: {error}") from None
        if trained := [term.text for term in watched if term.name in TRAINABLE_REWARDS]:
            raise ConfigError(f"eval.rewards: {trained[0]} trains against reference images, which only the training "
                              "reward is given (as a watched reward its head would score untrained)")
    if grpo.log_tame in ("mean", "median") and len(terms) < 2:
        raise ConfigError(f"grpo.log_tame: {grpo.log_tame} compares the spreads of the reward's terms, and "
                          f"{config.reward!r} has one; give a number δ")
    signed = [term.name for term in terms if term.name in SIGNED_REWARDS]
    if grpo.log_tame is not None and signed:
        raise ConfigError(f"grpo.log_tame: log-taming needs non-negative rewards, and {SIGNED_REWARDS[signed[0]]}")
    trainable = any(term.name in TRAINABLE_REWARDS for term in terms)
    if grpo.advantage == "bnpo":
        check_bnpo_range(config.reward, terms, grpo.reward_range, trainable)
    if trainable and config.algorithm == "gdro":
        raise ConfigError(f"reward: {config.reward!r} trains against the policy's samples as they come, and GDRO "
                          "scores its offline set once; use algorithm grpo")
    if trainable and config.references is None:
        raise ConfigError("references: the reward trains against reference images (adv-dino); set references to "
                          "'shapes' or an image folder")
    if not trainable and config.references is not None:  # else a run would seem to use them
        raise ConfigError(f"references: only a reward that trains against them (adv-dino) reads reference images, and "
                          f"reward {config.reward!r} has none; leave references out (null)")
    if not trainable and config.reward_updates != TrainConfig.reward_updates:
        raise ConfigError(f"reward_updates: only a reward that trains (adv-dino) is updated, and reward "
                          f"{config.reward!r} has none; leave reward_updates out")
    family = _model_family(config.model)
    is_flow = None if family is None else family.is_flow
    sides = {"sampling.height": sampling.height, "sampling.width": sampling.width}
    if found := size_problem(config.model, sides):
        raise ConfigError(f"{found[0]}: {found[1]}, got {sides[found[0]]} (model {config.model})")
    for option, value in model_options(config).items():
        if reason := model_option_problem(family, option, value):
            raise ConfigError(f"{MODEL_OPTION_FIELDS[option]}: {reason} (model {config.model})")
    if problem := guidance_problem(family, sampling.guidance_scale, sampling.negative_prompt,
                                   sampling.guidance_rescale, sampling.true_cfg_scale):  # LCM's: once the model loads
        raise ConfigError(f"sampling.{problem[0]}: {problem[1]} (model {config.model})")
    allowed = {True: FLOW_SAMPLERS, False: DIFFUSION_SAMPLERS, None: FLOW_SAMPLERS + DIFFUSION_SAMPLERS}[is_flow]
    if config.algorithm == "grpo":
        allowed = tuple(s for s in allowed if s != "ode")
        if config.sampling.sampler == "ode":
            raise ConfigError("sampling.sampler 'ode': GRPO trains on the log-probabilities of stochastic steps, and "
                              f"the ODE draws no noise; use one of {allowed}")
    if config.sampling.sampler not in allowed:
        kind = {True: "a flow model", False: "a diffusion (ε) model", None: "any model"}[is_flow]
        raise ConfigError(f"sampling.sampler {config.sampling.sampler!r} does not fit {kind}; use one of {allowed}")
    if problem := noise_levels_problem(sampling.sampler, levels):
        raise ConfigError(f"{key}: {problem}")
    if sampling.sampler == "ode" and window is not None:  # it would change nothing, yet tell the offline set apart
        raise ConfigError("sampling.noise_window: the ode sampler draws no noise, so a window would change nothing; "
                          "leave it out, or use a stochastic sampler")
    start, end = window if window is not None else (0, sampling.num_steps)
    drawing = noise_drawing_steps(sampling)
    if config.algorithm == "gdro" and sampling.shared_noise and (
            sampling.sampler == "ode" or not any(levels[t] > 0 for t in drawing)):
        raise ConfigError("sampling.shared_noise: with no noise drawn after the shared start, every image of a group "
                          "would be the same; pick a stochastic sampler and noise level, or share no noise")
    if config.algorithm == "grpo" and not any(levels[t] > 0 for t in drawing):
        cps_end = " (CPS's last step draws no noise)" if drawing.stop < end else ""
        raise ConfigError(f"{key}: GRPO trains on stochastic steps, and every noise level within the noise window "
                          f"[{start}, {end}) is 0{cps_end}")
