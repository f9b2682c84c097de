"""The `align-diffusion` console script: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from align_diffusion.files import check_outside, check_output_folder, folder_problem, home_expanded
from align_diffusion.launch import is_main_process, launched_processes
from align_diffusion.names import (
    DEFAULT_NOISE_LEVEL, DTYPE_NAMES, FK_POTENTIALS, FK_RESAMPLING, REWARD_TOKEN_ENV, SEED_LIMIT, STEERING_METHODS,
    WORLD_ASSETS,
)

if TYPE_CHECKING:  # the parser imports no torch (see align_diffusion.names); the commands import what they run
    from align_diffusion.models.base import PipelineAdapter


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= `minimum`."""
    def whole_number(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:  # torch's CPU generator reads a seed's low 32 bits
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {value}")
    return value


def _path(text: str) -> Path:
    """A path flag's value, with a leading ~ expanded (the shell expands it only at a word's start, not in
    --out=~/…); an empty one is refused (Path("") is the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(home_expanded(text))


def _reward_spec(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (a reward spec such as shapes or clip:PATH)")
    return text


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def _share(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_negative_prompt(parser) -> None:
    parser.add_argument("--negative-prompt", default=None,
                        help="what classifier-free guidance steers away from, for every prompt (SD3, SD 1.5, SDXL; "
                             "FLUX with --true-cfg-scale)")


def add_model_options(parser) -> None:
    """The options an adapter is built with (models.base.MODEL_OPTIONS); None: the stock pipeline's default."""
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="T5 tokens per prompt, SD3 and FLUX only (default: the pipeline's, 256 / 512)")
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="CLIP layers skipped from the end when encoding prompts (SD 1.5, SDXL, SD3; default: 0)")
    parser.add_argument("--guidance-rescale", type=_finite_float, default=None,
                        help="φ in [0, 1] of rescaled classifier-free guidance (SD 1.5 / 2.x, SDXL; default: 0, off)")
    parser.add_argument("--true-cfg-scale", type=_finite_float, default=None,
                        help="FLUX's true classifier-free guidance away from --negative-prompt, beside its distilled "
                             "--guidance (default: 1, off)")


def _device(text: str) -> str:
    from align_diffusion.models.base import unusable_device

    if reason := unusable_device(text):
        raise argparse.ArgumentTypeError(reason)
    return text


