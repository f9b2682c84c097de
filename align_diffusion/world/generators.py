"""The world's generators: a small VAE, an SD3-format flow-matching transformer and an SD-format ε-prediction
UNet, trained on renders of the training prompts and saved as stock diffusers pipelines.

Text conditioning comes from the world CLIP's text tower, through the pipelines' own `encode_prompt`, so training
sees exactly the embeddings inference will produce.
"""

from __future__ import annotations

import copy
import math
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

from align_diffusion.world.data import WORDS, balanced_prompts, render_batch
from align_diffusion.world.encoders import MAX_TOKENS
from align_diffusion.world.fit import fit
from align_diffusion.world.spec import BACKGROUND

CFG_DROPOUT = 0.1  # share of training prompts replaced by "" so classifier-free guidance works
BACKGROUND_PIXEL = torch.tensor(BACKGROUND).view(1, 3, 1, 1) / 127.5 - 1


GENERATOR_FIT = dict(weight_decay=0.0, warmup=0.05, max_grad_norm=1.0, log_every=100)


def train_vae(steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log=print) -> AutoencoderKL:
    """64×64 renders to 16×16×8 latents; L1 + MSE reconstruction with a small KL term."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=64, mid_block_add_attention=False,
    )

    def batch_loss():
        images = render_batch(balanced_prompts("train", batch_size, rng), rng)
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

    fit("vae", vae.parameters(), steps, lr, batch_loss, log, weight_decay=0.0, warmup=0.05)
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


class CompactContextAttnProcessor(torch.nn.Module):
    """Joint attention in which each context token stands for `multiplicity` identical tokens.

    SD3 without T5 appends 256 all-zero T5 tokens to every prompt; the context stream has no positions, so those
    tokens stay identical through every block. Keeping one of them and adding log(256) to its attention logit
    gives the same outputs at a fraction of the cost. Used for training only; the saved model is stock SD3.
    """

    def __init__(self, log_multiplicity: torch.Tensor):
        super().__init__()
        self.log_multiplicity = log_multiplicity  # (context_tokens,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        context_query = heads(attn.add_q_proj(encoder_hidden_states))
        context_key = heads(attn.add_k_proj(encoder_hidden_states))
        context_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            context_query, context_key = attn.norm_added_q(context_query), attn.norm_added_k(context_key)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)
        bias = torch.cat([torch.zeros(image_tokens), self.log_multiplicity]).to(query)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.expand(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1])
        sample_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](sample_out)), context_out


def compact_context(prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapses the trailing run of all-zero T5 tokens to one; returns (embeds, log-multiplicity per token)."""
    zero_tokens = (prompt_embeds == 0).all(-1).all(0)
    first_zero = MAX_TOKENS
    if not zero_tokens[first_zero:].all():
        raise ValueError("expected SD3 embeddings with all-zero T5 tokens after the CLIP tokens")
    repeats = prompt_embeds.shape[1] - first_zero
    log_multiplicity = torch.zeros(first_zero + 1)
    log_multiplicity[-1] = math.log(repeats)
    return prompt_embeds[:, : first_zero + 1], log_multiplicity


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
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=with_projection, tokenizer=tokenizer, text_encoder_2=with_projection, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


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
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=plain, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, count: int, seed: int = 0, batch_size: int = 256, log=print):
    """`count` renders of training prompts and their VAE latents (posterior samples, before any shift or scaling);
    both generators train on the same set."""
    rng = random.Random(seed)
    prompts = balanced_prompts("train", count, rng)
    latents = [vae.encode(render_batch(prompts[start : start + batch_size], rng)).latent_dist.sample()
               for start in range(0, count, batch_size)]
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


def train_sd3(pipe: StableDiffusion3Pipeline, steps: int, dataset, batch_size: int = 64, lr: float = 1e-3,
              seed: int = 0, log=print) -> StableDiffusion3Pipeline:
    """Rectified-flow training (logit-normal t, velocity target ε - x0) with CFG dropout on an `encode_dataset`
    set, its latents shifted and scaled as the SD3 pipeline does."""
    torch.manual_seed(seed)
    prompts, latents = dataset
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    unique, prompt_ids = _prompt_table(prompts)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(unique, None, None, do_classifier_free_guidance=False)
    embeds, log_multiplicity = compact_context(embeds)

    transformer = pipe.transformer.train()
    default_processors = transformer.attn_processors
    transformer.set_attn_processor(CompactContextAttnProcessor(log_multiplicity))

    def batch_loss():
        ids, x0, noise = _draw(latents, prompt_ids, len(unique) - 1, batch_size)
        t = torch.sigmoid(torch.randn(batch_size))
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=embeds[ids],
                        pooled_projections=pooled[ids]).sample
        return F.mse_loss(v, noise - x0)

    fit("sd3", transformer.parameters(), steps, lr, batch_loss, log, **GENERATOR_FIT)
    transformer.set_attn_processor(default_processors)
    transformer.eval()
    return pipe


def train_sd(pipe: StableDiffusionPipeline, steps: int, dataset, batch_size: int = 64, lr: float = 5e-4,
             seed: int = 0, log=print) -> StableDiffusionPipeline:
    """ε-prediction training on the DDPM noise schedule, with CFG dropout, on an `encode_dataset` set scaled as
    the SD pipeline does (no shift)."""
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
        t = torch.randint(0, len(alphas_cumprod), (batch_size,))
        alpha = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        return F.mse_loss(unet(x_t, t, encoder_hidden_states=embeds[ids]).sample, noise)

    fit("sd", unet.parameters(), steps, lr, batch_loss, log, **GENERATOR_FIT)
    unet.eval()
    return pipe
