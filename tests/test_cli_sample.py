"""`align-diffusion sample` end to end on tiny pipelines saved to disk, and the seed contract."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from align_diffusion.cli import main
from align_diffusion.files import folder_problem, write_atomically, write_folder_atomically
from align_diffusion.models import load_adapter
from align_diffusion.models.tiny import tiny_pipeline
from align_diffusion.rewards import load_reward
from align_diffusion.sampling.folder import SampleFolder, json_safe, sample_to_folder
from align_diffusion.sampling.loop import resolve_settings
from align_diffusion.training.prompts import PromptSource

PROMPTS = ["a red circle", "two blue squares"]


def read_png(path):
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)


def stock_image(model_dir, prompt, seed, steps, guidance):
    pipe = load_adapter(str(model_dir)).pipe
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=generator, output_type="pt").images[0]


@pytest.mark.parametrize("family,sampler", [("sd3", "ode"), ("sd", "ddim")])
def test_sample_writes_images_and_metadata_and_keeps_the_seed_contract(saved, tmp_path, family, sampler):
    out = tmp_path / "out"
    main(["sample", "--model", str(saved[family]), "--prompt", *PROMPTS, "--num-images-per-prompt", "2",
          "--steps", "4", "--guidance", "4.0", "--sampler", sampler, "--noise-level", "0", "--seed", "5",
          "--height", "32", "--width", "32", "--batch-size", "3", "--out", str(out)])
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [f"images/{k:05d}.png" for k in range(4)]
    assert [r["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [r["seed"] for r in records] == [5, 6, 7, 8]
    assert all(r["sampler"] == sampler and r["steps"] == 4 and r["guidance"] == 4.0 for r in records)
    assert all((r["height"], r["width"]) == (32, 32) for r in records)
    for record in records:
        expected = stock_image(saved[family], record["prompt"], record["seed"], 4, 4.0)
        assert (read_png(out / record["file"]) - expected).abs().max() <= 2 / 255


def test_sample_reads_a_prompts_file_leaving_out_blank_lines(saved, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\na green triangle\n")
    out = tmp_path / "out"
    main(["sample", "--model", str(saved["sd3"]), "--prompts-file", str(prompts_file), "--steps", "2", "--sampler",
          "flow-sde", "--height", "32", "--width", "32", "--out", str(out)])
    assert "wrote 2 images" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.png"))) == 2
    assert (out / "index.html").read_text().count('class="card"') == 2


def test_sample_scores_each_reward_term(saved, tmp_path):
    out = tmp_path / "out"
    prompts = ["a red circle", "two squares"]  # shapes-world prompts, which the shapes reward requires
    spec = "jpeg,jpeg:5=0.5,shapes=0.2"
    main(["sample", "--model", str(saved["sd3"]), "--prompt", *prompts, "--steps", "2", "--height", "64",
          "--width", "64", "--reward", spec, "--out", str(out)])
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(out / r["file"]) for r in records]
    # JPEG scores the 8-bit image the PNG holds, so the saved files score exactly as recorded.
    each = load_reward(spec).score_each(images, prompts)
    assert [sorted(record["rewards"]) for record in records] == [["jpeg", "jpeg:5", "shapes"]] * 2
    for key in ("jpeg", "jpeg:5", "shapes"):
        assert [record["rewards"][key] for record in records] == pytest.approx(each[key].tolist(), rel=1e-6), key
    # The two images score apart by far more than the tolerance: records matched to the wrong image would fail.
    assert abs(each["jpeg:5"][0] - each["jpeg:5"][1]) > 1e-3
    with pytest.raises(SystemExit, match="unknown reward"):
        main(["sample", "--model", str(saved["sd3"]), "--prompt", "a", "--reward", "nope", "--out",
              str(tmp_path / "other")])


def test_lora_folder_is_applied(saved, tmp_path):
    # A LoRA written the way our trainer will write it: peft adapter on the transformer, saved with its metadata.
    adapter = load_adapter(str(saved["sd3"]))
    pipe = adapter.pipe
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.transformer.add_adapter(config)
    lora_dir = tmp_path / "lora"
    type(pipe).save_lora_weights(lora_dir, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=config.to_dict())
    generator = torch.Generator().manual_seed(0)
    expected = pipe("a red circle", num_inference_steps=3, height=32, width=32, generator=generator,
                    output_type="pt").images[0]

    plain, with_lora = tmp_path / "plain", tmp_path / "with_lora"
    common = ["sample", "--model", str(saved["sd3"]), "--prompt", "a red circle", "--steps", "3", "--height", "32",
              "--width", "32"]
    main([*common, "--out", str(plain)])
    main([*common, "--lora", str(lora_dir), "--out", str(with_lora)])
    lora_image = read_png(with_lora / "images/00000.png")
    assert (lora_image - expected).abs().max() <= 2 / 255
    assert (lora_image - read_png(plain / "images/00000.png")).abs().max() > 2 / 255


def test_bad_input_fails_before_sampling(saved, tmp_path):
    common = ["sample", "--model", str(saved["sd3"]), "--prompt", "a", "--height", "32", "--width", "32"]
    with pytest.raises(SystemExit, match="does not fit"):
        main([*common, "--sampler", "ddim", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=re.escape("--height: must be a positive multiple of 2 for this transformer "
                                                   "(its patches), got 33")):
        main(["sample", "--model", str(saved["sd3"]), "--prompt", "a", "--height", "33", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--prompts-file"):
        main(["sample", "--model", str(saved["sd3"]), "--prompts-file", str(tmp_path / "nope.txt"), "--out",
              str(tmp_path / "c")])
    with pytest.raises(SystemExit):  # argparse: steps must be positive
        main([*common, "--steps", "0", "--out", str(tmp_path / "d")])
    main([*common, "--steps", "1", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="--overwrite"):
        main([*common, "--steps", "1", "--out", str(tmp_path / "e")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_max_sequence_length_is_applied_recorded_and_checked_before_the_model_loads(saved, tmp_path, monkeypatch):
    common = ["sample", "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32"]
    main([*common, "--model", str(saved["sd3"]), "--max-sequence-length", "8", "--out", str(tmp_path / "short")])
    record = json.loads((tmp_path / "short/metadata.jsonl").read_text())
    assert record["max_sequence_length"] == 8
    pipe = load_adapter(str(saved["sd3"])).pipe
    expected = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images[0]
    assert (read_png(tmp_path / "short" / record["file"]) - expected).abs().max() <= 2 / 255
    with pytest.raises(SystemExit, match="the earlier run's max_sequence_length was 8, this one's is not given "
                                         "\\(the default\\)"):
        main([*common, "--model", str(saved["sd3"]), "--resume", "--out", str(tmp_path / "short")])
    main([*common, "--model", str(saved["sd3"]), "--max-sequence-length", "256", "--out", str(tmp_path / "stock")])
    assert json.loads((tmp_path / "stock/metadata.jsonl").read_text())["max_sequence_length"] is None  # the default
    main([*common, "--prompt", "a blue square", "--model", str(saved["sd3"]), "--resume", "--out",
          str(tmp_path / "stock")])
    # Earlier versions recorded an explicit default as given: such a folder resumes all the same.
    metadata = tmp_path / "stock/metadata.jsonl"
    older = [{**json.loads(line), "max_sequence_length": 256} for line in metadata.read_text().splitlines()]
    metadata.write_text("".join(json.dumps(record) + "\n" for record in older))
    main([*common, "--prompt", "a blue square", "a green circle", "--model", str(saved["sd3"]), "--resume", "--out",
          str(tmp_path / "stock")])
    assert len(metadata.read_text().splitlines()) == 3

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("align_diffusion.models.DiffusionPipeline.from_pretrained", no_loading)
    with pytest.raises(SystemExit, match="--max-sequence-length: StableDiffusionPipeline has no T5 text encoder"):
        main([*common, "--model", str(saved["sd"]), "--max-sequence-length", "8", "--out", str(tmp_path / "sd")])
    with pytest.raises(SystemExit, match=re.escape("--max-sequence-length: must lie in [1, 512]")):
        main([*common, "--model", str(saved["sd3"]), "--max-sequence-length", "600", "--out", str(tmp_path / "b")])


def test_clip_skip_and_guidance_rescale_are_applied_recorded_and_options_checked_before_loading(saved, tmp_path,
                                                                                              monkeypatch):
    common = ["sample", "--prompt", "a red circle", "--steps", "2", "--guidance", "6", "--height", "32", "--width",
              "32"]
    stock = dict(num_inference_steps=2, guidance_scale=6, height=32, width=32, output_type="pt")
    runs = {"sd3": ["--clip-skip", "1", "--true-cfg-scale", "1"],
            "sd": ["--guidance-rescale", "0.7", "--sampler", "ddim", "--noise-level", "0"]}
    for name, options in runs.items():
        main([*common, "--model", str(saved[name]), *options, "--out", str(tmp_path / name)])
        record = json.loads((tmp_path / name / "metadata.jsonl").read_text())
        assert (record["clip_skip"], record["guidance_rescale"]) == ((1, None) if name == "sd3" else (None, 0.7))
        assert record["true_cfg_scale"] is None  # 1 is off, the default
        pipe = load_adapter(str(saved[name])).pipe
        image = read_png(tmp_path / name / record["file"])
        for applied in (True, False):
            option = {"clip_skip": 1} if name == "sd3" else {"guidance_rescale": 0.7}
            expected = pipe("a red circle", generator=torch.Generator().manual_seed(0), **stock,
                            **(option if applied else {})).images[0]
            assert ((image - expected).abs().max() <= 2 / 255) == applied
    with pytest.raises(SystemExit, match="the earlier run's clip_skip was 1, this one's is not given "
                                         "\\(the default\\)"):
        main([*common, "--model", str(saved["sd3"]), "--resume", "--out", str(tmp_path / "sd3")])
    main([*common, "--model", str(saved["sd3"]), "--clip-skip", "0", "--out", str(tmp_path / "zero")])
    assert json.loads((tmp_path / "zero/metadata.jsonl").read_text())["clip_skip"] is None  # 0 skips none
    main([*common, "--prompt", "a blue square", "--model", str(saved["sd3"]), "--resume", "--out",
          str(tmp_path / "zero")])
    with pytest.raises(SystemExit, match="--clip-skip: at most 1 for this pipeline's CLIP text encoders"):
        main([*common, "--model", str(saved["sd3"]), "--clip-skip", "2", "--out", str(tmp_path / "deep")])
    with pytest.raises(SystemExit, match="--guidance-rescale: guidance 1.0 runs no classifier-free guidance"):
        main([*common, "--model", str(saved["sd"]), "--guidance", "1", "--guidance-rescale", "0.7", "--sampler",
              "ddim", "--out", str(tmp_path / "unguided")])

    # An LCM UNet runs no CFG whatever the guidance, which only the loaded model says: refused before sampling.
    tiny_pipeline("sd", time_cond_proj_dim=8).save_pretrained(tmp_path / "lcm")
    with pytest.raises(SystemExit, match=re.escape("--negative-prompt: guidance 6.0 runs no classifier-free guidance "
                                                   "(distilled)")):
        main([*common, "--model", str(tmp_path / "lcm"), "--sampler", "ddim", "--negative-prompt", "x", "--out",
              str(tmp_path / "lcm-samples")])
    assert not (tmp_path / "lcm-samples").exists()
    tiny_pipeline("flux").save_pretrained(tmp_path / "flux")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("align_diffusion.models.DiffusionPipeline.from_pretrained", no_loading)
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    flux = [*common, "--model", str(tmp_path / "flux"), "--reward", "shapes"]
    with pytest.raises(SystemExit, match=re.escape("--true-cfg-scale: FLUX's true classifier-free guidance (2.0)")):
        main([*flux, "--true-cfg-scale", "2", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=re.escape("--negative-prompt: FLUX runs classifier-free guidance only as "
                                                   "true CFG (a true_cfg_scale > 1)")):
        main([*flux, "--negative-prompt", "blurry", "--out", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="--guidance-rescale: StableDiffusion3Pipeline has no guidance_rescale"):
        main([*common, "--model", str(saved["sd3"]), "--guidance-rescale", "0.5", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=re.escape("--guidance-rescale: must lie in [0, 1], got 2.0")):
        main([*common, "--model", str(saved["sd"]), "--guidance-rescale", "2", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--clip-skip: must be >= 0"):
        main([*common, "--model", str(saved["sd"]), "--clip-skip", "-1", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="--true-cfg-scale: StableDiffusion3Pipeline has no true_cfg_scale"):
        main([*common, "--model", str(saved["sd3"]), "--true-cfg-scale", "2", "--out", str(tmp_path / "d")])


def test_negative_prompt_matches_stock_is_recorded_and_needs_guidance(saved, tmp_path):
    common = ["sample", "--model", str(saved["sd"]), "--prompt", *PROMPTS, "--steps", "3", "--guidance", "4",
              "--sampler", "ddim", "--noise-level", "0", "--height", "32", "--width", "32"]
    main([*common, "--negative-prompt", "blurry", "--out", str(tmp_path / "negative")])
    main([*common, "--out", str(tmp_path / "plain")])
    records = [json.loads(line) for line in (tmp_path / "negative/metadata.jsonl").read_text().splitlines()]
    pipe = load_adapter(str(saved["sd"])).pipe
    for record in records:
        assert record["negative_prompt"] == "blurry"
        expected = pipe(record["prompt"], negative_prompt="blurry", num_inference_steps=3, guidance_scale=4,
                        height=32, width=32, generator=torch.Generator().manual_seed(record["seed"]),
                        output_type="pt").images[0]
        image = read_png(tmp_path / "negative" / record["file"])
        assert (image - expected).abs().max() <= 2 / 255
        assert (image - read_png(tmp_path / "plain" / record["file"])).abs().max() > 2 / 255
    with pytest.raises(SystemExit, match="--negative-prompt: guidance 1.0 runs no classifier-free guidance"):
        main([*common, "--guidance", "1", "--negative-prompt", "blurry", "--out", str(tmp_path / "unguided")])
    assert not (tmp_path / "unguided").exists()


def test_a_folder_written_before_an_option_existed_resumes_without_it(saved, tmp_path):
    common = ["sample", "--model", str(saved["sd3"]), "--steps", "2", "--height", "32", "--width", "32"]
    out = tmp_path / "out"
    main([*common, "--prompt", PROMPTS[0], "--out", str(out)])
    metadata = out / "metadata.jsonl"
    older = {key: value for key, value in json.loads(metadata.read_text()).items()
             if key not in ("negative_prompt", "max_sequence_length", "clip_skip", "guidance_rescale",
                            "true_cfg_scale")}
    metadata.write_text(json.dumps(older) + "\n")
    with pytest.raises(SystemExit, match="records hold no 'negative_prompt' \\(an older version wrote them\\?\\)"):
        main([*common, "--prompt", *PROMPTS, "--negative-prompt", "blurry", "--resume", "--out", str(out)])
    main([*common, "--prompt", *PROMPTS, "--resume", "--out", str(out)])
    assert [json.loads(line)["prompt"] for line in metadata.read_text().splitlines()] == PROMPTS


@pytest.mark.parametrize("command, option, value, message", [
    (["sample"], "--guidance", "nan", "must be a finite number"),
    (["sample"], "--noise-level", "inf", "must be a finite number"),
    (["sample"], "--device", "bogus", "device"),
    (["steer", "--method", "reno", "--reward", "jpeg"], "--lr", "nan", "must be a finite number"),
    (["steer", "--method", "reno", "--reward", "jpeg"], "--grad-clip", "-1", "must be > 0"),
    (["steer", "--method", "reno", "--reward", "jpeg"], "--reg-weight", "-0.5", "must be >= 0"),
    (["steer", "--method", "ttsnap", "--reward", "jpeg"], "--keep", "nan", "must be a finite number"),
    (["steer", "--method", "ttsnap", "--reward", "jpeg"], "--keep", "1.5", "must lie in (0, 1]"),
    (["steer", "--method", "ttsnap", "--reward", "jpeg"], "--prune-steps", "-1", "must be at least 0"),
    (["steer", "--method", "fk", "--reward", "jpeg"], "--adaptive-threshold", "inf", "must be a finite number"),
    (["steer", "--method", "fk", "--reward", "jpeg"], "--lam", "-1", "argument --lam: must be >= 0"),
])
def test_bad_option_values_are_refused_by_the_parser(saved, tmp_path, capsys, command, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--model", str(saved["sd3"]), "--prompt", "a", option, value, "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", [["sample"], ["eval"], ["steer", "--method", "best-of-n", "--reward", "jpeg"],
                                     ["steer", "--method", "fk", "--sampler", "ode", "--reward", "jpeg"]])
def test_a_noise_level_for_the_ode_sampler_is_refused_before_loading(saved, tmp_path, monkeypatch, command):
    """The ODE draws no noise: the level would change nothing but the records."""
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr("align_diffusion.cli.load_for_command", no_loading)
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    prompt = [] if command == ["eval"] else ["--prompt", "a red circle"]
    with pytest.raises(SystemExit, match="--noise-level: the ode sampler draws no noise"):
        main([*command, "--model", str(saved["sd3"]), *prompt, "--noise-level", "0.9", "--out", str(tmp_path / "a")])


@pytest.mark.parametrize("command, message", [
    (["sample", "--sampler", "ddim"], "--sampler: 'ddim' does not fit a flow-matching model"),
    (["sample", "--sampler", "cps", "--noise-level", "1.5"], "--noise-level: cps noise levels a must lie in [0, 1]"),
    (["steer", "--method", "best-of-n", "--sampler", "ddim"], "--sampler: 'ddim' does not fit a flow-matching"),
    (["steer", "--method", "best-of-n", "--steps", "4", "--budget", "3"],
     "a budget of 3 model evaluations is less than one best-of-n run of 4 steps"),
    (["steer", "--method", "fk", "--sampler", "ode", "--num-particles", "2"], "needs a stochastic sampler"),
    (["steer", "--method", "fk", "--steps", "10", "--resample-start", "12"],
     "resampling schedule start=12, interval=5, end=8 does not fit 10 steps"),
    (["steer", "--method", "ttsnap", "--prune-steps", "2", "6", "--keep", "0.5"],
     "one keep fraction per prune step, got steps [2, 6] and keep [0.5]"),
    (["steer", "--method", "ttsnap", "--steps", "5"], "prune steps must be increasing step indices in [0, 5)"),
    (["steer", "--method", "reno", "--reward", "shapes"], "ReNO needs differentiable rewards; shapes is not"),
])
def test_sampler_and_steering_options_that_do_not_fit_are_refused_before_the_model_loads(saved, tmp_path,
                                                                                         monkeypatch, command, message):
    """The family (an adapter class read from model_index.json) tells default steps and flow or not: enough. The
    method's options come before the reward too: a remote reward without its token would fail to load."""
    monkeypatch.setattr("align_diffusion.cli.load_for_command", lambda *args: pytest.fail("loaded the model"))
    monkeypatch.delenv("ALIGN_DIFFUSION_REWARD_TOKEN", raising=False)
    reward = [] if "--reward" in command or command[0] == "sample" else ["--reward", "remote:http://127.0.0.1:9"]
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*command, *reward, "--model", str(saved["sd3"]), "--prompt", "a red circle", "--out",
              str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", [["sample", "--reward", "shapes"],
                                     ["steer", "--method", "best-of-n", "--reward", "jpeg", "--shapes-eval"],
                                     ["steer", "--method", "fk", "--reward", "jpeg,shapes"],
                                     ["steer", "--method", "ttsnap", "--reward", "jpeg", "--prune-reward", "shapes"]])
