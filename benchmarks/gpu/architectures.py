"""Full-size architectures with random weights, and toy ones of the same families for CPU runs.

Speed and memory do not depend on weight values, so each model is built from its published config (the sizes
below) directly on the device, in the benchmark's dtype. Text encoders are left out: the adapters here draw
prompt embeddings at random in the shapes the published encoders produce (`RandomText`). The reward is an
open_clip model of ViT-H-14's size (HPSv2's and PickScore's backbone) with random weights.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from align_diffusion.models.base import PromptEmbeds
from align_diffusion.models.flux import FluxAdapter
from align_diffusion.models.sd3 import SD3Adapter
from align_diffusion.models.stable_diffusion import StableDiffusionAdapter
from align_diffusion.rewards.clip import OpenClipScore
from align_diffusion.steering import compile_models

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# stabilityai/sd-turbo unet/config.json (the SD 2.1 UNet, 865M parameters)
SD_TURBO = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
# The SD, SD3 and FLUX VAEs (vae/config.json) share these sizes; a toy's groups must divide its channels.
VAE_FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
VAE_TOY = dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)

# SD-Turbo's UNet and VAE and ViT-H-14 at full depth and an eighth of the width (ViT-H on 2 × 2 patches): the same
# modules and ops with next to no arithmetic, so on the CPU a step's time is the host's work (Python, dispatch),
# which a GPU step pays too.
NARROW_SD = dict(SD_TURBO, block_out_channels=(40, 80, 160, 160), norm_num_groups=8, cross_attention_dim=128)
VAE_NARROW = dict(VAE_FULL, block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
NARROW_VIT_H = dict(
    embed_dim=128, vision_cfg=dict(image_size=28, patch_size=14, width=160, layers=32, head_width=10),
    text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=16, layers=24),
)

TOY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
TOY_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)
TOY_SD = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4, use_linear_projection=True,
)
TOY_CLIP = dict(
    embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)

# Text tokens the pipelines pass: CLIP's 77 (SD3 adds T5's max_sequence_length, 256 by default), FLUX T5's alone
# (512 by default).
CLIP_TEXT_TOKENS = 77


class RandomText:
    """Adapter mixin: prompt embeddings drawn at random in the text encoders' output shapes (`text_shapes`)."""

    def text_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def encode_prompt(self, prompts, guidance_scale, num_images_per_prompt=1, negative_prompt=None):
        batch = len(prompts) * num_images_per_prompt

        def draw():
            return {name: torch.randn(batch, *shape, device=self.device, dtype=self.dtype)
                    for name, shape in self.text_shapes().items()}

        return PromptEmbeds(draw(), draw() if self.guidance_mode(guidance_scale) == "cfg" else None)


class RandomTextSD3(RandomText, SD3Adapter):
    def text_shapes(self):
        config = self.denoiser.config
        return {"encoder_hidden_states": (CLIP_TEXT_TOKENS + self.max_sequence_length, config.joint_attention_dim),
                "pooled_projections": (config.pooled_projection_dim,)}


class RandomTextFlux(RandomText, FluxAdapter):
    def text_shapes(self):
        config = self.denoiser.config
        return {"encoder_hidden_states": (self.max_sequence_length, config.joint_attention_dim),
                "pooled_projections": (config.pooled_projection_dim,)}


class RandomTextSD(RandomText, StableDiffusionAdapter):
    def text_shapes(self):
        return {"encoder_hidden_states": (CLIP_TEXT_TOKENS, self.denoiser.config.cross_attention_dim)}


