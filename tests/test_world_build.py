"""The world build path end to end at a few steps per asset: every asset saves and reloads with its stock class."""

import html
import json
import math
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel, Dinov2Model

from align_diffusion.cli import main
from align_diffusion.gallery import read_records
from align_diffusion.sampling.folder import SampleFolder
from align_diffusion.models import load_adapter
from align_diffusion.models.base import PipelineAdapter
from align_diffusion.sampling.loop import sample
from align_diffusion.world.build import QUICK_PLAN, BuildPlan, build_world
from align_diffusion.world.evaluate import shapes_eval
from align_diffusion.world.fit import fit
from align_diffusion.models.tiny import vae as tiny_vae
from align_diffusion.models.sd3 import CompactContextAttnProcessor, compact_attention, compact_zero_context
from align_diffusion.world.generators import FLOW_SHIFT, flow_matched_timesteps, standardize_latents

# Compiling would take minutes here; test_compiled_transformer_follows_the_compact_attention_swaps covers it.
PLAN = BuildPlan(clip_steps=2, dino_steps=2, vae_steps=2, sd3_steps=2, sd_steps=2, dataset_size=64, torch_compile=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    report = build_world(out, seed=0, plan=PLAN, log=lambda line: None)
    return out, report


def test_every_asset_loads_with_its_stock_class(world):
    out, report = world
    assert set(report["seconds"]) == {"clip", "dino", "vae", "sd3", "sd"}
    assert 0 <= report["vae_reconstruction_strict"] <= 1
    clip, tokenizer = CLIPModel.from_pretrained(out / "clip"), AutoTokenizer.from_pretrained(out / "clip")
    tokens = tokenizer(["a red circle left of a blue square"], padding="max_length", max_length=16,
                       return_tensors="pt")
    assert clip.get_text_features(input_ids=tokens.input_ids).pooler_output.shape[-1] == 128
    # The DINO encoder and both denoisers are stored in float16 (asset size); the denoisers load back as float32.
    assert {t.dtype for t in load_file(out / "dino" / "model.safetensors").values()} == {torch.float16}
    dino = Dinov2Model.from_pretrained(out / "dino", dtype=torch.float32)
    assert dino(pixel_values=torch.zeros(1, 3, 64, 64)).last_hidden_state.shape == (1, 65, 128)
    for folder, pipeline_class, denoiser in (("sd3", StableDiffusion3Pipeline, "transformer"),
                                             ("sd", StableDiffusionPipeline, "unet")):
        stored = load_file(out / folder / denoiser / "diffusion_pytorch_model.safetensors")
        assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
        pipe = pipeline_class.from_pretrained(out / folder)
        assert getattr(pipe, denoiser).dtype == torch.float32
        image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
        assert image.shape == (1, 3, 64, 64)


def test_generators_sample_through_the_adapters_at_the_world_size(world):
    out, _ = world
    for name in ("sd3", "sd"):
        adapter = load_adapter(str(out / name))
        assert adapter.default_size == (64, 64)
        assert sample(adapter, ["two squares"], num_inference_steps=2).images.shape == (1, 3, 64, 64)


def test_compact_context_attention_equals_full_attention(world):
    out, _ = world
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "sd3")
    embeds, _, pooled, _ = pipe.encode_prompt(["a red circle", "three triangles"], None, None,
                                              do_classifier_free_guidance=False)
    assert embeds.shape[1] == 16 + 256
    (compact,), (log_multiplicity,) = compact_zero_context(embeds)
    assert compact.shape[1] == 16 + 1
    transformer = pipe.transformer
    side = transformer.config.sample_size
    x, t = torch.randn(2, transformer.config.in_channels, side, side), torch.tensor([200.0, 800.0])
    with torch.no_grad():
        full = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
        transformer.set_attn_processor(CompactContextAttnProcessor(log_multiplicity))
        fast = transformer(hidden_states=x, timestep=t, encoder_hidden_states=compact,
                           pooled_projections=pooled).sample
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_compiled_transformer_follows_the_compact_attention_swaps(world):
    """`train_sd3(torch_compile=True)` swaps the compact-context processor in around a compiled transformer at every
    step: the compiled forward must use it with the bias it carries now, and drop it once swapped back out."""
    out, _ = world
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "sd3")
    embeds, _, pooled, _ = pipe.encode_prompt(["a red circle", "three triangles"], None, None,
                                              do_classifier_free_guidance=False)
    (compact,), (log_multiplicity,) = compact_zero_context(embeds)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_config(pipe.transformer.config, num_layers=1).eval()
    compiled = torch.compile(transformer)
    side = transformer.config.sample_size
    x, t = torch.randn(2, transformer.config.in_channels, side, side), torch.tensor([200.0, 800.0])
    outputs = []
    with torch.no_grad():
        for bias in (log_multiplicity, torch.zeros_like(log_multiplicity)):
            with compact_attention(transformer, bias):
                eager = transformer(hidden_states=x, timestep=t, encoder_hidden_states=compact,
                                    pooled_projections=pooled).sample
                fast = compiled(hidden_states=x, timestep=t, encoder_hidden_states=compact,
                                pooled_projections=pooled).sample
            torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
            outputs.append(eager)
        full = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
        torch.testing.assert_close(compiled(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                            pooled_projections=pooled).sample, full, atol=1e-5, rtol=1e-5)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the bias matters, so the first check can tell


