"""Files written so that a reader, or a run that stops halfway, never sees half of one: each is written under a
temporary name beside its place, then renamed over it. Each gets the permissions an ordinary new file gets (read
for all under the usual umask 022): safetensors >= 0.8.1 writes its files 0600, readable by their owner only, so
a LoRA trained by one account would not load for another."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def give_usual_permissions(path: Path) -> None:
    """Sets `path`, or every file under the folder `path`, to the mode `open` gives a new file: 0o666 less the
    umask."""
    umask = os.umask(0)
    os.umask(umask)
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write` on a temporary path beside `path`, then renames it over `path`: readers see the old file or the
    new."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        give_usual_permissions(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # left only when the write failed


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write` on an empty temporary folder beside `folder`, then puts it in `folder`'s place: a write cut
    short leaves the earlier folder whole. A link to a folder keeps pointing at the new one."""
    folder = Path(folder).resolve()
    partial, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial)
        give_usual_permissions(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():  # a folder cannot be renamed over a non-empty one: the earlier one steps aside first
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)


def folder_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be made or written in, None when it can: the nearest of it and its parents that exists must
    be a folder this process may write in. Commands ask before they compute, not when their first output is due."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        return f"{folder} cannot be a folder: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):  # no permission, or a read-only file system
        return f"{folder} cannot be written: {existing} is not writable"
    return None


def check_output_folder(folder: str | Path, marker: str) -> None:
    """Refuses an output folder that cannot be written, or that write_folder_atomically would replace whole although
    it is no earlier output of this kind: a folder with files but no `marker` (the file each such output holds)."""
    folder = Path(folder)
    if problem := folder_problem(folder):
        raise ValueError(problem)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ValueError(f"{folder} holds other files (no {marker}, so it is no earlier output of this kind), which "
                         "the output would replace; name a new or empty folder")
