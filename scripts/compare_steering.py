"""Every steering method on one prompt set at matched budgets: a table and plots of reward and ShapesEval accuracy
against the budget (denoiser evaluations per prompt).

    python scripts/compare_steering.py --out outputs/steering          # the shapes world, test split, 4 seeds each

Plain sampling is best-of-1. Best-of-N, FK and TTSnap run at each multiple of one sample's steps (`--budgets`);
ReNO runs its own iteration count on a few-step sampler, and its budget is reported as spent. Each run is a sample
folder with its review page under `--out`; `results.json` (after each run), `results.md`, `reward.png` and
`accuracy.png` sum up. `--resume` goes on with an interrupted comparison: finished runs are kept, the one cut short
continues after its last prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from align_diffusion.files import write_text_atomically
from align_diffusion.gallery.page import read_records
from align_diffusion.gallery.plots import plot_curves
from align_diffusion.models import load_adapter
from align_diffusion.rewards import load_reward
from align_diffusion.steering import steer_to_folder
from align_diffusion.names import STEERING_METHODS
from align_diffusion.steering.ttsnap import KEEP, PRUNE_STEPS, check_schedule
from align_diffusion.training.prompts import PromptSource
from align_diffusion.world.evaluate import shapes_eval
from align_diffusion.world.spec import parse_prompt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/world/sd3")
    parser.add_argument("--prompts", default="shapes:test", help="shapes:SPLIT or a file with one prompt per line")
    parser.add_argument("--seeds-per-prompt", type=int, default=4, help="each prompt is steered this many times")
    parser.add_argument("--reward", default="clip:assets/world/clip", help="the reward every method steers toward")
    parser.add_argument("--prune-reward", default=None, help="TTSnap's x̂0 reward (default: --reward)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of one sample")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8], help="multiples of one sample's cost")
    parser.add_argument("--methods", nargs="+", choices=STEERING_METHODS, default=["best-of-n", "fk", "ttsnap", "reno"])
    parser.add_argument("--reno-iterations", type=int, default=50)
    parser.add_argument("--reno-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/steering"))
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--resume", action="store_true", help="go on with the interrupted comparison in --out")
    args = parser.parse_args()
    for name in ("seeds_per_prompt", "steps", "reno_iterations", "reno_steps", "budgets"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {values}")
    try:
        PromptSource(args.prompts, "--prompts")
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume exclude each other")
    if (args.out / "results.json").exists() and not (args.overwrite or args.resume):
        parser.error(f"--out: {args.out} already holds results; pass --overwrite to replace them, or --resume to go "
                     "on with them")
    if args.prune_reward and "ttsnap" not in args.methods:
        parser.error("--prune-reward is TTSnap's; add ttsnap to --methods")
    if "ttsnap" in args.methods:
        try:
            check_schedule(list(PRUNE_STEPS), list(KEEP), args.steps)
        except ValueError as error:
            parser.error(f"--steps {args.steps}: TTSnap's default {error}; leave ttsnap out of --methods")
    return args


def is_world_prompt(prompt: str) -> bool:
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def main() -> None:
    args = parse_args()
    prompts = [p for _ in range(args.seeds_per_prompt) for p in PromptSource(args.prompts).all()]
    shapes = all(is_world_prompt(p) for p in prompts)  # then ShapesEval judges every image
    # The prompts themselves, not only the file's path: a file edited since holds another comparison's prompts
    settings = {**comparison_settings(args), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    finished = finished_rows(args.out / "results.json", settings) if args.resume else {}  # before the model loads
    adapter = load_adapter(args.model)
    reward = load_reward(args.reward)
    prune_reward = load_reward(args.prune_reward) if args.prune_reward else None
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, progress=True)

    runs = [("plain", "best-of-n", 1, {})]
    for multiple in args.budgets:
        for method in args.methods:
            if method != "reno":
                runs.append((f"{method}-x{multiple}", method, multiple, {}))
    if "reno" in args.methods:
        runs.append((f"reno-{args.reno_iterations}it", "reno", None, dict(
            iterations=args.reno_iterations, num_inference_steps=args.reno_steps)))

    rows = []
    for name, method, multiple, options in runs:
        if name in finished:
            rows.append(finished[name])
            continue
        folder = args.out / name
        before = len(read_records(folder)) if args.resume and (folder / "metadata.jsonl").exists() else 0
        started = time.time()
        budget = None if multiple is None else multiple * args.steps
        records = steer_to_folder(adapter, prompts, reward, method, folder, shapes_eval=shapes,
                                  overwrite=not args.resume, resume=args.resume, budget=budget,
                                  prune_reward=prune_reward if method == "ttsnap" else None, **{**common, **options})
        made = len(records) - before
        row = {
            "run": name, "method": method, "budget_multiple": multiple,
            "model_evals_per_prompt": sum(r["budget"]["model_evals"] for r in records) / len(records),
            "reward_evals_per_prompt": sum(r["budget"]["reward_evals"] for r in records) / len(records),
            "reward_mean": sum(r["rewards"][reward.name] for r in records) / len(records),
            "seconds_per_prompt": (time.time() - started) / made if made else None,  # of the prompts made now
        }
        if shapes:
            from PIL import Image

            images = [Image.open(args.out / name / r["file"]) for r in records]
            report = shapes_eval([r["prompt"] for r in records], images)
            row.update(strict=report["overall_strict"], graded=report["graded"],
                       per_category=report["per_category_strict"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_category"}), flush=True)
        write_text_atomically(args.out / "results.json",
                              json.dumps({"settings": settings, "prompts": len(prompts), "rows": rows}, indent=1))
    write_table(rows, args.out / "results.md", shapes)
    write_plots(rows, args.out, shapes)


def comparison_settings(args: argparse.Namespace) -> dict:
    """What makes a comparison this one: every option but where it writes and how it goes on."""
    return {name: value for name, value in vars(args).items() if name not in ("out", "overwrite", "resume")}


def finished_rows(path: Path, settings: dict) -> dict[str, dict]:
    """The rows (by run) of the comparison in `path`, refused when it ran with other settings."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    differing = [name for name in settings if saved["settings"].get(name) != settings[name]]
    if differing:
        raise SystemExit(f"--resume: {path} was run with other settings: "
                         + "; ".join(f"{name} {saved['settings'].get(name)!r} there, {settings[name]!r} here"
                                     for name in differing))
    return {row["run"]: row for row in saved["rows"]}


