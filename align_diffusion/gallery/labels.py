"""Reviewer labels exported from a review page: JSONL lines {"file", "prompt", "label", "image"} with label good,
artifact or bad (`image`: the key of the image's content and prompt; a hand-written file may leave it out). The same
file trains the artifact reward (`train-reward artifact --data labels.jsonl`: good = clean, artifact = has
artifacts, bad is left out) and gives preference pairs (good over bad or artifact, per prompt)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from align_diffusion.gallery.page import LABELS, label_key


def read_labels(path: str | Path) -> list[dict]:
    """The label records of `path` (see `label_lines`); an image labelled twice alike (merged exports) once."""
    path = Path(path)
    rows = []
    for number, record in label_lines(path, '{"file", "prompt", "label"}'):
        prompt, label = record.get("prompt"), record.get("label")
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: prompt must be text, got {prompt!r}")
        if label not in LABELS:
            raise ValueError(f"{path}:{number}: label must be one of {LABELS}, got {label!r}")
        rows.append((number, {"file": record["file"], "prompt": prompt, "label": label}))
    return once_per_image(path, rows)


def label_lines(path: Path, expected: str) -> Iterator[tuple[int, dict]]:
    """The JSON records of the label file `path` (`expected` names their fields) with their line numbers, `file`
    resolved against the file's folder when relative and refused when no image is there (a page read over HTTP
    exports paths relative to itself). A page's export names each image by its content and prompt (`image`): a
    record is refused when its file now holds another image, as a folder sampled again reuses its file names."""
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines: U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file = record["file"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {expected} ({error!r})") from None
        if not isinstance(file, str):
            raise ValueError(f"{path}:{number}: file must be a path, got {file!r}")
        image = path.parent / file
        if not image.is_file():
            raise ValueError(f"{path}:{number}: image {image} not found")
        if "image" in record:
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or record["image"] != label_key(prompt, image.read_bytes()):
                raise ValueError(f"{path}:{number}: {image} is not the image labelled, or not for prompt {prompt!r} "
                                 "(its file was replaced since, as sampling into a folder again replaces them): "
                                 "label it again")
        yield number, {**record, "file": image}


def once_per_image(source: Path, rows: list[tuple[int, dict]]) -> list[dict]:
    """The records of `rows` (line number, record with a "file" path), an image's repeats dropped (by its contents:
    a link, or a copy, such as the two sides of a compare page of folders sampled alike, is one image, which would
    otherwise be trained on and held out at once); ValueError when a repeat says otherwise of it (one image would be
    both clean and an artifact, or preferred over itself, or of two prompts)."""
    kept: dict[bytes, tuple[int, dict]] = {}  # by the SHA-256 of the image's contents
    for number, record in rows:
        image = hashlib.sha256(Path(record["file"]).read_bytes()).digest()
        differing = [] if image not in kept else [key for key in record
                                                  if key != "file" and kept[image][1][key] != record[key]]
        if differing:  # the same image named by another path says nothing new
            line, earlier = kept[image]
            differences = "; ".join(f"{key} {earlier[key]!r} there, {record[key]!r} here" for key in differing)
            raise ValueError(f"{source}:{number}: {record['file']} was labelled otherwise on line {line}: "
                             f"{differences}")
        kept.setdefault(image, (number, record))
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