def add_device(parser) -> None:
    """--device; its default, None until parsed, becomes `default_device()`."""
    parser.add_argument("--device", type=_device, default=None, help="torch device (default: cuda when torch sees "
                        "a GPU, else cpu)")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_sample_parser(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample images from prompts into a folder")
    parser.add_argument("--model", required=True, help="diffusers model id or local folder")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts")
    prompts.add_argument("--prompts-file", type=_path, help="text file with one prompt per line")
    parser.add_argument("--num-images-per-prompt", type=_positive_int, default=1)
    add_negative_prompt(parser)
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=_non_negative_float, default=None,
                        help="guidance scale (default: the model's)")
    parser.add_argument("--sampler", choices=sorted(DEFAULT_NOISE_LEVEL), default="ode")
    parser.add_argument(
        "--noise-level", type=_non_negative_float, default=None,
        help=f"SDE noise level a / η (default per sampler: {DEFAULT_NOISE_LEVEL})",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="image k (prompt-major) uses seed + k")
    parser.add_argument("--lora", type=_path, default=None, help="folder with a diffusers-format LoRA")
    parser.add_argument("--height", type=_positive_int, default=None)
    parser.add_argument("--width", type=_positive_int, default=None)
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="images per denoiser batch (default 4)")
    add_device(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    add_model_options(parser)
    parser.add_argument("--out", type=_path, required=True, help="output folder")
    parser.add_argument("--reward", type=_reward_spec, default=None,
                        help="reward spec to score every image with (shown on the review page), e.g. shapes")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace the samples already in --out")
    again.add_argument("--resume", action="store_true",
                       help="go on with an interrupted run in --out (same prompts and options), after its last image")
    parser.set_defaults(run=run_sample)


def check_model_arguments(args) -> type[PipelineAdapter] | None:
    """The checks of --model, --lora, --sampler, --height, --width and the model and guidance options that need no
    model loaded: sample, eval and steer make them before they load anything. Returns the model's family (its adapter
    class), None for a hub id not downloaded yet."""
    from align_diffusion.models import adapter_class, missing_local_model, size_problem
    from align_diffusion.models.base import MODEL_OPTIONS, model_option_problem
    from align_diffusion.sampling.loop import guidance_problem, sampler_problem

    if reason := missing_local_model(str(args.model)):  # before a reward loads, not once the model would
        raise SystemExit(f"--model: {reason}")
    if args.lora is not None and not args.lora.is_dir():
        raise SystemExit(f"--lora: no such folder {args.lora}")
    if args.lora is not None and not any((args.lora / f"pytorch_lora_weights.{ext}").is_file()
                                         for ext in ("safetensors", "bin")):
        raise SystemExit(f"--lora: {args.lora} holds no pytorch_lora_weights.safetensors (a diffusers LoRA folder, "
                         "such as a training run's lora/)")
    family = adapter_class(str(args.model))  # None for a hub id not downloaded yet: the adapter checks once loaded
    sampler = getattr(args, "sampler", None)  # steer's None: the method's default, which fits
    if family is not None and sampler is not None and (problem := sampler_problem(family.is_flow, sampler)):
        raise SystemExit(f"--sampler: {problem}")
    for option in MODEL_OPTIONS:
        if reason := model_option_problem(family, option, getattr(args, option)):
            raise SystemExit(f"--{option.replace('_', '-')}: {reason}")
    sides = {f"--{name}": getattr(args, name, None) for name in ("height", "width")}  # eval has neither
    if found := size_problem(str(args.model), sides):
        raise SystemExit(f"{found[0]}: {found[1]}, got {sides[found[0]]}")
    guidance = args.guidance if args.guidance is not None or family is None else family.default_guidance
    if problem := guidance_problem(family, guidance, args.negative_prompt, args.guidance_rescale or 0.0,
                                   args.true_cfg_scale or 1.0):
        raise SystemExit(f"--{problem[0].replace('_', '-')}: {problem[1]}")
    return family


def check_noise_level_argument(sampler: str | None, noise_level: float | None) -> None:
    from align_diffusion.sampling.loop import noise_levels_problem

    if noise_level is not None and (problem := noise_levels_problem(sampler, [noise_level])):
        raise SystemExit(f"--noise-level: {problem}")


def check_seed_argument(seed: int, images: int, first: int = 0) -> None:
    """--seed, refused before anything loads unless the generator seeds of `images` images, seed + first …, fit
    in torch's 32 bits (`checked_seed`)."""
    from align_diffusion.sampling.loop import checked_seed

    try:
        checked_seed(seed + first, images)
    except ValueError as error:
        problem = (f"the images seeded from seed + {first:,} need seed in [0, 2**32 − {first + images:,}], got {seed}"
                   if first else str(error))  # in terms of --seed, not of seed + first
        raise SystemExit(f"--seed: {problem}") from None


def load_for_command(args):
    """The adapter for --model (with --lora applied); `check_model_arguments` has checked what it could before."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from align_diffusion.models import load_adapter
    from align_diffusion.models.base import MODEL_OPTIONS
    from align_diffusion.sampling.loop import check_guidance, check_sampler

    try:  # what only the loaded model refuses: a clip skip past its encoder's layers, a negative prompt for LCM
        adapter = load_adapter(str(args.model), dtype=args.dtype, device=args.device,
                               **{option: getattr(args, option) for option in MODEL_OPTIONS})
        check_guidance(adapter, adapter.default_guidance if args.guidance is None else args.guidance,
                       args.negative_prompt)
    except ValueError as error:  # named as its flag
        option, _, reason = str(error).partition(": ")
        if option not in (*MODEL_OPTIONS, "negative_prompt"):
            raise
        raise SystemExit(f"--{option.replace('_', '-')}: {reason}") from None
    check_sampler(adapter, args.sampler)
    if args.lora is not None:
        try:
            adapter.pipe.load_lora_weights(str(args.lora))
        except RuntimeError as error:  # torch's size mismatch, with a line for every layer
            mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
            if mismatch is None:
                raise
            raise SystemExit(f"--lora: {args.lora} does not fit {args.model} (a LoRA of another architecture?): "
                             f"{mismatch}") from None
        if not any(isinstance(module, BaseTunerLayer) for component in adapter.pipe.components.values()
                   if isinstance(component, torch.nn.Module) for module in component.modules()):
            raise SystemExit(f"--lora: no layer of {args.model} took a weight of {args.lora} (a LoRA of another "
                             "architecture?)")
    return adapter


def check_image_size(args, rewards, adapter: PipelineAdapter | None = None) -> None:
    """Refuses a --height and --width (the model's default size where not given) that the model or one of `rewards`
    cannot take. Without the model loaded, checks only a size given whole against the rewards
    (`check_model_arguments` has checked each side given against the model's configs)."""
    size = args.height, args.width
    if adapter is not None:
        size = adapter.image_size(*size)
    if None in size:
        return
    try:
        if adapter is not None:
            adapter.check_size(*size)
        for reward in rewards:
            if reward is not None:
                reward.check_size(*size)
    except ValueError as error:
        defaulted = [f"{name} {value}" for name, value in zip(("height", "width"), size) if getattr(args, name) is None]
        where = f" (the model's default {' and '.join(defaulted)})" if defaulted else ""
        raise SystemExit(f"--height and --width: {error}{where}") from None


def model_record(args) -> dict:
    """What a sample, eval or steer folder records of the model, its dtype and options: as given, None for the
    default (a value that equals it included, so that a resume need not repeat it)."""
    from align_diffusion.models import adapter_class
    from align_diffusion.models.base import MODEL_OPTIONS, recorded_model_options

    options = {option: getattr(args, option) for option in MODEL_OPTIONS}
    return {"model": str(args.model), "lora": None if args.lora is None else str(args.lora),
            "dtype": None if args.dtype == "float32" else args.dtype,
            **recorded_model_options(adapter_class(str(args.model)), options)}


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    from align_diffusion.training.prompts import read_prompt_file

    if not args.prompts_file.is_file():
        what = "is a folder, not a file" if args.prompts_file.is_dir() else "no such file"
        raise SystemExit(f"--prompts-file: {args.prompts_file} {what}")
    try:
        return read_prompt_file(args.prompts_file)
    except ValueError as error:
        raise SystemExit(f"--prompts-file: {error}") from None


def check_sample_out(args) -> None:
    """Refuses an --out folder that cannot be written, and, without --overwrite, one that holds files but no samples:
    a run replaces what sample, eval and steer write (index.html, images/, eval.json, compare pages), which there
    would be someone else's (`sampling.folder.check_out_dir`)."""
    from align_diffusion.sampling.folder import check_out_dir

    if problem := folder_problem(args.out):
        raise SystemExit(f"--out: {problem}")
    try:
        check_out_dir(args.out, args.overwrite)
    except ValueError as error:
        raise SystemExit(f"--out: {error}, or pass --overwrite") from None


def note_a_fresh_start(args) -> None:
    """--resume on an --out with no earlier run starts from the beginning, which a mistyped --out would hide."""
    if args.resume and not (args.out / "metadata.jsonl").exists():
        print(f"align-diffusion {args.command}: --resume: {args.out} holds no earlier run; starting from the first "
              "prompt", file=sys.stderr)


def warn_of_diverged(args, diverged: int, total: int) -> None:
    if diverged:
        remedies = [*(["--dtype float32"] if args.dtype != "float32" else []),
                    *(["a lower --noise-level"] if args.sampler != "ode" else []), "a lower --guidance"]
        print(f"align-diffusion {args.command}: warning: {diverged} of {total} images diverged (NaN or infinite "
              'values, saved black and marked "diverged": true in metadata.jsonl); they may stay finite with '
              f"{' or '.join(remedies)}", file=sys.stderr)


def scoring_reward(flag: str, spec: str, args):
    """The reward `spec` names, loaded to score images as they are; one that trains against a run's samples (its
    head would score untrained) or needs reference images, which only `train` gives it, is refused."""
    from align_diffusion.rewards.spec import load_reward

    reward = load_reward(spec, device=args.device, dtype=args.dtype)
    if reward.trainable or reward.needs_reference:
        raise SystemExit(f"{flag}: {spec} trains against a run's samples or needs reference images, which only "
                         "train gives it (here its head would score untrained)")
    return reward


def run_sample(args) -> None:
    from align_diffusion.gallery.page import read_records
    from align_diffusion.sampling.folder import check_same_images, image_jobs, sample_to_folder

    prompts = read_prompts(args)
    if (args.out / "metadata.jsonl").exists() and not (args.overwrite or args.resume):
        raise SystemExit(f"--out: {args.out} already holds samples; pass --overwrite to replace them, or --resume to "
                         "go on with an interrupted run")
    check_sample_out(args)
    check_seed_argument(args.seed, len(prompts) * args.num_images_per_prompt)
    check_model_arguments(args)
    check_noise_level_argument(args.sampler, args.noise_level)
    note_a_fresh_start(args)
    earlier_records = []  # of the images a resumed run finished already
    jobs = image_jobs(prompts, args.num_images_per_prompt, args.seed)
    if args.resume and (args.out / "metadata.jsonl").exists():  # before anything loads, what can be told without
        earlier_records = read_records(args.out)
        given = {key: value for key, value in (("steps", args.steps), ("guidance", args.guidance),
                                               ("height", args.height), ("width", args.width),
                                               ("noise_level", args.noise_level)) if value is not None}
        known = {"sampler": args.sampler, "negative_prompt": args.negative_prompt, **given, **model_record(args)}
        check_same_images(earlier_records, jobs, known)
    reward = None if args.reward is None else scoring_reward("--reward", args.reward, args)
    if earlier_records:  # and the reward, as loaded, before the model loads
        check_same_images(earlier_records, jobs, {"reward": None if reward is None else reward.spec})
    earlier = len(earlier_records)
    try:  # sample_to_folder checks again, once the model has loaded
        if reward is not None:
            reward.check_prompts(prompts)
    except ValueError as error:
        raise SystemExit(f"{'--prompt' if args.prompt is not None else '--prompts-file'}: {error}") from None
    check_image_size(args, [reward])
    adapter = load_for_command(args)
    check_image_size(args, [reward], adapter)

    records = sample_to_folder(
        adapter,
        prompts,
        args.out,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=args.sampler,
        noise_level=args.noise_level,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        reward=reward,
        overwrite=args.overwrite,
        resume=args.resume,
        extra_metadata=model_record(args),
    )
    resumed = f" after the {earlier} it had" if earlier else ""
    print(f"wrote {len(records) - earlier} images to {args.out}{resumed}; review page {args.out / 'index.html'}")
    warn_of_diverged(args, sum(bool(r.get("diverged")) for r in records), len(records))


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score a model on a benchmark (ShapesEval on the shapes world)")
    parser.add_argument("--model", required=True, help="diffusers model id or local folder")
    parser.add_argument("--lora", type=_path, default=None, help="folder with a diffusers-format LoRA")
    parser.add_argument("--benchmark", choices=["shapes"], default="shapes")
    parser.add_argument("--split", choices=["train", "val", "test"], default="test")
    parser.add_argument("--num-images-per-prompt", type=_positive_int, default=4)
    add_negative_prompt(parser)
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=_non_negative_float, default=None,
                        help="guidance scale (default: the model's)")
    parser.add_argument("--sampler", choices=sorted(DEFAULT_NOISE_LEVEL), default="ode")
    parser.add_argument("--noise-level", type=_non_negative_float, default=None)
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per denoiser batch (default 16)")
    add_device(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    add_model_options(parser)
    parser.add_argument("--out", type=_path, required=True,
                        help="folder for eval.json (the scores), the samples and their review page index.html")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    parser.set_defaults(run=run_eval)


def run_eval(args) -> None:
    import json

    from align_diffusion.files import write_text_atomically
    from align_diffusion.world.benchmark import evaluate_shapes
    from align_diffusion.world.prompts import split_prompts

    if args.out.suffix == ".json" or args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out: expected a folder (for eval.json, the samples, index.html), got {args.out}")
    held = [name for name in ("eval.json", "metadata.jsonl") if (args.out / name).exists()]
    if held and not args.overwrite:
        raise SystemExit(f"--out: {args.out} already holds {' and '.join(held)} (an evaluation or samples); pass "
                         "--overwrite to replace them")
    check_sample_out(args)
    check_seed_argument(args.seed, len(split_prompts(args.split)) * args.num_images_per_prompt)
    check_model_arguments(args)
    check_noise_level_argument(args.sampler, args.noise_level)
    adapter = load_for_command(args)
    result = evaluate_shapes(
        adapter, args.split, num_images_per_prompt=args.num_images_per_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance, sampler=args.sampler, noise_level=args.noise_level,
        negative_prompt=args.negative_prompt, seed=args.seed, batch_size=args.batch_size, out_dir=args.out,
        extra_metadata=model_record(args), overwrite=args.overwrite,
    )
    result["settings"].update(model_record(args))
    write_text_atomically(args.out / "eval.json", json.dumps(result, indent=1))
    print(f"overall strict {result['overall_strict']:.3f} ± {result['overall_strict_se']:.3f}  graded "
          f"{result['graded']:.3f}  ({result['num_images']} images, ± one binomial standard error; review page "
          f"{args.out / 'index.html'})")
    for category, accuracy in result["per_category_strict"].items():
        print(f"  {category:<14} {accuracy:.3f} ± {result['per_category_strict_se'][category]:.3f}")
    if len(result["pass_at_k"]) > 1:
        print("  pass@k, best of k by a perfect judge: "
              + "  ".join(f"k={k} {v['overall']:.3f}" for k, v in result["pass_at_k"].items()))
    warn_of_diverged(args, result["diverged_images"], result["num_images"])


SHIPPED_WORLD = Path("assets/world")  # build-world's default --out: the repository's world, run from its root


def add_build_world_parser(subparsers) -> None:
    parser = subparsers.add_parser("build-world", help="train the shapes-world assets from a seed")
    parser.add_argument("--out", type=_path, default=SHIPPED_WORLD, help="folder for the assets")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--only", nargs="+", choices=WORLD_ASSETS, default=list(WORLD_ASSETS),
                        help="rebuild only these assets (the others are loaded from --out)")
    parser.add_argument("--quick", action="store_true", help="a few steps per asset: checks the plumbing only")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="train the VAE and SD3 under bfloat16 autocast (default: where the CPU computes "
                             "bfloat16 in hardware, AMX or AVX512-BF16; off with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the VAE's and SD3's losses (needs a C++ compiler; default: on, off with "
                             "--quick)")
    parser.set_defaults(run=run_build_world)


def run_build_world(args) -> None:
    from dataclasses import replace

    from align_diffusion.world.build import (
        QUICK_PLAN,
        BuildPlan,
        build_world,
        built_quick,
        compile_problem,
        held_assets,
    )

    if problem := folder_problem(args.out):
        raise SystemExit(f"--out: {problem}")
    held = held_assets(args.out)
    if not held and args.out.is_dir() and any(args.out.iterdir()):
        raise SystemExit(f"--out: {args.out} holds other files and no world (none of its asset folders), which the "
                         "build would mix with; name a new or empty folder, or a world to rebuild")
    if args.quick and held and not built_quick(args.out):  # the shipped world, or any copy of one
        raise SystemExit(f"--quick: its few-step models would replace the models in {args.out} ({', '.join(held)}), "
                         "not built by --quick; give a new or empty --out for a plumbing check")
    plan = QUICK_PLAN if args.quick else BuildPlan()
    choices = {"bf16": args.bf16, "torch_compile": args.compile}
    plan = replace(plan, **{name: value for name, value in choices.items() if value is not None})
    if error := compile_problem(plan, args.only, "--compile"):
        raise SystemExit(f"{error} (--no-compile builds without it)")  # as build_world would, naming the option
    report = build_world(args.out, seed=args.seed, plan=plan, only=args.only)
    minutes = report["total_seconds"] / 60
    print(f"built {', '.join(args.only)} in {minutes:.1f} min; report in {args.out}/build_report.json")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 picks a free port), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_serve_reward_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve-reward", help="serve a reward over HTTP for `remote:URL` clients")
    parser.add_argument("--reward", type=_reward_spec, required=True,
                        help="reward spec, e.g. shapes, pickscore, clip:PATH")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (the token travels in clear)")
    parser.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    parser.add_argument("--token", default=None,
                        help=f"bearer token clients must send (default: ${REWARD_TOKEN_ENV}, which keeps it out of ps)")
    parser.add_argument("--max-body-mb", type=_positive_float, default=64, help="largest request body accepted")
    add_device(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    parser.set_defaults(run=run_serve_reward)


def listen_problem(host: str, port: int) -> str | None:
    """Why the reward server could not listen on (host, port): the port taken, the host no address of this machine
    (the server binds IPv4, with SO_REUSEADDR, as this probe does). None when it can, for now."""
    import errno
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"cannot listen on {host}:{port}: {error.strerror} (--port 0 picks a free port)"
            return (f"cannot listen on {host}:{port}: {error.strerror or error} (--host takes an IPv4 address of this "
                    "machine or its name: the server listens on IPv4 only)")
    return None


def run_serve_reward(args) -> None:
    from align_diffusion.rewards.remote import checked_token
    from align_diffusion.rewards.server import serve
    from align_diffusion.rewards.spec import load_reward

    # Each told before the reward loads, which may take minutes.
    token = args.token or os.environ.get(REWARD_TOKEN_ENV)
    if not token:
        raise SystemExit(f"align-diffusion serve-reward: no token; pass --token or set {REWARD_TOKEN_ENV}")
    try:
        checked_token(token)
    except ValueError as error:
        source = "--token" if args.token else f"${REWARD_TOKEN_ENV}"
        raise SystemExit(f"align-diffusion serve-reward: {source}: {error}") from None
    max_body_bytes = int(args.max_body_mb * 2**20)
    if max_body_bytes < 1:
        raise SystemExit(f"--max-body-mb: {args.max_body_mb} MB is less than one byte")
    if problem := listen_problem(args.host, args.port):
        raise SystemExit(f"align-diffusion serve-reward: {problem}")
    reward = load_reward(args.reward, device=args.device, dtype=args.dtype)
    serve(reward, args.host, args.port, token=token, max_body_bytes=max_body_bytes)


def add_train_reward_parser(subparsers) -> None:
    parser = subparsers.add_parser("train-reward", help="train a learned reward")
    parser.add_argument("kind", choices=["artifact", "noise-aware"],
                        help="artifact: the artifact classifier (1 − P(artifact)); noise-aware: a student of a "
                             "CLIP-family reward that scores intermediate x̂0s by their outcome (TTSnap)")
    parser.add_argument("--out", type=_path, required=True, help="folder for the trained reward")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="optimizer steps (artifact, default 3000) or per curriculum stage (noise-aware, 60)")
    parser.add_argument("--seed", type=_seed, default=0)
    add_device(parser)
    artifact = parser.add_argument_group("artifact")
    artifact.add_argument("--data", type=_path, default=None,
                          help='JSONL of {"file": ..., "label": 0|1} (1 = has artifacts; or a review page\'s export, '
                               "labels good / artifact / bad, bad left out) or a folder with clean/ and artifact/")
    artifact.add_argument("--backbone", default="facebook/dinov2-small", help="frozen vision backbone, id or path")
    artifact.add_argument("--holdout", type=_share, default=0.2, help="share of images held out for the accuracy")
    artifact.add_argument("--unseen", type=_path, default=None,
                          help="folder of artifact images of kinds left out of --data: reports how often they score "
                               "below held-out clean images")
    noise_aware = parser.add_argument_group("noise-aware")
    noise_aware.add_argument("--model", default="assets/world/sd3", help="the generator whose trajectories it reads")
    noise_aware.add_argument("--lora", type=_path, default=None, help="folder with a diffusers-format LoRA for --model")
    noise_aware.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="the generator's dtype")
    noise_aware.add_argument("--teacher", type=_reward_spec, default="clip:assets/world/clip",
                             help="teacher reward spec (clip:, pickscore:)")
    noise_aware.add_argument("--prompts", default="shapes:train", help="training prompts: shapes:SPLIT or a file")
    noise_aware.add_argument("--eval-prompts", default="shapes:test", help="held-out prompts for the Spearman metric")
    noise_aware.add_argument("--train-images", type=_positive_int, default=512, help="training trajectories")
    noise_aware.add_argument("--images-per-eval-prompt", type=_positive_int, default=4)
    noise_aware.add_argument("--num-inference-steps", type=_positive_int, default=10)
    noise_aware.add_argument("--guidance", type=_non_negative_float, default=2.0)
    add_negative_prompt(noise_aware)
    add_model_options(noise_aware)
    noise_aware.add_argument("--prune-step", type=int, default=2,
                             help="the earliest step the student must score (the curriculum ends there)")
    parser.set_defaults(run=run_train_reward,
                        options_of_kind={"artifact": _options_of(artifact), "noise-aware": _options_of(noise_aware)})


