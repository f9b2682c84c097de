"""Reviewer labels exported from a review page: JSONL lines {"file", "prompt", "label"} with label good, artifact
or bad. The same file trains the artifact reward (`train-reward artifact --data labels.jsonl`: good = clean,
artifact = has artifacts, bad is left out) and gives preference pairs (good over bad or artifact, per prompt)."""

from __future__ import annotations

import json
from pathlib import Path

from align_diffusion.gallery.page import LABELS


def read_labels(path: str | Path) -> list[dict]:
    """The label records of `path`, with `file` resolved against the file's folder when relative."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().split("\n"), 1):  # not splitlines: U+2028 in a prompt
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file, prompt, label = record["file"], record["prompt"], record["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f'{path}:{number}: expected {{"file", "prompt", "label"}} ({error!r})') from None
        if label not in LABELS:
            raise ValueError(f"{path}:{number}: label must be one of {LABELS}, got {label!r}")
        records.append({"file": path.parent / file, "prompt": prompt, "label": label})
    return records


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
