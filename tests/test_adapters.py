"""Our sampling loop against the stock diffusers pipelines, family by family."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler, LCMScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler,
    UNet2DConditionModel,
)

from align_diffusion.models import PromptEmbeds, adapter_class, adapter_for, load_adapter
from align_diffusion.models.base import compile_repeated_blocks
from align_diffusion.models.sd3 import CONTEXT_BIAS, SD3Adapter
from align_diffusion.models.tiny import tiny_pipeline
from align_diffusion.sampling.loop import sample, sample_images
from align_diffusion.training.lora import add_lora
from training_helpers import skipped_clip_embeds

PROMPTS = ["a red circle", "two blue squares"]
SIZE = dict(height=32, width=32)


def stock_images(pipe, guidance, seeds, steps=5, size=32):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        PROMPTS,
        num_images_per_prompt=len(seeds) // len(PROMPTS),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=generators,
        output_type="pt",
    ).images


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_matches_stock_pipeline(tiny_adapter, guidance):
    trajectory = sample(
        tiny_adapter, PROMPTS, num_images_per_prompt=2, num_inference_steps=5, guidance_scale=guidance,
        height=32, width=32, seed=7,
    )
    expected = stock_images(tiny_adapter.pipe, guidance, seeds=[7, 8, 9, 10])
    assert trajectory.images.shape == expected.shape
    assert (trajectory.images - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["sd3", "sd", "sdxl"])
def test_one_negative_prompt_for_every_prompt_matches_stock(tiny_pipes, name):
    adapter = adapter_for(tiny_pipes[name])
    trajectory = sample(adapter, PROMPTS, num_inference_steps=3, guidance_scale=4.5, height=32, width=32, seed=7,
                        negative_prompt="blurry")
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    expected = adapter.pipe(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), num_inference_steps=3,
                            guidance_scale=4.5, height=32, width=32, generator=generators, output_type="pt").images
    assert (trajectory.images - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name,guidance", [("sd3", 4.5), ("flux", 3.5)])
def test_max_sequence_length_matches_stock(tiny_pipes, name, guidance):
    pipe = tiny_pipes[name]
    options = dict(num_inference_steps=3, guidance_scale=guidance, height=32, width=32)
    images = {}
    for length in (None, 8):
        adapter = adapter_for(pipe, max_sequence_length=length)
        assert adapter.max_sequence_length == (length or {"sd3": 256, "flux": 512}[name])  # the stock defaults
        images[length] = sample(adapter, PROMPTS, seed=7, **options).images
        generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
        expected = pipe(PROMPTS, generator=generators, output_type="pt", **options,
                        **({} if length is None else {"max_sequence_length": length})).images
        assert (images[length] - expected).abs().max() <= 1e-4
    assert (images[8] - images[None]).abs().max() > 1e-2  # the padding T5 tokens condition the image


def test_max_sequence_length_is_refused_where_it_cannot_apply(tiny_pipes):
    with pytest.raises(ValueError, match="max_sequence_length: StableDiffusionXLPipeline has no T5 text encoder"):
        adapter_for(tiny_pipes["sdxl"], max_sequence_length=64)
    for length in (0, 513):
        with pytest.raises(ValueError, match=re.escape(f"must lie in [1, 512] (T5 tokens per prompt), got {length}")):
            adapter_for(tiny_pipes["sd3"], max_sequence_length=length)


@pytest.mark.parametrize("name", ["sd3", "sd", "sdxl"])
def test_clip_skip_matches_stock_with_and_without_a_negative_prompt(tiny_pipes, name):
    # The stock pipelines skip no layer of the negative prompt's encoding; neither do the adapters.
    pipe = tiny_pipes[name]
    options = dict(num_inference_steps=3, guidance_scale=4.5, height=32, width=32)
    for negative in (None, "blurry"):
        images = {}
        for clip_skip in (None, 1):
            adapter = adapter_for(pipe, clip_skip=clip_skip)
            images[clip_skip] = sample(adapter, PROMPTS, seed=7, negative_prompt=negative, **options).images
            generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
            negatives = None if negative is None else [negative] * len(PROMPTS)
            if name == "sd" and clip_skip:
                with torch.no_grad():
                    embeds = skipped_clip_embeds(pipe, PROMPTS, clip_skip)
                expected = pipe(prompt_embeds=embeds, negative_prompt=negatives, generator=generators,
                                output_type="pt", **options)
            else:
                expected = pipe(PROMPTS, negative_prompt=negatives, clip_skip=clip_skip, generator=generators,
                                output_type="pt", **options)
            assert (images[clip_skip] - expected.images).abs().max() <= 1e-4
        assert (images[1] - images[None]).abs().max() > 1e-2  # the skipped layer conditioned the image


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_guidance_rescale_matches_stock(tiny_pipes, name):
    pipe = tiny_pipes[name]
    options = dict(num_inference_steps=3, guidance_scale=7.0, height=32, width=32)
    images = {}
    for rescale in (0.0, 0.7):
        images[rescale] = sample(adapter_for(pipe, guidance_rescale=rescale), PROMPTS, seed=7, **options).images
        generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
        expected = pipe(PROMPTS, generator=generators, output_type="pt", guidance_rescale=rescale, **options).images
        assert (images[rescale] - expected).abs().max() <= 1e-4
    assert (images[0.7] - images[0.0]).abs().max() > 1e-2


def test_guidance_rescale_pulls_the_guided_std_back_to_the_conditional_one(tiny_pipes):
    # φ = 1: each image's guided prediction has the conditional prediction's std (Lin et al. 2024, eq. 15).
    adapter, plain = adapter_for(tiny_pipes["sd"], guidance_rescale=1.0), adapter_for(tiny_pipes["sd"])
    latents, timestep = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0)), 500
    with torch.no_grad():
        embeds = adapter.encode_prompt(PROMPTS, 7.0)
        rescaled = adapter.predict(latents, timestep, embeds, 7.0)
        guided = plain.predict(latents, timestep, embeds, 7.0)
        conditional = plain.predict(latents, timestep, PromptEmbeds(embeds.cond), 1.0)
    for k in range(2):
        assert float(rescaled[k].std()) == pytest.approx(float(conditional[k].std()), rel=1e-4)
        torch.testing.assert_close(rescaled[k], guided[k] * conditional[k].std() / guided[k].std())
    assert guided.std() > 1.1 * conditional.std()  # so the test sees a rescale


def test_flux_true_cfg_matches_stock(tiny_pipes):
    pipe = tiny_pipes["flux"]
    options = dict(num_inference_steps=3, guidance_scale=3.5, height=32, width=32)
    adapter = adapter_for(pipe, true_cfg_scale=4.0)
    assert adapter.guidance_mode(3.5) == "cfg"
    images = sample(adapter, PROMPTS, seed=7, negative_prompt="blurry", **options).images
    expected = pipe(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), true_cfg_scale=4.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **options).images
    assert (images - expected).abs().max() <= 1e-4
    plain = sample(adapter_for(pipe), PROMPTS, seed=7, **options).images
    assert (images - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="true_cfg_scale: FLUX's true classifier-free guidance \\(4.0\\) steers away "
                                         "from a negative prompt, and none was given"):
        sample(adapter, PROMPTS, **options)
    with pytest.raises(ValueError, match=re.escape("negative_prompt: FLUX runs classifier-free guidance only as true "
                                                   "CFG (a true_cfg_scale > 1), so the negative prompt would have no "
                                                   "effect")):
        sample(adapter_for(pipe), PROMPTS, negative_prompt="blurry", **options)
    with pytest.raises(ValueError, match="true_cfg_scale: StableDiffusion3Pipeline has no true_cfg_scale"):
        adapter_for(tiny_pipes["sd3"], true_cfg_scale=2.0)
    with pytest.raises(ValueError, match=re.escape("true_cfg_scale: must be a finite number >= 1 (1: off), got 0.5")):
        adapter_for(pipe, true_cfg_scale=0.5)


def test_clip_skip_and_guidance_rescale_are_refused_where_they_cannot_apply(tiny_pipes):
    with pytest.raises(ValueError, match="clip_skip: FluxPipeline takes no clip_skip"):
        adapter_for(tiny_pipes["flux"], clip_skip=1)
    with pytest.raises(ValueError, match="clip_skip: must be >= 0"):
        adapter_for(tiny_pipes["sd"], clip_skip=-1)
    # SD3 and SDXL read hidden_states[-(clip_skip + 2)], SD 1.5 hidden_states[-(clip_skip + 1)], of 2 layers + 1.
    for name, most in [("sd3", 1), ("sdxl", 1), ("sd", 2)]:
        adapter_for(tiny_pipes[name], clip_skip=most)
        with pytest.raises(ValueError, match=re.escape(f"clip_skip: at most {most} for this pipeline's CLIP text "
                                                       f"encoders (2 layers), got {most + 1}")):
            adapter_for(tiny_pipes[name], clip_skip=most + 1)
    without_clip = {**tiny_pipes["sd3"].components, "text_encoder": None, "text_encoder_2": None}
    with pytest.raises(ValueError, match="clip_skip: the pipeline holds no CLIP text encoder"):
        adapter_for(StableDiffusion3Pipeline(**without_clip), clip_skip=1)
    assert adapter_for(tiny_pipes["sd"], clip_skip=0).clip_skip is None  # 0 skips none, as stock
    assert adapter_for(tiny_pipes["flux"], clip_skip=0).clip_skip is None
    for name in ("sd3", "flux"):
        with pytest.raises(ValueError, match="guidance_rescale: .*Pipeline has no guidance_rescale"):
            adapter_for(tiny_pipes[name], guidance_rescale=0.5)
    with pytest.raises(ValueError, match=re.escape("guidance_rescale: must lie in [0, 1], got 1.5")):
        adapter_for(tiny_pipes["sd"], guidance_rescale=1.5)
    with pytest.raises(ValueError, match="guidance_rescale: guidance 1.0 runs no classifier-free guidance"):
        sample(adapter_for(tiny_pipes["sd"], guidance_rescale=0.5), PROMPTS, guidance_scale=1.0, **SIZE)


def test_sample_images_takes_one_negative_prompt_per_prompt_across_batches(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    prompts, negatives = [*PROMPTS, "a green triangle"], ["blurry", "dark", "noisy"]
    options = dict(num_inference_steps=2, guidance_scale=4.5, **SIZE)
    batched = sample_images(adapter, prompts, seed=3, batch_size=2, negative_prompt=negatives, **options)
    for k in range(3):
        alone = sample(adapter, [prompts[k]], seed=3 + k, negative_prompt=negatives[k], **options).images[0]
        assert (batched[k] - alone).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="got 2 negative prompts for 3 prompts"):
        sample_images(adapter, prompts, negative_prompt=negatives[:2], **options)
    flux = adapter_for(tiny_pipes["flux"], true_cfg_scale=2.0)  # its encoding does not check, as stock's does not
    with pytest.raises(ValueError, match="got 2 negative prompts for 3 prompts"):
        sample(flux, prompts, negative_prompt=negatives[:2], num_inference_steps=2, **SIZE)


def test_guidance_modes(tiny_pipes):
    sd3 = adapter_for(tiny_pipes["sd3"])
    assert sd3.guidance_mode(4.5) == "cfg" and sd3.guidance_mode(1.0) == "none"
    assert sd3.encode_prompt(PROMPTS, 4.5).uncond is not None
    assert sd3.encode_prompt(PROMPTS, 1.0).uncond is None
    assert adapter_for(tiny_pipes["flux"]).guidance_mode(3.5) == "distilled"


def test_flux_guidance_embedding_changes_the_sample(tiny_pipes):
    adapter = adapter_for(tiny_pipes["flux"])
    low, high = (
        sample(adapter, PROMPTS[:1], num_inference_steps=3, guidance_scale=g, height=32, width=32).images
        for g in (1.0, 8.0)
    )
    assert (low - high).abs().max() > 1e-3


def test_pred_x0_at_the_last_flow_step_is_the_sample(tiny_pipes):
    # With sigma_next = 0 the Euler step lands exactly on x̂0 = x - σ·v.
    adapter = adapter_for(tiny_pipes["sd3"])
    trajectory = sample(adapter, PROMPTS, num_inference_steps=4, height=32, width=32)
    torch.testing.assert_close(trajectory.pred_x0[:, -1], trajectory.final_latents, atol=1e-6, rtol=0)


def test_decode_is_differentiable(tiny_adapter):
    latents = torch.randn(1, *tiny_adapter.latent_shape(32, 32), requires_grad=True)
    tiny_adapter.decode(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_saved_pipeline_reloads_offline_through_the_adapter(tmp_path, tiny_pipes, family):
    tiny_pipes[family].save_pretrained(tmp_path)
    adapter = load_adapter(str(tmp_path))
    assert type(adapter) is type(adapter_for(tiny_pipes[family]))
    reloaded = sample(adapter, PROMPTS[:1], num_inference_steps=2, height=32, width=32).images
    original = sample(adapter_for(tiny_pipes[family]), PROMPTS[:1], num_inference_steps=2, height=32, width=32).images
    assert (reloaded - original).abs().max() <= 1e-5


def test_a_model_under_the_home_folder_loads_as_written(saved, tmp_path, monkeypatch):
    """`~/…` in a config file or `--model=~/…` arrives unexpanded, which from_pretrained would take for a hub id."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").symlink_to(saved["sd3"])
    assert adapter_class("~/models") is SD3Adapter
    assert type(load_adapter("~/models")) is SD3Adapter
    # A pathlib path, which from_pretrained takes (home_expanded called str's startswith on it)
    assert adapter_class(Path("~/models")) is SD3Adapter
    assert type(load_adapter(Path(saved["sd3"]))) is SD3Adapter


