"""Noise-aware rewards (TTSnap): a student copy of a reward model that scores the decoded x̂0 of an intermediate
denoising step, trained to predict what the teacher will say about the finished image.

Early x̂0s are blurred averages of the images the state can still become, and a reward trained on clean images
ranks them poorly; pruning seeds early needs a reward that ranks them by their outcome. Self-distillation: for
sampled trajectories, the student's score of x̂0_t regresses (MSE) onto the teacher's score of the final image,
with a curriculum from the last (low-noise) steps to the earliest ones. The metric, per step, is the Spearman rank
correlation between a score of x̂0_t and the teacher's score of the final image, over held-out trajectories: pooled
over all of them, and within each prompt's own (what pruning one prompt's seeds needs), averaged over prompts.

Teachers are the transformers-CLIP rewards (`clip:`, `pickscore:`); the student is saved as a CLIP model folder, so
`clip:OUT` (or `pickscore:OUT`) loads it as a reward like any other.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align_diffusion.files import check_output_folder, write_folder_atomically
from align_diffusion.models.base import PipelineAdapter, is_whole_number
from align_diffusion.rewards.clip import _TransformersClip
from align_diffusion.sampling.folder import json_safe
from align_diffusion.sampling.loop import sample

REPORT_FILE = "noise_aware.json"


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, tied values sharing their mean rank (CLIPScore's clamp at 0 ties many early x̂0s)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts
    return (first + (counts - 1) / 2).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation, with average ranks for ties; NaN when a score is NaN."""
    if torch.isnan(a).any() or torch.isnan(b).any():
        return math.nan
    return float(torch.corrcoef(torch.stack([average_ranks(a), average_ranks(b)]))[0, 1])


@dataclass
class Rollouts:
    prompts: list[str]
    # (B, T, 3, h, w) decoded x̂0 per step in [0, 1], at the size the teacher's processor resizes the images to
    # where that is smaller (its score of them is its score of the full-size x̂0s)
    x0_images: torch.Tensor
    teacher_final: torch.Tensor  # (B,) the teacher's score of each finished image
    # What the trajectories were sampled with (`collect` fills it in): steps, guidance, negative prompt, size and
    # the denoiser's timesteps
    run: dict = field(default_factory=dict)


@torch.no_grad()
def collect(adapter: PipelineAdapter, teacher, prompts: list[str], num_images_per_prompt: int,
            num_inference_steps: int, guidance_scale: float, seed: int, batch_size: int = 32,
            negative_prompt: str | None = None) -> Rollouts:
    """ODE trajectories of the prompts, their decoded x̂0 per step and the teacher's final scores."""
    per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
    height, width = adapter.image_size(None, None)
    schedule = adapter.schedule(num_inference_steps, height, width)
    smaller = math.prod(teacher.transform.resized_size(height, width)) < height * width
    x0s, finals = [], []
    for start in tqdm(range(0, len(per_image), batch_size), desc="trajectories", leave=False):
        chunk = per_image[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        trajectory = sample(adapter, chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            negative_prompt=negative_prompt, generators=generators)
        # One step's images at a time, kept on the CPU at the size the teacher sees: a run's 512 trajectories of
        # 10 steps at 1024² would take 60 GiB, at 224² 3 GiB.
        x0s.append(torch.stack([_as_kept(adapter.decode(trajectory.pred_x0[:, t]), teacher, smaller)
                                for t in range(trajectory.pred_x0.shape[1])], dim=1))
        finals.append(teacher(trajectory.images, chunk).cpu())
    run = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
           "negative_prompt": negative_prompt, "height": height, "width": width,
           "timesteps": schedule.timesteps.tolist()}
    return Rollouts(per_image, torch.cat(x0s), torch.cat(finals), run)


def _as_kept(images: torch.Tensor, teacher: _TransformersClip, smaller: bool) -> torch.Tensor:
    """Decoded x̂0s as `collect` keeps them: on the CPU, resized as the teacher resizes (`smaller`: that shrinks
    them)."""
    return (teacher.transform.resized(images) if smaller else images).cpu()


def step_scores(reward, rollouts: Rollouts, batch_size: int = 64) -> torch.Tensor:
    """(B, T): `reward` of each trajectory's x̂0 at each step."""
    with torch.no_grad():
        return torch.stack([
            torch.cat([reward(rollouts.x0_images[start : start + batch_size, t],
                              rollouts.prompts[start : start + batch_size]).cpu()
                       for start in range(0, len(rollouts.prompts), batch_size)])
            for t in range(rollouts.x0_images.shape[1])], dim=1)


