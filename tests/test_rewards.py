"""The reward interface and the standard rewards, on the world CLIP and tiny random open_clip / head weights."""

import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor, CLIPModel, ViTImageProcessor

from align_diffusion.rewards.base import Reward, images_to_pil, images_to_tensor
from align_diffusion.rewards.clip import Aesthetic, AestheticHead, ClipScore, HPSv2, PickScore, TextFeatures
from align_diffusion.rewards.preprocess import TorchImageTransform
from align_diffusion.rewards.simple import JpegCompressibility, ShapesReward
from align_diffusion.rewards.spec import WeightedRewards, load_reward, parse_spec, score_terms
from align_diffusion.world.evaluate import score_image
from align_diffusion.world.render import render_prompt

WORLD_CLIP = "assets/world/clip"
PROMPTS = ["a red circle", "a blue square and a green triangle", "three triangles"]


def world_images(size=None) -> list[Image.Image]:
    images = [Image.fromarray(render_prompt(p, seed)) for seed, p in enumerate(PROMPTS)]
    return [image.resize(size, Image.BICUBIC) for image in images] if size else images


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip architecture registered under a test name, and a random weights file for it."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (folder / "tiny-hps-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "tiny-hps-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-test", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, folder / "hps.pt")
    return "tiny-hps-test", folder / "hps.pt"


def test_spec_spaces_repeats_and_missing_model_folders():
    assert [(t.name, t.weight) for t in parse_spec("shapes = 0.5, jpeg= 2")] == [("shapes", 0.5), ("jpeg", 2.0)]
    with pytest.raises(ValueError, match="names the same reward twice"):
        parse_spec("shapes:graded,shapes")  # `shapes` is the graded score
    assert len(parse_spec("shapes,shapes:strict")) == 2
    for spec in ("jpeg:50,jpeg:050", "jpeg,jpeg:95", "jpeg:+50,jpeg:50"):  # one quality written two ways
        with pytest.raises(ValueError, match="names the same reward twice"):
            parse_spec(spec)
    assert len(parse_spec("jpeg:5,jpeg:50,jpeg")) == 3
    for spec in ("pickscore,pickscore:yuvalkirstain/PickScore_v1", "hpsv2:w.pt,hpsv2:ViT-H-14:w.pt",
                 "aesthetic:h.pth,aesthetic:openai/clip-vit-large-patch14:h.pth"):  # the default model, named or not
        with pytest.raises(ValueError, match="names the same reward twice"):
            parse_spec(spec)
    assert len(parse_spec("hpsv2:w.pt,hpsv2:ViT-B-32:w.pt,pickscore,pickscore:other/model")) == 4
    assert load_reward("jpeg").quality == JpegCompressibility().quality == 95
    for spec in ("clip:./no/such/clip", "clip:assets/world/no-such-clip", "adv-dino:/no/such/dino"):
        with pytest.raises(FileNotFoundError, match=f"reward model {spec.split(':', 1)[1]} is no folder"):
            load_reward(spec)


def test_a_reward_model_under_the_home_folder_loads_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clip").symlink_to(Path(WORLD_CLIP).resolve())
    images = world_images()
    assert load_reward("clip:~/clip")(images, PROMPTS).tolist() == ClipScore(WORLD_CLIP)(images, PROMPTS).tolist()
    (tmp_path / "artifact").symlink_to(Path("assets/world/artifact").resolve())
    expected = load_reward("artifact:assets/world/artifact")(images, PROMPTS).tolist()
    assert load_reward("artifact:~/artifact")(images, PROMPTS).tolist() == expected


def test_images_to_tensor_accepts_pil_and_rejects_bad_shapes():
    images = world_images()
    tensor = images_to_tensor(images)
    assert tensor.shape == (3, 3, 64, 64) and tensor.min() >= 0 and tensor.max() <= 1
    np.testing.assert_array_equal((tensor[0].permute(1, 2, 0).numpy() * 255).round(), np.asarray(images[0]))
    with pytest.raises(ValueError, match="shape"):
        images_to_tensor(torch.zeros(2, 64, 64))
    with pytest.raises(TypeError):
        images_to_tensor(["not an image"])


def test_images_to_tensor_refuses_pil_images_of_different_sizes():
    with pytest.raises(ValueError, match=r"PIL images of one size, got sizes \[\(32, 32\), \(64, 32\)\]"):
        images_to_tensor([Image.new("RGB", (32, 32)), Image.new("RGB", (64, 32))])


