"""PNG plots for review pages: reward and accuracy against step for training runs, and any x–y curves (reward
against budget for steering comparisons)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from align_diffusion.files import write_atomically  # noqa: E402
from align_diffusion.gallery.page import finite_score  # noqa: E402
from align_diffusion.world.spec import CATEGORIES  # noqa: E402


def plot_curves(series: dict[str, tuple[list[float], list[float]]], path: str | Path, *, xlabel: str, ylabel: str,
                title: str) -> Path:
    """One line per series name (x values, y values) in one PNG at `path`."""
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, (xs, ys) in series.items():
        # A label is mathtext between dollar signs; a reward spec's path may hold one.
        (line,) = axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3,
                            label=name.replace("$", r"\$"))
        if len(xs) > 30:  # a value between two gaps has no line to show it: it gets its marker
            lone = [k for k, y in enumerate(ys) if math.isfinite(y)
                    and not any(0 <= j < len(ys) and math.isfinite(ys[j]) for j in (k - 1, k + 1))]
            axes.plot([xs[k] for k in lone], [ys[k] for k in lone], linestyle="none", marker="o", markersize=3,
                      color=line.get_color())
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda partial: figure.savefig(partial, format="png"))  # a page may be open on it
    plt.close(figure)
    return path


def _series(metrics: list[dict], keys: dict[str, str]) -> dict[str, tuple[list, list]]:
    """label → (steps, values) for each metric key with a value in at least one row, in step order (a repeated
    step: its last value). A null (a step that scored nothing), an infinite value or any other non-number is NaN, a
    gap in the line."""
    def number(value):
        score = None if isinstance(value, bool) else finite_score(value)
        return math.nan if score is None else score

    series = {}
    for label, key in keys.items():
        values = {row["step"]: number(row[key]) for row in metrics if key in row}
        if any(not math.isnan(value) for value in values.values()):
            steps = sorted(values)
            series[label] = (steps, [values[step] for step in steps])
    return series


def plot_training(metrics: list[dict], out_dir: str | Path) -> list[Path]:
    """`reward.png` (train and eval reward means, each term's when there are several) and, when the run scored
    ShapesEval, `accuracy.png` (strict accuracy overall and per category, graded score) in `out_dir`."""
    names = sorted({key for row in metrics for key in row})
    terms = [key for key in names if key.startswith("reward/") and key.endswith("_mean")]
    reward_keys = {"train reward": "reward_mean", "eval reward": "eval/reward_mean"}
    if len(terms) > 1:
        reward_keys.update({f"train {key[len('reward/'):-len('_mean')]}": key for key in terms})
    paths = []
    rewards = _series(metrics, reward_keys)
    if rewards:
        paths.append(plot_curves(rewards, Path(out_dir) / "reward.png", xlabel="step", ylabel="reward",
                                 title="reward"))
    overall = {"strict (overall)": "eval/shapes_strict", "graded": "eval/shapes_graded"}
    accuracy = _series(metrics, {**overall, **{category: f"eval/shapes_{category}" for category in CATEGORIES}})
    if accuracy:
        paths.append(plot_curves(accuracy, Path(out_dir) / "accuracy.png", xlabel="step", ylabel="ShapesEval",
                                 title="ShapesEval on the eval prompts"))
    return paths
