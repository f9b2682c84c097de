"""Noise-aware rewards: the Spearman metric against scipy, a distilled student that learns to rank blurred images
by the teacher's score of their sharp versions, saved as a CLIP folder that `clip:OUT` loads; trajectories that
end in the images sampling makes; the train-reward command's record and refusals."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
import transformers.modeling_utils
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from align_diffusion.cli import main
from align_diffusion.models import load_adapter
from align_diffusion.rewards.clip import ClipScore
from align_diffusion.rewards.noise_aware import REPORT_FILE, NoiseAwareTraining, Rollouts, collect, distill
from align_diffusion.rewards.noise_aware import save_student, spearman, step_agreement, step_scores
from align_diffusion.rewards.spec import load_reward
from align_diffusion.sampling.loop import sample_images
from align_diffusion.steering.steer import check_steering
from align_diffusion.steering.ttsnap import ttsnap
from align_diffusion.world.data import to_tensor
from align_diffusion.world.render import render_prompt
from training_helpers import interrupted_halfway

WORLD_CLIP = Path(__file__).resolve().parents[1] / "assets" / "world" / "clip"


def test_spearman_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    b = a + 0.7 * b
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_spearman_of_tied_scores_matches_scipy_whatever_their_order():
    """CLIPScore clamps at 0, so many early x̂0 scores tie; ties share their average rank, as in scipy."""
    a = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 2.0, 0.5])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    expected = spearmanr(a.numpy(), b.numpy()).statistic
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(a.flip(0), b.flip(0)) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(spearman(torch.tensor([1.0, math.nan, 2.0]), torch.tensor([1.0, 2.0, 3.0])))


def test_agreement_within_prompts_is_what_pooling_over_prompts_hides():
    """A score that tells prompt A's trajectories from prompt B's but ranks each prompt's own seeds backwards
    agrees with the outcome pooled over prompts, and not at all where pruning needs it: within a prompt."""
    finals = torch.tensor([10.0, 11.0, 12.0, 0.0, 1.0, 2.0])
    scores = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0], [0.0]])
    rollouts = Rollouts(["a"] * 3 + ["b"] * 3, torch.zeros(6, 1, 3, 8, 8), finals)
    agreement = step_agreement(scores, rollouts)
    assert agreement["pooled"][0] == pytest.approx(spearmanr(scores[:, 0].numpy(), finals.numpy()).statistic)
    assert agreement["pooled"][0] > 0.4 and agreement["within_prompt"] == [-1.0]
    # Prompts whose scores all tie say nothing and are left out of the mean.
    scores[3:] = 1.0
    assert step_agreement(scores, rollouts)["within_prompt"] == [-1.0]


def test_an_unscored_trajectory_is_left_out_of_the_agreement_not_turning_it_nan():
    finals = torch.tensor([10.0, 11.0, 12.0, 13.0, 0.0, 1.0, 2.0])
    scores = torch.tensor([[1.0], [3.0], [2.0], [math.nan], [5.0], [4.0], [6.0]])
    rollouts = Rollouts(["a"] * 4 + ["b"] * 3, torch.zeros(7, 1, 3, 8, 8), finals)
    agreement = step_agreement(scores, rollouts)
    kept = [0, 1, 2, 4, 5, 6]
    assert agreement["pooled"][0] == pytest.approx(spearmanr(scores[kept, 0].numpy(), finals[kept].numpy()).statistic)
    assert agreement["within_prompt"][0] == pytest.approx((0.5 + 0.5) / 2)  # a: ranks 0 2 1 against 0 1 2; b: 1 0 2


def test_distillation_learns_where_the_teacher_clamps_to_zero():
    """Noise scores 0 under CLIPScore (its cosine is negative): the clamped score sends no gradient back, the
    linear score the student trains on does."""
    student = load_reward(f"clip:{WORLD_CLIP}")
    student.model.vision_model.requires_grad_(True)
    noise = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle"] * 4
    assert (student(noise, prompts) == 0).all()
    grads = []
    for score in (lambda: student(noise, prompts), lambda: student.linear_score(noise, prompts)):
        student.model.zero_grad(set_to_none=True)
        ((score() - 1.0) ** 2).sum().backward()
        grads.append(sum(p.grad.abs().sum() for p in student.model.vision_model.parameters() if p.grad is not None))
    assert grads[0] == 0 and grads[1] > 0


def test_distillation_needs_two_trajectories_with_finite_scores():
    teacher = load_reward(f"clip:{WORLD_CLIP}")
    one = Rollouts(["a red circle"], torch.zeros(1, 2, 3, 64, 64), torch.ones(1))
    with pytest.raises(ValueError, match="at least 2 trajectories with finite teacher scores"):
        distill(teacher, one, NoiseAwareTraining(), log=lambda line: None)
    unscored = Rollouts(["a red circle"] * 2, torch.zeros(2, 2, 3, 64, 64), torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="finite teacher scores and x̂0s, got 1 of 2"):
        distill(teacher, unscored, NoiseAwareTraining(), log=lambda line: None)
    two = Rollouts(["a red circle"] * 2, torch.zeros(2, 2, 3, 64, 64), torch.ones(2))
    for name, value, message in [("steps_per_stage", 0, "a whole number >= 1, got 0"),
                                 ("batch_size", 2.0, "a whole number >= 1, got 2.0"),
                                 ("lr", math.nan, "a finite number > 0, got nan")]:
        with pytest.raises(ValueError, match=f"^{name} must be {message}$"):
            distill(teacher, two, NoiseAwareTraining(**{name: value}), log=lambda line: None)


def test_distillation_leaves_out_the_trajectories_it_cannot_learn_from_and_says_so():
    """One unscored or diverged trajectory among many does not stop the run: it is left out, as if never drawn."""
    teacher = load_reward(f"clip:{WORLD_CLIP}")
    x0 = torch.rand(4, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores, prompts = torch.tensor([0.2, 0.4, 0.6, 0.8]), ["a red circle", "two squares", "a blue star", "a circle"]
    diverged = x0.clone()
    diverged[3, 1, 0, 0, 0] = math.nan
    settings, logged = NoiseAwareTraining(steps_per_stage=2, batch_size=4), []
    with_bad = distill(teacher, Rollouts(prompts + ["x", "y"], torch.cat([x0, diverged[3:], x0[:1]]),
                                         torch.cat([scores, scores[3:], torch.tensor([math.inf])])), settings,
                       log=logged.append)
    without = distill(teacher, Rollouts(prompts, x0, scores), settings, log=lambda line: None)
    assert logged[0] == "left out 2 of 6 trajectories: a teacher score or an x̂0 pixel is not finite"
    for a, b in zip(with_bad.model.parameters(), without.model.parameters()):
        assert torch.equal(a, b)


def test_rejects_a_teacher_that_is_not_clip():
    rollouts = Rollouts(["a circle"], torch.zeros(1, 2, 3, 64, 64), torch.zeros(1))
    with pytest.raises(ValueError, match="CLIP-family teacher"):
        distill(load_reward("jpeg"), rollouts, NoiseAwareTraining())


def test_student_learns_to_rank_blurred_images_by_their_sharp_scores(tmp_path):
    """Two 'steps': a heavy blur (early) and the sharp image (last). The teacher scores sharp renders; the
    student must rank the blurred ones as the teacher ranks their sharp versions."""
    teacher = load_reward(f"clip:{WORLD_CLIP}")
    # Same color, different shapes: blurred, a circle, a square and a triangle look alike to the teacher.
    prompts = ["a red circle", "a red square", "a red triangle"]
    per_image = [prompts[k % 3] for k in range(96)]
    shown = [prompts[(k + (k // 3) % 3) % 3] for k in range(96)]  # a third of the images match their prompt
    sharp = to_tensor([render_prompt(p, k) for k, p in enumerate(shown)]) / 2 + 0.5
    blurred = F.avg_pool2d(F.avg_pool2d(sharp, 9, 1, 4), 9, 1, 4)
    with torch.no_grad():
        final = teacher(sharp, per_image)
    rollouts = Rollouts(per_image, torch.stack([blurred, sharp], dim=1), final)
    train, held_out = (Rollouts(per_image[s], rollouts.x0_images[s], final[s]) for s in (slice(0, 64), slice(64, 96)))
    before = step_agreement(step_scores(teacher, held_out), held_out)["pooled"]
    student = distill(teacher, train, NoiseAwareTraining(steps_per_stage=30, batch_size=16, lr=3e-4),
                      log=lambda line: None)
    after = step_agreement(step_scores(student, held_out), held_out)["pooled"]
    assert after[0] > before[0] + 0.1, (before, after)
    save_student(student, tmp_path, {"before": before, "after": after})
    reloaded = load_reward(f"clip:{tmp_path}")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(blurred[:4], per_image[:4]), student(blurred[:4], per_image[:4]))


WORLD_SD3 = WORLD_CLIP.parent / "sd3"


def test_collected_trajectories_end_in_the_images_sample_images_makes_with_the_negative_prompt():
    adapter = load_adapter(str(WORLD_SD3))
    teacher = load_reward(f"clip:{WORLD_CLIP}")
    prompts = ["a red circle", "a blue square"]
    settings = dict(num_inference_steps=3, guidance_scale=2.0, seed=5)
    with_negative = collect(adapter, teacher, prompts, 1, negative_prompt="a green triangle", **settings)
    images = sample_images(adapter, prompts, seed=5, num_inference_steps=3, guidance_scale=2.0,
                           negative_prompt="a green triangle")
    with torch.no_grad():
        torch.testing.assert_close(with_negative.teacher_final, teacher(images, prompts).cpu())
        torch.testing.assert_close(with_negative.x0_images[:, -1], images, atol=1e-4, rtol=0)
    without = collect(adapter, teacher, prompts, 1, **settings)
    assert (with_negative.x0_images[:, -1] - without.x0_images[:, -1]).abs().max() > 1e-2


def test_collected_x0s_are_kept_at_the_size_the_teacher_sees(tmp_path):
    """A teacher that resizes to 32² scores the kept 32² x̂0s as it scores the 64² images (memory: a run's x̂0s at
    1024² would not fit, at 224² they do)."""
    config = CLIPConfig.from_pretrained(WORLD_CLIP)
    config.vision_config.image_size = 32
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")  # the world's CLIP at 32², untrained
    processor = AutoProcessor.from_pretrained(WORLD_CLIP)
    processor.image_processor.size, processor.image_processor.crop_size = {"shortest_edge": 32}, {"height": 32,
                                                                                                   "width": 32}
    processor.save_pretrained(tmp_path / "clip")
    teacher = load_reward(f"pickscore:{tmp_path / 'clip'}")  # no clamp at 0, which an untrained CLIP sits at
    rollouts = collect(load_adapter(str(WORLD_SD3)), teacher, ["a red circle", "two blue squares"], 2,
                       num_inference_steps=2, guidance_scale=2.0, seed=0)
    assert rollouts.x0_images.shape == (4, 2, 3, 32, 32)
    with torch.no_grad():  # the last x̂0 is the finished image (measured: the same scores)
        torch.testing.assert_close(teacher(rollouts.x0_images[:, -1], rollouts.prompts), rollouts.teacher_final,
                                   atol=1e-4, rtol=0)


def test_train_reward_noise_aware_command_records_the_generator_it_read(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "student"
    main(["train-reward", "noise-aware", "--model", str(WORLD_SD3), "--teacher", f"clip:{WORLD_CLIP}",
          "--prompts", str(prompts), "--eval-prompts", str(prompts), "--train-images", "3",
          "--images-per-eval-prompt", "2", "--num-inference-steps", "3", "--prune-step", "1", "--steps", "1",
          "--negative-prompt", "a green triangle", "--clip-skip", "1", "--out", str(out)])
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["model"] == str(WORLD_SD3) and report["lora"] is None
    assert report["negative_prompt"] == "a green triangle" and report["clip_skip"] == 1
    assert report["num_inference_steps"] == 3 and report["held_out_images"] == 4
    assert report["held_out_prompts_trained_on"] == 2 and (report["height"], report["width"]) == (64, 64)
    world_schedule = load_adapter(str(WORLD_SD3)).schedule(3, 64, 64)
    assert report["timesteps"] == world_schedule.timesteps.tolist()
    assert len(report["spearman_student_on_x0"]) == len(report["spearman_student_on_x0_within_prompt"]) == 3
    with torch.no_grad():
        assert torch.isfinite(load_reward(f"clip:{out}")(torch.rand(1, 3, 32, 32), ["a red circle"])).all()
    # TTSnap prunes with it only at the settings whose x̂0s it learned from (there a step is the same noise level)
    adapter, student = load_adapter(str(WORLD_SD3), clip_skip=1), load_reward(f"clip:{out}")
    teacher = load_reward(f"clip:{WORLD_CLIP}")
    trained = dict(num_inference_steps=3, guidance_scale=2.0, negative_prompt="a green triangle")
    run = dict(num_seeds=2, prune_steps=[1], keep=[0.5])
    assert len(ttsnap(adapter, "a red circle", teacher, student, **run, **trained).details["survivors"][0]) == 1
    # The size and the model's options shape the x̂0s too: the model at its default CLIP layer, or at 32×32
    with pytest.raises(ValueError, match=re.escape("the student learned from x̂0s made with clip_skip 1, and this "
                                                   "run's is None (None: the model's default)")):
        ttsnap(load_adapter(str(WORLD_SD3)), "a red circle", teacher, student, **run, **trained)
    with pytest.raises(ValueError, match="made with height 64, and this run's is 32"):
        ttsnap(adapter, "a red circle", teacher, student, **run, **trained, height=32, width=32)
    # Any sequence of steps, as ttsnap takes them (an array's truth value was asked for once)
    check_steering(type(adapter), ["a red circle"], teacher, "ttsnap", prune_reward=student,
                   **dict(run, prune_steps=np.array([1, 2]), keep=[0.5, 0.5]), **trained)
    learned = (f"prune reward clip:{out}: the student learned from x̂0s of 3-step runs at guidance 2.0, negative "
               "prompt 'a green triangle', from step 1 on; ")
    for changed, named in [({"num_inference_steps": 4}, "this run has 4 steps"), ({"guidance_scale": 3.0},
                           "at guidance 3.0"), ({"negative_prompt": None}, "at guidance 2.0,"),
                           ({"prune_steps": [0]}, "pruning from step 0")]:
        with pytest.raises(ValueError, match=re.escape(learned) + f".*{named}"):
            ttsnap(adapter, "a red circle", teacher, student, **{**run, **trained, **changed})
        for combined in (f"clip:{out}=2", f"jpeg=0.1,clip:{out}"):  # a student among weighted terms is checked too
            with pytest.raises(ValueError, match=re.escape(f"prune reward clip:{out}") + f".*{named}"):
                ttsnap(adapter, "a red circle", teacher, load_reward(combined), **{**run, **trained, **changed})
    # Another schedule at the same steps (another model, or a size a shift depends on): other noise levels
    adapter.pipe.scheduler = type(adapter.pipe.scheduler).from_config(adapter.pipe.scheduler.config, shift=6.0)
    with pytest.raises(ValueError, match=r"learned from x̂0s at the timesteps \[1000.0, 751.12, 8.93\], and this "
                                         r"run's are \[1000.0, 858.6"):
        ttsnap(adapter, "a red circle", teacher, student, **run, **trained)
    with pytest.raises(ValueError, match=r"prune steps must be increasing step indices in \[0, 3\), got \[1.5\]"):
        ttsnap(adapter, "a red circle", teacher, student, **{**run, "prune_steps": [1.5]}, **trained)
    report_file = out / REPORT_FILE
    report_file.write_text(report_file.read_text()[:50])  # a report cut short
    with pytest.raises(ValueError, match=re.escape(f"{report_file}: not a noise-aware student's report")):
        ttsnap(adapter, "a red circle", teacher, student, **run, **trained)


@pytest.mark.parametrize("flags, named", [
    (["--negative-prompt", "blurry", "--guidance", "1"], "--negative-prompt"),
    (["--true-cfg-scale", "2"], "--true-cfg-scale"),
    (["--lora", "no/such/folder"], "--lora"),
    (["--prompts", "no/such/prompts.txt"], "--prompts: 'no/such/prompts.txt' is neither shapes:SPLIT nor a file"),
    (["--eval-prompts", "shapes:dev"], "--eval-prompts: 'shapes:dev'"),
    (["--teacher", "clip:assets/world/clip,jpeg"], "--teacher must be one unweighted term, clip:PATH or pickscore:"),
    (["--train-images", "1"], "--train-images: distillation needs at least 2 trajectories, got 1"),
    (["--teacher", "clip:assets/world/clip=2"], "--teacher must be one unweighted term, clip:PATH or pickscore:PATH, "
                                                "got 'clip:assets/world/clip=2'"),
])
def test_train_reward_noise_aware_refuses_bad_generator_options_before_loading(tmp_path, monkeypatch, flags, named):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    with pytest.raises(SystemExit, match=named):
        main(["train-reward", "noise-aware", "--out", str(tmp_path / "student"), *flags])


def test_train_reward_noise_aware_refuses_inputs_inside_the_out_folder_it_replaces(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    out = tmp_path / "student"  # an earlier student's folder, which a new one may replace
    out.mkdir()
    (out / "noise_aware.json").write_text("{}")
    (out / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit, match=r"--prompts: .*prompts.txt lies inside --out .*student, which the output "
                                         "replaces whole"):
        main(["train-reward", "noise-aware", "--out", str(out), "--prompts", str(out / "prompts.txt")])
    assert (out / "prompts.txt").is_file()
    (out / "lora").mkdir()  # a LoRA kept there was deleted with the earlier student
    with pytest.raises(SystemExit, match=r"--lora: .*lora lies inside --out .*student, which the output"):
        main(["train-reward", "noise-aware", "--out", str(out), "--lora", str(out / "lora")])
    assert (out / "lora").is_dir()


def test_train_reward_noise_aware_refuses_an_out_folder_holding_other_files_before_loading(tmp_path, monkeypatch):
    """The student replaces its folder whole: a folder that is no earlier student would lose its files."""
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out: .*notes holds other files"):
        main(["train-reward", "noise-aware", "--out", str(tmp_path / "notes")])


@pytest.mark.parametrize("kind, flags, message", [
    ("artifact", ["--data", "set", "--prune-step", "3"], "--prune-step is an option of train-reward noise-aware"),
    ("noise-aware", ["--holdout", "0.5", "--data", "set"], "--data, --holdout are options of train-reward artifact"),
])
def test_train_reward_refuses_the_options_of_the_other_kind_before_loading(tmp_path, monkeypatch, kind, flags,
                                                                          message):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    monkeypatch.setattr("align_diffusion.rewards.spec.load_reward", no_loading)
    monkeypatch.setattr("align_diffusion.rewards.artifact.train_artifact_reward", no_loading)
    with pytest.raises(SystemExit, match=message):
        main(["train-reward", kind, "--out", str(tmp_path / "reward"), *flags])


def test_the_student_keeps_the_processor_its_teacher_scored_with(tmp_path):
    """PickScore reads images with another model's processor: the student folder must hold that one."""
    processor = AutoProcessor.from_pretrained(WORLD_CLIP)
    processor.image_processor.image_mean = [0.25, 0.5, 0.75]
    processor.save_pretrained(tmp_path / "processor")
    teacher = ClipScore(str(WORLD_CLIP), processor=str(tmp_path / "processor"))
    save_student(teacher, tmp_path / "student", {})
    saved = AutoProcessor.from_pretrained(tmp_path / "student").image_processor
    assert list(saved.image_mean) == [0.25, 0.5, 0.75]
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert load_reward(f"clip:{tmp_path / 'student'}")(image, ["a red circle"]) == teacher(image, ["a red circle"])


