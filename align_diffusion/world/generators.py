"""The world's generators: a small VAE, an SD3-format flow-matching transformer and an SD-format ε-prediction
UNet, trained on renders of the training prompts and saved as stock diffusers pipelines.

Text conditioning comes from the world CLIP's text tower, through the pipelines' own `encode_prompt`, so training
sees exactly the embeddings inference will produce.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from align_diffusion.models.sd3 import CONTEXT_BIAS, SD3Adapter, compact_attention
from align_diffusion.world.data import WORDS, balanced_prompts, render_batch
from align_diffusion.world.fit import fit
from align_diffusion.world.render import Layout
from align_diffusion.world.spec import BACKGROUND

CFG_DROPOUT = 0.1  # share of training prompts replaced by "" so classifier-free guidance works
# SD3's timestep shift, used both to draw training times and by the saved scheduler. On 16×16 latents the layout
# is decided at high noise (t > 0.7), where the unshifted logit-normal spends 4% of training above t = 0.85 and
# shifted-uniform times spend 35%; with it, blank samples became rare (assets/README.md).
FLOW_SHIFT = 3.0
BACKGROUND_PIXEL = torch.tensor(BACKGROUND).view(1, 3, 1, 1) / 127.5 - 1
# The generators' training scenes: 14 px objects with corners on a 16 px grid, so each object lies inside one
# block of 2×2 transformer tokens (4×4 latent cells) and neighbours keep the spec's 2 px gap. Still correct world
# images, but few layouts to learn: with the spec's full range of sizes and positions a 2000-step model drew soft,
# blob-like outlines, and on an 8 px grid, where objects straddle token blocks, it often failed to commit to one
# object (assets/README.md).
GENERATOR_LAYOUT = Layout(min_side=14, max_side=14, grid=16)


GENERATOR_FIT = dict(weight_decay=0.0, warmup=0.05, max_grad_norm=1.0, log_every=100)


def train_vae(steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log=print, bf16: bool = False,
              torch_compile: bool = False) -> AutoencoderKL:
    """64×64 renders to 16×16×8 latents; L1 + MSE reconstruction with a small KL term (`bf16`: see `fit`;
    `torch_compile`: the loss runs `torch.compile`d, rendering excluded)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=64, mid_block_add_attention=False,
    )

    def reconstruction_loss(images):
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        # Objects cover a few percent of the canvas and ShapesEval classes them by outline: weight object pixels
        # up, and their edges (corners, apexes) more, so colors and outlines come out exact.
        objects = (images - BACKGROUND_PIXEL).abs().amax(1, keepdim=True).gt(0.05).float()
        edges = F.max_pool2d(objects, 3, 1, 1) + F.max_pool2d(-objects, 3, 1, 1)
        weight = 1 + 9 * objects + 20 * edges
        error = (recon - images).abs()
        return (weight * (error + error**2)).mean() + 1e-6 * kl

    loss = torch.compile(reconstruction_loss) if torch_compile else reconstruction_loss

    def batch_loss():
        return loss(render_batch(balanced_prompts("train", batch_size, rng), rng))

    fit("vae", vae.parameters(), steps, lr, batch_loss, log, weight_decay=0.0, warmup=0.05, bf16=bf16)
    vae.eval()
    # Latent statistics set the scaling the pipelines apply, as for the real models.
    with torch.no_grad():
        latents = vae.encode(render_batch(balanced_prompts("train", 256, rng), rng)).latent_dist.mode()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    return vae


def text_towers(clip: CLIPModel):
    """The world CLIP's text tower as the classes the pipelines expect (with and without projection)."""
    config = copy.deepcopy(clip.config.text_config)
    config.projection_dim = clip.config.projection_dim
    with_projection = CLIPTextModelWithProjection(config)
    with_projection.text_model.load_state_dict(clip.text_model.state_dict())
    with_projection.text_projection.load_state_dict(clip.text_projection.state_dict())
    plain = CLIPTextModel(config)
    plain.load_state_dict(clip.text_model.state_dict())
    return with_projection.eval(), plain.eval()