def test_a_size_shapes_eval_cannot_judge_is_refused_before_any_image_naming_the_flags(saved, tmp_path, monkeypatch,
                                                                                      command):
    """ShapesEval judges 64×64 images: a size given whole is refused before the model loads, the model's default
    (32×32 for the tiny SD3) or a size given in part once it has."""
    out = tmp_path / "a"
    model = ["--model", str(saved["sd3"]), "--prompt", "a red circle", "--out", str(out)]
    judged = "ShapesEval judges 64×64 shapes-world images"
    with monkeypatch.context() as patched:
        patched.setattr("align_diffusion.cli.load_for_command", lambda *args: pytest.fail("loaded the model"))
        with pytest.raises(SystemExit, match=f"^--height and --width: {judged}, got 32×32$"):
            main([*command, *model, "--height", "32", "--width", "32"])
    with pytest.raises(SystemExit, match=re.escape(f"--height and --width: {judged}, got 32×32 (the model's default "
                                                   "height 32 and width 32)")):
        main([*command, *model])
    with pytest.raises(SystemExit, match=re.escape(f"--height and --width: {judged}, got 32×64 (the model's default "
                                                   "height 32)")):
        main([*command, *model, "--width", "64"])
    assert not out.exists()


@pytest.mark.parametrize("command", [["sample"], ["steer", "--method", "best-of-n", "--reward", "jpeg"]])
def test_a_side_the_model_cannot_take_is_read_from_its_configs_before_anything_loads(saved, tmp_path, monkeypatch,
                                                                                    command):
    """The tiny SD3's patches span 2 pixels and its position table 96 of them."""
    monkeypatch.setattr("align_diffusion.cli.load_for_command", lambda *args: pytest.fail("loaded the model"))
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", lambda *args, **kwargs: pytest.fail("loaded"))
    model = ["--model", str(saved["sd3"]), "--prompt", "a", "--out", str(tmp_path / "a")]
    with pytest.raises(SystemExit, match=re.escape("--width: must be at most 192 for this transformer "
                                                   "(pos_embed_max_size 96), got 200")):
        main([*command, *model, "--width", "200"])
    with pytest.raises(SystemExit, match=re.escape("--height: must be a positive multiple of 2 for this transformer "
                                                   "(its patches), got 33")):
        main([*command, *model, "--height", "33", "--width", "32"])
    assert not (tmp_path / "a").exists()


