"""The shipped shapes-world encoders load offline with their stock transformers classes and do their job."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model

from align_diffusion.world.data import to_tensor
from align_diffusion.world.encoders import clip_prompt_accuracy
from align_diffusion.world.render import render_prompt

WORLD = Path(__file__).resolve().parents[1] / "assets" / "world"


@pytest.mark.parametrize("name", ["clip", "dino"])
def test_image_processor_reproduces_the_training_normalization(name):
    images = [render_prompt("a red circle left of a blue square", 0), render_prompt("three triangles", 1)]
    processor = AutoImageProcessor.from_pretrained(WORLD / name)
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, to_tensor(images), atol=1e-5, rtol=0)


def test_world_clip_picks_the_right_prompt_among_six():
    model, tokenizer = CLIPModel.from_pretrained(WORLD / "clip").eval(), AutoTokenizer.from_pretrained(WORLD / "clip")
    assert clip_prompt_accuracy(model, tokenizer, split="test", images_per_prompt=4) >= 0.9


def test_world_dino_loads_and_tells_scenes_apart():
    model = Dinov2Model.from_pretrained(WORLD / "dino").eval()
    prompts = ["a red circle", "four squares"]
    renders = to_tensor([render_prompt(p, seed) for p in prompts for seed in range(8)])
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model(pixel_values=renders).pooler_output, dim=-1)
    similarity = cls @ cls.T
    same = torch.block_diag(torch.ones(8, 8), torch.ones(8, 8)).bool() & ~torch.eye(16, dtype=torch.bool)
    different = ~torch.block_diag(torch.ones(8, 8), torch.ones(8, 8)).bool()
    assert similarity[same].mean() > similarity[different].mean() + 0.1