@contextlib.contextmanager
def built_on(device: str, dtype: torch.dtype):
    """Modules constructed inside are allocated on `device` in `dtype` (no float32 copy on the host first)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(saved)


def vae(latent_channels: int, toy: bool, narrow: bool = False, **config) -> AutoencoderKL:
    sizes = VAE_TOY if toy else VAE_NARROW if narrow else VAE_FULL
    blocks = len(sizes["block_out_channels"])
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels, **sizes, **config,
    )


def sd35_medium(device: str, dtype: torch.dtype, toy: bool = False) -> RandomTextSD3:
    """SD3.5-Medium (2.5B transformer, the SD3 VAE) as an adapter; `toy` gives the same blocks at toy width."""
    with built_on(device, dtype):
        transformer = SD3Transformer2DModel(**(TOY_SD3 if toy else SD35_MEDIUM))
        autoencoder = vae(16, toy, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=autoencoder,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )
    return RandomTextSD3(pipe)


def flux_dev(device: str, dtype: torch.dtype, toy: bool = False) -> RandomTextFlux:
    """FLUX.1-dev (12B transformer with guidance embedding, the FLUX VAE) as an adapter."""
    with built_on(device, dtype):
        transformer = FluxTransformer2DModel(**(TOY_FLUX if toy else FLUX_DEV))
        autoencoder = vae(16, toy, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                          use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=autoencoder, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return RandomTextFlux(pipe)


def sd_turbo(device: str, dtype: torch.dtype, toy: bool = False, narrow: bool = False) -> RandomTextSD:
    """SD-Turbo (the SD 2.1 UNet, 865M, and the SD VAE) as an adapter, one-step with trailing DDIM timesteps;
    `narrow`: at full depth and an eighth of the width."""
    with built_on(device, dtype):
        unet = UNet2DConditionModel(**(TOY_SD if toy else NARROW_SD if narrow else SD_TURBO))
        autoencoder = vae(4, toy, narrow, scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return RandomTextSD(pipe)


def vit_h14_reward(device: str, dtype: torch.dtype, toy: bool = False, narrow: bool = False) -> OpenClipScore:
    """An open_clip ViT-H-14 (or a 1-layer toy CLIP, or ViT-H-14's depth at an eighth of its width) with random
    weights, scoring like HPSv2."""
    import open_clip

    with built_on(device, torch.float32):  # open_clip builds in float32; the reward casts to `dtype`
        if toy or narrow:
            config = NARROW_VIT_H if narrow else TOY_CLIP
            model = open_clip.CLIP(**config)
            open_clip.set_model_preprocess_cfg(model, dict(size=config["vision_cfg"]["image_size"],
                                                           mean=open_clip.OPENAI_DATASET_MEAN,
                                                           std=open_clip.OPENAI_DATASET_STD))
        else:
            model = open_clip.create_model("ViT-H-14", pretrained=None, device=device)
    return OpenClipScore("vit-h-14", model, open_clip.get_tokenizer("ViT-H-14"), device, dtype)


ARCHITECTURES = {"sd35-medium": sd35_medium, "flux-dev": flux_dev, "sd-turbo": sd_turbo}


def to_channels_last(adapter) -> None:
    """The denoiser and the VAE in channels-last memory layout, the one cuDNN's tensor-core convolutions prefer
    (PyTorch's GroupNorm wants NCHW, though: on the H200 it cost FK more than it saved; benchmarks/README.md)."""
    for module in (adapter.denoiser, adapter.pipe.vae):
        module.to(memory_format=torch.channels_last)


def add_steering_options(parser) -> None:
    """How the steering benchmarks run their models: cuDNN's algorithm search, channels-last, torch.compile."""
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms at the first call of each shape (untimed)")
    parser.add_argument("--channels-last", action="store_true",
                        help="the denoiser and the VAE in channels-last memory layout")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile the denoiser, the VAE decoder and the reward's image tower "
                             "(compile_models) in torch.compile's MODE (default: default; reduce-overhead replays "
                             "CUDA graphs); they compile in the untimed first run")


def apply_steering_options(args, adapter, reward) -> dict:
    """Sets up the models as `add_steering_options`' options ask; returns those options for the report."""
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.channels_last:
        to_channels_last(adapter)
    if args.compile:
        compile_models(adapter, reward, mode=args.compile)
    return {"cudnn_benchmark": args.cudnn_benchmark, "channels_last": args.channels_last, "compile": args.compile}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