def test_build_without_a_cpp_compiler_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(RuntimeError, match="BuildPlan.torch_compile: torch.compile builds its kernels with a C/C"):
        build_world(tmp_path / "world", plan=BuildPlan(torch_compile=True), only=["vae"], log=lambda line: None)
    assert not (tmp_path / "world").exists()
    # The command names its own option, on by default, in one line (it ended in BuildPlan's RuntimeError traceback)
    with pytest.raises(SystemExit, match=r"^--compile: torch.compile builds .*\(--no-compile builds without it\)$"):
        main(["build-world", "--out", str(tmp_path / "world"), "--only", "vae"])
    assert not (tmp_path / "world").exists()


def test_only_dino_builds_on_a_fresh_folder_without_loading_the_clip(tmp_path):
    report = build_world(tmp_path, plan=PLAN, only=["dino"], log=lambda line: None)
    assert set(report["seconds"]) == {"dino"} and Dinov2Model.from_pretrained(tmp_path / "dino") is not None
    assert not (tmp_path / "clip").exists()


def test_an_asset_whose_save_is_cut_short_is_not_left_half_saved(tmp_path, monkeypatch):
    """A clip folder holding the model but no tokenizer would load, and condition every prompt on unknown words."""
    build_world(tmp_path, plan=PLAN, only=["dino"], log=lambda line: None)
    earlier = (tmp_path / "dino" / "model.safetensors").read_bytes()

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", cut_short)
    monkeypatch.setattr("transformers.BitImageProcessor.save_pretrained", cut_short)
    for asset in ("clip", "dino"):
        with pytest.raises(KeyboardInterrupt):
            build_world(tmp_path, plan=PLAN, only=[asset], log=lambda line: None)
    assert not (tmp_path / "clip").exists()
    assert (tmp_path / "dino" / "model.safetensors").read_bytes() == earlier  # the earlier dino, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["build_report.json", "dino"]


def test_generators_without_their_clip_and_vae_fail_in_one_line_before_training(tmp_path):
    out = tmp_path / "fresh"
    expected = f"{re.escape(str(out))} has no clip and no vae folder, which sd3 trains on: build clip and vae"
    with pytest.raises(SystemExit, match=expected):
        main(["build-world", "--out", str(out), "--only", "dino", "sd3", "--quick"])
    with pytest.raises(SystemExit, match="has no vae folder, which sd3 and sd train on: build vae first"):
        main(["build-world", "--out", str(out), "--only", "clip", "sd3", "sd", "--quick"])
    assert not out.exists()