def test_images_to_tensor_refuses_integer_and_out_of_range_tensors():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        images_to_tensor((images * 255).round().to(torch.uint8))
    one_bright_pixel = images.clone()
    one_bright_pixel[1, 2, 7, 7] = 1.01
    for outside in (images * 2 - 1, images * 255, one_bright_pixel):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            images_to_tensor(outside)
    with pytest.raises(ValueError, match="dtype"):
        JpegCompressibility()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"])
    noisy = images.clone()
    noisy[0, 0, 0, :2] = torch.tensor([-5e-4, 1 + 5e-4])  # rounding noise of a decoder still passes
    assert images_to_tensor(noisy) is noisy


def test_images_to_tensor_refuses_nan_pixels():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        images_to_tensor(images)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_image_with_a_non_finite_pixel_scores_nan_and_the_others_as_alone(bad):
    clean = images_to_tensor(world_images())
    diverged = clean.clone()
    diverged[1, :, 10:20, 10:20] = bad
    for reward in (ShapesReward("strict"), ShapesReward(), JpegCompressibility(), ClipScore(WORLD_CLIP)):
        alone = reward(clean, PROMPTS)
        scores = reward(diverged, PROMPTS)
        assert torch.isnan(scores[1]), reward
        assert scores[[0, 2]].tolist() == alone[[0, 2]].tolist(), reward
    pixels = diverged.clone().requires_grad_(True)
    ClipScore(WORLD_CLIP)(pixels, PROMPTS).nansum().backward()
    assert torch.isfinite(pixels.grad).all() and (pixels.grad[1] == 0).all() and pixels.grad[0].abs().sum() > 0


def test_an_empty_batch_gets_no_scores():
    for reward in (ShapesReward(), JpegCompressibility(), ClipScore(WORLD_CLIP)):
        assert reward([], []).shape == (0,)
        assert reward(torch.zeros(0, 3, 64, 64), []).shape == (0,)


def test_reward_checks_lengths():
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        ShapesReward()(world_images(), PROMPTS[:2])


def test_shapes_reward_matches_shapes_eval_and_refuses_foreign_prompts():
    images = world_images()
    graded = ShapesReward()(images, PROMPTS)
    strict = ShapesReward("strict")(images, PROMPTS)
    assert strict.tolist() == [1.0, 1.0, 1.0] and graded.tolist() == [1.0, 1.0, 1.0]
    shuffled = PROMPTS[1:] + PROMPTS[:1]
    expected = [score_image(p, image) for p, image in zip(shuffled, images)]
    assert ShapesReward()(images, shuffled).tolist() == pytest.approx([j.graded for j in expected])
    assert ShapesReward("strict")(images, shuffled).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        ShapesReward()(images[:1], ["a photo of a cat"])
    ShapesReward().check_prompts(PROMPTS[0])  # one string is one prompt (its letters are no prompts)
    with pytest.raises(ValueError, match="'a photo of a cat'"):
        ShapesReward().check_prompts("a photo of a cat")


def test_jpeg_compressibility_is_minus_kilobytes():
    images = world_images()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rewards = JpegCompressibility()(images + [noise], PROMPTS + ["noise"])
    buffer = io.BytesIO()
    images[0].save(buffer, format="JPEG", quality=95)
    assert rewards[0].item() == pytest.approx(-buffer.tell() / 1000)
    assert rewards[3] < rewards[:3].min()  # noise compresses worst


@pytest.mark.parametrize("size", [(96, 80), (94, 80), (80, 94)])
def test_torch_transform_matches_processor(size):
    """The differentiable preprocessing against the transformers processor (resize + crop) on PIL images. Not square
    and larger than 64, so both the resize and the crop act; 94 resizes to 75, an odd margin of 11 whose offset 5.5
    the processor floors (rounding gives 6), on either axis."""
    processor = AutoProcessor.from_pretrained(WORLD_CLIP).image_processor
    transform = TorchImageTransform.from_processor(processor)
    images = world_images(size)
    expected = processor(images=images, return_tensors="pt").pixel_values
    actual = transform(images_to_tensor(images))
    assert actual.shape == expected.shape == (3, 3, 64, 64)
    # The processor resamples 8-bit images: measured mean gaps 2.4e-4 to 2.7e-4 in [-1, 1] units, against 2.7e-3
    # for bilinear or non-antialiased resampling and 1.4e-2 for a crop one pixel off.
    assert (actual - expected).abs().mean() < 1e-3