def _options_of(group) -> dict[str, tuple[str, object]]:
    """dest → (flag, default) of each option in an argparse group."""
    return {action.dest: (action.option_strings[0], action.default) for action in group._group_actions}


def run_train_reward(args) -> None:
    other = "noise-aware" if args.kind == "artifact" else "artifact"
    given = [flag for dest, (flag, default) in args.options_of_kind[other].items() if getattr(args, dest) != default]
    if given:
        raise SystemExit(f"align-diffusion train-reward {args.kind}: {', '.join(given)} "
                         f"{'is an option' if len(given) == 1 else 'are options'} of train-reward {other}")
    if args.kind == "artifact":
        run_train_artifact(args)
    else:
        run_train_noise_aware(args)


def check_backbone(backbone: str) -> None:
    """Refuses a --backbone that is no local folder and that the hub does not give (offline: not in its cache), before
    any image is read. The hub's message alone would not say which flag to change, nor that the world ships one."""
    from transformers import AutoConfig

    from align_diffusion.models import missing_local_model

    if reason := missing_local_model(backbone, holds="config.json"):  # written as a path
        raise SystemExit(f"--backbone: {reason}")
    if Path(home_expanded(backbone)).is_dir():
        return

    try:
        AutoConfig.from_pretrained(backbone)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise SystemExit(f"--backbone: {backbone} is no local folder, and the hub did not give it ({reason}); "
                         "offline, give a local backbone, such as the shapes world's assets/world/dino") from None


def check_inputs_outside_out(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuses an input (flag: path or id) inside `out`, which the trained reward replaces whole (`check_outside`)."""
    try:
        check_outside(out, inputs, "--out")
    except ValueError as error:
        raise SystemExit(str(error)) from None


def run_train_artifact(args) -> None:
    from align_diffusion.rewards.artifact import CONFIG_FILE, ArtifactTraining, train_artifact_reward

    if args.data is None:
        raise SystemExit("align-diffusion train-reward artifact: --data is required")
    try:
        check_output_folder(args.out, CONFIG_FILE)
    except ValueError as error:
        raise SystemExit(f"--out: {error}") from None
    if not args.data.exists():  # named before the backbone is looked for
        raise SystemExit(f"--data: no such file or folder {args.data}")
    check_inputs_outside_out(args.out, {"--data": args.data, "--unseen": args.unseen, "--backbone": args.backbone})
    check_backbone(args.backbone)
    settings = ArtifactTraining(steps=args.steps or ArtifactTraining.steps, holdout=args.holdout, seed=args.seed)
    result = train_artifact_reward(args.data, args.out, args.backbone, settings, device=args.device,
                                   unseen=args.unseen)
    print(f"saved to {args.out} (spec artifact:{args.out}); train accuracy {result['train_accuracy']:.3f} on "
          f"{result['train_images']} images")
    if args.unseen is not None:
        print(f"unseen kinds: {result['unseen_below_clean']:.3f} of (clean, unseen) pairs rank the unseen image "
              f"lower ({result['unseen_images']} unseen images)")
    print(f"held-out accuracy {result['heldout_accuracy']:.3f} on {result['heldout_images']} images (clean ones "
          f"{result['heldout_clean_accuracy']:.3f}, artifacts {result['heldout_artifact_accuracy']:.3f})")


HELD_OUT_SEEDS = 10**6  # the noise-aware student's held-out trajectories are seeded from seed + this


def run_train_noise_aware(args) -> None:
    from align_diffusion.rewards import noise_aware
    from align_diffusion.rewards.spec import load_reward, parse_spec
    from align_diffusion.training.prompts import PromptSource

    terms = parse_spec(args.teacher)
    if len(terms) != 1 or terms[0].name not in ("clip", "pickscore") or terms[0].arg is None or terms[0].weight != 1:
        raise SystemExit("align-diffusion train-reward noise-aware: --teacher must be one unweighted term, clip:PATH "
                         f"or pickscore:PATH, got {args.teacher!r}")
    term = terms[0]
    if not 0 <= args.prune_step < args.num_inference_steps:
        raise SystemExit(f"--prune-step must lie in [0, {args.num_inference_steps}) (--num-inference-steps)")
    if args.train_images < 2:  # a score regressed on one target learns nothing to rank by
        raise SystemExit(f"--train-images: distillation needs at least 2 trajectories, got {args.train_images}")
    try:
        check_output_folder(args.out, noise_aware.REPORT_FILE)
    except ValueError as error:
        raise SystemExit(f"--out: {error}") from None
    check_inputs_outside_out(args.out, {"--model": args.model, "--lora": args.lora, "--teacher": term.arg,
                                        "--prompts": args.prompts, "--eval-prompts": args.eval_prompts})
    train_prompts = PromptSource(args.prompts, "--prompts").draw(args.seed, 0, args.train_images)
    eval_prompts = PromptSource(args.eval_prompts, "--eval-prompts").all()
    check_seed_argument(args.seed, args.train_images)
    check_seed_argument(args.seed, len(eval_prompts) * args.images_per_eval_prompt, first=HELD_OUT_SEEDS)
    check_model_arguments(args)
    teacher = load_reward(args.teacher, device=args.device)
    args.sampler = "ode"  # the trajectories are the ODE's; what load_for_command checks against the model
    adapter = load_for_command(args)
    settings = noise_aware.NoiseAwareTraining(steps_per_stage=args.steps or 60, earliest_step=args.prune_step,
                                              seed=args.seed)
    collect = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance,
                   negative_prompt=args.negative_prompt)
    train = noise_aware.collect(adapter, teacher, train_prompts, 1, seed=args.seed, **collect)
    held_out = noise_aware.collect(adapter, teacher, eval_prompts, args.images_per_eval_prompt,
                                   seed=args.seed + HELD_OUT_SEEDS, **collect)
    before = noise_aware.step_agreement(noise_aware.step_scores(teacher, held_out), held_out)
    student = noise_aware.distill(teacher, train, settings)
    after = noise_aware.step_agreement(noise_aware.step_scores(student, held_out), held_out)
    shared = set(train_prompts) & set(eval_prompts)  # the held-out metric flatters a student on them
    report = noise_aware.report_dict(settings, train, before, after, **model_record(args), teacher=args.teacher,
                                     held_out_images=len(held_out.prompts), held_out_prompts_trained_on=len(shared))
    noise_aware.save_student(student, args.out, report)
    print("spearman(score of x̂0, teacher's of the final image), pooled over all held-out trajectories and within "
          "each prompt's (mean over prompts)")
    print("step  teacher pooled  student pooled  teacher within  student within")
    for step in range(len(before["pooled"])):
        print(f"{step:>4}" + "".join(f"  {agreement[kind][step]:>14.3f}" for kind in ("pooled", "within_prompt")
                                     for agreement in (before, after)))
    if shared:
        print(f"note: {len(shared)} of the {len(set(eval_prompts))} held-out prompts were training prompts too")
    print(f"saved to {args.out} (spec {term.name}:{args.out})")
    print(f"prune step {args.prune_step}: spearman pooled {before['pooled'][args.prune_step]:.3f} -> "
          f"{after['pooled'][args.prune_step]:.3f}, within prompt {before['within_prompt'][args.prune_step]:.3f} -> "
          f"{after['within_prompt'][args.prune_step]:.3f}")


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model toward rewards (Flow-GRPO); `accelerate launch -m align_diffusion train` "
        "for several processes"
    )
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (configs/*.yaml); omitted: every default")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampling.noise_level=0.5")
    parser.add_argument("--print-config", action="store_true",
                        help="check the config and print it, every key with its documentation, instead of training")
    parser.set_defaults(run=run_train)


def run_train(args) -> None:
    from align_diffusion.training.config import ConfigError, describe_config, load_config
    from align_diffusion.training.grpo import TrainingInterrupted, train

    # The first word is the config file where one is there by that name, else an override when it is key=value (kept
    # as given: a path would fold the `//` in a value)
    if args.config is not None and not Path(home_expanded(args.config)).is_file():
        if "=" not in args.config:
            raise SystemExit(f"align-diffusion train: no such config file {args.config}")
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        config = load_config(args.config and home_expanded(args.config), args.overrides,
                             num_processes=launched_processes())
    except ConfigError as error:
        raise SystemExit(f"align-diffusion train: bad config: {error}") from None
    if args.print_config:
        print(describe_config(config))
        return
    try:
        folder = train(config)
    except TrainingInterrupted as stopped:
        print(f"align-diffusion train: {stopped}", file=sys.stderr)
        raise SystemExit(128 + (stopped.agreed or signal.SIGINT)) from None
    except KeyboardInterrupt:  # a second Ctrl-C, which stops at once: the last checkpoint is where it goes on
        from align_diffusion.training.checkpoint import checkpoint_step, resolve_resume

        last = resolve_resume("latest", config.output_dir)
        goes_on = (f"; its last checkpoint is step {checkpoint_step(last)} ({last}), and the same command with "
                   "resume_from=latest goes on after it") if last else (
            " before its first checkpoint; the same command with resume_from=latest starts it over")
        print(f"align-diffusion train: interrupted{goes_on}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    if is_main_process():  # the other processes of a launch end before the main one exports
        print(f"trained weights in {folder}; metrics in {config.output_dir}/metrics.jsonl")


def add_calibrate_noise_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate-noise", help="DenseGRPO's per-step noise calibration ψ(t): write a noise table for a config")
    parser.add_argument("config", type=_path,
                        help="the training config whose model, reward, prompts and sampler to use")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    parser.add_argument("--rounds", type=_positive_int, default=5, help="calibration rounds (one rollout batch each)")
    parser.add_argument("--eps1", type=_non_negative_float, default=0.1,
                        help="balance tolerance: |n₊ − n₋| ≤ eps1 · (n₊ + n₋) raises ψ(t)")
    parser.add_argument("--eps2", type=_positive_float, default=0.05, help="the step ψ(t) moves by per round")
    parser.add_argument("--out", type=_path, required=True, help="JSON noise table (for sampling.noise_table)")
    parser.set_defaults(run=run_calibrate_noise)


def run_calibrate_noise(args) -> None:
    from align_diffusion.training.config import ConfigError, load_config, noise_drawing_steps
    from align_diffusion.training.grpo import NO_NOISE_TO_CALIBRATE, GRPOTrainer
    from align_diffusion.training.noise_table import holds_table, write_table

    if not args.config.is_file():
        raise SystemExit(f"align-diffusion calibrate-noise: no such config file {args.config}")
    overrides, processes = ["log_with=[]", *args.overrides], launched_processes()
    try:
        config = load_config(args.config, overrides, processes)
    except ConfigError as error:
        raise SystemExit(f"align-diffusion calibrate-noise: bad config: {error}") from None
    if args.out.is_dir():
        raise SystemExit(f"--out: {args.out} is a folder; name the JSON file to write")
    if args.out.exists() and not holds_table(args.out):
        raise SystemExit(f"--out: {args.out} exists and is no noise table (no 'noise_levels'), which the table would "
                         "replace; name a new file or an earlier table")
    if problem := folder_problem(args.out.parent):
        raise SystemExit(f"--out: {problem}")
    if config.sampling.sampler == "ode":
        raise SystemExit(f"align-diffusion calibrate-noise: bad config: {NO_NOISE_TO_CALIBRATE}")
    if config.algorithm != "grpo":
        raise SystemExit(f"align-diffusion calibrate-noise: algorithm {config.algorithm}: calibration runs GRPO's "
                         "rollouts and step rewards; give a grpo config of the same model, sampler and steps (its "
                         "table serves both)")
    if config.grpo.dense is None:  # calibration reads step rewards
        try:
            config = load_config(args.config, [*overrides, "grpo.dense=ode"], processes)
        except ConfigError as error:
            raise SystemExit(f"align-diffusion calibrate-noise: calibration reads step rewards, so it runs the config "
                             f"with grpo.dense=ode, which it does not take: {error}") from None
    config.resume_from = None  # calibration samples the base model: no checkpoint is read, none is checked
    levels = GRPOTrainer(config).calibrate_noise(args.rounds, args.eps1, args.eps2)
    if not any(levels[t] > 0 for t in noise_drawing_steps(config.sampling)):
        raise SystemExit(f"align-diffusion calibrate-noise: every level that draws noise calibrated to 0 ({levels}), "
                         "a table train refuses; nothing written. Try a smaller --eps2 or another number of --rounds")
    if not is_main_process():  # every process of a launch calibrated the same levels
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.out, levels, sampler=config.sampling.sampler, config=str(args.config), overrides=args.overrides,
                rounds=args.rounds, eps1=args.eps1, eps2=args.eps2)
    print(f"wrote {args.out}: ψ = {[round(v, 4) for v in levels]}")


# Method options of `steer` (argument name = the method's keyword) and the methods each applies to.
STEER_OPTIONS = {
    "num_candidates": ("best-of-n",),
    "num_particles": ("fk",),
    "potential": ("fk",),
    "lam": ("fk",),
    "resample_start": ("fk",),
    "resample_interval": ("fk",),
    "resample_end": ("fk",),
    "resampling": ("fk",),
    "adaptive_threshold": ("fk",),
    "num_seeds": ("ttsnap",),
    "prune_steps": ("ttsnap",),
    "keep": ("ttsnap",),
    "iterations": ("reno",),
    "lr": ("reno",),
    "reg_weight": ("reno",),
    "grad_clip": ("reno",),
    "sampler": ("best-of-n", "fk", "ttsnap"),
    "noise_level": ("best-of-n", "fk", "ttsnap"),
}


def add_steer_parser(subparsers) -> None:
    parser = subparsers.add_parser("steer", help="steer sampling toward a reward: best-of-n, fk, reno, ttsnap")
    parser.add_argument("--method", choices=STEERING_METHODS, required=True)
    parser.add_argument("--model", required=True, help="diffusers model id or local folder")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts")
    prompts.add_argument("--prompts-file", type=_path, help="text file with one prompt per line")
    parser.add_argument("--reward", type=_reward_spec, required=True,
                        help="reward spec (ReNO: differentiable terms only)")
    parser.add_argument("--budget", type=_positive_int, default=None,
                        help="model evaluations per prompt (one image through one step); sets the method's size")
    parser.add_argument("--seed", type=_seed, default=0, help="prompt j's first candidate uses seed + j")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="denoising steps (default: the model's; ReNO: 4)")
    parser.add_argument("--guidance", type=_non_negative_float, default=None,
                        help="guidance scale (default: the model's)")
    add_negative_prompt(parser)
    parser.add_argument("--height", type=_positive_int, default=None)
    parser.add_argument("--width", type=_positive_int, default=None)
    parser.add_argument("--lora", type=_path, default=None, help="folder with a diffusers-format LoRA")
    add_device(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    add_model_options(parser)
    parser.add_argument("--shapes-eval", action="store_true",
                        help="add ShapesEval's verdict of each image (shapes-world prompts only)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser, the VAE decoder and the rewards' image networks, for GPU "
                             "runs: fewer, fused kernels once compiled (the first calls compile, minutes at full size)")
    parser.add_argument("--out", type=_path, required=True, help="output folder")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    again.add_argument("--resume", action="store_true",
                       help="go on with an interrupted run in --out (same prompts and options), after its last prompt")
    sampling = parser.add_argument_group("sampler (best-of-n, fk, ttsnap)")
    sampling.add_argument("--sampler", choices=sorted(DEFAULT_NOISE_LEVEL), default=None,
                          help="default: ode; fk: flow-sde for flow models, ddim for ε-models")
    sampling.add_argument("--noise-level", type=_non_negative_float, default=None)
    group = parser.add_argument_group("best-of-n")
    group.add_argument("--num-candidates", type=_positive_int, default=None, help="N (default 4, or from --budget)")
    group = parser.add_argument_group("fk")
    group.add_argument("--num-particles", type=_positive_int, default=None, help="k (default 4, or from --budget)")
    group.add_argument("--potential", choices=FK_POTENTIALS, default=None, help="default max")
    group.add_argument("--lam", type=_non_negative_float, default=None, help="tilt λ (default 10)")
    group.add_argument("--resample-start", type=int, default=None,
                       help="first scored step (default: 20 %% of the steps)")
    group.add_argument("--resample-interval", type=_positive_int, default=None, help="default 5")
    group.add_argument("--resample-end", type=int, default=None,
                       help="last step of the schedule; the last step is scored anyway (default: 80 %% of the steps)")
    group.add_argument("--resampling", choices=FK_RESAMPLING, default=None, help="default multinomial")
    group.add_argument("--adaptive-threshold", type=_fraction, default=None,
                       help="resample only when ESS < threshold · k (default: at every scored step)")
    group = parser.add_argument_group("ttsnap")
    group.add_argument("--num-seeds", type=_positive_int, default=None, help="N (default 16, or from --budget)")
    group.add_argument("--prune-steps", type=_non_negative_int, nargs="+", default=None,
                       help="step indices, increasing (default 2 6 11, for 20 steps)")
    group.add_argument("--keep", type=_fraction, nargs="+", default=None,
                       help="fraction kept per prune step (0.4 0.4 0.5)")
    group.add_argument("--prune-reward", type=_reward_spec, default=None,
                       help="noise-aware reward spec ranking x̂0 at prune steps (default: --reward)")
    group = parser.add_argument_group("reno")
    group.add_argument("--iterations", type=_non_negative_int, default=None, help="default 50, or from --budget")
    group.add_argument("--lr", type=_non_negative_float, default=None, help="SGD learning rate (default 5)")
    group.add_argument("--reg-weight", type=_non_negative_float, default=None,
                       help="noise-norm regularizer weight (0.01)")
    group.add_argument("--grad-clip", type=_positive_float, default=None, help="gradient norm clip per image (0.1)")
    group.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing")
    group.add_argument("--autocast", choices=["bfloat16", "float16"], default=None, help="mixed precision")
    group.add_argument("--batch-size", type=_positive_int, default=None, help="prompts optimized together (16)")
    parser.set_defaults(run=run_steer)


def run_steer(args) -> None:
    from align_diffusion.models.base import DTYPES, missing_c_compiler
    from align_diffusion.rewards.simple import ShapesReward
    from align_diffusion.steering import compile_models, steer_to_folder
    from align_diffusion.steering.steer import SIZE_OPTION, check_steering, steered_already

    options = {}
    for dest, methods in STEER_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.method not in methods:
            raise SystemExit(f"--{dest.replace('_', '-')} applies to {' and '.join(methods)}, not {args.method}")
        options[dest] = value
    if args.prune_reward is not None and args.method != "ttsnap":
        raise SystemExit(f"--prune-reward applies to ttsnap, not {args.method}")
    if args.budget is not None and SIZE_OPTION[args.method] in options:  # steer refuses it too, named as its argument
        raise SystemExit(f"give either --budget or --{SIZE_OPTION[args.method].replace('_', '-')}, not both")
    if args.method == "reno":
        options.update(gradient_checkpointing=not args.no_checkpointing,
                       autocast_dtype=None if args.autocast is None else DTYPES[args.autocast])
    elif args.no_checkpointing or args.autocast or args.batch_size:
        raise SystemExit(f"--no-checkpointing, --autocast and --batch-size apply to reno, not {args.method}")
    options.update({key: value for key, value in (("num_inference_steps", args.steps),
                                                  ("guidance_scale", args.guidance), ("height", args.height),
                                                  ("width", args.width), ("negative_prompt", args.negative_prompt))
                    if value is not None})
    prompts = read_prompts(args)
    if (args.out / "metadata.jsonl").exists() and not (args.overwrite or args.resume):
        raise SystemExit(f"--out: {args.out} already holds results; pass --overwrite to replace them, or --resume to "
                         "go on with an interrupted run")
    check_sample_out(args)
    if args.shapes_eval:  # before the model loads; steer_to_folder checks again for Python callers
        try:
            ShapesReward().check_prompts(prompts)
        except ValueError as error:
            raise SystemExit(f"--shapes-eval judges shapes-world prompts only: {error}") from None
    if args.compile and (error := missing_c_compiler("--compile")):
        raise SystemExit(error)
    family = check_model_arguments(args)
    check_noise_level_argument(args.sampler or ("ode" if args.method != "fk" else None),  # FK's is stochastic
                               args.noise_level)
    if family is not None:  # read without loading the model (a hub id not downloaded yet: steer checks once loaded)
        check_steering(family, prompts, None, args.method, budget=args.budget, seed=args.seed, **options)
    reward = scoring_reward("--reward", args.reward, args)
    prune_reward = None if args.prune_reward is None else scoring_reward("--prune-reward", args.prune_reward, args)
    if family is not None:  # again with the rewards: their prompts, differentiability, a student's fit
        check_steering(family, prompts, reward, args.method, budget=args.budget, prune_reward=prune_reward,
                       seed=args.seed, **options)
    run = dict(shapes_eval=args.shapes_eval, budget=args.budget, seed=args.seed, prune_reward=prune_reward,
               extra_metadata=model_record(args), **options,
               **({} if args.batch_size is None else {"reno_batch_size": args.batch_size}))  # else steer's default
    earlier = 0
    if args.resume:  # before the model loads: a run that is not this one is refused at once
        earlier = steered_already(args.out, prompts, reward, args.method, **run)
        note_a_fresh_start(args)
    judges = [reward, prune_reward, *([ShapesReward()] if args.shapes_eval else [])]
    check_image_size(args, judges)
    args.sampler = options.get("sampler", "ode")  # what load_for_command checks against the model
    adapter = load_for_command(args)
    check_image_size(args, judges, adapter)
    if args.compile:
        compile_models(adapter, *[r for r in (reward, prune_reward) if r is not None])
    records = steer_to_folder(adapter, prompts, reward, args.method, args.out, overwrite=args.overwrite,
                              resume=args.resume, **run)
    spent = sum(r["budget"]["model_evals"] for r in records)
    mean = sum(r["rewards"][reward.name] for r in records) / len(records)
    resumed = f" after the {earlier} it had" if earlier else ""
    print(f"wrote {len(records) - earlier} images to {args.out}{resumed} (of all {len(records)}: mean reward "
          f"{mean:.4f}, {spent} model evaluations); review page {args.out / 'index.html'}")


def add_gallery_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "gallery", help="(re)build the review page of a sample, eval or steer folder, or of a training run")
    parser.add_argument("dir", type=_path, help="a folder with metadata.jsonl, or a training run's output_dir")
    parser.add_argument("--compare", type=_path, default=None,
                        help="a second sample folder: also build a side-by-side page pairing images by prompt and seed")
    parser.add_argument("--out", type=_path, default=None,
                        help="file for the side-by-side page (default DIR/compare-<name of DIR2>.html)")
    parser.set_defaults(run=run_gallery)


def run_gallery(args) -> None:
    from align_diffusion.gallery import build_comparison, build_run_page

    if args.out is not None and args.compare is None:
        raise SystemExit("--out: names the side-by-side page, so it needs --compare")
    if args.out is not None and (args.out.suffix.lower() != ".html" or args.out.is_dir()):
        raise SystemExit(f"--out: names the side-by-side page, an .html file, got {args.out}")
    if (args.dir / "metrics.jsonl").is_file():
        if args.compare is not None:
            raise SystemExit("--compare: compares two sample folders, and DIR is a training run")
        print(f"wrote {build_run_page(args.dir)}")
        return
    if not (args.dir / "metadata.jsonl").is_file():
        raise SystemExit(f"{args.dir}: neither a sample folder (metadata.jsonl) nor a training run (metrics.jsonl)")
    if args.compare is not None and not (args.compare / "metadata.jsonl").is_file():
        raise SystemExit(f"--compare: {args.compare} is not a sample folder (no metadata.jsonl)")
    print(f"wrote {rebuild_gallery(args.dir)}")
    if args.compare is not None:
        print(f"wrote {build_comparison(args.dir, args.compare, args.out)}")


def rebuild_gallery(folder: Path) -> Path:
    """The review page of a sample folder, titled as the command that wrote it titled it: an eval's by its split and
    strict accuracy, a training run's evaluation by run and step (with its link back to the run)."""
    import json

    from align_diffusion.gallery import build_gallery
    from align_diffusion.gallery.run import EVAL_DIR, build_eval_gallery
    from align_diffusion.world.benchmark import eval_title

    run_dir = folder.resolve().parent.parent
    if folder.resolve().parent.name == EVAL_DIR and (run_dir / "metrics.jsonl").is_file():
        return build_eval_gallery(run_dir, folder)
    title = None  # the folder's name
    if (folder / "eval.json").is_file():
        try:
            title = eval_title(json.loads((folder / "eval.json").read_text()))
        except (ValueError, KeyError, TypeError):  # not an eval.json of ours: the folder's name will do
            pass
    return build_gallery(folder, title=title)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses `argv`, taking `key=value` overrides after options too (argparse alone takes a positional list only
    before them: `calibrate-noise CONFIG --out F key=value` would be refused)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="align-diffusion", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    add_eval_parser(subparsers)
    add_build_world_parser(subparsers)
    add_serve_reward_parser(subparsers)
    add_train_reward_parser(subparsers)
    add_train_parser(subparsers)
    add_calibrate_noise_parser(subparsers)
    add_steer_parser(subparsers)
    add_gallery_parser(subparsers)
    args = parse_with_overrides(parser, argv)
    launched = launched_processes()
    if launched > 1 and args.command not in ("train", "calibrate-noise"):  # those share the work between processes
        raise SystemExit(f"align-diffusion {args.command}: launched as {launched} processes, each of which would do "
                         "the whole job into the same files; run it as one process")
    if getattr(args, "device", "") is None:
        args.device = default_device()
    from align_diffusion.rewards.base import RewardError

    # Bad input found after loading (size, sampler, model type) or a path that does not load (a folder that is no
    # pipeline, a missing asset): one line, no traceback.
    earlier = metadata_stamp(args)
    try:
        args.run(args)
    except (ValueError, OSError, RewardError) as error:
        raise SystemExit(f"align-diffusion {args.command}: {error}") from error
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback, and for sample and steer how to go on
        kept = ""
        if earlier is not None and args.overwrite and metadata_stamp(args) == earlier:  # before its first image
            kept = f"; it had written nothing, and {args.out} holds the earlier run's results as they were"
        elif hasattr(args, "resume") and (args.out / "metadata.jsonl").exists():
            instead = " in place of --overwrite" if args.overwrite else ""
            kept = f"; what it finished is in {args.out}, and the same command with --resume{instead} goes on after it"
        print(f"align-diffusion {args.command}: interrupted{kept}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def metadata_stamp(args) -> tuple[int, int] | None:
    """When the records of a command that writes a sample folder (`--resume`) were last changed and their size;
    None for other commands and a folder without records."""
    if not hasattr(args, "resume"):
        return None
    try:
        stat = (args.out / "metadata.jsonl").stat()
    except OSError:  # none there, or an --out the command itself names in its error
        return None
    return stat.st_mtime_ns, stat.st_size


if __name__ == "__main__":
    main(sys.argv[1:])