def write_table(rows: list[dict], path: Path, shapes: bool) -> None:
    header = "| run | model evals / prompt | reward evals / prompt | reward | s / prompt |"
    header += " strict | graded |" if shapes else ""
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for row in rows:
        seconds = "–" if row["seconds_per_prompt"] is None else f"{row['seconds_per_prompt']:.2f}"
        line = (f"| {row['run']} | {row['model_evals_per_prompt']:.0f} | {row['reward_evals_per_prompt']:.0f} | "
                f"{row['reward_mean']:.4f} | {seconds} |")
        line += f" {row['strict']:.3f} | {row['graded']:.3f} |" if shapes else ""
        lines.append(line)
    write_text_atomically(path, "\n".join(lines) + "\n")
    print(path.read_text())


def write_plots(rows: list[dict], out: Path, shapes: bool) -> None:
    plain = rows[0]
    for key, label, file in [("reward_mean", "reward", "reward.png"), ("strict", "ShapesEval strict", "accuracy.png")]:
        if key == "strict" and not shapes:
            continue
        series = {}
        for method in dict.fromkeys(row["method"] for row in rows[1:]):
            points = [plain] + [row for row in rows[1:] if row["method"] == method]
            if method == "reno":
                points = [row for row in rows if row["method"] == "reno"]
            series[method] = ([p["model_evals_per_prompt"] for p in points], [p[key] for p in points])
        plot_curves(series, out / file, xlabel="model evaluations per prompt", ylabel=label,
                    title=f"{label} against budget")


if __name__ == "__main__":
    main()