def test_a_dtype_named_as_the_commands_name_it_loads_in_that_dtype(saved):
    """diffusers takes only a torch.dtype: given "bfloat16" it logs a line and loads float32."""
    adapter = load_adapter(str(saved["sd3"]), dtype="bfloat16")
    assert {p.dtype for p in adapter.denoiser.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype or one of \['bfloat16', 'float16', 'float32'\], "
                                         "got 'half'"):
        load_adapter(str(saved["sd3"]), dtype="half")
    with pytest.raises(ValueError, match="device: .*bogus"):  # named before the weights load, not after
        load_adapter(str(saved["sd3"]), device="bogus")


def test_unsupported_pipeline_names_the_supported_classes(tiny_pipes):
    img2img = StableDiffusionImg2ImgPipeline(**tiny_pipes["sd"].components)
    supported = "FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline"
    with pytest.raises(ValueError, match=f"StableDiffusionImg2ImgPipeline.*{supported}"):
        adapter_for(img2img)


def test_bad_sizes_are_refused(tiny_pipes):
    adapter = adapter_for(tiny_pipes["flux"])
    with pytest.raises(ValueError, match="^height must be a positive multiple of 4, got 30×32$"):
        sample(adapter, PROMPTS, num_inference_steps=2, height=30, width=32)


