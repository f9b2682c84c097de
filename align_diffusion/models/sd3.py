"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): flow matching with an MMDiT transformer and CFG.

Run without T5 (`text_encoder_3=None`, or a T5 that outputs zeros), the pipeline appends hundreds of all-zero T5
tokens to every prompt. The context stream has no positions, so those tokens stay identical through every block:
the adapter keeps one of them and adds log(count) to its attention logit, which gives the same outputs (up to float
rounding) at a fraction of the cost. In bfloat16 that logit offset itself rounds (log 256 to 5.531), which weighs the
zero tokens 1.4 % light in every attention (float16: 5.547, 0.2 % heavy), a bias beside the dtype's own rounding.
Under gradient checkpointing every call keeps the full context, since the backward pass reruns the blocks with the
stock attention.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from align_diffusion.models.base import PipelineAdapter, PromptEmbeds, Schedule, flow_schedule


CONTEXT_BIAS = "context_log_multiplicity"  # conditioning key of the compacted context's attention bias


class CompactContextAttnProcessor:
    """SD3 joint attention in which context token j stands for exp(bias[b, j]) identical tokens."""

    def __init__(self, log_multiplicity: torch.Tensor):
        self.log_multiplicity = log_multiplicity  # (B, context tokens)

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
        bias = F.pad(self.log_multiplicity, (image_tokens, 0)).to(query)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias[:, None, None, :])
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1])
        sample_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](sample_out)), context_out


def compact_zero_context(*embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Collapses the trailing all-zero tokens every batch in `embeds` shares into one token; returns the cut
    embeddings and each one's (B, tokens) log-multiplicity, or None when fewer than two such tokens trail."""
    zero = torch.stack([(e == 0).all(-1).all(0) for e in embeds]).all(0)  # (tokens,)
    nonzero = torch.nonzero(~zero)
    first_zero = int(nonzero[-1]) + 1 if len(nonzero) else 0
    repeats = zero.numel() - first_zero
    if repeats < 2:
        return None
    bias = torch.zeros(first_zero + 1)
    bias[-1] = math.log(repeats)
    return [e[:, : first_zero + 1] for e in embeds], [bias.expand(len(e), -1).to(e.device) for e in embeds]


@contextlib.contextmanager
def compact_attention(transformer, log_multiplicity: torch.Tensor):
    """The transformer's joint attention modules attend with CompactContextAttnProcessor inside the block; its own
    processors after. The image-only attention of SD3.5's dual attention blocks (`attn2`) keeps its processor."""
    saved = transformer.attn_processors
    compact = CompactContextAttnProcessor(log_multiplicity)
    processors = {}
    for name, processor in saved.items():
        attention = transformer.get_submodule(name.removesuffix(".processor"))
        processors[name] = compact if getattr(attention, "add_q_proj", None) is not None else processor
    transformer.set_attn_processor(processors)
    try:
        yield
    finally:
        transformer.set_attn_processor(saved)


class SD3Adapter(PipelineAdapter):
    pipeline_class = StableDiffusion3Pipeline
    is_flow = True
    default_steps = 28
    default_guidance = 7.0
    default_max_sequence_length = 256
    takes_clip_skip = True

    @classmethod
    def side_problem(cls, pixels, vae_scale_factor, denoiser_config):
        multiple = vae_scale_factor * denoiser_config["patch_size"]
        if pixels <= 0 or pixels % multiple:
            return f"must be a positive multiple of {multiple} for this transformer (its patches)"
        table = denoiser_config.get("pos_embed_max_size")
        if table is not None and pixels > table * multiple:  # past its position table's reach
            return f"must be at most {table * multiple} for this transformer (pos_embed_max_size {table})"
        return None

    def encode_prompt(self, prompts, guidance_scale, num_images_per_prompt=1, negative_prompt=None):
        cfg = self.guidance_mode(guidance_scale) == "cfg"
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
            clip_skip=self.clip_skip,
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if cfg else None
        compacted = compact_zero_context(embeds, *([negative] if cfg else []))
        if compacted is not None:
            for branch, cut, bias in zip((cond, uncond), *compacted):
                branch.update({"encoder_hidden_states": cut, CONTEXT_BIAS: bias})
        return PromptEmbeds(cond, uncond)

    def schedule(self, num_inference_steps, height, width) -> Schedule:
        config = self.pipe.scheduler.config
        kwargs = {"num_inference_steps": num_inference_steps}
        if config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return flow_schedule(self.pipe, **kwargs)

    def forward(self, latents, timestep, conditioning, guidance_scale):
        timestep = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0])
        conditioning = dict(conditioning)
        bias = conditioning.pop(CONTEXT_BIAS, None)
        if bias is not None and self.called_denoiser().gradient_checkpointing:
            # Checkpointing reruns each block in the backward pass, after compact_attention has put the stock
            # processors back: those blocks get the zero tokens in full, and so do calls without gradients (rollouts),
            # so that in bfloat16 they compute what training recomputes
            context = conditioning["encoder_hidden_states"]
            repeats = round(math.exp(float(bias[0, -1])))
            conditioning["encoder_hidden_states"] = torch.cat([context, context[:, -1:].expand(-1, repeats - 1, -1)], 1)
            bias = None
        with contextlib.nullcontext() if bias is None else compact_attention(self.called_denoiser(), bias):
            return self.call_denoiser(hidden_states=latents, timestep=timestep, **conditioning, return_dict=False)[0]