def step_agreement(scores: torch.Tensor, rollouts: Rollouts) -> dict[str, list[float]]:
    """Per step t, Spearman(scores at t, teacher(final)): "pooled" over all trajectories, and "within_prompt", the
    mean over prompts of it among each prompt's own trajectories (prompts whose scores all tie left out). Pruning
    ranks the seeds of one prompt, which only the second measures; the first also credits telling prompts apart.
    A trajectory without a finite score at t or a finite final score is left out of step t (one would make the
    whole step's figure NaN)."""
    final = rollouts.teacher_final
    pooled, within = [], []
    for t in range(scores.shape[1]):
        scored = torch.isfinite(scores[:, t]) & torch.isfinite(final)
        groups = {}
        for k, prompt in enumerate(rollouts.prompts):
            if scored[k]:
                groups.setdefault(prompt, []).append(k)
        each = [spearman(scores[group, t], final[group]) for group in groups.values() if len(group) > 1]
        each = [value for value in each if not math.isnan(value)]
        within.append(sum(each) / len(each) if each else math.nan)
        pooled.append(spearman(scores[scored, t], final[scored]) if int(scored.sum()) > 1 else math.nan)
    return {"pooled": pooled, "within_prompt": within}


@dataclass
class NoiseAwareTraining:
    steps_per_stage: int = 60
    batch_size: int = 64
    lr: float = 1e-4
    earliest_step: int = 0  # the curriculum runs from the last step down to this one
    seed: int = 0


def distill(teacher: _TransformersClip, rollouts: Rollouts, settings: NoiseAwareTraining, log=print):
    """A student copy of `teacher` trained to score x̂0_t like the teacher scores the final image."""
    if not isinstance(teacher, _TransformersClip):
        raise ValueError(f"noise-aware distillation takes a CLIP-family teacher (clip:, pickscore:), got "
                         f"{teacher.name}")
    for name in ("steps_per_stage", "batch_size"):
        if not is_whole_number(value := getattr(settings, name)) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if not (isinstance(settings.lr, int | float) and 0 < settings.lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {settings.lr!r}")
    student = copy.deepcopy(teacher)
    student.model.vision_model.requires_grad_(True)
    student.model.visual_projection.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    num_steps = rollouts.x0_images.shape[1]
    if not is_whole_number(settings.earliest_step) or not 0 <= settings.earliest_step < num_steps:
        raise ValueError(f"earliest_step must lie in [0, {num_steps}), got {settings.earliest_step}")
    # A trajectory the teacher could not score (or that diverged on the way) teaches nothing: left out, and said.
    usable = torch.isfinite(rollouts.teacher_final) & torch.isfinite(rollouts.x0_images).flatten(1).all(1)
    if usable.sum() < 2:
        raise ValueError(f"noise-aware distillation needs at least 2 trajectories with finite teacher scores and "
                         f"x̂0s, got {int(usable.sum())} of {len(usable)}")
    if not usable.all():
        log(f"left out {int((~usable).sum())} of {len(usable)} trajectories: a teacher score or an x̂0 pixel is "
            "not finite")
        rollouts = Rollouts([p for p, keep in zip(rollouts.prompts, usable.tolist()) if keep],
                            rollouts.x0_images[usable], rollouts.teacher_final[usable], rollouts.run)
    num_images = len(rollouts.prompts)
    target_scale = rollouts.teacher_final.std().clamp(min=1e-6)
    stages = list(range(num_steps - 1, settings.earliest_step - 1, -1))
    for stage, first_step in enumerate(stages):
        student.train()
        for _ in range(settings.steps_per_stage):
            images = torch.randint(0, num_images, (settings.batch_size,), generator=generator)
            steps = torch.randint(first_step, num_steps, (settings.batch_size,), generator=generator)
            # Below CLIPScore's clamp at 0 no gradient would come back: the student learns the unclamped score.
            scores = student.linear_score(rollouts.x0_images[images, steps],
                                          [rollouts.prompts[i] for i in images.tolist()])
            target = rollouts.teacher_final[images].to(scores)
            loss = (((scores - target) / target_scale) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log(f"stage {stage + 1}/{len(stages)}: steps {first_step}..{num_steps - 1}, loss {loss.item():.4f}")
    return student.eval().requires_grad_(False)


def save_student(student: _TransformersClip, out: str | Path, report: dict) -> None:
    """The student's CLIP model with the processor the teacher scored with (PickScore's is another model's), and
    the metrics report, in place of the folder `out`."""
    check_output_folder(out, REPORT_FILE)

    def write(folder: Path) -> None:
        student.model.save_pretrained(folder)
        student.processor.save_pretrained(folder)
        # An agreement of a step whose scores do not vary is NaN: null, which strict JSON readers take
        (folder / REPORT_FILE).write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))

    write_folder_atomically(out, write)