@pytest.mark.parametrize("setting", [{"resample": 2}, {"do_center_crop": False}, {"do_resize": False},
                                     {"do_normalize": False}])
def test_torch_transform_follows_the_processors_settings(setting):
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, **setting)
    images = world_images((94, 80))
    expected = processor(images=images, return_tensors="pt").pixel_values
    actual = TorchImageTransform.from_processor(processor)(images_to_tensor(images))
    assert actual.shape == expected.shape
    assert (actual - expected).abs().mean() < 1e-3


@pytest.mark.parametrize("setting, message", [
    ({"resample": 0}, "resample=0"), ({"resample": 1}, "resample=1"),
    ({"do_rescale": False}, "do_rescale=False"), ({"rescale_factor": 1.0}, "rescale_factor=1.0"),
    ({"size": {"shortest_edge": 64, "longest_edge": 100}}, "size=.*longest_edge"),
])
def test_torch_transform_refuses_processor_settings_it_cannot_follow(setting, message):
    processor = CLIPImageProcessor(**{"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
                                      **setting})
    with pytest.raises(ValueError, match=message):
        TorchImageTransform.from_processor(processor)


def test_torch_transform_truncates_the_long_side_like_clip_processor():
    """1024x768 → 298x224 (224 · 1024 / 768 = 298.7, truncated as transformers does; rounding gives 299)."""
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    transform = TorchImageTransform.from_processor(processor)
    coarse = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    images = images_to_pil(F.interpolate(coarse, size=(1024, 768), mode="bilinear"))  # smooth: PIL ≈ torch bicubic
    expected = processor(images=images, return_tensors="pt").pixel_values
    actual = transform(images_to_tensor(images))
    assert actual.shape == expected.shape == (1, 3, 224, 224)
    assert (actual - expected).abs().mean() < 0.01 and (actual - expected).abs().max() < 0.05


def _processor_cosine(model, processor, images, prompts):
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding="max_length", truncation=True,
                       max_length=model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        image = F.normalize(model.get_image_features(pixel_values=inputs.pixel_values).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(input_ids=inputs.input_ids,
                                                   attention_mask=inputs.attention_mask).pooler_output, dim=-1)
    return (image * text).sum(-1)


def check_differentiable(reward: Reward, images: torch.Tensor, prompts):
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, prompts)
    scores.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    return scores.detach()


def test_clip_and_pickscore_on_world_clip():
    model = CLIPModel.from_pretrained(WORLD_CLIP).eval()
    processor = AutoProcessor.from_pretrained(WORLD_CLIP)
    images = world_images((80, 80))
    reference = _processor_cosine(model, processor, images, PROMPTS)

    clip = ClipScore(WORLD_CLIP)
    scores = check_differentiable(clip, images_to_tensor(images), PROMPTS)
    np.testing.assert_allclose(scores, 2.5 * reference.clamp(min=0), atol=0.005)
    assert (scores > 0.5).all()  # the world CLIP agrees with its own world

    pick = PickScore(WORLD_CLIP)
    scores = check_differentiable(pick, images_to_tensor(images), PROMPTS)
    np.testing.assert_allclose(scores, model.logit_scale.exp().item() * reference, rtol=0.005)
    # Matched prompts beat mismatched ones.
    mismatched = pick(images_to_tensor(images), PROMPTS[1:] + PROMPTS[:1])
    assert (scores > mismatched).all()


def test_pickscore_in_bfloat16_keeps_the_float32_logit_scale(tmp_path):
    """PickScore_v1's logit scale is ln 100; cast to bfloat16 first it would be 4.59375, and every score 1% low."""
    model = CLIPModel.from_pretrained(WORLD_CLIP)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    model.save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(WORLD_CLIP).save_pretrained(tmp_path)
    images = images_to_tensor(world_images((80, 80)))
    with torch.no_grad():
        full = PickScore(str(tmp_path))(images, PROMPTS)
        half = PickScore(str(tmp_path), dtype=torch.bfloat16)(images, PROMPTS)
    # Measured: the bfloat16 model's scores within 0.08% of float32's.
    torch.testing.assert_close(half, full, rtol=3e-3, atol=0)
    by_name = load_reward(f"pickscore:{tmp_path}", dtype="bfloat16")  # as the commands and configs name it
    assert by_name.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or one of"):
        load_reward(f"pickscore:{tmp_path}", dtype="half")