@pytest.mark.parametrize("settings, message", [
    (dict(num_inference_steps=2.5), "num_inference_steps must be a whole number >= 1, got 2.5"),
    (dict(height=32.0), "height must be a whole number >= 1, got 32.0"),
    (dict(guidance_scale=math.inf), "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
])
def test_bad_sampling_settings_are_named(tiny_pipes, settings, message):
    adapter = adapter_for(tiny_pipes["sd3"])
    with pytest.raises(ValueError, match=re.escape(message)):
        sample(adapter, PROMPTS, **{"num_inference_steps": 2, **SIZE, **settings})


def test_one_prompt_string_is_one_prompt_and_no_prompt_is_an_error(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    one = sample(adapter, PROMPTS[0], num_inference_steps=2, **SIZE)
    assert one.prompts == PROMPTS[:1]
    assert torch.equal(one.images, sample(adapter, PROMPTS[:1], num_inference_steps=2, **SIZE).images)
    with pytest.raises(ValueError, match="prompts is empty"):
        sample(adapter, [], num_inference_steps=2, **SIZE)
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
        sample_images(adapter, [PROMPTS[0], None], num_inference_steps=2, **SIZE)
    # An argument's undecodable bytes become half a UTF-16 pair: named, not a tokenizer's TypeError
    with pytest.raises(ValueError, match=r"prompt 'a red \\udcff circle' is no text"):
        sample(adapter, ["a red \udcff circle"], num_inference_steps=2, **SIZE)
    with pytest.raises(TypeError, match="one image per prompt: repeat a prompt"):
        sample_images(adapter, PROMPTS, num_images_per_prompt=2, num_inference_steps=2, **SIZE)


def test_one_step_turbo_sampling_matches_stock(tiny_pipes):
    # SD-Turbo / SDXL-Turbo: one step from t = 999 with trailing spacing and no guidance.
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    components = dict(tiny_pipes["sdxl"].components)
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe)
    trajectory = sample(adapter, PROMPTS, num_inference_steps=1, guidance_scale=0.0, height=32, width=32, seed=3)
    assert trajectory.schedule.timesteps.tolist() == [999]
    expected = stock_images(pipe, 0.0, seeds=[3, 4], steps=1)
    assert (trajectory.images - expected).abs().max() <= 1e-4


def test_prediction_carries_grad_to_the_denoiser_when_enabled(tiny_adapter):
    embeds = tiny_adapter.encode_prompt(PROMPTS[:1], guidance_scale=3.0)
    schedule = tiny_adapter.schedule(4, 32, 32)
    latents = torch.randn(1, *tiny_adapter.latent_shape(32, 32))
    with torch.no_grad():
        assert not tiny_adapter.predict(latents, schedule.timesteps[1], embeds, 3.0).requires_grad
    tiny_adapter.denoiser.zero_grad()
    tiny_adapter.predict(latents, schedule.timesteps[1], embeds, 3.0).square().mean().backward()
    grads = [p.grad for p in tiny_adapter.denoiser.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    tiny_adapter.denoiser.zero_grad(set_to_none=True)


def test_sd35_dual_attention_without_t5_matches_stock():
    # Without T5 the adapter compacts the all-zero T5 context; SD3.5's image-only attention (attn2) has no context.
    pipe = tiny_pipeline("sd3", dual_attention_layers=(0,))
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe)
    assert CONTEXT_BIAS in adapter.encode_prompt(PROMPTS, 4.5).cond
    trajectory = sample(adapter, PROMPTS, num_inference_steps=3, guidance_scale=4.5, height=32, width=32, seed=7)
    expected = stock_images(pipe, 4.5, seeds=[7, 8], steps=3)
    assert (trajectory.images - expected).abs().max() <= 1e-4


def test_a_reference_copy_without_t5_predicts_like_the_denoiser():
    """Full fine-tuning runs its frozen copy of the denoiser through `forward_module`; the compacted T5 context must
    be attended as compactly there as in the denoiser itself."""
    pipe = tiny_pipeline("sd3")
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    adapter = adapter_for(pipe)
    embeds = adapter.encode_prompt(PROMPTS, 4.5)
    assert CONTEXT_BIAS in embeds.cond
    schedule = adapter.schedule(3, 32, 32)
    latents = adapter.initial_noise([torch.Generator().manual_seed(s) for s in (0, 1)], 32, 32)
    with torch.no_grad():
        own = adapter.predict(latents, schedule.timesteps[1], embeds, 4.5)
        adapter.forward_module = copy.deepcopy(adapter.denoiser)
        reference = adapter.predict(latents, schedule.timesteps[1], embeds, 4.5)
    assert (reference - own).abs().max() <= 1e-5 * own.abs().max()


def test_gradient_checkpointing_without_t5_gives_the_stock_transformers_gradients():
    """Checkpointing reruns each block in the backward pass, after the compacted context's attention is undone: the
    gradients must still be the stock transformer's on the full context."""
    pipe = tiny_pipeline("sd3")
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    adapter = adapter_for(pipe)
    embeds = adapter.encode_prompt(PROMPTS[:1], 1.0)
    assert CONTEXT_BIAS in embeds.cond and embeds.uncond is None
    timestep = adapter.schedule(3, 32, 32).timesteps[1]
    latents = torch.randn(1, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS[:1], None, None, do_classifier_free_guidance=False)

    def gradients(prediction):
        adapter.denoiser.zero_grad(set_to_none=True)
        prediction().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in adapter.denoiser.parameters()])

    stock = gradients(lambda: pipe.transformer(hidden_states=latents, timestep=timestep.expand(1),
                                               encoder_hidden_states=context, pooled_projections=pooled,
                                               return_dict=False)[0])
    adapter.denoiser.enable_gradient_checkpointing()
    ours = gradients(lambda: adapter.predict(latents, timestep, embeds, 1.0))
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5 * float(stock.abs().max()))
    # Calls without gradients (rollouts) compute what training recomputes, to the bit: the ratio starts at 1
    with torch.no_grad():
        rollout = adapter.predict(latents, timestep, embeds, 1.0)
    assert torch.equal(rollout, adapter.predict(latents, timestep, embeds, 1.0).detach())


