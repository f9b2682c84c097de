"""Files written so that a reader, or a run that stops halfway, never sees half of one: each is written under a
temporary name beside its place, then renamed over it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write` on a temporary path beside `path`, then renames it over `path`: readers see the old file or the
    new."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # left only when the write failed


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))
