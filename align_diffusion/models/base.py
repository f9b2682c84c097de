"""The adapter interface: one view of every supported diffusers pipeline for samplers, rewards and trainers.

An adapter wraps a loaded pipeline and exposes what the methods of this package need: prompt encoding (with the
unconditional branch for classifier-free guidance), the initial noise, the timestep schedule, the denoiser's guided
prediction, x̂0, decoding, and the module LoRA attaches to. It reuses the pipeline's own encoders and helpers, so a
sample drawn through an adapter matches the stock pipeline's `__call__`.
"""

from __future__ import annotations

import copy
import math
import numbers
import shutil
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from align_diffusion.names import DTYPE_NAMES
from align_diffusion.sampling.steps import ddim_pred_x0_and_eps


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of images: batch-first tensors keyed by the denoiser's argument names."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None  # present when guidance is classifier-free

    def select(self, index) -> PromptEmbeds:
        """The conditioning of the images at `index` (an int list, slice or bool mask)."""
        def pick(tensors):
            return {name: tensor[index] for name, tensor in tensors.items()}

        return PromptEmbeds(pick(self.cond), None if self.uncond is None else pick(self.uncond))


@dataclass
class Schedule:
    """The noise levels of one sampling run with `num_steps` steps."""

    timesteps: torch.Tensor  # (T,) the denoiser's time input at each step, exactly as the stock pipeline passes it
    sigmas: torch.Tensor | None = None  # flow models: (T + 1,) noise levels t, ending at 0
    alphas_cumprod: torch.Tensor | None = None  # ε-models: (T,) ᾱ at each step
    alphas_cumprod_prev: torch.Tensor | None = None  # ε-models: (T,) ᾱ each step lands on

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