def test_clip_rewards_encode_each_prompt_once():
    pick = PickScore(WORLD_CLIP)
    encoded = []
    pick.model.text_model.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(len(kwargs["input_ids"])), with_kwargs=True)
    images = images_to_tensor(world_images((80, 80)))
    first = pick(images, PROMPTS)
    again = pick(images.flip(0), PROMPTS[::-1])
    mixed = [PROMPTS[0], "a new prompt", PROMPTS[0]]
    scores = pick(images, mixed)
    assert encoded == [3, 1]  # the second call encoded nothing, the third only its new prompt
    assert torch.allclose(again, first.flip(0), atol=1e-6)
    assert torch.allclose(scores, PickScore(WORLD_CLIP)(images, mixed), atol=1e-5)  # a fresh reward encodes all


def test_text_feature_cache_evicts_the_least_recent_and_keeps_contexts_apart():
    calls = []

    def encode(prompts, device):
        calls.append(list(prompts))
        return torch.tensor([[float(len(prompt)), 1.0] for prompt in prompts])

    cache = TextFeatures(encode, capacity=2)
    cpu = torch.device("cpu")
    features = cache(["ab", "c", "ab"], cpu, torch.float32)
    assert torch.allclose(features, F.normalize(torch.tensor([[2.0, 1.0], [1.0, 1.0], [2.0, 1.0]]), dim=-1))
    cache(["d"], cpu, torch.float32)  # "c" was used longest ago: it goes
    cache(["ab"], cpu, torch.float32)
    cache(["c"], cpu, torch.float32)
    cache(["c"], cpu, torch.float64)  # another dtype: encoded for it
    for autocast in (torch.bfloat16, torch.float16, torch.float16):  # and each autocast dtype (once)
        with torch.autocast("cpu", dtype=autocast):
            cache(["c"], cpu, torch.float64)
    assert calls == [["ab", "c"], ["d"], ["c"], ["c"], ["c"], ["c"]]
    cache(["e", "f", "g"], cpu, torch.float32)  # each kept row holds its own storage, not its batch's
    assert all(feature.untyped_storage().nbytes() == 2 * 4 for feature in cache.features.values())


def test_hpsv2_open_clip_weights_file(tiny_open_clip):
    import open_clip

    arch, weights = tiny_open_clip
    reward = HPSv2(weights, arch)
    images = world_images((96, 96))
    scores = check_differentiable(reward, images_to_tensor(images), PROMPTS)
    # PIL path: open_clip's own eval transform and tokenizer on a freshly loaded copy of the weights.
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    pil_pixels = torch.stack([preprocess(i) for i in images])
    # The torch transform against open_clip's: bicubic resampling differs in detail (measured mean gap 5e-4).
    assert (reward.transform(images_to_tensor(images)) - pil_pixels).abs().mean() < 0.005
    with torch.no_grad():
        image = F.normalize(model.encode_image(pil_pixels), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(PROMPTS)), dim=-1)
    # Measured gap 7e-5; flipping the images moves the scores by 4e-3, a 4x down-and-up scaling by 1.3e-3.
    np.testing.assert_allclose(scores, (image * text).sum(-1), rtol=0, atol=5e-4)
    with pytest.raises(FileNotFoundError, match="hpsv2"):
        HPSv2(weights.parent / "missing.pt", arch)