def test_lcm_unet_takes_guidance_as_its_embedding_like_stock():
    # A UNet with time_cond_proj_dim gets the guidance scale as an embedding, and the stock pipeline runs no CFG.
    adapter = adapter_for(tiny_pipeline("sd", time_cond_proj_dim=8))
    assert adapter.guidance_mode(7.5) == "distilled"
    trajectory = sample(adapter, PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=32, width=32, seed=7)
    assert trajectory.embeds.uncond is None
    expected = stock_images(adapter.pipe, 7.5, seeds=[7, 8], steps=4)
    assert (trajectory.images - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler", [LCMScheduler, TCDScheduler])
def test_consistency_schedulers_are_refused_rather_than_replaced_by_ddim(scheduler):
    pipe = tiny_pipeline("sd", time_cond_proj_dim=8)
    ddim = pipe.scheduler
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    refused = f"scheduler is {scheduler.__name__}, whose consistency steps"
    with pytest.raises(ValueError, match=refused):  # as the model loads
        adapter_for(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")  # as it advises
    adapter = adapter_for(pipe)
    assert sample(adapter, PROMPTS, num_inference_steps=4, **SIZE).schedule.timesteps[0] == 999
    pipe.scheduler = scheduler.from_config(ddim.config)  # swapped in after loading: refused as it samples
    with pytest.raises(ValueError, match=refused):
        sample(adapter, PROMPTS, num_inference_steps=4, **SIZE)


def test_schedulers_without_ddpm_betas_are_refused_and_defaults_kept(tiny_pipes, tmp_path):
    """An EDM or continuous-time scheduler preconditions the UNet's input and time: DDIM on its config sampled images
    0.8 off the stock pipeline's. A scheduler's default spacing (Euler's linspace, unwritten in a saved config) is
    its own, not DDIM's leading: the DDIM steps take the stock scheduler's timesteps."""
    pipe = copy.deepcopy(tiny_pipes["sd"])
    for scheduler in (EDMEulerScheduler(), EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                              timestep_type="continuous")):
        pipe.scheduler = scheduler
        with pytest.raises(ValueError, match=f"scheduler is {type(scheduler).__name__} with a noise schedule that is "
                                             "no DDPM beta schedule"):
            adapter_for(pipe)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1}))
    pipe.scheduler = EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert "timestep_spacing" in pipe.scheduler.config["_use_default_values"]
    pipe.scheduler.set_timesteps(10)
    adapter = adapter_for(pipe)
    schedule = adapter.schedule(10, 32, 32)
    assert schedule.timesteps.tolist() == pipe.scheduler.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333,
                                                                                 222, 111, 0]
    # Each step lands where the next starts (DDIM's t − 1000 // steps would land on 889, 778, … under linspace)
    assert torch.equal(schedule.alphas_cumprod_prev[:-1], schedule.alphas_cumprod[1:])
    # The same ODE as the stock Euler sampler, discretized alike: measured 7.5e-4 apart (9.1e-3 with DDIM's landing
    # rule on these timesteps)
    ours = sample(adapter, PROMPTS, num_inference_steps=10, guidance_scale=4.5, seed=7, **SIZE).images
    assert (ours - stock_images(pipe, 4.5, seeds=[7, 8], steps=10)).abs().max() < 2e-3


