"""Stable Diffusion 1.5 / 2.x and SDXL (incl. SD-Turbo / SDXL-Turbo): ε- or v-prediction UNets with CFG.

Sampling uses DDIM built from the pipeline's own noise schedule (`DDIMScheduler.from_config`), whatever scheduler
the pipeline ships with, so the DDIM-η family of steps has exact posterior means and log-probs. With η = 0 the
result equals the stock pipeline run with a `DDIMScheduler`. Turbo models are sampled in one step with
`guidance_scale=0` on their "trailing" timesteps, with DDIM: their stock Euler schedulers give other images (0.23
apart per pixel at most in one step, measured on the world's trained SD; diffusers' Euler lands on σ = 0 and starts
from noise · σ_max, DDIM lands on the final ᾱ of its config), and at several steps an ancestral Euler scheduler,
which draws fresh noise each step, gives others again. LCM
and TCD schedulers, whose consistency steps draw fresh noise on timesteps of their own, are refused rather than
replaced.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler

from align_diffusion.models.base import PipelineAdapter, PromptEmbeds, Schedule


@contextlib.contextmanager
def text_model_alias(text_encoder):
    """Inside, a CLIPTextModel without `.text_model` answers it with itself.

    The stock SD pipeline's clip_skip branch reads `text_encoder.text_model.final_layer_norm`, a wrapper
    transformers 5.6 removed when it flattened CLIPTextModel (diffusers issue #14124, fix proposed in PR #14043).
    The alias bypasses nn.Module's registration, so the encoder does not become its own submodule.
    """
    if hasattr(text_encoder, "text_model"):
        yield
        return
    object.__setattr__(text_encoder, "text_model", text_encoder)
    try:
        yield
    finally:
        del text_encoder.__dict__["text_model"]


class StableDiffusionAdapter(PipelineAdapter):
    pipeline_class = StableDiffusionPipeline
    is_flow = False
    default_steps = 50
    default_guidance = 7.5
    takes_guidance_rescale = True
    takes_clip_skip = True
    clip_hidden_state_from_end = 1

    def guidance_mode(self, guidance_scale):
        # As the stock pipelines: a UNet with a guidance-scale embedding (LCM, time_cond_proj_dim) runs no CFG.
        if self.denoiser.config.time_cond_proj_dim is not None:
            return "distilled"
        return super().guidance_mode(guidance_scale)

    def encode_prompt(self, prompts, guidance_scale, num_images_per_prompt=1, negative_prompt=None):
        cfg = self.guidance_mode(guidance_scale) == "cfg"
        if isinstance(negative_prompt, str):  # the stock encode_prompt wants the prompts' type: one per prompt
            negative_prompt = [negative_prompt] * len(prompts)
        with text_model_alias(self.pipe.text_encoder):
            embeds, negative = self.pipe.encode_prompt(
                prompts, self.device, num_images_per_prompt, cfg, negative_prompt=negative_prompt,
                clip_skip=self.clip_skip,
            )
        return PromptEmbeds({"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative} if cfg else None)

    def __init__(self, pipe, *options, **named_options):
        super().__init__(pipe, *options, **named_options)
        self.check_scheduler()  # as the model loads, before any work with it

    def check_scheduler(self) -> None:
        config, name = self.pipe.scheduler.config, type(self.pipe.scheduler).__name__
        # The DDIM steps read the scheduler's DDPM betas; an EDM scheduler (Playground v2.5) or continuous-time
        # Euler (CosXL) has none and preconditions the UNet's input and time, so DDIM on its config samples garbage.
        if ("beta_schedule" not in config or config.get("timestep_type", "discrete") != "discrete"
                or config.get("use_flow_sigmas") or config.get("prediction_type") not in ("epsilon", "v_prediction")):
            raise ValueError(f"the pipeline's scheduler is {name} with a noise schedule that is no DDPM beta schedule "
                             "of ε- or v-prediction (an EDM or continuous-time scheduler, flow sigmas, or another "
                             "prediction type), which this package's DDIM steps cannot read: it samples SD-family "
                             "models with DDIM on the scheduler's betas")
        if isinstance(self.pipe.scheduler, (LCMScheduler, TCDScheduler)):
            name = type(self.pipe.scheduler).__name__
            raise ValueError(f"the pipeline's scheduler is {name}, whose consistency steps (fresh noise each step, on "
                             "timesteps of its own) this package does not reproduce: it samples SD-family models "
                             "with DDIM. To sample this model with DDIM anyway, set pipe.scheduler = "
                             "DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing'), or "
                             "name DDIMScheduler in the model folder's model_index.json (\"scheduler\": "
                             "[\"diffusers\", \"DDIMScheduler\"]) and set \"timestep_spacing\": \"trailing\" in its "
                             "scheduler/scheduler_config.json")

    def schedule(self, num_inference_steps, height, width) -> Schedule:
        self.check_scheduler()  # again: the scheduler may have been swapped since
        config = self.pipe.scheduler.config
        if config.get("clip_sample", False) or config.get("thresholding", False):
            raise ValueError("schedulers with clip_sample or thresholding are not supported: x̂0 must stay unclipped")
        # DDIM's own default clips x̂0; schedulers that do not mention clipping (Euler, PNDM) never clip. A setting
        # the scheduler took by default (listed in _use_default_values, which from_config would drop) is kept: Euler's
        # default spacing is linspace, DDIM's leading.
        ddim = DDIMScheduler.from_config({key: value for key, value in config.items() if key != "_use_default_values"},
                                         clip_sample=False)
        ddim.set_timesteps(num_inference_steps)
        if isinstance(self.pipe.scheduler, DDIMScheduler):  # its own step rule, as the stock pipeline steps
            prev = ddim.timesteps - ddim.config.num_train_timesteps // num_inference_steps
        else:  # each step lands on the next one's timestep, which DDIM's rule misses under linspace spacing
            prev = torch.cat([ddim.timesteps[1:], torch.tensor([-1])])
        alphas_prev = [ddim.alphas_cumprod[t] if t >= 0 else ddim.final_alpha_cumprod for t in prev.tolist()]
        if config.get("prediction_type") == "epsilon" and (ddim.alphas_cumprod[ddim.timesteps] == 0).any():
            raise ValueError("the scheduler's zero-terminal-SNR schedule (rescale_betas_zero_snr) reaches ᾱ = 0 at its "
                             "first step, where an ε-prediction implies no x̂0 (every sample would be NaN): such "
                             "schedules are for v-prediction models; set prediction_type='v_prediction' if the model "
                             "predicts v, or leave out rescale_betas_zero_snr")
        return Schedule(
            timesteps=ddim.timesteps,
            alphas_cumprod=ddim.alphas_cumprod[ddim.timesteps],
            alphas_cumprod_prev=torch.stack([torch.as_tensor(a) for a in alphas_prev]),
        )

    def forward(self, latents, timestep, conditioning, guidance_scale):
        return self.call_denoiser(
            latents,
            torch.as_tensor(timestep, device=latents.device),
            timestep_cond=self.guidance_embedding(latents.shape[0], guidance_scale, latents),
            added_cond_kwargs=self.added_conditions(conditioning, latents),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]

    def guidance_embedding(self, batch, guidance_scale, latents):
        """Guidance-scale conditioning of LCM-style UNets (time_cond_proj_dim); None for the others."""
        dim = self.denoiser.config.time_cond_proj_dim
        if dim is None:
            return None
        scale = torch.tensor(guidance_scale - 1).repeat(batch)
        return self.pipe.get_guidance_scale_embedding(scale, embedding_dim=dim).to(latents)

    def added_conditions(self, conditioning, latents):
        return None

    def unscale_latents(self, latents):
        return latents / self.pipe.vae.config.scaling_factor


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    pipeline_class = StableDiffusionXLPipeline
    default_guidance = 5.0
    clip_hidden_state_from_end = 2

    def encode_prompt(self, prompts, guidance_scale, num_images_per_prompt=1, negative_prompt=None):
        cfg = self.guidance_mode(guidance_scale) == "cfg"
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
            clip_skip=self.clip_skip,
        )
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled}
        uncond = {"encoder_hidden_states": negative, "text_embeds": negative_pooled} if cfg else None
        return PromptEmbeds(cond, uncond)

    def added_conditions(self, conditioning, latents):
        """SDXL's micro-conditioning: original size, crop (0, 0) and target size, all the generated size."""
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=latents.device, dtype=latents.dtype)
        text_embeds = conditioning["text_embeds"]
        return {"text_embeds": text_embeds, "time_ids": time_ids.repeat(text_embeds.shape[0], 1)}

    def decoding_vae(self):
        """A float32 copy of a float16 VAE whose config sets force_upcast (it overflows in float16), else the VAE.

        The stock pipeline decodes such a VAE in float32 too, casting it in place and back; a copy gives the same
        images and keeps the weights a graph built through `decode` saved for backward. The copy is made once per
        VAE (the VAE is frozen here), not at every decode of a ReNO or FK loop, and made again when the VAE's weights
        change in place (`load_state_dict` bumps each parameter's version) or it moves to another device.
        """
        vae = self.pipe.vae
        if not (vae.dtype == torch.float16 and vae.config.force_upcast):
            return vae
        state = (vae, vae.device, tuple(parameter._version for parameter in vae.parameters()))
        copied_from, upcast = getattr(self, "_float32_vae", (None, None))
        if copied_from != state:
            upcast = copy.deepcopy(vae).float()
            self._float32_vae = (state, upcast)
        upcast.use_slicing, upcast.use_tiling = vae.use_slicing, vae.use_tiling  # set on the VAE after the copy
        return upcast

    def unscale_latents(self, latents):
        config = self.pipe.vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor
