"""Builds every asset of the shapes world from one seed: `align-diffusion build-world --out assets/world`.

Order: the CLIP (its text tower conditions both generators), the DINO-format encoder, the VAE, the SD3-format
flow-matching generator, the SD-format ε-prediction generator. Each asset is saved with its stock
`save_pretrained` as soon as it is trained, into a temporary folder renamed into place once whole, so an
interrupted build keeps what it finished (and no half-saved asset) and `--only` can redo the rest. A subset rebuilt
with `--only` is the seed's for that subset, but its generators differ from a full build's: their initial weights
and the dataset's latents are drawn from the random stream the earlier stages of the same build leave.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, BitImageProcessor, CLIPImageProcessor, CLIPModel

from align_diffusion.files import write_folder_atomically, write_text_atomically
from align_diffusion.models.base import missing_c_compiler, native_bf16
from align_diffusion.names import WORLD_ASSETS
from align_diffusion.world.data import to_tensor
from align_diffusion.world.encoders import clip_prompt_accuracy, train_clip, train_dino
from align_diffusion.world.evaluate import shapes_eval
from align_diffusion.world.generators import (
    encode_dataset,
    standardize_latents,
    train_sd,
    train_sd3,
    train_vae,
    world_sd3_pipeline,
    world_sd_pipeline,
)
from align_diffusion.world.prompts import split_prompts
from align_diffusion.world.render import render_prompt

# Both encoders read 64×64 images scaled to [-1, 1]: (x / 255 - 0.5) / 0.5.
IMAGE_PROCESSING = dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                        image_std=[0.5] * 3)


@dataclass
class BuildPlan:
    """Training steps per asset, and how the VAE and the SD3 generator train: under bfloat16 autocast (`bf16`, see
    `fit`; by default where the CPU computes bfloat16 in hardware, as the shipped assets' build machines did: on one
    that emulates it a step takes 10-25× as long) with their losses `torch.compile`d (`torch_compile`; needs a C++
    compiler, and pays off only over hundreds of steps). The default plan is the one the shipped assets come from;
    assets/README.md has its measured build (per-step times differ by up to 2× between the machines of different
    sessions)."""

    clip_steps: int = 400
    dino_steps: int = 300
    vae_steps: int = 1200
    sd3_steps: int = 4000
    sd_steps: int = 1500
    dataset_size: int = 40000
    bf16: bool = field(default_factory=lambda: native_bf16("cpu"))
    torch_compile: bool = True


QUICK_PLAN = BuildPlan(clip_steps=20, dino_steps=10, vae_steps=20, sd3_steps=20, sd_steps=20, dataset_size=512,
                       bf16=False, torch_compile=False)


@torch.no_grad()
def vae_reconstruction_strict(vae: AutoencoderKL, per_prompt: int = 4) -> float:
    """ShapesEval strict accuracy of the VAE's reconstructions of test-split renders: a ceiling for the
    generators trained on its latents."""
    prompts = [p for p in split_prompts("test") for _ in range(per_prompt)]
    images = to_tensor([render_prompt(p, seed) for seed, p in enumerate(prompts)])
    reconstructions = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return shapes_eval(prompts, (reconstructions / 2 + 0.5).clamp(0, 1))["overall_strict"]


def compile_problem(plan: BuildPlan, only, option: str = "BuildPlan.torch_compile") -> str | None:
    """The error, naming `option`, when the plan compiles the assets of `only` it would train (the VAE and the SD3
    generator) and no C/C++ compiler is on PATH; else None."""
    if plan.torch_compile and {"vae", "sd3"} & set(only):
        return missing_c_compiler(option)
    return None


def build_world(out: str | Path, seed: int = 0, plan: BuildPlan | None = None, only=WORLD_ASSETS, log=print) -> dict:
    """Trains and saves the assets named in `only` under `out` (default plan: `BuildPlan()`); returns a report of
    times and metrics."""
    plan = plan or BuildPlan()
    unknown = set(only) - set(WORLD_ASSETS)
    if unknown:
        raise ValueError(f"unknown assets {sorted(unknown)}; choose from {WORLD_ASSETS}")
    out = Path(out)
    generators = {"sd3", "sd"} & set(only)
    # The generators train on the CLIP's text tower and the VAE's latents: loaded from `out` when not built now.
    missing = [name for name in ("clip", "vae") if generators and name not in only and not (out / name).is_dir()]
    if missing:
        built = [name for name in ("sd3", "sd") if name in generators]
        raise FileNotFoundError(f"{out} has no {' and no '.join(missing)} folder, which {' and '.join(built)} "
                                f"{'trains' if len(built) == 1 else 'train'} on: build {' and '.join(missing)} first "
                                "(add to --only)")
    if error := compile_problem(plan, only):
        raise RuntimeError(error)
    out.mkdir(parents=True, exist_ok=True)
    # Each stage seeds itself, but a generator's initial weights and the dataset's latents are drawn from the global
    # stream the stages before leave: seeded here, a build of the same subset is the seed's too (a full build's first
    # draw is the CLIP's, which seeds itself, so it is unchanged). Reseeding before each draw would make a subset
    # match the full build, but would no longer rebuild the shipped generators.
    torch.manual_seed(seed)
    report = {"seed": seed, "plan": asdict(plan), "seconds": {}, "built_with": {}}
    start = time.time()
    log(f"bfloat16 autocast {'on' if plan.bf16 else 'off'}, torch.compile {'on' if plan.torch_compile else 'off'}")

    def write_report():
        write_text_atomically(out / "build_report.json", json.dumps(merged_report(out, report), indent=1))

    def saved(name, metric=None, measure=None):
        """Records the asset just saved (its seconds, seed and plan) at once, so a build stopped while it is
        measured names the new asset's plan, not the one it replaced; then its `metric` by `measure()`."""
        report["seconds"][name] = round(time.time() - start - sum(report["seconds"].values()), 1)
        report["built_with"][name] = {"seed": seed, "plan": asdict(plan)}
        if metric is not None:
            report[metric] = None  # not the score of the asset this one replaced, until measured
        write_report()
        log(f"== {name} saved to {out / name} ({report['seconds'][name]:.0f}s)")
        if metric is not None:
            began = time.time()
            report[metric] = measure()
            report["seconds"][name] = round(report["seconds"][name] + time.time() - began, 1)  # measuring, too
            write_report()

    if "clip" in only:
        clip, tokenizer = train_clip(plan.clip_steps, seed=seed, log=log)

        def save_clip(folder: Path) -> None:
            clip.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            CLIPImageProcessor(**IMAGE_PROCESSING).save_pretrained(folder)

        write_folder_atomically(out / "clip", save_clip)
        saved("clip", "clip_test_accuracy_6way", lambda: clip_prompt_accuracy(clip, tokenizer))
    elif generators:
        clip, tokenizer = CLIPModel.from_pretrained(out / "clip").eval(), AutoTokenizer.from_pretrained(out / "clip")
    if "dino" in only:
        # float16 on disk to keep the assets small; its readers (the DINO and artifact rewards) ask for a dtype.
        dino = train_dino(plan.dino_steps, seed=seed, log=log).half()

        def save_dino(folder: Path) -> None:
            dino.save_pretrained(folder)
            BitImageProcessor(**IMAGE_PROCESSING).save_pretrained(folder)

        write_folder_atomically(out / "dino", save_dino)
        saved("dino")
    if "vae" in only:
        vae = train_vae(plan.vae_steps, seed=seed, log=log, bf16=plan.bf16, torch_compile=plan.torch_compile)
        write_folder_atomically(out / "vae", vae.save_pretrained)
        saved("vae", "vae_reconstruction_strict", lambda: vae_reconstruction_strict(vae.eval()))
    if generators:
        vae = AutoencoderKL.from_pretrained(out / "vae").eval()
        dataset = encode_dataset(vae, plan.dataset_size, seed=seed, log=log)
    if "sd3" in only:
        pipe = train_sd3(world_sd3_pipeline(vae, clip, tokenizer), plan.sd3_steps, dataset, seed=seed, log=log,
                         bf16=plan.bf16, torch_compile=plan.torch_compile)
        # Stored in float16 to keep the assets small; `from_pretrained` loads it back as float32.
        pipe.transformer.to(torch.float16)
        write_folder_atomically(out / "sd3", pipe.save_pretrained)
        saved("sd3")
    if "sd" in only:
        sd_vae, sd_latents = standardize_latents(vae, dataset[1])
        pipe = world_sd_pipeline(sd_vae, clip, tokenizer)
        train_sd(pipe, plan.sd_steps, (dataset[0], sd_latents), seed=seed, log=log)
        pipe.unet.to(torch.float16)  # as the SD3 transformer: float16 on disk, float32 when loaded
        write_folder_atomically(out / "sd", pipe.save_pretrained)
        saved("sd")
    report["total_seconds"] = round(time.time() - start, 1)
    return report


def held_assets(out: str | Path) -> list[str]:
    """The asset folders a world folder `out` holds."""
    return [name for name in WORLD_ASSETS if (Path(out) / name).is_dir()]


def built_quick(out: str | Path) -> bool:
    """Whether every asset of the world in `out` was built with QUICK_PLAN's steps, by its build_report.json (the
    shipped world has none; one written before it recorded each asset's plan names the last build's)."""
    def steps(plan: dict) -> dict:
        return {name: value for name, value in plan.items() if name not in ("bf16", "torch_compile")}

    try:
        report = json.loads((Path(out) / "build_report.json").read_text(encoding="utf-8"))
        plans = [report.get("built_with", {}).get(name, report)["plan"] for name in held_assets(out)]
        return all(steps(plan) == steps(asdict(QUICK_PLAN)) for plan in plans)
    except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return False


def merged_report(out: Path, report: dict) -> dict:
    """This build's report merged into the one already in `out`: the rebuilt assets' seconds, seed and plan
    (`built_with`) and metrics replace theirs, total_seconds sums every asset's, and seed and plan are this
    build's."""
    path = out / "build_report.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    seconds = {**earlier.get("seconds", {}), **report["seconds"]}
    built_with = {**earlier.get("built_with", {}), **report["built_with"]}
    return {**earlier, **report, "seconds": seconds, "built_with": built_with,
            "total_seconds": round(sum(seconds.values()), 1)}