def test_inverted_sigmas_are_sampled_by_the_ode_only(tiny_pipes):
    pipe = copy.deepcopy(tiny_pipes["sd3"])
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, invert_sigmas=True)
    assert torch.isfinite(sample(adapter_for(pipe), PROMPTS, num_inference_steps=3, **SIZE).images).all()
    with pytest.raises(ValueError, match="sampler 'flow-sde': the pipeline's scheduler sets invert_sigmas"):
        sample(adapter_for(pipe), PROMPTS, sampler="flow-sde", num_inference_steps=3, **SIZE)


def test_sdxl_float16_vae_with_force_upcast_decodes_in_float32_like_stock(tiny_pipes):
    components = dict(tiny_pipes["sdxl"].components)
    components["vae"] = copy.deepcopy(components["vae"]).half()
    assert components["vae"].config.force_upcast
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe)
    trajectory = sample(adapter, PROMPTS, num_inference_steps=2, guidance_scale=4.5, height=32, width=32, seed=7)
    assert pipe.vae.dtype == torch.float16
    expected = stock_images(pipe, 4.5, seeds=[7, 8], steps=2)
    assert (trajectory.images - expected).abs().max() <= 1e-4
    in_float16 = pipe.vae.decode(adapter.unscale_latents(trajectory.final_latents).half(), return_dict=False)[0]
    assert ((in_float16.float() / 2 + 0.5).clamp(0, 1) - expected).abs().max() > 1e-4  # the check tells them apart
    latents = trajectory.final_latents.clone().requires_grad_()
    adapter.decode(latents).mean().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    assert adapter.decoding_vae() is adapter.decoding_vae()  # copied once, not at every decode
    pipe.vae.enable_slicing()  # set after the copy was made, it still reaches the decode
    assert adapter.decoding_vae().use_slicing
    replaced = copy.deepcopy(pipe.vae)  # a VAE swapped in is copied anew
    with torch.no_grad():
        replaced.decoder.conv_out.bias.add_(0.5)
    pipe.vae = replaced
    assert torch.equal(adapter.decoding_vae().decoder.conv_out.bias, replaced.decoder.conv_out.bias.float())
    state = {key: value + 0.25 if "decoder" in key else value for key, value in replaced.state_dict().items()}
    replaced.load_state_dict(state)  # new weights loaded into the same VAE are copied anew too
    assert torch.equal(adapter.decoding_vae().decoder.conv_out.bias, replaced.decoder.conv_out.bias.float())
    trajectory = sample(adapter, PROMPTS, num_inference_steps=2, guidance_scale=4.5, height=32, width=32, seed=7)
    assert (trajectory.images - stock_images(pipe, 4.5, seeds=[7, 8], steps=2)).abs().max() <= 1e-4