@pytest.mark.parametrize("width", [49, 51, 53])
def test_open_clip_transform_crops_where_open_clip_does(tiny_open_clip, width):
    """No resize at height 48 (the tiny model's size), so only the crop offset differs: (width - 48) / 2 rounded as
    torchvision rounds it (0.5 -> 0, 1.5 -> 2, 2.5 -> 2), where transformers floors it."""
    import open_clip

    arch, weights = tiny_open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (48, width, 3), dtype=np.uint8))
    ours = TorchImageTransform.from_open_clip(model.visual)(images_to_tensor([image]))[0]
    torch.testing.assert_close(ours, preprocess(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("resize_mode, interpolation", [("squash", "bilinear"), ("longest", "bicubic"),
                                                        ("shortest", "bilinear")])
def test_open_clip_transform_follows_resize_mode_and_interpolation(tiny_open_clip, resize_mode, interpolation):
    import open_clip

    arch, _ = tiny_open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=None, image_resize_mode=resize_mode, image_interpolation=interpolation)
    images = world_images((100, 61))
    expected = torch.stack([preprocess(image) for image in images])
    actual = TorchImageTransform.from_open_clip(model.visual)(images_to_tensor(images))
    # PIL against torch resampling: measured mean gaps 2.8e-4 to 5.5e-4; the default bicubic shortest-side resize
    # and crop in their place differ by 6e-3 (bilinear) to 0.33 (letterbox).
    assert actual.shape == expected.shape and (actual - expected).abs().mean() < 1e-3


def test_a_processor_without_a_crop_squashes_to_its_size_as_it_resizes():
    """ViT's and SigLIP's processors resize to a height and width, with no crop: the whole-image transform of the
    artifact and adversarial rewards takes that size, and the processor's own output."""
    processor = ViTImageProcessor(size={"height": 40, "width": 48})
    images = world_images((100, 61))
    expected = processor(images=images, return_tensors="pt").pixel_values
    actual = TorchImageTransform.from_processor(processor, squash=True)(images_to_tensor(images))
    assert actual.shape == expected.shape == (len(images), 3, 40, 48)
    assert (actual - expected).abs().mean() < 1e-2  # torch against PIL resampling
    processor.size = {"shortest_edge": 40}
    with pytest.raises(ValueError, match="expected a height and width to resize the whole image to"):
        TorchImageTransform.from_processor(processor, squash=True)


@pytest.mark.parametrize("change, message", [
    ({"fill_color": 255}, "fill_color=255"), ({"interpolation": "nearest"}, "interpolation='nearest'"),
    ({"resize_mode": "crop"}, "resize_mode='crop'"), ({"size": (48, 64)}, r"size=\(48, 64\)"),
])
def test_open_clip_transform_refuses_settings_it_cannot_follow(tiny_open_clip, change, message):
    import open_clip

    visual = open_clip.create_model(tiny_open_clip[0], pretrained=None).visual
    visual.preprocess_cfg = {**visual.preprocess_cfg, **change}
    with pytest.raises(ValueError, match=message):
        TorchImageTransform.from_open_clip(visual)


def test_hpsv2_letterboxes_like_its_scorer(tiny_open_clip):
    """HPSv2's scorer (`light_augmentation=True`, its ResizeMaxSize) resizes the tensor's longest side to the input
    size and zero-pads the short side (the odd pixel after); written out here with torchvision on a wide image."""
    import open_clip
    from torchvision.transforms import functional as TF

    arch, weights = tiny_open_clip
    reward = HPSv2(weights, arch)
    image = world_images((100, 61))[0]  # 48 x 29 once resized: 19 rows of padding, 9 above and 10 below
    tensor = TF.resize(TF.to_tensor(image), [round(61 * 48 / 100), 48], TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.normalize(TF.pad(tensor, [0, 9, 0, 10], fill=0), open_clip.OPENAI_DATASET_MEAN,
                            open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(reward.transform(images_to_tensor([image]))[0], expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        image_features = F.normalize(reward.model.encode_image(expected[None]), dim=-1)
        text_features = F.normalize(reward.model.encode_text(open_clip.get_tokenizer(arch)(PROMPTS[:1])), dim=-1)
    torch.testing.assert_close(reward([image], PROMPTS[:1]), (image_features * text_features).sum(-1), rtol=0,
                               atol=1e-5)


def test_aesthetic_head_on_clip_embedding(tmp_path):
    model = CLIPModel.from_pretrained(WORLD_CLIP).eval()
    torch.manual_seed(0)
    head = AestheticHead(model.config.projection_dim)
    with torch.no_grad():  # the random head scores about 0.02; scaled to LAION-like magnitudes (1.3 to 2.4)
        head.layers[-1].weight.mul_(100)
        head.layers[-1].bias.mul_(100)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    reward = Aesthetic(tmp_path / "head.pth", clip=WORLD_CLIP)
    images = world_images((72, 72))
    scores = check_differentiable(reward, images_to_tensor(images), PROMPTS)
    assert scores.abs().min() > 1
    processor = AutoProcessor.from_pretrained(WORLD_CLIP).image_processor
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt").pixel_values
        expected = head.eval()(F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1))
    # PIL and torch bicubic resampling differ in detail: measured relative gap 2.3e-4; flipping the images moves
    # the scores by 9%.
    np.testing.assert_allclose(scores, expected.squeeze(-1), rtol=1e-3, atol=0)
    # LAION's predictor preprocesses with openai CLIP's torchvision CenterCrop, which rounds the crop offset: a
    # 64 × 67 image (no resize at the world CLIP's 64) is cropped from column 2, where transformers' processor
    # crops from column 1.
    from torchvision.transforms import functional as TF

    wide = images_to_tensor([Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 67, 3), np.uint8))])
    expected = TF.normalize(TF.center_crop(wide, [64, 64]), processor.image_mean, processor.image_std)
    torch.testing.assert_close(reward.transform(wide), expected, rtol=0, atol=1e-6)