def test_a_student_save_cut_short_leaves_the_earlier_student_whole(tmp_path, monkeypatch):
    teacher = ClipScore(str(WORLD_CLIP))
    save_student(teacher, tmp_path / "student", {"round": 1})
    saved = {path.name: path.read_bytes() for path in (tmp_path / "student").iterdir()}
    modeling = transformers.modeling_utils  # save_pretrained writes the weights with its safe_save_file
    monkeypatch.setattr(modeling, "safe_save_file", interrupted_halfway(modeling.safe_save_file))
    with pytest.raises(KeyboardInterrupt):
        save_student(teacher, tmp_path / "student", {"round": 2})
    assert {path.name: path.read_bytes() for path in (tmp_path / "student").iterdir()} == saved
    # Saved through a link to a folder, twice: the link stays and points at the new student.
    monkeypatch.undo()
    (tmp_path / "link").symlink_to(tmp_path / "student")
    for round_ in (3, 4):
        save_student(teacher, tmp_path / "link", {"round": round_})
        assert (tmp_path / "link").is_symlink()
        assert json.loads((tmp_path / "student" / REPORT_FILE).read_text()) == {"round": round_}


def test_a_report_holding_a_nan_agreement_is_strict_json(tmp_path):
    """Spearman of scores that do not vary (one image per held-out prompt, within prompt) is NaN: null in the file."""
    save_student(load_reward(f"clip:{WORLD_CLIP}"), tmp_path / "student", {"within_prompt": [math.nan, 0.5]})
    text = (tmp_path / "student" / REPORT_FILE).read_text()
    assert json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token}")) == {"within_prompt": [None, 0.5]}