def test_a_generator_rebuilt_alone_is_the_seeds(world, tmp_path):
    out, _ = world
    rebuilt = []
    for copy in ("a", "b"):
        shutil.copytree(out, tmp_path / copy)
        torch.manual_seed(ord(copy))  # a different stream in each process before the build
        build_world(tmp_path / copy, seed=0, plan=PLAN, only=["sd3"], log=lambda line: None)
        rebuilt.append(load_file(str(tmp_path / copy / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors")))
    assert rebuilt[0].keys() == rebuilt[1].keys()
    assert all(torch.equal(rebuilt[0][key], rebuilt[1][key]) for key in rebuilt[0])


def test_a_quick_build_replaces_no_world_but_a_quick_one_and_no_build_mixes_with_other_files(monkeypatch, tmp_path):
    """The shipped world, of this checkout or another, or any copy of a world: only a --quick world is replaced by
    another; a folder of other files (an eval's) takes no world."""
    built, plans = [], []
    monkeypatch.setattr("align_diffusion.world.build.build_world", lambda out, **kwargs: built.append(Path(out)) or
                        plans.append(kwargs["plan"]) or {"total_seconds": 0})
    with pytest.raises(SystemExit, match="--quick: its few-step models would replace the models in assets/world "
                                         r"\(clip, dino, vae, sd3, sd\)"):
        main(["build-world", "--quick"])
    copy = tmp_path / "copy"
    (copy / "clip").mkdir(parents=True)
    (copy / "build_report.json").write_text(json.dumps({"plan": asdict(PLAN)}))
    with pytest.raises(SystemExit, match=f"--quick: its few-step models would replace the models in {copy} \\(clip\\)"):
        main(["build-world", "--quick", "--out", str(copy)])
    (copy / "build_report.json").write_text(json.dumps({"plan": asdict(QUICK_PLAN)}))
    main(["build-world", "--quick", "--out", str(copy)])
    # A world of quick assets but one rebuilt at full length (`--only`) is not all quick: the last build's plan
    # named in the report spoke for every asset.
    (copy / "vae").mkdir()
    full = {"plan": asdict(PLAN), "seed": 0}
    (copy / "build_report.json").write_text(json.dumps({"plan": asdict(QUICK_PLAN), "built_with": {
        "clip": {"plan": asdict(QUICK_PLAN), "seed": 0}, "vae": full}}))
    with pytest.raises(SystemExit, match=r"would replace the models in .*copy \(clip, vae\)"):
        main(["build-world", "--quick", "--out", str(copy)])
    (copy / "build_report.json").write_text(json.dumps({"plan": asdict(QUICK_PLAN), "built_with": {
        "vae": {"plan": asdict(replace(QUICK_PLAN, bf16=True)), "seed": 0}}}))  # quick steps, another precision
    main(["build-world", "--quick", "--bf16", "--out", str(copy)])
    assert plans[-1] == replace(QUICK_PLAN, bf16=True)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text("{}")
    for quick in ([], ["--quick"]):
        with pytest.raises(SystemExit, match="--out: .*eval holds other files and no world"):
            main(["build-world", *quick, "--out", str(tmp_path / "eval")])
    monkeypatch.chdir(tmp_path)  # assets/world here is no world
    main(["build-world", "--quick", "--out", "assets/world"])
    assert built == [copy, copy, Path("assets/world")]
    assert plans[0] == plans[2] == QUICK_PLAN  # --quick trains in float32, bfloat16 or not in hardware


def test_an_interrupted_build_keeps_the_report_of_the_assets_it_finished(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("align_diffusion.world.build.train_vae", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_world(tmp_path, plan=PLAN, only=["dino", "vae"], log=lambda line: None)
    written = json.loads((tmp_path / "build_report.json").read_text())
    assert list(written["seconds"]) == ["dino"] and written["plan"] == asdict(PLAN)
    assert written["total_seconds"] == written["seconds"]["dino"]


def test_a_rebuilt_vae_is_measured_again_and_the_report_names_each_assets_seed_and_plan(tmp_path):
    """The reconstruction score was measured only where a generator was built: `--only vae` kept the old VAE's."""
    (tmp_path / "build_report.json").write_text(json.dumps({  # of a world whose VAE trained for long
        "seconds": {"dino": 1.0, "vae": 60.0}, "vae_reconstruction_strict": 0.97,
        "built_with": {"dino": {"seed": 0, "plan": asdict(PLAN)}, "vae": {"seed": 0, "plan": asdict(BuildPlan())}}}))
    rebuilt = build_world(tmp_path, seed=1, plan=replace(PLAN, vae_steps=1), only=["vae"], log=lambda line: None)
    written = json.loads((tmp_path / "build_report.json").read_text())
    assert written["vae_reconstruction_strict"] == rebuilt["vae_reconstruction_strict"] < 0.97
    assert written["built_with"]["dino"] == {"seed": 0, "plan": asdict(PLAN)}
    assert written["built_with"]["vae"] == {"seed": 1, "plan": asdict(replace(PLAN, vae_steps=1))}


def test_an_asset_saved_and_then_interrupted_while_measured_is_reported_with_its_own_plan(tmp_path, monkeypatch):
    """The report was written after the measurement: a Ctrl-C between them left the new VAE under the old VAE's
    plan and score (a quick plan's, say, which the quick build's guard reads)."""
    (tmp_path / "build_report.json").write_text(json.dumps({  # of a world whose VAE trained for long
        "seconds": {"vae": 60.0}, "vae_reconstruction_strict": 0.97,
        "built_with": {"vae": {"seed": 0, "plan": asdict(BuildPlan())}}}))
    again = replace(PLAN, vae_steps=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("align_diffusion.world.build.vae_reconstruction_strict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_world(tmp_path, seed=1, plan=again, only=["vae"], log=lambda line: None)
    written = json.loads((tmp_path / "build_report.json").read_text())
    assert written["built_with"]["vae"] == {"seed": 1, "plan": asdict(again)}
    assert written["vae_reconstruction_strict"] is None


def test_only_merges_into_the_build_report(world):
    out, full = world
    report = build_world(out, plan=PLAN, only=["dino"], log=lambda line: None)
    written = json.loads((out / "build_report.json").read_text())
    assert written["seconds"] == {**full["seconds"], "dino": report["seconds"]["dino"]}
    assert written["vae_reconstruction_strict"] == full["vae_reconstruction_strict"]
    assert written["clip_test_accuracy_6way"] == full["clip_test_accuracy_6way"]
    assert written["total_seconds"] == round(sum(written["seconds"].values()), 1)


def test_eval_refuses_a_folder_of_samples_without_overwrite(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "metadata.jsonl").write_text('{"file": "images/00000.png", "prompt": "a red circle"}\n')
    with pytest.raises(SystemExit, match="already holds metadata.jsonl .* pass --overwrite"):
        main(["eval", "--model", "never-loaded", "--out", str(samples)])
    assert (samples / "metadata.jsonl").read_text() == '{"file": "images/00000.png", "prompt": "a red circle"}\n'
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="--out: expected a folder"):
        main(["eval", "--model", "never-loaded", "--out", str(tmp_path / "a-file")])


def test_evaluate_shapes_replaces_earlier_samples_only_when_asked_and_needs_images(tmp_path):
    """As sample_to_folder and the eval command: from Python too, samples already in out_dir are kept unless asked."""
    from align_diffusion.world.benchmark import evaluate_shapes

    world = load_adapter(str(Path(__file__).resolve().parents[1] / "assets" / "world" / "sd3"))
    with SampleFolder(tmp_path / "out") as folder:
        folder.add(Image.new("RGB", (64, 64)), {"prompt": "a red circle"})
    kept = (tmp_path / "out" / "metadata.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already holds samples; pass overwrite=True to replace them"):
        evaluate_shapes(world, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="num_images_per_prompt must be a whole number >= 1, got 0"):
        evaluate_shapes(world, num_images_per_prompt=0, out_dir=tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "metadata.jsonl").read_text() == kept


def test_eval_refuses_a_model_of_another_size_before_sampling(saved, tmp_path):
    with pytest.raises(SystemExit, match="ShapesEval judges 64×64 images, and this model samples 32×32"):
        main(["eval", "--model", str(saved["sd3"]), "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval" / "images").exists()


def test_diverged_samples_are_marked_and_warned_of_not_passed_off_as_black_images(tmp_path, capsys):
    """Flow-SDE at a noise level of 1e20 leaves the finite numbers: eval and sample say so, and mark each image."""
    finite, nan, inf = torch.rand(3, 4, 4), torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    nan[1, 2, 3], inf[0, 0, 0] = math.nan, math.inf
    assert PipelineAdapter.diverged(torch.stack([finite, nan, inf])) == [False, True, True]
    world_sd3 = str(Path(__file__).resolve().parents[1] / "assets" / "world" / "sd3")
    common = ["--model", world_sd3, "--steps", "1", "--sampler", "flow-sde"]
    main(["eval", *common, "--noise-level", "1e20", "--num-images-per-prompt", "1", "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["diverged_images"] == result["num_images"] > 0
    assert all(record["diverged"] for record in read_records(tmp_path / "eval"))
    assert f"{result['num_images']} of {result['num_images']} images diverged" in capsys.readouterr().err
    page = tmp_path / "eval" / "index.html"
    written = page.read_text()
    assert "<title>ShapesEval test: strict 0.000</title>" in written
    page.unlink()
    main(["gallery", str(tmp_path / "eval")])  # rebuilt as eval titled it
    assert page.read_text() == written
    for level, diverged in (("1e20", True), ("0.5", False)):
        main(["sample", *common, "--noise-level", level, "--prompt", "a red circle", "--out", str(tmp_path / level)])
        assert [record.get("diverged", False) for record in read_records(tmp_path / level)] == [diverged]
        warned = "1 of 1 images diverged" in (err := capsys.readouterr().err)
        assert warned == diverged and warned == err.strip().endswith("with a lower --noise-level or a lower --guidance")


def test_new_samples_in_a_folder_remove_its_earlier_evaluation(tmp_path):
    (tmp_path / "eval.json").write_text("{}")  # the summary of the images about to be replaced
    with SampleFolder(tmp_path) as folder:
        assert (tmp_path / "eval.json").exists()  # kept while no new image exists, as the images are
        folder.add(Image.new("RGB", (8, 8)), {"prompt": "a red circle"})
    assert not (tmp_path / "eval.json").exists()


def test_eval_of_a_folder_that_is_no_pipeline_fails_in_one_line(tmp_path):
    not_a_pipeline = tmp_path / "vae"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "config.json").write_text("{}")
    expected = f"align-diffusion eval: .*model_index.json.* {re.escape(str(not_a_pipeline))}"
    with pytest.raises(SystemExit, match=expected):
        main(["eval", "--model", str(not_a_pipeline), "--out", str(tmp_path / "eval")])


def test_eval_command_writes_scores(world, tmp_path):
    out, _ = world
    main(["eval", "--model", str(out / "sd3"), "--benchmark", "shapes", "--split", "val", "--num-images-per-prompt",
          "1", "--steps", "2", "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(result["per_category_strict"]) == {"single_object", "colors", "counting", "two_object",
                                                   "color_attr", "position"}
    assert 0 <= result["overall_strict"] <= 1 and 0 <= result["graded"] <= 1
    assert result["settings"]["num_inference_steps"] == 2 and result["num_images"] == len(result["per_image"])
    assert [r["seed"] for r in result["per_image"]] == list(range(result["num_images"]))
    assert list(result["pass_at_k"]) == ["1"]  # one image per prompt: pass@1 is the strict accuracy
    assert result["pass_at_k"]["1"]["overall"] == pytest.approx(result["overall_strict"])
    # The samples and their review page, each image with its verdict.
    records = read_records(tmp_path / "eval")
    assert [(r["prompt"], r["shapes_strict"], r["rewards"]["shapes"]) for r in records] == [
        (r["prompt"], r["strict"], r["graded"]) for r in result["per_image"]]
    assert all((tmp_path / "eval" / r["file"]).is_file() for r in records)
    # Each verdict holds for the saved file: ShapesEval of the PNGs as they read back gives the same ones.
    saved = [Image.open(tmp_path / "eval" / r["file"]) for r in records]
    rejudged = shapes_eval([r["prompt"] for r in records], saved)["per_image"]
    assert [(r["strict"], r["graded"]) for r in rejudged] == [(r["shapes_strict"], r["rewards"]["shapes"])
                                                             for r in records]
    assert (tmp_path / "eval" / "index.html").read_text().count('class="card"') == len(records)
    with pytest.raises(SystemExit, match="already holds eval.json and metadata.jsonl"):
        main(["eval", "--model", str(out / "sd3"), "--out", str(tmp_path / "eval")])
    # The prompt options reach the samples and the settings.
    main(["eval", "--model", str(out / "sd3"), "--split", "val", "--num-images-per-prompt", "1", "--steps", "2",
          "--negative-prompt", "a blue square", "--max-sequence-length", "16", "--out", str(tmp_path / "options")])
    settings = json.loads((tmp_path / "options" / "eval.json").read_text())["settings"]
    assert (settings["negative_prompt"], settings["max_sequence_length"]) == ("a blue square", 16)
    first = read_records(tmp_path / "options")[0]
    assert (first["model"], first["steps"], first["negative_prompt"], first["max_sequence_length"]) == (
        str(out / "sd3"), 2, "a blue square", 16)  # each image says how it was made, and so does the page
    assert f"steps 2 · guidance {settings['guidance_scale']} · negative_prompt a blue square" in html.unescape(
        (tmp_path / "options" / "index.html").read_text())
    expected = sample(load_adapter(str(out / "sd3"), max_sequence_length=16), [first["prompt"]], seed=first["seed"],
                      num_inference_steps=2, negative_prompt="a blue square").images[0]
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "options" / first["file"]), dtype=np.float32) / 255)
    assert (image.permute(2, 0, 1) - expected).abs().max() <= 1 / 255


@torch.no_grad()
def test_standardized_vae_is_the_same_autoencoder_with_standard_latents():
    torch.manual_seed(0)
    vae = tiny_vae(latent_channels=4).eval()
    torch.nn.init.normal_(vae.quant_conv.bias, std=2.0)  # latents far from zero mean, as after training
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    latents = vae.encode(images).latent_dist.mode()
    standard_vae, standard = standardize_latents(vae, latents)
    torch.testing.assert_close(standard.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(standard.std((0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    posterior = standard_vae.encode(images).latent_dist
    torch.testing.assert_close(posterior.mode(), standard, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(standard_vae.decode(standard).sample, vae.decode(latents).sample, atol=1e-4, rtol=0)
    scale = latents.std((0, 2, 3)).view(1, -1, 1, 1)
    torch.testing.assert_close(posterior.std, vae.encode(images).latent_dist.std / scale, atol=1e-5, rtol=1e-4)
    assert standard_vae.config.scaling_factor == 1.0 and standard_vae.config.shift_factor is None


def test_sd_training_noise_levels_are_the_sd3_generators():
    """Shifted-uniform flow times s = 3u / (1 + 2u) have log-SNR 2 log((1 - s) / s): the median (u = 1/2, s = 3/4)
    is 2 log(1/3), and flow times beyond the last DDPM step's noise level, s* = σ / (α + σ), all land on that step:
    u > s* / (3 - 2 s*)."""
    alphas_cumprod = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.manual_seed(0)
    steps = flow_matched_timesteps(alphas_cumprod, 200_000)
    log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log()[steps]
    assert FLOW_SHIFT == 3.0
    assert abs(log_snr.median().item() - 2 * torch.log(torch.tensor(1 / 3)).item()) < 0.02
    alpha, sigma = alphas_cumprod[-1].sqrt(), (1 - alphas_cumprod[-1]).sqrt()
    noisiest = sigma / (alpha + sigma)
    expected_last = 1 - noisiest / (3 - 2 * noisiest)
    assert abs((steps == len(alphas_cumprod) - 1).float().mean().item() - expected_last.item()) < 0.005


def test_fit_in_bfloat16_reaches_the_exact_solution_with_float32_weights():
    """With `bf16` the loss runs on bfloat16 matmuls while weights and updates stay float32, so a noise-free linear
    regression converges to its exact weights within 1e-2 (measured 2e-3). Weights held in bfloat16 themselves
    (8 mantissa bits) stall ~7e-2 away: late, small updates round to nothing."""
    torch.manual_seed(0)
    inputs, true_weight = torch.randn(512, 8), torch.randn(8, 1)
    targets = inputs @ true_weight
    model = torch.nn.Linear(8, 1)
    output_dtypes = []

    def batch_loss():
        out = model(inputs)
        output_dtypes.append(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), targets)

    fit("linear", model.parameters(), 300, 0.05, batch_loss, log=lambda line: None, weight_decay=0.0, bf16=True)
    assert set(output_dtypes) == {torch.bfloat16}
    assert model.weight.dtype == torch.float32
    torch.testing.assert_close(model.weight.detach().T, true_weight, atol=1e-2, rtol=0)
    assert abs(model.bias.item()) < 1e-2


@pytest.mark.parametrize("steps, warmup", [(10, 0.1), (20, 0.05), (11, 0.1), (2, 0.1)])
def test_fit_runs_whatever_the_warm_up_rounds_to(steps, warmup):
    """`build-world --quick` trains DINO 10 steps at warm-up 0.1 and the generators 20 at 0.05: one warm-up step,
    where OneCycleLR's warm-up divides by zero. Every step must still run."""
    model = torch.nn.Linear(2, 1)
    calls = []

    def batch_loss():
        calls.append(1)
        return model(torch.ones(4, 2)).square().mean()

    fit("tiny", model.parameters(), steps, 1e-2, batch_loss, log=lambda line: None, warmup=warmup)
    assert len(calls) == steps and torch.isfinite(model.weight).all()
