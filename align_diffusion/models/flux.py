"""FLUX.1 (`FluxPipeline`): flow matching with a guidance-distilled transformer (dev) or no guidance (schnell).

Latents are kept unpacked, (batch, C, h, w), like every other family; they are packed into FLUX's 2×2 patch
sequence only around the transformer call, so samplers and rewards never see the packing.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from align_diffusion.models.base import PipelineAdapter, PromptEmbeds, Schedule, flow_schedule


class FluxAdapter(PipelineAdapter):
    pipeline_class = FluxPipeline
    is_flow = True
    default_steps = 28
    default_guidance = 3.5
    default_max_sequence_length = 512
    takes_true_cfg_scale = True

    def guidance_mode(self, guidance_scale):
        if self.true_cfg_scale > 1:  # true CFG: two branches, each with the distilled guidance too
            return "cfg"
        return "distilled" if self.denoiser.config.guidance_embeds else "none"

    def cfg_weight(self, guidance_scale):
        return self.true_cfg_scale

    @classmethod
    def side_problem(cls, pixels, vae_scale_factor, denoiser_config):
        return super().side_problem(pixels, vae_scale_factor * 2, denoiser_config)  # latents packed in 2 × 2 patches

    def latent_shape(self, height, width):
        return self.denoiser.config.in_channels // 4, height // self.vae_scale_factor, width // self.vae_scale_factor

    def encode_prompt(self, prompts, guidance_scale, num_images_per_prompt=1, negative_prompt=None):
        if (negative_prompt is not None) != (self.true_cfg_scale > 1):
            raise ValueError("FLUX runs classifier-free guidance (true CFG) with a negative prompt and a "
                             f"true_cfg_scale > 1 together, got true_cfg_scale {self.true_cfg_scale} and negative "
                             f"prompt {negative_prompt!r}")
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        cond, uncond = (self.encoded(texts, num_images_per_prompt) for texts in (prompts, negative_prompt))
        return PromptEmbeds(cond, uncond)

    def encoded(self, prompts, num_images_per_prompt):
        if prompts is None:
            return None
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def schedule(self, num_inference_steps, height, width) -> Schedule:
        config = self.pipe.scheduler.config
        _, h, w = self.latent_shape(height, width)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if config.get("use_flow_sigmas", False):
            return flow_schedule(self.pipe, num_inference_steps=num_inference_steps, mu=mu)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return flow_schedule(self.pipe, sigmas=sigmas, mu=mu)

    def forward(self, latents, timestep, conditioning, guidance_scale):
        batch, channels, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, latents.device, latents.dtype)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=text.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([batch], guidance_scale, device=latents.device, dtype=torch.float32)
        timestep = torch.as_tensor(timestep, device=latents.device).expand(batch).to(latents.dtype)
        packed_pred = self.call_denoiser(
            hidden_states=packed,
            timestep=timestep / 1000,
            guidance=guidance,
            txt_ids=text_ids,
            img_ids=image_ids,
            **conditioning,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(packed_pred, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)