def test_flow_schedule_keeps_the_shift_set_on_the_pipelines_scheduler(tiny_pipes):
    pipe = StableDiffusion3Pipeline(**tiny_pipes["sd3"].components)
    pipe.scheduler = copy.deepcopy(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_shift(1.0)  # the config still says shift 3
    adapter = adapter_for(pipe)
    trajectory = sample(adapter, PROMPTS, num_inference_steps=4, guidance_scale=4.5, seed=7, **SIZE)
    linear = torch.linspace(1.0, pipe.scheduler.sigma_min, 4)  # shift 1: evenly spaced, not shifted towards 1
    assert trajectory.schedule.sigmas[:4].tolist() == pytest.approx(linear.tolist())
    assert (trajectory.images - stock_images(pipe, 4.5, seeds=[7, 8], steps=4)).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler, message", [
    (FlowMatchHeunDiscreteScheduler(shift=3.0), "scheduler is FlowMatchHeunDiscreteScheduler"),
    (FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), "sets stochastic_sampling"),
])
def test_flow_schedulers_the_samplers_do_not_reproduce_are_refused(tiny_pipes, scheduler, message):
    pipe = StableDiffusion3Pipeline(**{**tiny_pipes["sd3"].components, "scheduler": scheduler})
    with pytest.raises(ValueError, match=message):
        sample(adapter_for(pipe), PROMPTS, num_inference_steps=2, **SIZE)


