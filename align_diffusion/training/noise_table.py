"""DenseGRPO's per-timestep noise calibration ψ(t): a noise level for every sampling step, tuned so that each step's
exploration yields step rewards of both signs.

One round samples groups with the current levels, computes the step rewards ΔR_t of every trajectory, and for each
step t counts the positive and the negative ones: where they balance (|n₊ − n₋| ≤ ε1 · (n₊ + n₋)) the step can afford
more noise and ψ(t) rises by ε2; elsewhere it falls by ε2 (never below 0). A step whose step rewards are all 0 (it
changed no trajectory's score: common under a discrete reward such as `shapes`) counts as balanced and rises, so
that more noise there may change something. A step with no finite step reward (every trajectory diverged or went
unscored) keeps its level: it gives no evidence either way. The table is a JSON file
{"noise_levels": [ψ(0), …, ψ(T−1)], "sampler": …, …} that `sampling.noise_table` makes the trainer's sampler read.

ψ(t) is the sampler's own noise level (Flow-SDE's a, Dance-SDE's η, CPS's a, DDIM's η), not σ_t itself as in
DenseGRPO's Eq. 11: a table means something under its sampler only, and under Flow-SDE a step of ε2 moves σ_t by
ε2 · √(σ / (1 − σ)) (larger at early, noisy steps). Each step settles at the same balance either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from align_diffusion.files import write_text_atomically


def calibrate_step(levels: list[float], deltas: torch.Tensor, eps1: float, eps2: float,
                   largest: float = math.inf) -> list[float]:
    """One calibration update of the per-step levels from step rewards `deltas` (B, T), kept within [0, largest]
    (the sampler's largest valid level)."""
    if deltas.shape[1] != len(levels):
        raise ValueError(f"{deltas.shape[1]} steps of step rewards for {len(levels)} noise levels")
    updated = []
    for level, column in zip(levels, deltas.T):
        if not column.isfinite().any():
            updated.append(level)
            continue
        positive, negative = int((column > 0).sum()), int((column < 0).sum())
        balanced = abs(positive - negative) <= eps1 * (positive + negative)
        # rounded, so that levels stepping down by eps2 reach 0 exactly: 0.7 − 7 · 0.1 is 2.8e-17 in floats, a step
        # that would count as stochastic with a std too small for its log-probs to mean anything
        updated.append(min(largest, max(0.0, round(level + eps2 if balanced else level - eps2, 9))))
    return updated


def write_table(path: str | Path, levels: list[float], **provenance) -> None:
    write_text_atomically(path, json.dumps({"noise_levels": levels, **provenance}, indent=1))


def holds_table(path: str | Path) -> bool:
    """Whether `path` is a noise table (a JSON object with 'noise_levels'), as calibrate-noise writes."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False
    return isinstance(table, dict) and "noise_levels" in table


def read_table(path: str | Path, num_steps: int, sampler: str) -> list[float]:
    """The levels of a noise table, checked against the number of sampling steps and the sampler it was calibrated
    for (a table without one, written before tables named it, is taken as it is)."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        levels = table["noise_levels"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"noise table {path}: expected a JSON file with a 'noise_levels' list ({error!r})") from None
    if not isinstance(levels, list) or len(levels) != num_steps or not all(_is_level(v) for v in levels):
        raise ValueError(f"noise table {path}: needs {num_steps} finite, non-negative levels (one per step), "
                         f"got {levels}")
    if table.get("sampler", sampler) != sampler:
        raise ValueError(f"noise table {path}: calibrated for sampler {table['sampler']}, not {sampler} (a level "
                         f"means another noise under each); calibrate a table for {sampler}")
    return [float(v) for v in levels]


def _is_level(value) -> bool:
    try:  # float() of a huge JSON integer overflows
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= float(value) < math.inf
    except OverflowError:
        return False
