"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): flow matching with an MMDiT transformer and CFG."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from align_diffusion.models.base import PipelineAdapter, PromptEmbeds, Schedule, flow_schedule


class SD3Adapter(PipelineAdapter):
    pipeline_class = StableDiffusion3Pipeline
    is_flow = True
    default_steps = 28
    default_guidance = 7.0

    def check_size(self, height, width):
        super().check_size(height, width)
        multiple = self.vae_scale_factor * self.denoiser.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this transformer")

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
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if cfg else None
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
        return self.call_denoiser(hidden_states=latents, timestep=timestep, **conditioning, return_dict=False)[0]
