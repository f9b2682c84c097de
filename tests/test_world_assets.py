"""The shipped shapes-world models load offline with their stock diffusers / transformers classes and do their
job."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model

from align_diffusion.models import adapter_for, load_adapter
from align_diffusion.sampling.loop import sample

from align_diffusion.world.data import to_tensor
from align_diffusion.world.encoders import clip_prompt_accuracy, world_tokenizer
from align_diffusion.world.render import render_prompt

WORLD = Path(__file__).resolve().parents[1] / "assets" / "world"


@pytest.mark.parametrize("name", ["clip", "dino"])
def test_image_processor_reproduces_the_training_normalization(name):
    images = [render_prompt("a red circle left of a blue square", 0), render_prompt("three triangles", 1)]
    processor = AutoImageProcessor.from_pretrained(WORLD / name)
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, to_tensor(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("folder", ["clip", "sd/tokenizer", "sd3/tokenizer", "sd3/tokenizer_2"])
def test_world_tokenizers_read_capitals_and_punctuation_as_the_world_words(folder):
    """They lowercase, like CLIP's, and drop punctuation: 'A' and '.' were unknown words the models saw."""
    tokenizer, typed = AutoTokenizer.from_pretrained(WORLD / folder), "A Red circle, left of two squares!"
    words = tokenizer("a red circle left of two squares").input_ids
    assert tokenizer(typed).input_ids == words and tokenizer.unk_token_id not in words
    assert world_tokenizer()(typed).input_ids == words  # as a build makes them


def test_world_clip_picks_the_right_prompt_among_six():
    model, tokenizer = CLIPModel.from_pretrained(WORLD / "clip").eval(), AutoTokenizer.from_pretrained(WORLD / "clip")
    assert clip_prompt_accuracy(model, tokenizer, split="test", images_per_prompt=4) >= 0.9


def test_world_dino_loads_and_tells_scenes_apart():
    model = Dinov2Model.from_pretrained(WORLD / "dino", dtype=torch.float32).eval()  # stored in float16
    prompts = ["a red circle", "four squares"]
    renders = to_tensor([render_prompt(p, seed) for p in prompts for seed in range(8)])
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model(pixel_values=renders).pooler_output, dim=-1)
    similarity = cls @ cls.T
    same = torch.block_diag(torch.ones(8, 8), torch.ones(8, 8)).bool() & ~torch.eye(16, dtype=torch.bool)
    different = ~torch.block_diag(torch.ones(8, 8), torch.ones(8, 8)).bool()
    assert similarity[same].mean() > similarity[different].mean() + 0.1


def test_sd3_generator_loads_with_its_stock_pipeline_and_our_sampler_matches_it():
    pipe = StableDiffusion3Pipeline.from_pretrained(WORLD / "sd3")
    prompts = ["a red circle left of a blue square", "three triangles"]
    stock = pipe(prompts, num_inference_steps=10, guidance_scale=2.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(k) for k in range(2)]).images
    ours = sample(adapter_for(pipe), prompts, num_inference_steps=10, guidance_scale=2.0).images
    assert stock.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=0)


def test_sd3_sizes_past_the_transformers_position_table_are_refused_in_pixels():
    """The world transformer's table holds 8 × 8 patches of 2 × 2 latents of 4 × 4 pixels: 64 px at most."""
    adapter = load_adapter(str(WORLD / "sd3"))
    assert sample(adapter, ["a red circle"], num_inference_steps=1, height=64, width=64).images.shape[-1] == 64
    with pytest.raises(ValueError, match=r"height must be at most 64 for this transformer \(pos_embed_max_size 8\), "
                                         "got 72×64"):
        sample(adapter, ["a red circle"], num_inference_steps=1, height=72, width=64)


def test_sd_generator_loads_with_its_stock_pipeline_and_our_ddim_sampler_matches_it():
    pipe = StableDiffusionPipeline.from_pretrained(WORLD / "sd")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.dtype == torch.float32  # stored in float16
    prompts = ["a red circle left of a blue square", "three triangles"]
    stock = pipe(prompts, num_inference_steps=10, guidance_scale=2.0, eta=0.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(k) for k in range(2)]).images
    ours = sample(adapter_for(pipe), prompts, sampler="ddim", noise_level=0.0, num_inference_steps=10,
                  guidance_scale=2.0).images
    assert stock.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=0)
