"""Resumable checkpoints: `output_dir/checkpoints/step-NNNNNN/`, each written to a temporary folder first and
renamed into place, so an interrupted save never leaves a half-written checkpoint that `latest` would pick up.
A checkpoint is complete while it holds `trainer_state.json`, written last; a deleted one is renamed to a temporary
name first (`discard`), so an interrupted deletion leaves no folder `latest` would pick, and one the next resume
clears."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from align_diffusion.files import give_usual_permissions, sync_folder, sync_to_disk, write_atomically

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TEMPORARY = ".partial"
STATE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{PREFIX}{step:06d}"


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder's name says (`step-000100`); None for any other name (a user's `step-best`)."""
    match = re.fullmatch(rf"{PREFIX}([0-9]+)", folder.name)
    return int(match[1]) if match else None


def completed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: the folders named for a step that hold the trainer's state."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def clear_cut_short(output_dir: str | Path) -> None:
    """Deletes the checkpoint folders a write or a deletion left unfinished (`.partial` ones, and step folders without
    the trainer's state, as an earlier version's deletion left them); never a user's own `step-*` file or folder."""
    for folder in (Path(output_dir) / CHECKPOINTS).glob(f"{PREFIX}*"):
        cut_short = TEMPORARY in folder.name or (checkpoint_step(folder) is not None and not (folder / STATE).is_file())
        if cut_short and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder `resume_from` names ('latest': the newest in output_dir, None if there is none)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = completed_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"resume_from: {path} is not a checkpoint (no trainer_state.json)")
    return path


def partial_dir(output_dir: str | Path, step: int) -> Path:
    """The temporary folder the checkpoint of `step` is written to."""
    return checkpoint_dir(output_dir, step).with_name(f"{PREFIX}{step:06d}{TEMPORARY}")


def begin(partial: Path) -> None:
    """Empties the temporary folder (a crash may have left one)."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)


def commit(partial: Path, trainer_state: dict, keep: int) -> Path:
    """Writes trainer_state.json last, renames the folder into place and prunes all but the newest `keep`."""
    (partial / STATE).write_text(json.dumps(trainer_state, indent=1))
    give_usual_permissions(partial)
    sync_to_disk(partial)
    final = partial.with_name(partial.name.removesuffix(TEMPORARY))
    if final.exists():
        discard(final)
    os.replace(partial, final)
    sync_folder(final.parent)
    for old in completed_checkpoints(final.parent.parent)[:-keep]:
        discard(old)
    return final


def discard(checkpoint: Path) -> None:
    """Deletes a checkpoint: renamed first, so that cut short it leaves a temporary folder (which the next resume
    clears), never one that `latest` would pick."""
    doomed = checkpoint.with_name(f"{checkpoint.name}.discarded{TEMPORARY}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))


def atomic_torch_save(value, path: str | Path) -> None:
    """torch.save to a temporary name, then a rename: `path` is either absent or complete."""
    write_atomically(path, lambda partial: torch.save(value, partial))