def test_default_size_from_a_unet_sample_size_pair_matches_stock(tiny_pipes):
    base = tiny_pipes["sd"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**base.unet.config, "sample_size": (8, 16)}).eval()
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    trajectory = sample(adapter_for(pipe), PROMPTS[:1], num_inference_steps=2, seed=7)
    expected = pipe(PROMPTS[:1], num_inference_steps=2, generator=[torch.Generator().manual_seed(7)],
                    output_type="pt").images
    assert trajectory.images.shape == expected.shape == (1, 3, 16, 32)
    assert (trajectory.images - expected).abs().max() <= 1e-4


def test_a_single_generator_is_refused_with_what_to_pass(tiny_pipes):
    adapter = adapter_for(tiny_pipes["sd3"])
    with pytest.raises(TypeError, match="one torch.Generator per image, a list of 2, not a single generator"):
        sample(adapter, PROMPTS, num_inference_steps=2, generators=torch.Generator().manual_seed(0), **SIZE)
    # A tuple of generators is a sequence like a list (diffusers' noise drawing failed on it); seeds are not.
    as_tuple = sample(adapter, PROMPTS, num_inference_steps=2, decode=False, **SIZE,
                      generators=tuple(torch.Generator().manual_seed(k) for k in range(2)))
    assert torch.equal(as_tuple.final_latents, sample(adapter, PROMPTS, num_inference_steps=2, decode=False, seed=0,
                                                      **SIZE).final_latents)
    with pytest.raises(TypeError, match=r"generators must be torch.Generators, got \['int'\]"):
        sample(adapter, PROMPTS, num_inference_steps=2, generators=[0, 1], **SIZE)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a whole number >= 1, got 2.0"):
        sample(adapter, PROMPTS, num_inference_steps=2, num_images_per_prompt=2.0, **SIZE)


def test_model_options_of_the_wrong_type_are_refused_before_the_weights_load(saved):
    """They failed on the first sample, deep in the tokenizer (128.5 tokens), or counted True as 1."""
    for option, value, message in [("max_sequence_length", 128.5, "must be a whole number of T5 tokens, got 128.5"),
                                   ("clip_skip", True, "must be a whole number of CLIP layers, got True")]:
        with pytest.raises(ValueError, match=f"{option}: {message}"):
            load_adapter(str(saved["sd3"]), **{option: value})


@pytest.mark.parametrize("family", ["sd3", "sd", "sdxl"])
def test_per_sample_timesteps_under_cfg_equal_the_shared_timestep(tiny_pipes, family):
    adapter = adapter_for(tiny_pipes[family])
    embeds = adapter.encode_prompt(PROMPTS, guidance_scale=3.0)
    assert embeds.uncond is not None
    timestep = adapter.schedule(4, 32, 32).timesteps[1]
    latents = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shared = adapter.predict(latents, timestep, embeds, 3.0)
        per_sample = adapter.predict(latents, timestep.repeat(2), embeds, 3.0)
    torch.testing.assert_close(per_sample, shared, atol=1e-6, rtol=0)