def silent_t5(d_model: int) -> tuple[T5EncoderModel, T5Tokenizer]:
    """A one-layer T5 whose final norm has zero weight, so it outputs exact zeros: SD3 run without T5, as the SD3
    pipeline itself does when `text_encoder_3` is None, but in a folder the stock `from_pretrained` loads whole."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + word, -1.0) for word in WORDS]
    config = T5Config(d_model=d_model, d_kv=8, d_ff=16, num_layers=1, num_heads=1, vocab_size=len(pieces),
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    encoder = T5EncoderModel(config)
    torch.nn.init.zeros_(encoder.encoder.final_layer_norm.weight)
    return encoder.eval(), T5Tokenizer(vocab=pieces, extra_ids=0)


def _latent_side(vae: AutoencoderKL) -> int:
    return vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)


def world_sd3_pipeline(vae, clip: CLIPModel, tokenizer, layers: int = 6, heads: int = 3,
                       patch_size: int = 2) -> StableDiffusion3Pipeline:
    """An SD3 transformer over the VAE's latents: 64 image tokens (2×2 patches of the 16×16 latent)."""
    with_projection, _ = text_towers(clip)
    width = clip.config.text_config.hidden_size
    t5, t5_tokenizer = silent_t5(2 * width)
    side, channels = _latent_side(vae), vae.config.latent_channels
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=patch_size, in_channels=channels, out_channels=channels, num_layers=layers,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=2 * width,
        caption_projection_dim=64 * heads, pooled_projection_dim=2 * clip.config.projection_dim,
        pos_embed_max_size=side // patch_size,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), vae=vae,
        text_encoder=with_projection, tokenizer=tokenizer, text_encoder_2=with_projection, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


