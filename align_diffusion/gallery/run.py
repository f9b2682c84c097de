"""The review page of a training run: `OUTPUT_DIR/index.html` with the reward and accuracy plots, one row per
evaluation linking its gallery, and a side-by-side page of each evaluation against the first (base vs trained).
An evaluation that shares no (prompt, seed) with the first (one interrupted before its first image, or one of
other eval prompts after a resume) gets its gallery but no side-by-side page."""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from urllib.parse import quote

from align_diffusion.files import write_text_atomically
from align_diffusion.gallery.page import (
    build_comparison,
    build_gallery,
    finite_score,
    format_score,
    pair_key,
    read_jsonl,
    read_records,
    stylesheet,
)
from align_diffusion.gallery.plots import plot_training

EVAL_DIR = "eval"  # OUTPUT_DIR/eval/step-NNNNNN/ holds the samples of each evaluation


def eval_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"step-{step:06d}"


def eval_folders(run_dir: str | Path) -> dict[int, Path]:
    """step → the run's evaluation folder of it, in step order; a folder not named for a step (a user's
    `step-best`) is none."""
    found = {}
    for folder in (Path(run_dir) / EVAL_DIR).glob("step-*"):
        if folder.is_dir() and (match := re.fullmatch(r"step-([0-9]+)", folder.name)):
            found[int(match[1])] = folder
    return dict(sorted(found.items()))  # by number: step-1000000 after step-900000


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of the run's metrics.jsonl, each checked to be an object with a whole-number `step`."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: no metrics.jsonl")
    rows = []
    for number, row in read_jsonl(metrics):
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{metrics}:{number}: not a metrics row (a JSON object with a step >= 0)")
        rows.append(row)
    return rows


def build_eval_gallery(run_dir: str | Path, folder: str | Path) -> Path:
    """(Re)writes the review page of one of the run's evaluations, titled by run and step, with a link to the run's
    page."""
    return build_gallery(folder, title=f"{Path(run_dir).resolve().name} — {Path(folder).resolve().name}",
                         links={"run": "../../index.html"})


def build_run_page(run_dir: str | Path, *, only_stale: bool = False) -> Path:
    """(Re)writes the run's plots, its evaluations' galleries and comparisons, and `run_dir/index.html`. With
    `only_stale` (the trainer, after each evaluation) an evaluation's pages are written only when missing or older
    than the samples they show, so each evaluation adds its own pages, not all of them again."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    plots = plot_training(metrics, run_dir / "plots")
    folders_by_step = {step: folder for step, folder in eval_folders(run_dir).items()
                       if (folder / "metadata.jsonl").is_file()}
    folders = list(folders_by_step.values())
    links, first, first_keys = {}, None, set()
    for folder in folders:
        gallery = folder / "index.html"
        if not (only_stale and _fresh(gallery, folder)):
            build_eval_gallery(run_dir, folder)
        links[folder.name] = [("gallery", gallery.relative_to(run_dir).as_posix())]
        keys = {pair_key(record) for record in read_records(folder)}
        if first is None:
            first, first_keys = (folder, keys) if keys else (None, set())
        elif keys & first_keys:
            comparison = first / f"compare-{folder.name}.html"  # where `gallery FIRST --compare STEP` writes it
            if not (only_stale and _fresh(comparison, first, folder)):
                build_comparison(first, folder, out=comparison)
            links[folder.name].append((f"vs {first.name}", comparison.relative_to(run_dir).as_posix()))

    # One row per step (the last, should rows repeat one), and one for each evaluation that has samples but was cut
    # short before its scores were written.
    by_step = {row["step"]: row for row in metrics if "eval/reward_mean" in row}
    for step in folders_by_step:
        by_step.setdefault(step, {})
    evaluated = [by_step[step] | {"step": step} for step in sorted(by_step)]
    pass_at_k = sorted({key for row in evaluated for key in row if key.startswith("eval/shapes_pass@")},
                       key=lambda key: int(key.rpartition("@")[2]))
    columns = {"eval reward": "eval/reward_mean", "strict": "eval/shapes_strict",
               "strict s.e.": "eval/shapes_strict_se", **{key.rpartition("_")[2]: key for key in pass_at_k},
               "graded": "eval/shapes_graded"}
    columns = {label: key for label, key in columns.items() if any(key in row for row in evaluated)}
    rows = []
    for row in evaluated:
        cells = "".join(f"<td>{format_score(finite_score(row.get(key)))}</td>" for key in columns.values())
        anchors = " ".join(f'<a href="{escape(quote(url))}">{escape(text)}</a>'
                           for text, url in links.get(f"step-{row['step']:06d}", []))
        rows.append(f"<tr><td>{row['step']}</td>{cells}<td>{anchors}</td></tr>")
    header = "".join(f"<th>{escape(label)}</th>" for label in columns)
    images = "".join(f'<a href="{escape(quote(p.relative_to(run_dir).as_posix()))}"><img src="'
                     f'{escape(quote(p.relative_to(run_dir).as_posix()))}" alt="{escape(p.stem)}"></a>' for p in plots)
    title = escape(run_dir.resolve().name)
    trained = max((row["step"] for row in metrics), default=0)
    page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title><style>
{stylesheet()}</style></head>
<body>
<header><h1>{title}</h1><p class="summary">training run · {trained} steps · {len(evaluated)} evaluations</p></header>
<div class="plots">{images}</div>
<table class="runs"><tr><th>step</th>{header}<th>samples</th></tr>
{chr(10).join(rows)}
</table>
</body>
</html>
"""
    out = run_dir / "index.html"
    write_text_atomically(out, page)
    return out


def _fresh(page: Path, *folders: Path) -> bool:
    """Whether `page` exists and is newer than the samples of `folders` (their metadata.jsonl)."""
    return page.exists() and all(page.stat().st_mtime_ns > (folder / "metadata.jsonl").stat().st_mtime_ns
                                 for folder in folders)