def test_longest_side_resizes_round_as_open_clip_and_hpsv2_do(tiny_open_clip):
    """open_clip's ResizeKeepRatio and HPSv2's letterbox size the short side one pixel apart at some sizes."""
    import open_clip
    from open_clip.transform import ResizeKeepRatio

    visual = open_clip.create_model(tiny_open_clip[0], pretrained=None).visual
    ours = dataclasses.replace(TorchImageTransform.from_open_clip(visual, "longest"), edge=224, size=(224, 224))
    hps = dataclasses.replace(ours, longest_rounding="hpsv2")
    differ = 0
    for short in range(1, 400):
        for long in range(short, 400):
            expected = ResizeKeepRatio.get_params(Image.new("RGB", (long, short)), (224, 224), longest=1)
            assert ours.resized_size(short, long) == tuple(expected), (short, long)
            scale = 224 / long  # HPSv2's ResizeMaxSize
            assert hps.resized_size(short, long) == (round(short * scale), round(long * scale)), (short, long)
            differ += ours.resized_size(short, long) != hps.resized_size(short, long)
    assert differ == 5  # 105 × 192 among them: 122 rows here, 123 in HPSv2


def test_resizing_stays_in_the_unit_range_as_resized_8_bit_images_do():
    """Bicubic upscaling of a hard edge overshoots [0, 1]; the processors resize 8-bit images, which saturate."""
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1
    transform = TorchImageTransform("squash", (32, 32), (0.0,) * 3, (1.0,) * 3)
    assert F.interpolate(edge, size=(32, 32), mode="bicubic", antialias=True).amax() > 1
    resized = transform(edge)
    assert resized.amin() == 0 and resized.amax() == 1


def test_spec_parsing_and_weighted_sum():
    assert [(t.name, t.arg, t.weight) for t in parse_spec("shapes=1.0,clip:assets/world/clip=0.25")] == [
        ("shapes", None, 1.0), ("clip", "assets/world/clip", 0.25)]
    assert parse_spec("remote:http://127.0.0.1:8000")[0].arg == "http://127.0.0.1:8000"
    for bad, message in [("", "empty"), ("nope", "unknown reward 'nope'"), ("shapes=heavy", "not a number"),
                         ("shapes,shapes", "twice")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)
    with pytest.raises(ValueError, match="needs"):
        load_reward("hpsv2")

    assert isinstance(load_reward("shapes"), ShapesReward)
    combined = load_reward(f"shapes:strict=2.0,jpeg=-0.5,clip:{WORLD_CLIP}=0.1")
    assert isinstance(combined, WeightedRewards) and not combined.differentiable
    images = world_images()
    each = combined.score_each(images, PROMPTS)
    expected = 2.0 * each["shapes:strict"] - 0.5 * each["jpeg"] + 0.1 * each["clip"]
    total = combined(images, PROMPTS)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert math.isclose(total[0].item(), 2.0 - 0.5 * each["jpeg"][0].item() + 0.1 * each["clip"][0].item(),
                        rel_tol=1e-6)
    assert load_reward(f"clip:{WORLD_CLIP}=0.5,pickscore:{WORLD_CLIP}").differentiable


def jpeg_kilobytes(image: Image.Image, quality: int) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def test_terms_of_one_reward_type_each_count():
    images = world_images()
    combined = load_reward("jpeg:5=1,jpeg:95=0.5")
    at_5 = torch.tensor([-jpeg_kilobytes(image, 5) for image in images])
    at_95 = torch.tensor([-jpeg_kilobytes(image, 95) for image in images])
    assert not torch.equal(at_5, at_95)
    torch.testing.assert_close(combined(images, PROMPTS), at_5 + 0.5 * at_95)
    total, each = score_terms(combined, images, PROMPTS)
    torch.testing.assert_close(total, at_5 + 0.5 * at_95)
    assert each.keys() == {"jpeg:5", "jpeg:95"} and combined.name == "jpeg:5=1,jpeg:95=0.5"
    torch.testing.assert_close(each["jpeg:5"], at_5)
    torch.testing.assert_close(each["jpeg:95"], at_95)
    # Names that do not collide stay the keys (metrics read `reward/jpeg_mean`, `reward/shapes_mean`).
    assert score_terms(load_reward("jpeg:5,shapes=0.5"), images, PROMPTS)[1].keys() == {"jpeg", "shapes"}
    assert score_terms(load_reward("jpeg,jpeg:5=2"), images, PROMPTS)[1].keys() == {"jpeg", "jpeg:5"}


