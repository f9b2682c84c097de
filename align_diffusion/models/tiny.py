"""Random-weight pipelines of every supported family at toy sizes, built from configs with in-memory tokenizers.

No hub access is needed: tokenizers get their vocabularies here (character-level CLIP BPE, a unigram T5 vocab),
and every component is a real diffusers / transformers class. Tests, benchmarks and smoke runs use these; they
save with `save_pretrained` and reload offline through `DiffusionPipeline.from_pretrained` like any model.
"""

from __future__ import annotations

import string

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
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

FAMILIES = ("sd3", "flux", "sd", "sdxl")
CHARS = string.ascii_lowercase + string.digits + " "


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (BPE with no merges), so any lowercase prompt tokenizes."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in CHARS.strip():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS.strip()] + [("▁", -1.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_text_encoder(hidden_size: int, with_projection: bool = False, projection_dim: int = 32):
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=2 + 2 * len(CHARS.strip()),
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_text_encoder(d_model: int) -> T5EncoderModel:
    config = T5Config(
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        vocab_size=4 + len(CHARS.strip()),
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def vae(latent_channels: int, block_out_channels=(8, 8), scaling_factor=0.18215, shift_factor=None) -> AutoencoderKL:
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(block_out_channels),
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def tiny_sd3(
    num_layers: int = 2, num_heads: int = 2, head_dim: int = 8, patch_size: int = 1, sample_size: int = 16,
    latent_channels: int = 4, vae_channels=(8, 8), dual_attention_layers=(),
) -> StableDiffusion3Pipeline:
    """A random SD3 pipeline; the defaults are toy-sized, larger values serve speed measurements.
    `dual_attention_layers` makes it SD3.5-style (image-only attention added in those blocks)."""
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            caption_projection_dim=head_dim * num_heads,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            dual_attention_layers=dual_attention_layers,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(latent_channels, vae_channels, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=clip_text_encoder(16, with_projection=True, projection_dim=16),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(16, with_projection=True, projection_dim=16),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text_encoder(32),
        tokenizer_3=t5_tokenizer(),
    )


def tiny_flux(guidance_embeds: bool = True) -> FluxPipeline:
    return FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae(latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=clip_text_encoder(32),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_text_encoder(32),
        tokenizer_2=t5_tokenizer(),
    )


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd(time_cond_proj_dim: int | None = None) -> StableDiffusionPipeline:
    """A random SD pipeline; `time_cond_proj_dim` gives its UNet LCM's guidance-scale embedding."""
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=4,
            time_cond_proj_dim=time_cond_proj_dim,
        ),
        scheduler=ddim_scheduler(),
        vae=vae(latent_channels=4),
        text_encoder=clip_text_encoder(32),
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=4,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        scheduler=ddim_scheduler(),
        vae=vae(latent_channels=4),
        text_encoder=clip_text_encoder(32),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(32, with_projection=True, projection_dim=32),
        tokenizer_2=clip_tokenizer(),
        add_watermarker=False,
    )


BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux, "sd": tiny_sd, "sdxl": tiny_sdxl}


def tiny_pipeline(family: str, seed: int = 0, **options):
    """A random-weight pipeline of `family` (one of FAMILIES), deterministic in `seed`, in eval mode; `options`
    (sizes, variants) go to the family's builder."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(seed)
    pipe = BUILDERS[family](**options)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