class PipelineAdapter:
    """Base class; subclasses fill in the family-specific parts (see models/__init__.py for the list)."""

    pipeline_class: type
    is_flow: bool  # flow matching (velocity) rather than ε / v-prediction diffusion
    default_steps: int
    default_guidance: float
    # T5 tokens per prompt the stock pipeline encodes by default (SD3, FLUX); None: the family has no T5 encoder.
    default_max_sequence_length: int | None = None
    takes_clip_skip = False  # the stock pipeline's encode_prompt takes clip_skip
    # The stock encoding reads CLIP's hidden_states[-(clip_skip + this)]: 1 the last layer's output, 2 the one before.
    clip_hidden_state_from_end = 2
    takes_guidance_rescale = False  # the stock pipeline's __call__ takes guidance_rescale
    takes_true_cfg_scale = False  # the stock pipeline's __call__ takes true_cfg_scale (FLUX)

    def __init__(self, pipe, max_sequence_length: int | None = None, clip_skip: int | None = None,
                 guidance_rescale: float | None = None, true_cfg_scale: float | None = None):
        if not isinstance(pipe, self.pipeline_class):
            raise TypeError(f"{type(self).__name__} wraps {self.pipeline_class.__name__}, got {type(pipe).__name__}")
        check_model_options(type(self), max_sequence_length=max_sequence_length, clip_skip=clip_skip,
                            guidance_rescale=guidance_rescale, true_cfg_scale=true_cfg_scale)
        self.pipe = pipe
        # T5 tokens per prompt: the prompt is truncated, or padded, to this many (None for families without T5).
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        # CLIP layers skipped from the end when encoding prompts, as the stock encode_prompt skips them (None: none).
        self.clip_skip = clip_skip or None  # 0 skips none, as the stock pipelines read it
        if clip_skip:
            layers = min((encoder.config.num_hidden_layers for encoder in self.clip_text_encoders()), default=None)
            if layers is None:
                raise ValueError("clip_skip: the pipeline holds no CLIP text encoder to skip layers of")
            if clip_skip > (most := layers + 1 - self.clip_hidden_state_from_end):
                raise ValueError(f"clip_skip: at most {most} for this pipeline's CLIP text encoders ({layers} layers), "
                                 f"got {clip_skip}")
        # φ of "Common Diffusion Noise Schedules and Sample Steps are Flawed": the guided prediction's std is pulled
        # back toward the conditional one's, as the stock SD pipelines do with guidance_rescale (0: off).
        self.guidance_rescale = guidance_rescale or 0.0
        # The weight of FLUX's true classifier-free guidance, run beside its distilled guidance (1: off).
        self.true_cfg_scale = true_cfg_scale or 1.0
        # What `forward` calls instead of the denoiser, when set: a trainer's distributed wrapper of it (so
        # gradients synchronize) or a frozen reference copy.
        self.forward_module: torch.nn.Module | None = None

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def denoiser_name(self) -> str:
        """The pipeline component that denoises: `transformer` or `unet`."""
        return "transformer" if hasattr(self.pipe, "transformer") else "unet"

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module LoRA attaches to: the transformer or the UNet."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def prediction_type(self) -> str:
        return "flow" if self.is_flow else self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """The stock pipeline's default height and width: the denoiser's sample size, one side or a (height, width)
        pair, in pixels."""
        sample_size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The height and width in pixels of an image asked for as `height` × `width`, None meaning the default's
        side."""
        default_height, default_width = self.default_size
        return default_height if height is None else height, default_width if width is None else width

    def guidance_mode(self, guidance_scale: float) -> str:
        """'cfg' (classifier-free, two branches), 'distilled' (guidance embedding) or 'none'."""
        return "cfg" if guidance_scale > 1 else "none"

    def clip_text_encoders(self) -> list[torch.nn.Module]:
        """The CLIP text encoders whose hidden states `clip_skip` picks from."""
        return [encoder for name in ("text_encoder", "text_encoder_2")
                if isinstance(encoder := getattr(self.pipe, name, None), (CLIPTextModel, CLIPTextModelWithProjection))]

    @classmethod
    def side_problem(cls, pixels: int, vae_scale_factor: int, denoiser_config) -> str | None:
        """Why an image side of `pixels` does not fit a model of this family with that VAE and denoiser config (a
        config dict: read from the model's files, a command checks a size before it loads the model); None when it
        fits."""
        if pixels <= 0 or pixels % vae_scale_factor:
            return f"must be a positive multiple of {vae_scale_factor}"
        return None

    def check_size(self, height: int, width: int) -> None:
        for name, pixels in (("height", height), ("width", width)):
            if problem := self.side_problem(pixels, self.vae_scale_factor, self.denoiser.config):
                raise ValueError(f"{name} {problem}, got {height}×{width}")

    # --- sampling pieces -------------------------------------------------------------------------------------
    def encode_prompt(
        self, prompts: list[str], guidance_scale: float, num_images_per_prompt: int = 1, negative_prompt=None
    ) -> PromptEmbeds:
        """Conditioning for len(prompts) × num_images_per_prompt images, prompt-major."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one image's latent, without the batch dim."""
        channels = self.denoiser.config.in_channels
        return channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """x_T for one image per generator, float32; drawn as the stock pipeline draws it (in the model's dtype)."""
        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype).float()

    def schedule(self, num_inference_steps: int, height: int, width: int) -> Schedule:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, timestep, embeds: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
        """The denoiser's guided prediction (float32) at `timestep` (a schedule entry, scalar or per-sample).

        Grad flows when the caller enables it; the classifier-free combination is done in the model's dtype,
        as in the stock pipelines.
        """
        model_input = latents.to(self.dtype)
        if embeds.uncond is None:
            if self.guidance_mode(guidance_scale) == "cfg":  # one branch would be the unguided prediction
                raise ValueError(f"guidance_scale {guidance_scale} runs classifier-free guidance, but the prompt "
                                 "embeddings hold no unconditional branch: encode them with that guidance scale")
            return self.forward(model_input, timestep, embeds.cond, guidance_scale).float()
        both = {name: torch.cat([embeds.uncond[name], embeds.cond[name]]) for name in embeds.cond}
        timestep = torch.as_tensor(timestep)
        if timestep.ndim:  # per-sample timesteps go with both halves of the doubled batch
            timestep = torch.cat([timestep] * 2)
        pred_uncond, pred_cond = self.forward(torch.cat([model_input] * 2), timestep, both, guidance_scale).chunk(2)
        guided = pred_uncond + self.cfg_weight(guidance_scale) * (pred_cond - pred_uncond)
        if self.guidance_rescale:
            guided = rescale_noise_cfg(guided, pred_cond, self.guidance_rescale)
        return guided.float()

    def cfg_weight(self, guidance_scale: float) -> float:
        """The weight of the conditional branch over the unconditional one in classifier-free guidance."""
        return guidance_scale

    def forward(self, latents, timestep, conditioning: dict, guidance_scale: float) -> torch.Tensor:
        """One denoiser call on a batch in the model's dtype, as the stock pipeline makes it."""
        raise NotImplementedError

    def call_denoiser(self, *args, **kwargs):
        module = self.denoiser if self.forward_module is None else self.forward_module
        return module(*args, **kwargs)

    def called_denoiser(self) -> torch.nn.Module:
        """The model `call_denoiser` runs (the denoiser, or a trainer's frozen reference copy), without the
        distributed wrapper around it: where per-call attention processors must go."""
        module = self.denoiser if self.forward_module is None else self.forward_module
        return getattr(module, "module", module)  # DDP, FSDP and DeepSpeed hold the model they wrap as .module

    def pred_x0(self, latents: torch.Tensor, prediction: torch.Tensor, schedule: Schedule, step_index: int):
        """The clean-latent estimate x̂0 implied by `prediction` at step `step_index`."""
        latents, prediction = latents.float(), prediction.float()
        if self.is_flow:
            return latents - schedule.sigmas[step_index] * prediction
        alpha = schedule.alphas_cumprod[step_index]
        return ddim_pred_x0_and_eps(prediction, latents, alpha, self.prediction_type)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32, (batch, 3, H, W); grad flows when the caller enables it."""
        vae = self.decoding_vae()
        images = vae.decode(self.unscale_latents(latents).to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def decoding_vae(self) -> torch.nn.Module:
        """The VAE `decode` runs: the pipeline's own."""
        return self.pipe.vae

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the VAE's own space."""
        config = self.pipe.vae.config
        return latents / config.scaling_factor + (config.get("shift_factor") or 0.0)

    @staticmethod
    def levels(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images as 8-bit levels 0…255 (float), rounded as diffusers' image processor rounds them."""
        return (images.detach().float().clamp(0, 1) * 255).round()

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """[0, 1] image tensors to PIL at their `levels`."""
        pixels = PipelineAdapter.levels(images).to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

    @staticmethod
    def diverged(images: torch.Tensor) -> list[bool]:
        """Which images hold a NaN or infinite value: a sample that diverged (fp16 overflow, a huge noise level),
        which `to_pil` writes black."""
        return (~torch.isfinite(images.detach().flatten(1)).all(dim=1)).tolist()

    @staticmethod
    def as_saved(images: torch.Tensor) -> torch.Tensor:
        """The images at the 8-bit levels `to_pil` writes: a verdict on them holds for the saved files (a shape's
        fill can sit on a ShapesEval threshold that rounding crosses)."""
        return PipelineAdapter.levels(images) / 255


MAX_SEQUENCE_LENGTH = 512  # the most T5 tokens the stock SD3 and FLUX pipelines accept
RECOMPILE_LIMIT = 64  # graphs per compiled block forward (see compile_repeated_blocks)
C_COMPILERS = ("g++", "c++", "clang++", "gcc", "cc")  # what inductor (CPU) and Triton (GPU) build with


def is_whole_number(value) -> bool:
    """An int of any kind (numpy's too), not a bool: what counts, steps, seeds and token lengths must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def max_sequence_length_problem(family: type[PipelineAdapter] | None, value: int) -> str | None:
    if not is_whole_number(value):
        return f"must be a whole number of T5 tokens, got {value!r}"
    if not 1 <= value <= MAX_SEQUENCE_LENGTH:
        return f"must lie in [1, {MAX_SEQUENCE_LENGTH}] (T5 tokens per prompt), got {value}"
    if family is not None and family.default_max_sequence_length is None:
        return (f"{family.pipeline_class.__name__} has no T5 text encoder: a max_sequence_length (T5 tokens per "
                "prompt) is for SD3 and FLUX; CLIP encoders take 77 tokens")
    return None


def clip_skip_problem(family: type[PipelineAdapter] | None, value: int) -> str | None:
    if not is_whole_number(value):
        return f"must be a whole number of CLIP layers, got {value!r}"
    if value < 0:
        return f"must be >= 0 (CLIP layers skipped from the end), got {value}"
    if family is not None and value and not family.takes_clip_skip:
        return (f"{family.pipeline_class.__name__} takes no clip_skip: it conditions on CLIP's pooled output only "
                "(SD 1.5, SDXL and SD3 take it)")
    return None


def guidance_rescale_problem(family: type[PipelineAdapter] | None, value: float) -> str | None:
    if not 0 <= value <= 1:
        return f"must lie in [0, 1], got {value}"
    if family is not None and value and not family.takes_guidance_rescale:
        return (f"{family.pipeline_class.__name__} has no guidance_rescale: the stock SD 1.5 / 2.x and SDXL "
                "pipelines take it")
    return None


def true_cfg_scale_problem(family: type[PipelineAdapter] | None, value: float) -> str | None:
    if not 1 <= value < math.inf:
        return f"must be a finite number >= 1 (1: off), got {value}"
    if family is not None and value > 1 and not family.takes_true_cfg_scale:
        return (f"{family.pipeline_class.__name__} has no true_cfg_scale, which is FLUX's: its classifier-free "
                "guidance is guidance_scale")
    return None


# The dtypes a model loads in, by the names the commands and configs give them
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`dtype`, or the dtype of its name ("bfloat16"); ValueError for another name or type (diffusers would load a
    model in float32 in place of a name it does not know)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")


# Options an adapter is built with (`adapter_for`, `load_adapter`), each with the check of a value against a family.
MODEL_OPTIONS = {"max_sequence_length": max_sequence_length_problem, "clip_skip": clip_skip_problem,
                 "guidance_rescale": guidance_rescale_problem, "true_cfg_scale": true_cfg_scale_problem}
# The value of an option that leaves the stock pipeline as it is, as None does (max_sequence_length has none: its
# default depends on the family).
MODEL_OPTIONS_OFF = {"clip_skip": 0, "guidance_rescale": 0.0, "true_cfg_scale": 1.0}


def model_option_problem(family: type[PipelineAdapter] | None, option: str, value) -> str | None:
    """Why an adapter of `family` (an adapter class; None: not known yet) cannot be built with `value` for
    `option` (a key of MODEL_OPTIONS); None when it can. None, the option's default, always can."""
    return None if value is None else MODEL_OPTIONS[option](family, value)


def recorded_model_options(family: type[PipelineAdapter] | None, options: dict) -> dict:
    """`options` as a record keeps them: None for a value that leaves the stock pipeline of `family` (None: not known)
    as it is, so that records made with and without it compare equal."""
    defaults = {**MODEL_OPTIONS_OFF, "max_sequence_length": family and family.default_max_sequence_length}
    return {option: None if value == defaults[option] else value for option, value in options.items()}


def check_model_options(family: type[PipelineAdapter] | None, **options) -> None:
    """ValueError, naming the option, for the first of `options` with a `model_option_problem`."""
    for option, value in options.items():
        if reason := model_option_problem(family, option, value):
            raise ValueError(f"{option}: {reason}")


def native_bf16(device: str | None = None) -> bool:
    """Whether `device` (None: CUDA where torch sees it, else the CPU) computes bfloat16 in hardware: a CUDA GPU
    that supports it, or a CPU with AMX or AVX512-BF16. Elsewhere bfloat16 is emulated: on an AVX2 CPU a world-size
    training step under bfloat16 autocast took 10-25× as long as in float32 (measured)."""
    kind = torch.device(device).type if device else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def missing_c_compiler(option: str) -> str | None:
    """The error to raise, naming `option`, when `torch.compile` would find no C/C++ compiler on PATH; else None."""
    if any(shutil.which(compiler) for compiler in C_COMPILERS):
        return None
    return (f"{option}: torch.compile builds its kernels with a C/C++ compiler, and none of "
            f"{', '.join(C_COMPILERS)} is on PATH; install one (g++) or leave {option} off")


def unusable_device(device: str) -> str | None:
    """Why `device` cannot run here (torch cannot parse it; it is `meta`, which holds no data; torch sees no such
    device, or not that many); else None."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        return str(error)
    if parsed.type == "cpu":
        return None
    if parsed.type == "meta":
        return f"{device!r} holds no data: a model there cannot run"
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        what = "CUDA GPU" if parsed.type == "cuda" else f"{parsed.type} device"
        return f"{device!r}, but torch sees no {what} on this machine"
    if parsed.index is not None and parsed.index >= backend.device_count():
        return f"{device!r}, but torch sees {backend.device_count()} {parsed.type} device(s) on this machine"
    return None


def compile_repeated_blocks(denoiser: torch.nn.Module) -> int:
    """Compiles the denoiser's repeated blocks in place with `torch.compile` and returns how many: regional
    compilation, where one graph serves every block of a kind, so compiling costs a block's time, not the model's.

    The blocks are those the diffusers model lists in `_repeated_blocks` (FLUX, the UNets), else the entries of its
    `transformer_blocks` (SD3). The first calls of each shape, grad mode and adapter state compile; later ones run
    the fused kernels.
    """
    kinds = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if not kinds:
        kinds = {type(block).__name__ for block in getattr(denoiser, "transformer_blocks", ())}
    blocks = [module for module in denoiser.modules() if type(module).__name__ in kinds]
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no repeated blocks to compile")
    # One forward serves every block kind, and each kind compiles once per grad mode, adapter state and batch shape:
    # more graphs than dynamo's default limit of 8 per function, past which it silently runs the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile()
    return len(blocks)


def flow_schedule(pipe, **set_timesteps_kwargs) -> Schedule:
    """Sigmas and timesteps from a copy of the pipeline's flow-matching scheduler, set as its pipeline sets them.

    The copy keeps what was set on the scheduler after loading (`set_shift`). The package's samplers take Euler
    steps (or their SDE counterparts) on these sigmas, so only the Euler scheduler's deterministic step is theirs to
    reproduce: another scheduler class, or Euler's stochastic_sampling, would be silently replaced and is refused.
    """
    scheduler = pipe.scheduler
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"the pipeline's scheduler is {type(scheduler).__name__}: flow models are sampled with "
                         "FlowMatchEulerDiscreteScheduler's sigmas (set pipe.scheduler to one; --sampler picks the "
                         "ODE or an SDE)")
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError("the pipeline's FlowMatchEulerDiscreteScheduler sets stochastic_sampling, which the "
                         "package's samplers do not reproduce: set it to False and pick an SDE with --sampler")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(device="cpu", **set_timesteps_kwargs)
    return Schedule(timesteps=scheduler.timesteps, sigmas=scheduler.sigmas.float())
