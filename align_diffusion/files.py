"""Files written so that a reader, or a run that stops halfway, never sees half of one: each is written under a
temporary name beside its place, flushed to the disk, then renamed over it (flushed first, so that after a power cut
too the name holds the old contents or the whole new ones, never an empty file). The files of a folder written
whole get the permissions an ordinary new file gets there (from the umask, or a folder's default ACL):
safetensors 0.8 writes its files 0600, readable by their owner only, so a LoRA trained by one account would not
load for another. (A single file is written with `open` or torch.save, which give it those permissions already.)
And `home_expanded`, the one reading of a path that starts with ~, and `files_sha256`, the one fingerprint of files
read as inputs."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path


def give_usual_permissions(path: Path) -> None:
    """Sets `path`, or every file under the folder `path`, to the mode a new file gets there: read from a probe file
    created as `open` creates one (no umask round trip, which would race with other threads)."""
    folder = path if path.is_dir() else path.parent
    probe = folder / f".{os.getpid()}.{threading.get_ident()}.mode-probe"
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        probe.unlink()
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)


def sync_to_disk(path: Path) -> None:
    """Flushes the file `path`, or every file under the folder `path`, and the folders that name them, from the
    system's cache to the disk."""
    files = [file for file in path.rglob("*") if file.is_file() and not file.is_symlink()] if path.is_dir() else [path]
    for file in files:
        _flush(file)
    for folder in {file.parent for file in files} | ({path} if path.is_dir() else set()):
        sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """Flushes the names in `folder` (a rename's result) to the disk."""
    _flush(folder)


def _flush(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # Windows opens no folder; its renames are flushed with the file system's journal
        return
    try:
        os.fsync(descriptor)
    except OSError:  # a file system that cannot flush (some network and FUSE ones, Windows without write access):
        pass  # what it wrote is as durable as it makes it, as before this flush
    finally:
        os.close(descriptor)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write` on a temporary path beside `path`, flushes it to the disk, then renames it over `path`: readers
    see the old file or the new. A link to a file keeps pointing at it, and the file is replaced (beside it: its
    folder must be writable); a link to nothing is replaced by the file."""
    path = Path(os.path.realpath(path) if os.path.exists(path) else path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        sync_to_disk(partial)
        os.replace(partial, path)
        sync_folder(path.parent)
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
        sync_to_disk(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():  # a folder cannot be renamed over a non-empty one: the earlier one steps aside first
        os.replace(folder, old)
    os.replace(partial, folder)
    sync_folder(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def folder_problem(folder: str | Path, *, replaced_whole: bool = False) -> str | None:
    """Why `folder` cannot be made or written in, None when it can: the nearest of it and its parents that exists must
    be a folder this process may write in, and, for a folder `write_folder_atomically` replaces whole, so must the
    parent it is renamed in. Commands ask before they compute, not when their first output is due."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        return f"{folder} is a link to {os.readlink(folder)}, which does not exist"
    existing = next(path for path in (folder, *folder.parents) if path.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        return f"{folder} cannot be a folder: {existing} is a file"
    if replaced_whole and existing == folder:
        existing = folder.resolve().parent  # where the new folder is written beside it, then renamed
    if not os.access(existing, os.W_OK | os.X_OK):  # no permission, or a read-only file system
        return f"{folder} cannot be written: {existing} is not writable"
    return None


def check_output_folder(folder: str | Path, marker: str, *, replaced_whole: bool = True) -> None:
    """Refuses an output folder that cannot be written, or that would replace, although it is no earlier output of
    this kind, the files of a folder that holds no `marker` (the file each such output holds). `replaced_whole`: the
    output is written by write_folder_atomically."""
    folder = Path(folder)
    if problem := folder_problem(folder, replaced_whole=replaced_whole):
        raise ValueError(problem)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ValueError(f"{folder} holds other files (no {marker}, so it is no earlier output of this kind), which "
                         "the output would replace; name a new or empty folder")


def check_outside(out: str | Path, inputs: dict[str, str | Path | None], out_name: str = "out") -> None:
    """ValueError for an input (name: path or hub id) that is a file or folder inside `out`, an output replaced whole:
    the input would be deleted with the earlier output."""
    for name, value in inputs.items():
        path = None if value is None else Path(home_expanded(str(value))).resolve()
        if path is not None and path.exists() and path.is_relative_to(Path(out).resolve()):
            raise ValueError(f"{name}: {value} lies inside {out_name} {out}, which the output replaces whole; move it "
                             "out first")


def home_expanded(model: str | os.PathLike) -> str:
    """`model` (or any path) as a string with a leading ~ expanded, which from_pretrained leaves as it is (the shell
    does not expand it in a config file or in `--model=~/…`); as it is where ~user names no user."""
    model = os.fspath(model)
    try:
        return str(Path(model).expanduser()) if model.startswith("~") else model
    except RuntimeError:  # "Could not determine home directory": then no such file, named as written
        return model


def files_sha256(paths: Iterable[Path]) -> str:
    """A SHA-256 of files' names and contents, in the order given (each file read in pieces: weights may be large)."""
    digest = hashlib.sha256()
    for path in paths:
        contents = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                contents.update(block)
        digest.update(path.name.encode() + b"\0" + contents.digest())
    return digest.hexdigest()
