"""Reviewer labels exported from a review page: JSONL lines {"file", "prompt", "label"} with label good, artifact
or bad. The same file trains the artifact reward (`train-reward artifact --data labels.jsonl`: good = clean,
artifact = has artifacts, bad is left out) and gives preference pairs (good over bad or artifact, per prompt)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from align_diffusion.gallery.page import LABELS


def read_labels(path: str | Path) -> list[dict]:
    """The label records of `path`, with `file` resolved against the file's folder when relative (and refused when
    no image is there: a page read over HTTP exports paths relative to itself); a file labelled twice alike (merged
    exports) once."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines: U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file, prompt, label = record["file"], record["prompt"], record["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f'{path}:{number}: expected {{"file", "prompt", "label"}} ({error!r})') from None
        if not isinstance(file, str) or not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: file and prompt must be text, got {file!r} and {prompt!r}")
        if label not in LABELS:
            raise ValueError(f"{path}:{number}: label must be one of {LABELS}, got {label!r}")
        if not (path.parent / file).is_file():
            raise ValueError(f"{path}:{number}: image {path.parent / file} not found")
        rows.append((number, {"file": path.parent / file, "prompt": prompt, "label": label}))
    return once_per_file(path, rows)


def once_per_file(source: Path, rows: list[tuple[int, dict]]) -> list[dict]:
    """The records of `rows` (line number, record with a "file" path), a file's repeats dropped; ValueError when a
    repeat says otherwise of it (one image would be both clean and an artifact, or preferred over itself)."""
    kept: dict[str, tuple[int, dict]] = {}
    for number, record in rows:
        file = os.path.realpath(record["file"])  # a link and its target are one image
        differing = [] if file not in kept else [key for key in record
                                                 if key != "file" and kept[file][1][key] != record[key]]
        if differing:  # the same file named by another path says nothing new
            line, earlier = kept[file]
            differences = "; ".join(f"{key} {earlier[key]!r} there, {record[key]!r} here" for key in differing)
            raise ValueError(f"{source}:{number}: {record['file']} was labelled otherwise on line {line}: "
                             f"{differences}")
        kept.setdefault(file, (number, record))
    return [record for _, record in kept.values()]


def preference_pairs(path: str | Path) -> list[dict]:
    """Every (chosen, rejected) pair of images of one prompt where the chosen one is labelled good and the
    rejected one bad or artifact: dicts {"prompt", "chosen", "rejected"} in file order."""
    by_prompt: dict[str, dict[str, list[Path]]] = {}
    for record in read_labels(path):
        by_prompt.setdefault(record["prompt"], {"good": [], "worse": []})[
            "good" if record["label"] == "good" else "worse"].append(record["file"])
    return [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        for prompt, groups in by_prompt.items()
        for chosen in groups["good"]
        for rejected in groups["worse"]
    ]