def student_reports(reward) -> dict[str, dict]:
    """The training report of each noise-aware student (loaded from a folder) among `reward`'s terms, by its spec."""
    from align_diffusion.rewards.spec import WeightedRewards

    reports = {}
    for term in reward.rewards if isinstance(reward, WeightedRewards) else [reward]:
        folder = getattr(getattr(getattr(term, "model", None), "config", None), "_name_or_path", None)
        report = Path(folder) / REPORT_FILE if folder else None
        if report is not None and report.is_file():
            try:
                reports[term.spec] = json.loads(report.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{report}: not a noise-aware student's report ({error})") from None
    return reports


def unfit_run(report: dict, num_inference_steps: int, guidance_scale: float, negative_prompt: str | None,
              first_prune_step: int | None, timesteps=None, made_with: dict | None = None) -> str | None:
    """Why a student trained as `report` says cannot score the x̂0s of a run with these settings (None when it can):
    a step index is a noise level only at one number of steps (and of one model's schedule at one image size: the
    run's `timesteps`, where known, are compared with those the report records), and guidance, the negative
    prompt, the image size and the model's options shape the x̂0s (`made_with`, where known: height, width and the
    options as a record keeps them, each compared where the report records it); before its earliest step it saw no
    x̂0 at all."""
    trained = (report.get("num_inference_steps"), report.get("guidance_scale"), report.get("negative_prompt") or None)
    earliest = report.get("settings", {}).get("earliest_step", 0)
    if trained == (num_inference_steps, guidance_scale, negative_prompt or None) and (
            first_prune_step is None or first_prune_step >= earliest):
        for key, value in (made_with or {}).items():
            if key in report and report[key] != value:
                return (f"the student learned from x̂0s made with {key} {report[key]!r}, and this run's is {value!r} "
                        "(None: the model's default): run with the settings it learned from")
        learned = report.get("timesteps")
        if timesteps is None or learned is None or torch.allclose(
                torch.as_tensor(timesteps, dtype=torch.float64), torch.tensor(learned, dtype=torch.float64),
                rtol=1e-4, atol=1e-3):
            return None
        return (f"the student learned from x̂0s at the timesteps {[round(t, 2) for t in learned]}, and this run's "
                f"are {[round(float(t), 2) for t in timesteps]} (another model's schedule, or another image size, "
                "at the same number of steps): run the model and size it learned from, or train a student on this "
                "model (at its default size, the one train-reward noise-aware samples)")
    described = ", negative prompt {!r}"
    return (f"the student learned from x̂0s of {trained[0]}-step runs at guidance {trained[1]}"
            f"{described.format(trained[2]) if trained[2] else ''}, from step {earliest} on; this run has "
            f"{num_inference_steps} steps at guidance {guidance_scale}"
            f"{described.format(negative_prompt) if negative_prompt else ''}"
            f"{'' if first_prune_step is None else f', pruning from step {first_prune_step}'} (at another number "
            "of steps a step index is another noise level): run with its settings, or train a student for these")


def report_dict(settings: NoiseAwareTraining, rollouts: Rollouts, before: dict, after: dict, **extra) -> dict:
    """The report saved with a student: its settings, what its training `rollouts` were sampled with (which
    `unfit_run` compares a run with), and the teacher's and its step agreements."""
    return {"settings": asdict(settings), **rollouts.run, "spearman_teacher_on_x0": before["pooled"],
            "spearman_student_on_x0": after["pooled"],
            "spearman_teacher_on_x0_within_prompt": before["within_prompt"],
            "spearman_student_on_x0_within_prompt": after["within_prompt"], **extra}