def test_spec_arguments_may_hold_equals_signs():
    assert [(t.name, t.arg, t.weight) for t in parse_spec("remote:http://h:8000/?a=b,clip:/a/b=c=0.2")] == [
        ("remote", "http://h:8000/?a=b", 1.0), ("clip", "/a/b=c", 0.2)]
    assert parse_spec("clip:/a/b=c")[0].arg == "/a/b=c"
    assert parse_spec("shapes:strict=-2")[0].weight == -2.0
    # A URL's query value that reads as a number could be a weight: written out it is one, left bare it is refused.
    assert [(t.arg, t.weight) for t in parse_spec("remote:http://h/score?version=2=1,jpeg=0.5")] == [
        ("http://h/score?version=2", 1.0), (None, 0.5)]
    assert parse_spec("remote:http://h/score?a=b&version=2=3")[0].weight == 3.0
    for spec in ("remote:http://h/score?version=2", "remote:http://h/score?a=b&version=2"):
        with pytest.raises(ValueError, match="is '2' a weight or the value of the URL's 'version'"):
            parse_spec(spec)


def test_a_single_reward_records_a_spec_that_reads_back_as_itself(tmp_path):
    (tmp_path / "clip=2").symlink_to(Path(WORLD_CLIP).resolve())
    recorded = load_reward(f"clip:{tmp_path}/clip=2=1").spec
    assert recorded == f"clip:{tmp_path}/clip=2=1"
    assert [(t.arg, t.weight) for t in parse_spec(recorded)] == [(f"{tmp_path}/clip=2", 1.0)]
    assert load_reward(f"clip:{WORLD_CLIP}").spec == f"clip:{WORLD_CLIP}"
    (tmp_path / "clip=0").symlink_to(Path(WORLD_CLIP).resolve())  # as a weight, 0 would be refused
    assert load_reward(f"clip:{tmp_path}/clip=0=1").spec == f"clip:{tmp_path}/clip=0=1"


def test_an_existing_path_ending_in_equals_a_number_is_read_whole_unless_its_head_exists_too(tmp_path):
    """`runs/step=1000` is a folder, not `runs/step` at weight 1000; it is recorded with its weight spelled out."""
    (tmp_path / "step=1000").symlink_to(Path(WORLD_CLIP).resolve())
    assert [(t.arg, t.weight) for t in parse_spec(f"clip:{tmp_path}/step=1000")] == [(f"{tmp_path}/step=1000", 1.0)]
    assert load_reward(f"clip:{tmp_path}/step=1000").spec == f"clip:{tmp_path}/step=1000=1"
    assert parse_spec(f"clip:{tmp_path}/step=1000=0.5")[0].weight == 0.5
    (tmp_path / "step").symlink_to(Path(WORLD_CLIP).resolve())
    with pytest.raises(ValueError, match="is '1000' a weight\\? write one after the term"):
        parse_spec(f"clip:{tmp_path}/step=1000")
    assert parse_spec(f"clip:{tmp_path}/step=1000=1")[0].arg == f"{tmp_path}/step=1000"


@pytest.mark.parametrize("spec", ["shapes=nan", "shapes=inf", "jpeg:50=-inf"])
def test_spec_weights_must_be_finite(spec):
    with pytest.raises(ValueError, match=f"reward term '{spec}': weight .* is not finite"):
        parse_spec(spec)


@pytest.mark.parametrize("spec", ["shapes=0", "jpeg:50,shapes=-0.0"])
def test_a_zero_weight_is_refused(spec):
    """0 × NaN is NaN: such a term would add nothing but the images it fails to score."""
    with pytest.raises(ValueError, match="weight 0 adds nothing but the images it fails to score"):
        parse_spec(spec)


