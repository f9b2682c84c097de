"""Sample folders: `images/00000.png …` plus one `metadata.jsonl` line per image, and `index.html` to review them.

Each image is written, then its metadata line appended and flushed, so an interrupted run keeps every image it
finished. Image k (prompt-major) is seeded `seed + k` whatever the batch size. A record holds `file`, `prompt`,
`seed`, the settings (the reward's spec among them), optionally `rewards` ({name: score or null}) and
`shapes_strict` (ShapesEval's verdict).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from align_diffusion.files import check_output_folder, folder_problem, write_text_atomically
from align_diffusion.models import adapter_class
from align_diffusion.models.base import MODEL_OPTIONS, PipelineAdapter, recorded_model_options
from align_diffusion.rewards.base import Reward, prompt_list
from align_diffusion.sampling.loop import Settings, check_count, checked_seed, resolve_settings, sample


IMAGE_NAME = re.compile(r"\d{5,}\.png")  # the names `SampleFolder.add` gives


class SampleFolder:
    """Writes images and their metadata records into a sample folder, one image at a time.

    A run replaces what an earlier run wrote to the folder (its images, metadata, review page and the side-by-side
    pages of its images, `compare-*.html`) just before its first image, or at its end if it wrote none, so a smaller
    or interrupted run never shows stale images, and a run that fails before its first image (a bad option, an
    unreachable reward) leaves the earlier one whole. Other files in the folder stay. A run that stops halfway
    (interrupted, or failing) leaves the review page of the images it finished.
    """

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.records: list[dict] = []
        self._metadata = None

    def continue_earlier_run(self) -> list[dict]:
        """Keeps what an earlier, interrupted run wrote (the records `read_records` reads: a last one cut short by
        the interruption is dropped, its image written again) and appends after it; returns the kept records. The
        side-by-side pages of the earlier images go: they would miss the new ones. ValueError, before anything
        changes, for a kept record whose image is gone."""
        from align_diffusion.gallery.page import read_records

        metadata = self.root / "metadata.jsonl"
        self.records = read_records(self.root)
        if missing := next((r["file"] for r in self.records if not (self.root / r["file"]).is_file()), None):
            raise ValueError(f"resume: {self.root / missing}, an image of the earlier run, is gone; sample the "
                             "folder again (overwrite) or into a new one")
        self._remove_comparisons()
        text = metadata.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # the last line is kept when it parses, as read_records keeps it
            finished, _, last = text.rpartition("\n")
            try:
                json.loads(last)
                complete = text + "\n"
            except json.JSONDecodeError:
                complete = finished + "\n" if finished else ""
            write_text_atomically(metadata, complete)
        self._metadata = open(metadata, "a", encoding="utf-8")
        return self.records

    def _replace_earlier_run(self) -> None:
        images = self.root / "images"
        images.mkdir(parents=True, exist_ok=True)
        for path in images.iterdir():
            if IMAGE_NAME.fullmatch(path.name):
                path.unlink()
        (self.root / "index.html").unlink(missing_ok=True)
        (self.root / "eval.json").unlink(missing_ok=True)  # an evaluation's summary of the earlier images
        self._remove_comparisons()
        self._metadata = open(self.root / "metadata.jsonl", "w", encoding="utf-8")

    def _remove_comparisons(self) -> None:
        for page in self.root.glob("compare-*.html"):  # side-by-side pages of the earlier images against others
            page.unlink()

    def add(self, image: Image.Image, record: dict) -> dict:
        file = f"images/{len(self.records):05d}.png"
        record = json_safe({"file": file, **record})
        line = json.dumps(record, allow_nan=False) + "\n"  # first: a record that cannot be written replaces nothing
        if self._metadata is None:  # the first image is saved before the earlier run goes: a full disk keeps it
            new = self.root / "images" / f".new-{Path(file).name}"
            new.parent.mkdir(parents=True, exist_ok=True)
            try:
                image.save(new, format="PNG")
            except BaseException:
                new.unlink(missing_ok=True)
                raise
            self._replace_earlier_run()
            os.replace(new, self.root / file)
        else:
            image.save(self.root / file)
        self._metadata.write(line)
        self._metadata.flush()
        self.records.append(record)
        return record

    def close(self) -> None:
        if self._metadata is not None:
            self._metadata.close()

    def __enter__(self) -> SampleFolder:
        return self

    def __exit__(self, error_type, *exc) -> None:
        if error_type is None and self._metadata is None:  # a run of no images replaces the earlier one too
            self._replace_earlier_run()
        self.close()
        if error_type is not None and self._metadata is not None:
            from align_diffusion.gallery import build_gallery

            try:
                build_gallery(self.root)
            except Exception as error:  # the run's own error is the one to raise
                warnings.warn(f"no review page for the images {self.root} holds: {error}", stacklevel=2)


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """ValueError, before any image is made, for an `out_dir` that cannot be written, or, without `overwrite`, one
    that holds other files but no samples, which a folder's page and images would replace (an earlier `eval.json`,
    someone's `index.html`)."""
    if not overwrite:
        check_output_folder(out_dir, "metadata.jsonl", replaced_whole=False)
    elif problem := folder_problem(out_dir):
        raise ValueError(problem)