@torch.no_grad()
def standardize_latents(vae: AutoencoderKL, latents: torch.Tensor) -> tuple[AutoencoderKL, torch.Tensor]:
    """A copy of the VAE whose latents have zero mean and unit std per channel, and `latents` mapped into it.

    The SD pipeline applies only a scaling factor, no shift; our VAE's channel means sit 1-2 std from zero, and
    with SD's noise schedule (ᾱ_T ≈ 0.005) that offset leaks into x_T during training but never at sampling. The
    affine map z' = (z - m) / s is folded into the VAE's 1×1 quant convs, so the result is a stock AutoencoderKL.
    """
    mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
    vae = copy.deepcopy(vae)
    channels = len(mean)
    quant, post = vae.quant_conv, vae.post_quant_conv  # quant outputs [mean, logvar]; post reads a sample
    quant.weight[:channels] /= std.view(-1, 1, 1, 1)
    quant.bias[:channels] = (quant.bias[:channels] - mean) / std
    quant.bias[channels:] -= 2 * std.log()
    post.bias += post.weight[:, :, 0, 0] @ mean
    post.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0, shift_factor=None)
    return vae, (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def world_sd_pipeline(vae, clip: CLIPModel, tokenizer) -> StableDiffusionPipeline:
    _, plain = text_towers(clip)
    channels = vae.config.latent_channels
    unet = UNet2DConditionModel(
        sample_size=_latent_side(vae), in_channels=channels, out_channels=channels,
        block_out_channels=(32, 64, 128), layers_per_block=1,
        # Attention at 8×8 and 4×4 only: with attention at the full 16×16 a training step takes ~5× longer on CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=clip.config.text_config.hidden_size, attention_head_dim=32, norm_num_groups=32,
    )
    # "trailing" spacing: sampling starts at the last training step, the one x_T ~ N(0, I) stands for.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return StableDiffusionPipeline(vae=vae, text_encoder=plain, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, count: int, seed: int = 0, batch_size: int = 256, log=print):
    """`count` renders of training prompts in GENERATOR_LAYOUT and their VAE latents (posterior samples, before
    any shift or scaling); both generators train on the same set."""
    rng = random.Random(seed)
    prompts = balanced_prompts("train", count, rng)
    latents = [
        vae.encode(render_batch(prompts[start : start + batch_size], rng, GENERATOR_LAYOUT)).latent_dist.sample()
        for start in range(0, count, batch_size)
    ]
    log(f"encoded {count} training images")
    return prompts, torch.cat(latents)


def _prompt_table(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct prompts (the empty one last, for CFG dropout) and each training image's index into them."""
    unique = sorted(set(prompts)) + [""]
    index = {p: i for i, p in enumerate(unique)}
    return unique, torch.tensor([index[p] for p in prompts])


def _draw(latents, prompt_ids, empty_id: int, batch_size: int):
    """A random batch of training latents with their prompt ids (CFG_DROPOUT of them `empty_id`) and noise."""
    pick = torch.randint(0, len(latents), (batch_size,))
    ids = torch.where(torch.rand(batch_size) < CFG_DROPOUT, empty_id, prompt_ids[pick])
    return ids, latents[pick], torch.randn_like(latents[pick])


def shifted_flow_times(batch_size: int) -> torch.Tensor:
    """Training times of the SD3 generator: uniform, then shifted by FLOW_SHIFT as the sampler's times are."""
    u = torch.rand(batch_size)
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def train_sd3(pipe: StableDiffusion3Pipeline, steps: int, dataset, batch_size: int = 64, lr: float = 1e-3,
              seed: int = 0, log=print, bf16: bool = False, torch_compile: bool = False) -> StableDiffusion3Pipeline:
    """Rectified-flow training (velocity target ε - x0; t uniform, then shifted by FLOW_SHIFT as the sampler's
    times are) with CFG dropout on an `encode_dataset` set, its latents shifted and scaled as the SD3 pipeline does
    (`bf16`: see `fit`; `torch_compile`: the transformer runs `torch.compile`d; measured step times in
    assets/README.md)."""
    torch.manual_seed(seed)
    prompts, latents = dataset
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    unique, prompt_ids = _prompt_table(prompts)
    # The adapter's conditioning: the silent T5's zero tokens compacted to one (see models/sd3.py).
    with torch.no_grad():
        embeds = SD3Adapter(pipe).encode_prompt(unique, guidance_scale=1.0).cond
    if CONTEXT_BIAS not in embeds:
        raise ValueError("expected SD3 embeddings with all-zero T5 tokens after the CLIP tokens")
    transformer = pipe.transformer.train()
    forward = torch.compile(transformer) if torch_compile else transformer

    def batch_loss():
        ids, x0, noise = _draw(latents, prompt_ids, len(unique) - 1, batch_size)
        t = shifted_flow_times(batch_size)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        with compact_attention(transformer, embeds[CONTEXT_BIAS][ids]):
            v = forward(hidden_states=x_t, timestep=t * 1000,
                        encoder_hidden_states=embeds["encoder_hidden_states"][ids],
                        pooled_projections=embeds["pooled_projections"][ids]).sample
        return F.mse_loss(v, noise - x0)

    fit("sd3", transformer.parameters(), steps, lr, batch_loss, log, bf16=bf16, **GENERATOR_FIT)
    transformer.eval()
    return pipe


def flow_matched_timesteps(alphas_cumprod: torch.Tensor, batch_size: int) -> torch.Tensor:
    """DDPM timesteps at the noise levels the SD3 generator trains on: shifted-uniform flow times, each mapped to
    the first DDPM step at least as noisy (log-SNR at or below the flow time's; flow times noisier than the
    schedule's last step map to that step)."""
    t = shifted_flow_times(batch_size)
    flow_log_snr = 2 * torch.log((1 - t) / t)
    ddpm_log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log()  # decreasing in the timestep
    return torch.searchsorted(-ddpm_log_snr, -flow_log_snr).clamp(max=len(alphas_cumprod) - 1)


def train_sd(pipe: StableDiffusionPipeline, steps: int, dataset, batch_size: int = 64, lr: float = 1e-3,
             seed: int = 0, log=print) -> StableDiffusionPipeline:
    """ε-prediction training with the SD3 generator's objective: its noise levels (`flow_matched_timesteps`) and
    its loss, the rectified-flow velocity error of the velocity the predicted ε implies, (1 + σ/α)·(ε̂ − ε). Plain
    ε-loss (with or without min-SNR weights) gives the noisiest steps, where the layout is decided, almost no weight
    in x̂0 terms (assets/README.md); this one weighs x̂0 errors there ~1. CFG dropout as for SD3; latents scaled as
    the SD pipeline does (no shift: see `standardize_latents`)."""
    torch.manual_seed(seed)
    prompts, latents = dataset
    latents = latents * pipe.vae.config.scaling_factor
    unique, prompt_ids = _prompt_table(prompts)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(unique, pipe.device, 1, False)
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    unet = pipe.unet.train()

    def batch_loss():
        ids, x0, noise = _draw(latents, prompt_ids, len(unique) - 1, batch_size)
        t = flow_matched_timesteps(alphas_cumprod, batch_size)
        alpha = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        x_t = alpha * x0 + sigma * noise
        epsilon = unet(x_t, t, encoder_hidden_states=embeds[ids]).sample
        return (((1 + sigma / alpha) * (epsilon - noise)) ** 2).mean()

    fit("sd", unet.parameters(), steps, lr, batch_loss, log, **GENERATOR_FIT)
    unet.eval()
    return pipe