@pytest.mark.parametrize("spec", ["jpeg:abc", "jpeg:0", "jpeg:96", "jpeg:-5", "jpeg:2.5", "jpeg:1_0",
                                  "jpeg:\u0665\u0660"])
def test_jpeg_quality_must_be_from_1_to_95(spec):
    with pytest.raises(ValueError, match=f"reward term '{spec}': JPEG quality must be an integer from 1 to 95"):
        load_reward(spec)


@pytest.mark.parametrize("spec", ["jpeg:", "shapes: ", "clip:=2"])
def test_a_colon_with_nothing_after_it_is_refused(spec):
    """`jpeg:` loaded quality 95 and `shapes:` the graded score, as if the ':' were not there."""
    with pytest.raises(ValueError, match="nothing after ':'"):
        parse_spec(spec)


def test_jpeg_quality_bounds_are_accepted():
    assert load_reward("jpeg:1").quality == 1 and load_reward("jpeg:95").quality == 95


def test_hpsv2_arch_may_hold_a_colon_and_so_may_its_weights_path(tiny_open_clip, tmp_path):
    """open_clip names hub models `hf-hub:ORG/NAME`: the weights file is what follows the last ':', unless a longer
    tail is a file that exists (a folder named by an ISO time split at its last ':' read as arch and file)."""
    with pytest.raises(FileNotFoundError, match="weights file /no/such/hps.pt not found"):
        load_reward("hpsv2:hf-hub:org/x:/no/such/hps.pt")
    arch, weights = tiny_open_clip
    timed = tmp_path / "2024-01-01T10:00" / "hps.pt"
    timed.parent.mkdir()
    shutil.copy(weights, timed)
    images = world_images((48, 48))
    with torch.no_grad():
        expected = load_reward(f"hpsv2:{arch}:{weights}")(images, PROMPTS)
        assert load_reward(f"hpsv2:{arch}:{timed}")(images, PROMPTS).tolist() == expected.tolist()


def test_a_weight_with_an_underscore_and_one_model_written_two_ways_are_refused():
    with pytest.raises(ValueError, match="reward term 'shapes=1_0': weight '1_0' is not a number"):
        parse_spec("shapes=1_0")  # Python's float reads it as 10
    with pytest.raises(ValueError, match="names the same reward twice"):
        parse_spec(f"clip:{WORLD_CLIP},clip:./{WORLD_CLIP}")


def test_loading_a_reward_leaves_the_global_rng_alone():
    """The artifact head draws init weights before its checkpoint overwrites them; a seeded run must not notice."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    load_reward("shapes,artifact:assets/world/artifact=0.5")
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_one_prompt_given_as_a_string_is_one_prompt_not_its_letters():
    """12 images against "a red circle" (12 letters) would otherwise be scored, each against one letter."""
    images = world_images()[:1]
    assert ShapesReward()(images, PROMPTS[0]).tolist() == ShapesReward()(images, PROMPTS[:1]).tolist() == [1.0]
    with pytest.raises(ValueError, match="^jpeg: 1 prompts for 12 images$"):
        JpegCompressibility()(world_images() * 4, "a red circle")
    from align_diffusion.world.evaluate import shapes_eval

    assert shapes_eval(PROMPTS[0], images)["per_image"] == shapes_eval(PROMPTS[:1], images)["per_image"]


def test_weighted_rewards_refuse_weights_that_do_not_match_their_rewards():
    shapes, jpeg = ShapesReward(), JpegCompressibility()
    for rewards, weights, keys in (([shapes, jpeg], [1.0], None), ([shapes], [1.0, 0.5], None),
                                   ([shapes, jpeg], [1.0, 0.5], ["shapes"]), ([], [], None)):
        with pytest.raises(ValueError, match="one weight and key per reward, and a reward at least"):
            WeightedRewards(rewards, weights, keys)
    for weight in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match="weights must be finite numbers other than 0"):
            WeightedRewards([shapes, jpeg], [1.0, weight])
    built = WeightedRewards([load_reward("shapes"), load_reward("jpeg:50")], [1, 0.2])  # by hand, from loaded terms
    assert built.spec == "shapes=1.0,jpeg:50=0.2" == load_reward(built.spec).spec


def test_spaces_around_a_terms_parts_are_not_part_of_them():
    assert parse_spec(" clip : assets/world/clip = 0.5 , jpeg:90") == parse_spec("clip:assets/world/clip=0.5,jpeg:90")