def adapter_record(adapter: PipelineAdapter) -> dict:
    """What a folder records of the model where its caller records nothing of it (a Python call; the commands record
    the model as given, its LoRA and options too): the pipeline's name or path and its dtype, as the commands do."""
    dtype = str(adapter.dtype).removeprefix("torch.")
    return {"model": adapter.pipe.name_or_path, "dtype": None if dtype == "float32" else dtype}


def json_safe(value):
    """`value` with every NaN or infinite float, however deeply nested, as None: JSON has neither, and strict
    readers (JSON.parse, jq) refuse the bare NaN that Python writes; numbers, booleans and arrays of other types
    (numpy's, torch's) as Python's, and a mapping's keys as text, as JSON writes them."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value.item()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key if isinstance(key, str) else json.dumps(json_safe(key)): json_safe(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def reward_record(each: dict[str, torch.Tensor], index: int) -> dict[str, float | None]:
    """Image `index`'s score under each reward term, NaN (unscorable) as None."""
    return json_safe({name: float(values[index]) for name, values in each.items()})


def sample_to_folder(
    adapter: PipelineAdapter,
    prompts: list[str],
    out_dir: str | Path,
    *,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    sampler: str = "ode",
    noise_level: float | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    reward: Reward | None = None,
    extra_metadata: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> list[dict]:
    """Writes every image and its metadata (with each reward term's score when `reward` is given) to `out_dir`,
    then the review page; returns the metadata records. An image that diverged (`PipelineAdapter.diverged`, written
    black) is marked `"diverged": true`. Samples already in `out_dir` are replaced only with
    `overwrite`; with `resume`, an interrupted run of the same prompts and settings goes on after its last image
    (ValueError naming what differs otherwise)."""
    from align_diffusion.gallery import build_gallery
    from align_diffusion.rewards.spec import WeightedRewards, score_terms

    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other")
    resuming = resume and (Path(out_dir) / "metadata.jsonl").exists()
    if (Path(out_dir) / "metadata.jsonl").exists() and not (overwrite or resume):
        raise FileExistsError(f"{out_dir} already holds samples; pass overwrite=True to replace them, or resume=True "
                              "to go on with them")
    check_out_dir(out_dir, overwrite)

    prompts = prompt_list(prompts)
    check_count("num_images_per_prompt", num_images_per_prompt)
    check_count("batch_size", batch_size)
    if reward is not None:
        reward.check_prompts(prompts)
    settings = resolve_settings(adapter, sampler, num_inference_steps, guidance_scale, noise_level, height, width)
    if reward is not None:
        reward.check_size(settings.height, settings.width)
    jobs = image_jobs(prompts, num_images_per_prompt, checked_seed(seed, len(prompts) * num_images_per_prompt))
    same_run = {**settings_record(sampler, settings, negative_prompt),
                "reward": None if reward is None else reward.spec, **adapter_record(adapter), **(extra_metadata or {})}
    reward_keys = None if reward is None else reward.keys if isinstance(reward, WeightedRewards) else [reward.name]
    done = 0
    if resuming:  # checked before the folder is touched: a refused resume leaves it as it was
        from align_diffusion.gallery.page import read_records

        done = check_resumable(read_records(out_dir), jobs, json_safe(same_run), reward_keys)
    with SampleFolder(out_dir) as folder, tqdm(total=len(jobs), initial=done, desc="images",
                                               disable=not progress) as bar:
        if resuming:
            folder.continue_earlier_run()
        for start in range(done, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            batch_prompts = [prompt for prompt, _ in batch]
            trajectory = sample(
                adapter,
                batch_prompts,
                generators=[torch.Generator("cpu").manual_seed(image_seed) for _, image_seed in batch],
                sampler=sampler,
                negative_prompt=negative_prompt,
                **asdict(settings),
            )
            each = score_terms(reward, trajectory.images, batch_prompts)[1] if reward is not None else None
            diverged = adapter.diverged(trajectory.images)
            for k, ((prompt, image_seed), image) in enumerate(zip(batch, adapter.to_pil(trajectory.images))):
                folder.add(image, {"prompt": prompt, "seed": image_seed, **same_run,
                                   **({"rewards": reward_record(each, k)} if each is not None else {}),
                                   **({"diverged": True} if diverged[k] else {})})
            bar.update(len(batch))
    build_gallery(out_dir)
    return folder.records


def settings_record(sampler: str, settings: Settings, negative_prompt) -> dict:
    """How images were sampled, under the keys every record of a sample folder holds (the review pages show them)."""
    return {"sampler": sampler, "noise_level": settings.noise_level, "steps": settings.num_inference_steps,
            "guidance": settings.guidance_scale, "height": settings.height, "width": settings.width,
            "negative_prompt": negative_prompt}


def image_jobs(prompts: list[str], num_images_per_prompt: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, seed) of each image a sample folder holds, in order: each prompt's images together, seeds counting
    up from `seed`."""
    return [(prompt, seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(num_images_per_prompt))]


def check_resumable(records: list[dict], jobs: list[tuple[str, int]], same_run: dict,
                    reward_keys: list[str] | None) -> int:
    """How many of `jobs` an earlier run already did; ValueError when its records are not those jobs' first ones
    under the same settings and rewards."""
    check_same_images(records, jobs, same_run)
    for record in records:
        scored = None if "rewards" not in record else list(record["rewards"])
        if scored != reward_keys:
            raise ValueError(f"resume: the earlier run scored {scored}, this one scores {reward_keys}")
    return len(records)


# Keys only one kind of folder's records hold: what made a folder a resume finds to be of the other kind
FOLDER_KINDS = {"method": "a steering run's results (align-diffusion steer)",
                "sampler": "samples (align-diffusion sample or eval)"}


def check_same_images(records: list[dict], jobs: list[tuple[str, int]], same_run: dict) -> None:
    """ValueError when `records` are not the first of `jobs`, or were made with other values of `same_run`'s keys
    (a caller that has not loaded the model yet passes the settings it knows: those given, not the defaults)."""
    ours = next((key for key in FOLDER_KINDS if key in same_run), None)
    theirs = next((key for key in FOLDER_KINDS if records and key in records[0]), None)
    if ours and theirs and ours != theirs:
        raise ValueError(f"resume: the folder holds {FOLDER_KINDS[theirs]}, and this run makes {FOLDER_KINDS[ours]}; "
                         "choose another output folder")
    if len(records) > len(jobs):
        raise ValueError(f"resume: the folder holds {len(records)} images, more than the {len(jobs)} this run makes")
    # Earlier versions recorded a model option at its default as given (an explicit 256 T5 tokens, say): as null now.
    family = adapter_class(same_run["model"]) if same_run.get("model") else None  # None: a pipeline built in memory
    for record, (prompt, seed) in zip(records, jobs):
        record = {**record, **recorded_model_options(family, {option: record[option] for option in MODEL_OPTIONS
                                                              if option in record})}
        if (record["prompt"], record.get("seed")) != (prompt, seed):
            raise ValueError(f"resume: image {record['file']} is of prompt {record['prompt']!r}, seed "
                             f"{record.get('seed')}; this run makes {prompt!r}, seed {seed} there")
        for key, value in same_run.items():
            if key not in record and value is not None:  # an option added since is None where it is not used
                raise ValueError(f"resume: the earlier run's records hold no {key!r} (an older version wrote them?); "
                                 "start over, replacing them (overwrite)")
            if record.get(key) != value:
                key, earlier, value = _first_difference(key, record.get(key), value)
                raise ValueError(f"resume: the earlier run's {key} was {_given(earlier)}, this one's is {_given(value)}"
                                 + ("; an option left at its default is recorded as not given, so resume with the "
                                    "options as the earlier run gave them" if None in (earlier, value) else ""))


def _given(value) -> str:
    return "not given (the default)" if value is None else repr(value)


def _first_difference(key: str, earlier, value) -> tuple[str, object, object]:
    """Where two differing values first differ: within dicts, the first key (dotted) whose values differ."""
    if isinstance(earlier, dict) and isinstance(value, dict):
        inner = next((k for k in sorted(earlier.keys() | value.keys()) if earlier.get(k) != value.get(k)), None)
        if inner is not None:  # else they differ only by a key one lacks and the other holds as None
            return _first_difference(f"{key}.{inner}", earlier.get(inner), value.get(inner))
    return key, earlier, value