def test_sides_read_from_a_models_configs_are_those_its_loaded_adapter_takes(saved, tiny_pipes, tmp_path):
    from align_diffusion.models import size_problem

    tiny_pipes["flux"].save_pretrained(tmp_path / "flux")
    world = Path(__file__).resolve().parents[1] / "assets" / "world"
    for model in (saved["sd3"], saved["sd"], tmp_path / "flux", world / "sd3", world / "sd"):
        adapter = load_adapter(str(model))
        for pixels in range(0, 210):
            try:
                adapter.check_size(pixels, adapter.default_size[1])
                taken = True
            except ValueError:
                taken = False
            assert (size_problem(str(model), {"height": pixels}) is None) == taken, (model, pixels)


def test_sampling_functions_refuse_a_size_the_reward_cannot_judge_before_any_image(saved, tmp_path):
    from align_diffusion.rewards.simple import ShapesReward
    from align_diffusion.steering import steer_to_folder

    adapter = load_adapter(str(saved["sd3"]))
    with pytest.raises(ValueError, match="^ShapesEval judges 64×64 shapes-world images, got 32×32$"):
        sample_to_folder(adapter, ["a red circle"], tmp_path / "a", reward=ShapesReward("strict"))
    with pytest.raises(ValueError, match="^ShapesEval judges 64×64 shapes-world images, got 32×32$"):
        steer_to_folder(adapter, ["a red circle"], load_reward("jpeg"), "best-of-n", tmp_path / "b", shapes_eval=True)
    with pytest.raises(ValueError, match="^ShapesEval judges 64×64 shapes-world images, got 64×32$"):
        steer_to_folder(adapter, ["a red circle"], load_reward("jpeg,shapes"), "fk", tmp_path / "c", height=64)
    assert not any(tmp_path.iterdir())


def test_an_overwrite_that_cannot_save_its_first_image_and_a_resume_missing_one_leave_the_folder(saved, tmp_path,
                                                                                                   monkeypatch):
    """The earlier run went before the first new image was saved: a full disk left an empty folder. A resume of a
    folder whose image was deleted went on and left a record without its image."""
    adapter = load_adapter(str(saved["sd3"]))
    out = tmp_path / "out"
    options = dict(num_inference_steps=1, height=32, width=32, progress=False)
    sample_to_folder(adapter, PROMPTS[:2], out, **options)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            sample_to_folder(adapter, PROMPTS, out, overwrite=True, **options)
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    (out / "images" / "00001.png").unlink()
    with pytest.raises(ValueError, match=r"resume: .*images/00001.png, an image of the earlier run, is gone"):
        sample_to_folder(adapter, PROMPTS, out, resume=True, **options)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2


def test_sampling_functions_refuse_an_out_dir_of_other_files_or_unwritable_before_any_image(saved, tmp_path):
    """As the commands do: a folder of someone else's files is kept unless asked (its eval.json and index.html were
    replaced), and a folder that cannot be made fails at once, not after the images."""
    from align_diffusion.steering import steer_to_folder
    from align_diffusion.world.benchmark import evaluate_shapes

    adapter = load_adapter(str(saved["sd3"]))
    world = load_adapter(str(Path(__file__).resolve().parents[1] / "assets" / "world" / "sd3"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "eval.json").write_text('{"mine": 1}')
    (tmp_path / "a-file").write_text("")
    calls = []
    for model in (adapter, world):
        model.denoiser.register_forward_pre_hook(lambda *args: calls.append(1))
    runs = [lambda out, **kw: sample_to_folder(adapter, ["a red circle"], out, num_inference_steps=1, **kw),
            lambda out, **kw: steer_to_folder(adapter, ["a red circle"], load_reward("jpeg"), "best-of-n", out,
                                              num_candidates=1, num_inference_steps=1, **kw),
            lambda out, **kw: evaluate_shapes(world, num_inference_steps=1, num_images_per_prompt=1, out_dir=out,
                                              progress=False, **kw)]
    for run in runs:
        with pytest.raises(ValueError, match="holds other files .* name a new or empty folder"):
            run(theirs)
        with pytest.raises(ValueError, match="cannot be a folder: .*a-file is a file"):
            run(tmp_path / "a-file" / "out", overwrite=True)
    assert not calls and (theirs / "eval.json").read_text() == '{"mine": 1}' and len(list(theirs.iterdir())) == 1
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 1.5"):
        evaluate_shapes(world, batch_size=1.5)


def test_sampling_functions_refuse_a_noise_level_for_the_ode_sampler(saved):
    with pytest.raises(ValueError, match="noise_level: the ode sampler draws no noise"):
        resolve_settings(load_adapter(str(saved["sd3"])), "ode", num_inference_steps=2, noise_level=[0.0, 0.5])


def test_paths_written_from_the_home_folder_are_expanded(saved, tmp_path, monkeypatch):
    """The shell expands ~ at a word's start only: `--out=~/samples` arrives as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").symlink_to(saved["sd3"])
    main(["sample", "--model=~/model", "--prompt", "a", "--steps", "1", "--height", "32", "--width", "32",
          "--out=~/samples"])
    assert (tmp_path / "samples" / "metadata.jsonl").is_file() and not Path("~").exists()
    (tmp_path / "prompts.txt").write_text("a red circle\n")  # a prompt file named in a config or by --prompts
    assert PromptSource("~/prompts.txt").all() == ["a red circle"]


def test_a_folder_of_other_files_is_refused_as_out_and_a_gallery_page_must_be_html(saved, tmp_path):
    """A run replaces index.html, images/ and the like in --out: in a folder that holds no samples they are
    someone else's. A side-by-side page written over a sample folder's records would break it."""
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "index.html").write_text("mine")
    (site / "images" / "00000.png").write_bytes(b"mine")
    common = ["--model", str(saved["sd3"]), "--prompt", "a", "--steps", "1", "--height", "32", "--width", "32"]
    for command in (["sample", *common], ["steer", "--method", "best-of-n", "--reward", "jpeg", *common],
                    ["eval", "--model", str(saved["sd3"])]):
        with pytest.raises(SystemExit, match="--out: .*site holds other files .*, or pass --overwrite"):
            main([*command, "--out", str(site)])
    assert (site / "index.html").read_text() == "mine" and (site / "images" / "00000.png").read_bytes() == b"mine"
    main(["sample", *common, "--out", str(tmp_path / "a")])
    for out in (tmp_path / "a" / "metadata.jsonl", tmp_path / "a"):
        with pytest.raises(SystemExit, match="--out: names the side-by-side page, an .html file"):
            main(["gallery", str(tmp_path / "a"), "--compare", str(tmp_path / "a"), "--out", str(out)])
    assert (tmp_path / "a" / "metadata.jsonl").read_text().startswith("{")


def test_outputs_reach_the_disk_before_the_rename_that_shows_them(tmp_path, monkeypatch):
    """After a power cut a renamed name may hold an empty file unless its contents were flushed before the rename,
    and the rename itself lasts only once its folder is flushed: each file and folder of an output (by inode) is
    flushed before the rename that puts it in place, and the folder it is renamed in after it."""
    from align_diffusion.training import checkpoint

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.fstat(descriptor).st_ino))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def write(folder):
        (folder / "sub").mkdir()
        (folder / "weights.bin").write_bytes(b"1")
        (folder / "sub" / "config.json").write_text("{}")

    def check(target: Path, parts: list[Path]) -> None:
        renamed = events.index(("replace", target))
        flushed_before = {inode for kind, inode in events[:renamed] if kind == "fsync"}
        assert {part.stat().st_ino for part in parts} <= flushed_before
        assert ("fsync", target.parent.stat().st_ino) in events[renamed + 1:]
        events.clear()

    write_folder_atomically(tmp_path / "lora", write)
    lora = tmp_path / "lora"
    check(lora, [lora, lora / "sub", lora / "weights.bin", lora / "sub" / "config.json"])
    write_atomically(tmp_path / "eval.json", lambda partial: partial.write_text("{}"))
    check(tmp_path / "eval.json", [tmp_path / "eval.json"])
    partial = checkpoint.partial_dir(tmp_path / "run", 3)
    checkpoint.begin(partial)
    write(partial)
    final = checkpoint.commit(partial, {"step": 3}, keep=1)
    check(final, [final, final / "sub", final / "weights.bin", final / checkpoint.STATE])


def test_an_out_that_cannot_be_written_is_named_before_anything_loads(tmp_path):
    """--out under a regular file: every command that writes one refuses it first (the model named here does not
    exist, so a command that went on to load it would fail otherwise), not once its first output is due."""
    (tmp_path / "notes").write_text("a file")
    out = str(tmp_path / "notes" / "out")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    model = ["--model", str(tmp_path / "no-model")]
    commands = [["sample", *model, "--prompt", "a"], ["eval", *model], ["steer", "--method", "fk", "--reward", "jpeg",
                *model, "--prompt", "a"], ["train-reward", "artifact", "--data", str(tmp_path / "no-data")],
                ["train-reward", "noise-aware", *model], ["build-world", "--quick"],
                ["calibrate-noise", str(tmp_path / "config.yaml")]]
    for command in commands:
        with pytest.raises(SystemExit, match=r"^--out: .*notes.out cannot be a folder: .*notes is a file$"):
            main([*command, "--out", out if command[0] != "calibrate-noise" else f"{out}/table.json"])


def test_an_output_replaced_whole_needs_its_parent_writable_and_a_dangling_link_is_named(tmp_path, monkeypatch):
    """A trained reward is written beside its folder, then renamed over it: a writable folder in a parent that is
    not (a stand-in for one: root may write anywhere) would fail only once training is done."""
    parent, out = tmp_path / "parent", tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent and access(path, mode))
    assert folder_problem(out) is None  # sample writes inside it
    assert folder_problem(out, replaced_whole=True) == f"{out} cannot be written: {parent} is not writable"
    with pytest.raises(SystemExit, match=f"^--out: {re.escape(str(out))} cannot be written"):
        main(["train-reward", "artifact", "--data", str(tmp_path / "no-data"), "--out", str(out)])
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert folder_problem(tmp_path / "link") == f"{tmp_path / 'link'} is a link to {tmp_path / 'gone'}, which does " \
        "not exist"


def test_a_file_written_through_a_link_replaces_the_file_the_link_names(tmp_path):
    """The link stays (it was replaced by a file, and the file it named kept the old text)."""
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_atomically(tmp_path / "link.json", lambda partial: partial.write_text("new"))
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]
    (tmp_path / "dangling.json").symlink_to(tmp_path / "gone" / "x.json")  # its target's folder does not exist
    write_atomically(tmp_path / "dangling.json", lambda partial: partial.write_text("new"))
    assert not (tmp_path / "dangling.json").is_symlink() and (tmp_path / "dangling.json").read_text() == "new"


def test_outputs_take_the_mode_a_new_file_gets_under_the_umask(tmp_path):
    """safetensors writes 0600 whatever the umask; an output follows the umask, as a file made by open does."""
    umask = os.umask(0o027)
    try:
        write_folder_atomically(tmp_path / "lora", lambda folder: save_file({"w": torch.zeros(1)},
                                                                            str(folder / "b.safetensors")))
        write_atomically(tmp_path / "a.json", lambda path: path.write_text("{}"))
    finally:
        os.umask(umask)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.rglob("*") if path.is_file()}
    assert modes == {"a.json": "0o640", "b.safetensors": "0o640"}  # no probe file left behind


def test_ctrl_c_while_torch_is_still_importing_ends_with_a_line_not_a_traceback(tmp_path):
    """-X importtime reports each import as it finishes: the signal lands once torch's own imports are under way."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "align_diffusion", "gallery",
                                str(tmp_path)], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "torch." in line:
            process.send_signal(signal.SIGINT)
            break
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 130 and "align-diffusion: interrupted" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr


CLI_COMMANDS = ["sample", "eval", "build-world", "serve-reward", "train-reward", "train", "calibrate-noise", "steer",
                "gallery"]
HELP_AND_A_BAD_FLAG = f"""
import json, sys
from align_diffusion.cli import main

exit_codes = []
for argv in [["--help"], *([command, "--help"] for command in {CLI_COMMANDS}),
             ["steer", "--method", "fk", "--model", "m", "--prompt", "a", "--reward", "shapes", "--out", "o",
              "--potential", "min"]]:
    try:
        main(argv)
    except SystemExit as stop:
        exit_codes.append(stop.code)
print(json.dumps([exit_codes, sorted({{"torch", "diffusers", "transformers"}} & set(sys.modules))]), file=sys.stderr)
"""


def test_help_and_a_bad_flag_answer_before_torch_loads():
    """The parser is built from align_diffusion.names alone: `align-diffusion --help` took 8 s of imports."""
    result = subprocess.run([sys.executable, "-c", HELP_AND_A_BAD_FLAG], capture_output=True, text=True, timeout=60)
    assert "--potential: invalid choice: 'min'" in result.stderr
    exit_codes, heavy_modules = json.loads(result.stderr.splitlines()[-1])
    assert exit_codes == [0] * (1 + len(CLI_COMMANDS)) + [2]
    assert heavy_modules == []