def test_lora_takes_the_same_modules_and_initial_weights_whatever_the_order_of_its_targets(tiny_pipes):
    """Why a resume may list lora.target_modules in another order: the run it makes is the same."""
    layers = []
    for targets in (["to_q", "to_k", "to_v", "to_out.0"], ["to_out.0", "to_v", "to_k", "to_q", "to_k"]):
        adapter = adapter_for(copy.deepcopy(tiny_pipes["sd3"]))
        torch.manual_seed(0)
        add_lora(adapter, rank=4, alpha=8, target_modules=targets)
        layers.append({name: p for name, p in adapter.denoiser.named_parameters() if "lora_" in name})
    assert list(layers[0]) == list(layers[1]) and len(layers[0]) > 0
    for name, weight in layers[0].items():
        assert torch.equal(weight, layers[1][name]), name


def test_lora_targets_naming_a_container_are_refused_with_the_module_named(tiny_pipes):
    """peft wraps only layers: `to_out` (a ModuleList holding the Linear `to_out.0`) failed inside peft with a dump
    of the module."""
    adapter = adapter_for(copy.deepcopy(tiny_pipes["sd3"]))
    with pytest.raises(ValueError, match=r"'to_out' matches transformer_blocks\.0\.attn\.to_out, a ModuleList"):
        add_lora(adapter, rank=4, alpha=8, target_modules=["to_q", "to_out"])
    with pytest.raises(ValueError, match="'to_nothing' matches no module of SD3Transformer2DModel"):
        add_lora(adapter, rank=4, alpha=8, target_modules=["to_nothing"])


def test_compiled_blocks_with_lora_match_eager_in_every_mode_the_trainer_runs(tiny_pipes, capfd):
    """Regional compilation (the trainer's `optim.compile`) of SD3.5-style blocks (dual attention, a last block
    without context output), LoRA inside: one compiled block per layer, the eager model's predictions and input
    gradients in each mode the trainer runs (rollouts without grad, the update with grad, the reference with the
    adapter off), and no block left eager by dynamo's recompile limit."""
    pipe = copy.deepcopy(tiny_pipes["sd3"])
    pipe.transformer = SD3Transformer2DModel(**{**pipe.transformer.config, "num_layers": 3,
                                                "dual_attention_layers": (0,), "qk_norm": "rms_norm"})
    eager = adapter_for(pipe)
    params = add_lora(eager, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(0)
    with torch.no_grad():
        for param in params:
            param.normal_(std=0.5)  # a fresh LoRA's B is zero: give it a part in the prediction
    compiled = copy.deepcopy(eager.denoiser)
    assert compile_repeated_blocks(compiled) == 3
    config = compiled.config

    def run(denoiser, batch, grad, adapter):
        latents = torch.randn(batch, config.in_channels, 16, 16, generator=torch.Generator().manual_seed(batch))
        inputs = dict(encoder_hidden_states=torch.randn(batch, 7, config.joint_attention_dim),
                      pooled_projections=torch.randn(batch, config.pooled_projection_dim),
                      timestep=torch.linspace(900, 250, batch))
        x = latents.requires_grad_(grad)
        if not adapter:
            denoiser.disable_adapters()
        try:
            with torch.set_grad_enabled(grad):
                prediction = denoiser(hidden_states=x, **inputs, return_dict=False)[0]
        finally:
            denoiser.enable_adapters()
        if not grad:
            return prediction, None
        prediction.square().sum().backward()
        return prediction.detach(), x.grad

    modes = [(2, False, True), (2, True, True), (2, False, False)]  # 3 block kinds × 3 modes: over dynamo's 8
    for mode in modes:
        torch.manual_seed(1)
        eager_prediction, eager_grad = run(eager.denoiser, *mode)
        torch.manual_seed(1)
        compiled_prediction, compiled_grad = run(compiled, *mode)
        assert (compiled_prediction - eager_prediction).abs().max() <= 1e-5 * eager_prediction.abs().max(), mode
        if eager_grad is not None:
            assert (compiled_grad - eager_grad).abs().max() <= 1e-5 * eager_grad.abs().max(), mode
    assert "recompile_limit" not in capfd.readouterr().err  # torch's own log handler: on stderr, not caplog


def test_regional_compilation_finds_the_repeated_blocks_of_each_family(tiny_pipes):
    flux = copy.deepcopy(tiny_pipes["flux"].transformer)
    assert compile_repeated_blocks(flux) == flux.config.num_layers + flux.config.num_single_layers
    with pytest.raises(ValueError, match="AutoencoderKL has no repeated blocks to compile"):
        compile_repeated_blocks(copy.deepcopy(tiny_pipes["sd3"].vae))