def test_a_reward_that_trains_against_samples_is_refused_for_scoring(saved, tmp_path):
    """adv-dino's head trains against a run's samples: sample and steer scored, and steer chose, with it untrained."""
    common = ["--model", str(saved["sd3"]), "--prompt", "a red circle", "--out", str(tmp_path / "out")]
    for command, flag in [(["sample", "--reward"], "--reward"), (["steer", "--method", "best-of-n", "--reward"],
                          "--reward"), (["steer", "--method", "ttsnap", "--reward", "shapes", "--prune-reward"],
                          "--prune-reward")]:
        with pytest.raises(SystemExit, match=f"{flag}: adv-dino:assets/world/dino trains against a run's samples"):
            main([*command, "adv-dino:assets/world/dino", *common])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_a_command_launched_as_several_processes_that_would_each_do_all_of_it_is_refused(monkeypatch, tmp_path,
                                                                                        variable):
    """WORLD_SIZE is what `accelerate launch --num_processes 2` (torchrun) sets; the others an MPI launch's."""
    monkeypatch.setenv(variable, "2")
    with pytest.raises(SystemExit, match="sample: launched as 2 processes, each of which would do the whole job"):
        main(["sample", "--model", "m", "--prompt", "a", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_empty_paths_and_reward_specs_and_seeds_out_of_range_are_refused_by_name(capsys):
    """Path("") is the current folder, which --out "" would have written into; --reward "" was read as no reward."""
    common = ["sample", "--model", "m", "--prompt", "a"]
    for flags, message in [(["--out", ""], "--out: must not be empty"), (["--out", "o", "--lora", " "],
                           "--lora: must not be empty"), (["--out", "o", "--reward", ""], "--reward: must not be "
                           "empty"), (["--out", "o", "--seed", str(2**32)], r"--seed: must lie in \[0, 2\*\*32\)"),
                           (["--out", "o", "--seed", "-1"], r"--seed: must lie in \[0, 2\*\*32\), got -1"),
                           (["--out", "o", "--seed", "1.5"], r"--seed: must be a whole number, got '1.5'"),
                           (["--out", "~nosuchuser/x", "--lora", ""], "--lora: must not be empty")]:
        with pytest.raises(SystemExit):
            main([*common, *flags])
        assert re.search(message, capsys.readouterr().err)


def test_seeds_the_images_would_run_past_2_32_with_are_refused_before_the_model_loads(tmp_path):
    """The model named does not exist: the seed's refusal comes first (it came once the model had loaded, and the
    noise-aware student's held-out seeds, from seed + 10**6, wrapped past 2**32 onto other images' noise)."""
    last = 2**32 - 1
    for command, message in [
            (["sample", "--prompt", "a", "--num-images-per-prompt", "2", "--seed", str(last)],
             r"--seed: seed must be a whole number in \[0, 2\*\*32 − 2\]"),
            (["eval", "--seed", str(last - 100)], r"--seed: seed must be a whole number in \[0, 2\*\*32 − 152\]"),
            (["train-reward", "noise-aware", "--seed", str(last - 10**6)],
             r"--seed: the images seeded from seed \+ 1,000,000 need seed in \[0, 2\*\*32 − 1,000,152\]")]:
        with pytest.raises(SystemExit, match=message):
            main([*command, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")])


def test_a_model_folder_that_is_not_there_is_named_before_a_reward_loads(tmp_path, monkeypatch):
    """It was found as the model loaded, after the reward, and named `model:` where the option is --model."""
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", lambda *a, **k: pytest.fail("a reward loaded"))
    for command in (["sample", "--prompt", "a red circle", "--reward", "shapes"], ["eval"],
                    ["steer", "--method", "best-of-n", "--prompt", "a red circle", "--reward", "shapes"]):
        with pytest.raises(SystemExit, match=f"^--model: {re.escape(str(tmp_path / 'gone'))} is no folder"):
            main([*command, "--model", str(tmp_path / "gone"), "--out", str(tmp_path / "out")])


def test_a_holdout_outside_the_open_unit_interval_and_a_prompts_folder_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train-reward", "artifact", "--data", "d", "--out", "o", "--holdout", "1.5"])
    assert "--holdout: must lie in (0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"--prompts-file: {re.escape(str(tmp_path))} is a folder, not a file"):
        main(["sample", "--model", "m", "--prompts-file", str(tmp_path), "--out", str(tmp_path / "o")])


def test_resume_on_a_folder_with_no_earlier_run_says_it_starts_from_the_first_prompt(saved, tmp_path, capsys):
    main(["sample", "--model", str(saved["sd3"]), "--prompt", "a", "--steps", "1", "--height", "32", "--width", "32",
          "--out", str(tmp_path / "typo"), "--resume"])
    assert "--resume: " + str(tmp_path / "typo") + " holds no earlier run; starting from the first prompt" in \
        capsys.readouterr().err
    assert (tmp_path / "typo" / "metadata.jsonl").is_file()
    main(["sample", "--model", str(saved["sd3"]), "--prompt", "a", "--steps", "1", "--height", "32", "--width", "32",
          "--out", str(tmp_path / "typo"), "--resume"])  # a finished run: nothing to do, and it says so
    assert f"wrote 0 images to {tmp_path / 'typo'} after the 1 it had;" in capsys.readouterr().out


def test_a_lora_folder_without_weights_is_named(saved, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--lora: .*empty holds no pytorch_lora_weights.safetensors"):
        main(["sample", "--model", str(saved["sd3"]), "--lora", str(tmp_path / "empty"), "--prompt", "a",
              "--out", str(tmp_path / "out")])


def test_a_lora_of_another_architecture_is_refused(saved, tmp_path):
    pipe = load_adapter(str(saved["sd"])).pipe
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    pipe.unet.add_adapter(config)
    type(pipe).save_lora_weights(tmp_path / "unet_lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    with pytest.raises(SystemExit, match="--lora: no layer of .* took a weight"):
        main(["sample", "--model", str(saved["sd3"]), "--lora", str(tmp_path / "unet_lora"), "--prompt", "a",
              "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "out")])
    # SDXL's UNet has layers of the same names, of other sizes
    tiny_pipeline("sdxl").save_pretrained(tmp_path / "sdxl")
    with pytest.raises(SystemExit, match=r"--lora: .*unet_lora does not fit .*sdxl \(a LoRA of another architecture\?\)"
                                         r": size mismatch for .*lora_A"):
        main(["sample", "--model", str(tmp_path / "sdxl"), "--lora", str(tmp_path / "unet_lora"), "--prompt", "a",
              "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "out")])


def test_an_unreachable_reward_is_one_line_and_leaves_no_folder(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_DIFFUSION_REWARD_TOKEN", "secret")
    with pytest.raises(SystemExit, match=r"align-diffusion sample: reward server http://127.0.0.1:9 failed"):
        main(["sample", "--model", str(saved["sd3"]), "--prompt", "a", "--steps", "1", "--height", "32", "--width",
              "32", "--reward", "remote:http://127.0.0.1:9", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "metadata.jsonl").exists()


def test_overwrite_leaves_only_the_new_samples(saved, tmp_path):
    out = tmp_path / "out"
    common = ["sample", "--model", str(saved["sd3"]), "--steps", "1", "--height", "32", "--width", "32", "--out",
              str(out)]
    main([*common, "--prompt", *PROMPTS, "--num-images-per-prompt", "2"])
    (out / "notes.txt").write_text("mine")
    (out / "images" / "keep.jpg").write_bytes(b"mine")
    earlier = sorted(p.name for p in (out / "images").iterdir())
    with pytest.raises(SystemExit, match="DDIM η = 5.0 at step 0 makes σ² exceed"):  # fails at its first step
        main([*common, "--prompt", PROMPTS[0], "--model", str(saved["sd"]), "--sampler", "ddim", "--noise-level",
              "5", "--overwrite"])
    assert sorted(p.name for p in (out / "images").iterdir()) == earlier and (out / "index.html").is_file()
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 4
    with pytest.raises(KeyboardInterrupt), SampleFolder(out) as folder:  # interrupted after its first image
        folder.add(Image.new("RGB", (32, 32)), {"prompt": PROMPTS[0]})
        raise KeyboardInterrupt
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "keep.jpg"]
    assert (out / "index.html").read_text().count('class="card"') == 1  # the finished image's page, not a stale one
    main([*common, "--prompt", PROMPTS[0], "--overwrite"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "keep.jpg"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 1
    assert (out / "index.html").read_text().count('class="card"') == 1
    assert (out / "notes.txt").read_text() == "mine"
    adapter = load_adapter(str(saved["sd3"]))  # from Python as from the command line: replaced only when asked
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sample_to_folder(adapter, PROMPTS[:1], out, num_inference_steps=1, height=32, width=32, progress=False)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 1
    with pytest.raises(TypeError, match="not JSON serializable"):  # a record that cannot be written replaces nothing
        sample_to_folder(adapter, PROMPTS, out, num_inference_steps=1, height=32, width=32, progress=False,
                         overwrite=True, extra_metadata={"note": object()})
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "keep.jpg"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 1
    # numpy's numbers, which sampling takes, are written as JSON's (they failed the first record, after the
    # earlier run was gone)
    sample_to_folder(adapter, PROMPTS, out, num_inference_steps=np.int64(1), height=32, width=32, progress=False,
                     overwrite=True, guidance_scale=np.float32(2.0))
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == len(PROMPTS) and (records[0]["steps"], records[0]["guidance"]) == (1, 2.0)
    for count in (0, -1):  # no image to make: refused, not an overwrite that leaves the folder empty
        with pytest.raises(ValueError, match=f"num_images_per_prompt must be a whole number >= 1, got {count}"):
            sample_to_folder(adapter, PROMPTS, out, num_images_per_prompt=count, overwrite=True, progress=False)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == len(PROMPTS)


def test_records_take_torch_and_numpy_values_and_keys_that_are_no_text(saved, tmp_path):
    """They failed to serialize (a tensor, an array, numpy's bool), or a resume failed comparing a number key."""
    value = {"a": torch.tensor(1.5), "b": np.array([1, np.nan]), "c": np.bool_(True), np.int64(1): "x",
             None: {2.5: torch.tensor([True, False])}, "d": torch.tensor(float("inf"))}
    assert json.dumps(json_safe(value), allow_nan=False) == (
        '{"a": 1.5, "b": [1.0, null], "c": true, "1": "x", "null": {"2.5": [true, false]}, "d": null}')
    adapter = load_adapter(str(saved["sd3"]))
    options = dict(num_inference_steps=1, height=32, width=32, progress=False, extra_metadata={"notes": {1: "x"}})
    sample_to_folder(adapter, PROMPTS[:1], tmp_path / "out", **options)
    assert len(sample_to_folder(adapter, PROMPTS[:2], tmp_path / "out", resume=True, **options)) == 2


def test_seeds_are_whole_numbers_in_the_documented_range_from_python_too(tiny_pipes, tmp_path):
    """torch's CPU generator reads a seed's low 32 bits (and seed -1 as 2**64 - 1): seed 2**32, or image 1 of a
    seed 2**32 - 1 or -1 run, would repeat image 0 of a seed-0 run."""
    from align_diffusion.models import adapter_for
    from align_diffusion.sampling.loop import sample, sample_images
    from align_diffusion.steering import steer

    adapter = adapter_for(tiny_pipes["sd3"])
    kwargs = dict(num_inference_steps=1, height=32, width=32)
    assert torch.equal(*(torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (0, 2**32)))
    for seed in (-1, 2**32, 1.0, torch.Generator()):
        with pytest.raises(ValueError, match=re.escape(f"seed must be a whole number in [0, 2**32), got {seed!r}")):
            sample(adapter, ["a"], seed=seed, **kwargs)
        with pytest.raises(ValueError, match=re.escape("seed must be a whole number in [0, 2**32)")):
            sample_images(adapter, ["a"], seed=seed, **kwargs)
        with pytest.raises(ValueError, match=re.escape("seed must be a whole number in [0, 2**32)")):
            steer(adapter, ["a"], load_reward("jpeg"), "best-of-n", seed=seed, num_candidates=1, **kwargs)
        with pytest.raises(ValueError, match=re.escape("seed must be a whole number in [0, 2**32)")):
            sample_to_folder(adapter, ["a"], tmp_path / "out", seed=seed, progress=False, **kwargs)
    # The seeds a call derives stay below 2**32 too: seed + k for its images, and steering's candidate streams.
    last = re.escape("seed must be a whole number in [0, 2**32 − 2] (generators up to seed + 1 follow), got 4294967295")
    with pytest.raises(ValueError, match=last):
        sample(adapter, ["a", "b"], seed=2**32 - 1, **kwargs)
    with pytest.raises(ValueError, match=last):
        sample_images(adapter, ["a", "b"], seed=2**32 - 1, **kwargs)
    with pytest.raises(ValueError, match=last):
        sample_to_folder(adapter, ["a"], tmp_path / "out", seed=2**32 - 1, num_images_per_prompt=2, progress=False,
                         **kwargs)
    with pytest.raises(ValueError, match=re.escape("2**32 − 100001] (generators up to seed + 100000 follow)")):
        list(steer(adapter, ["a"], load_reward("jpeg"), "best-of-n", seed=2**32 - 100_000, num_candidates=2,
                   progress=False, **kwargs))
    assert sample(adapter, ["a", "b"], seed=2**32 - 2, **kwargs).images.shape[0] == 2
    torch.testing.assert_close(sample_images(adapter, ["a", "b"], seed=np.int64(3), **kwargs),
                               sample_images(adapter, ["a", "b"], seed=3, **kwargs), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"sample_images seeds image k with seed \+ k"):
        sample_images(adapter, ["a"], generators=[torch.Generator()], **kwargs)


def test_metadata_writes_non_finite_numbers_as_null(tmp_path):
    """A reward that could not score an image (NaN), however deeply it sits in a record, reaches strict JSON readers
    as null."""
    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    with SampleFolder(tmp_path) as folder:
        record = folder.add(Image.new("RGB", (4, 4)), {
            "rewards": {"clip": float("nan"), "jpeg": -1.5},
            "details": {"candidate_rewards": [1.0, float("nan"), float("-inf")], "trace": [[0.5, float("inf")]]},
        })
    line = json.loads((tmp_path / "metadata.jsonl").read_text(), parse_constant=strict)
    assert line == record
    assert line["rewards"] == {"clip": None, "jpeg": -1.5}
    assert line["details"] == {"candidate_rewards": [1.0, None, None], "trace": [[0.5, None]]}


def test_as_saved_is_exactly_what_a_saved_png_reads_back(tmp_path):
    """ShapesEval's verdicts in eval and steer folders are taken on `as_saved` images: for a verdict to hold for the
    saved file, those must be the PNG's pixels, bit for bit."""
    from align_diffusion.models.base import PipelineAdapter
    from align_diffusion.rewards.base import images_to_tensor

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of [0, 1]
    for k, image in enumerate(PipelineAdapter.to_pil(images)):
        image.save(tmp_path / f"{k}.png")
    read_back = images_to_tensor([Image.open(tmp_path / f"{k}.png") for k in range(3)])
    assert torch.equal(PipelineAdapter.as_saved(images), read_back)


def test_resume_goes_on_after_an_interrupted_run_as_if_it_had_not_stopped(saved, tmp_path):
    common = ["sample", "--model", str(saved["sd3"]), "--steps", "2", "--height", "32", "--width", "32",
              "--num-images-per-prompt", "2", "--reward", "jpeg", "--batch-size", "1"]
    prompts = ["a red circle", "two squares", "a triangle"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main([*common, "--prompt", *prompts, "--out", str(straight)])
    main([*common, "--prompt", *prompts[:2], "--out", str(resumed)])  # the first four images of the same run
    metadata = resumed / "metadata.jsonl"
    cut = metadata.read_text()[:-20]  # killed while writing the fourth record
    metadata.write_text(cut)
    with pytest.raises(SystemExit, match="already holds samples; pass --overwrite .* or --resume"):
        main([*common, "--prompt", *prompts, "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's guidance was 7.0, this one's is 3.0"):
        main([*common, "--prompt", *prompts, "--guidance", "3", "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's dtype was not given \\(the default\\), this one's "
                                         "is 'bfloat16'; an option left at its default is recorded as not given"):
        main([*common, "--prompt", *prompts, "--dtype", "bfloat16", "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: image images/00002.png is of prompt 'two squares', seed 2; this "
                                         "run makes 'a triangle', seed 2 there"):
        main([*common, "--prompt", prompts[0], prompts[2], "--resume", "--out", str(resumed)])
    with pytest.raises(SystemExit, match="resume: the earlier run's reward was 'jpeg', this one's is 'jpeg:5'"):
        main([*common[:-4], "--reward", "jpeg:5", "--batch-size", "1", "--prompt", *prompts, "--resume", "--out",
              str(resumed)])
    assert metadata.read_text() == cut  # a refused resume leaves the folder as it was
    main([*common, "--prompt", *prompts, "--resume", "--out", str(resumed)])
    assert metadata.read_text() == (straight / "metadata.jsonl").read_text()
    for k in range(6):
        name = f"images/{k:05d}.png"
        assert np.array_equal(np.asarray(Image.open(resumed / name)), np.asarray(Image.open(straight / name))), name
    assert (resumed / "index.html").read_text().count('class="card"') == 6


def test_a_resume_that_differs_in_what_was_given_is_refused_before_anything_loads(saved, tmp_path, monkeypatch):
    common = ["sample", "--model", str(saved["sd3"]), "--steps", "1", "--height", "32", "--width", "32",
              "--reward", "jpeg", "--out", str(tmp_path / "out")]
    main([*common, "--prompt", "a red circle", "two squares"])

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr("align_diffusion.cli.load_for_command", no_loading)
    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    for flags, message in [(["--guidance", "3"], "guidance was 7.0, this one's is 3.0"),
                           (["--sampler", "flow-sde"], "sampler was 'ode', this one's is 'flow-sde'"),
                           (["--dtype", "bfloat16"], "dtype was not given (the default), this one's is 'bfloat16'"),
                           (["--seed", "1"], "is of prompt 'a red circle', seed 0; this run makes 'a red circle', "
                                             "seed 1 there")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            main([*common, "--prompt", "a red circle", "two squares", "three circles", "--resume", *flags])
    monkeypatch.undo()  # another reward is told once it loads, still before the model
    monkeypatch.setattr("align_diffusion.cli.load_for_command", no_loading)
    with pytest.raises(SystemExit, match=re.escape("reward was 'jpeg', this one's is 'jpeg:50'")):
        main([*common[:-4], "--reward", "jpeg:50", *common[-2:], "--prompt", "a red circle", "two squares",
              "--resume"])


def test_a_resume_into_a_folder_the_other_command_wrote_says_what_it_holds(saved, tmp_path, monkeypatch):
    shared = ["--model", str(saved["sd3"]), "--steps", "1", "--prompt", "a red circle"]
    steer = ["steer", "--method", "best-of-n", "--reward", "jpeg", *shared]
    main(["sample", *shared, "--out", str(tmp_path / "samples")])
    main([*steer, "--out", str(tmp_path / "steered")])
    kept = {name: (tmp_path / name / "metadata.jsonl").read_text() for name in ("samples", "steered")}
    monkeypatch.setattr("align_diffusion.cli.load_for_command", lambda *args: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match=re.escape("resume: the folder holds samples (align-diffusion sample or "
                                                   "eval), and this run makes a steering run's results")):
        main([*steer, "--resume", "--out", str(tmp_path / "samples")])
    with pytest.raises(SystemExit, match=re.escape("resume: the folder holds a steering run's results (align-diffusion "
                                                   "steer), and this run makes samples")):
        main(["sample", *shared, "--resume", "--out", str(tmp_path / "steered")])
    assert {name: (tmp_path / name / "metadata.jsonl").read_text() for name in kept} == kept


def test_ctrl_c_before_an_overwrite_wrote_anything_says_the_earlier_run_is_kept(saved, tmp_path, capsys,
                                                                               monkeypatch):
    """The hint to go on with --resume named the earlier run's folder, which that resume then refused."""
    out = tmp_path / "out"
    common = ["sample", "--model", str(saved["sd3"]), "--prompt", "a red circle", "--steps", "1", "--height", "32",
              "--width", "32", "--out", str(out)]
    main([*common, "--seed", "7"])
    before = (out / "metadata.jsonl").read_bytes()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("align_diffusion.sampling.folder.sample", ctrl_c)  # Ctrl-C during the first batch
    with pytest.raises(SystemExit) as stopped:
        main([*common, "--seed", "100", "--overwrite"])
    assert stopped.value.code == 130 and (out / "metadata.jsonl").read_bytes() == before
    assert (f"sample: interrupted; it had written nothing, and {out} holds the earlier run's results as they were"
            in capsys.readouterr().err)


def test_an_out_folder_the_system_cannot_name_fails_in_one_line(saved, tmp_path):
    """The records' stamp taken for a Ctrl-C's message read the folder before the command's checks, and raised."""
    with pytest.raises(SystemExit, match="align-diffusion sample: .*File name too long"):
        main(["sample", "--model", str(saved["sd3"]), "--prompt", "a red circle", "--out", str(tmp_path / ("a" * 300))])


def test_ctrl_c_leaves_the_finished_images_and_says_how_to_go_on(saved, tmp_path):
    out = tmp_path / "out"
    # Far more images than a run reaches before the signal: a test process starved of the CPU for a while must still
    # find the run going when it sends it
    common = [sys.executable, "-m", "align_diffusion", "sample", "--model", str(saved["sd3"]), "--prompt",
              "a red circle", "--num-images-per-prompt", "100000", "--batch-size", "1", "--steps", "2", "--height",
              "32", "--width", "32", "--out", str(out)]
    process = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metadata, deadline = out / "metadata.jsonl", time.time() + 200
    while not (metadata.is_file() and metadata.read_text().count("\n") >= 2) and process.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=200)
    assert process.returncode == 130, stderr[-3000:]
    assert f"sample: interrupted; what it finished is in {out}, and the same command with --resume goes on" in stderr
    assert "Traceback" not in stderr
    finished = [json.loads(line) for line in metadata.read_text().splitlines() if line.endswith("}")]
    assert 2 <= len(finished) < 100000 and all((out / r["file"]).is_file() for r in finished)
