"""Review pages: `index.html` for a sample folder, and a side-by-side page comparing two folders.

A page is one self-contained static file: inline CSS and JavaScript, no network, images referenced by relative
paths. The cards are rendered here with every piece of user text HTML-escaped; the page's script only filters,
sorts and collects reviewer labels (good / artifact / bad), exported as JSONL lines {file, prompt, label}.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from html import escape
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from align_diffusion.files import write_text_atomically

LABELS = ("good", "artifact", "bad")
CORRECT = "correct"  # the value name of ShapesEval's strict verdict (1 or 0)
# Record keys that say how a folder's images were made (`sample` and `steer` write them; `steer` its method's options
# under "options"), shown in a page's header.
SETTINGS = ("model", "lora", "dtype", "method", "sampler", "noise_level", "steps", "guidance", "negative_prompt",
            "height", "width", "max_sequence_length", "clip_skip", "guidance_rescale", "true_cfg_scale", "reward")
STEER_SETTINGS = {"num_inference_steps": "steps", "guidance_scale": "guidance"}  # steer's option names of settings
# What a page reads of a record, where the record holds it: (types, the types in words).
RECORD_TYPES = {"file": (str, "a path"), "prompt": (str, "text"), "seed": ((int, type(None)), "a whole number"),
                "rewards": ((dict, type(None)), "an object {name: score}"), "budget": ((dict, type(None)), "an object")}
# A card shows an image 168 to 256 px wide: one this narrow is always enlarged, and shown as sharp pixels. Wider
# ones are shown smooth, as scaling an image down pixel by pixel adds moiré a reviewer would label an artifact.
SHARP_PIXELS_WIDTH = 128


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, value) of each non-blank line of a JSONL file. An unterminated last line that does not parse
    is skipped: the file's writer (a training run, a sampler) may be halfway through it."""
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error
    return rows


def read_records(folder: str | Path) -> list[dict]:
    """The metadata records of a sample folder, in page order."""
    metadata = Path(folder) / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{folder} is not a sample folder: no metadata.jsonl")
    records = []
    for number, record in read_jsonl(metadata):
        if not isinstance(record, dict) or not {"file", "prompt"} <= record.keys():
            raise ValueError(f"{metadata}:{number}: a record is an object with 'file' and 'prompt', got "
                             f"{sorted(record) if isinstance(record, dict) else record!r}")
        for key, (kinds, text) in RECORD_TYPES.items():
            if key in record and (not isinstance(record[key], kinds) or isinstance(record[key], bool)):
                raise ValueError(f"{metadata}:{number}: {key} must be {text}, got {record[key]!r}")
        try:
            json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError as error:  # JSON's escapes can spell half a UTF-16 pair, which no page can hold
            raise ValueError(f"{metadata}:{number}: not text: {error.reason} ({error.object[error.start:error.end]!r})"
                             ) from None
        records.append(record)
    return records


def safe_filename(text: str, max_length: int = 80) -> str:
    """`text` reduced to letters, digits, '.', '_' and '-' (never empty, never hidden), for names built from user
    text."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:max_length]
    if name or not text:
        return name or "untitled"
    return f"untitled-{hashlib.sha256(text.encode()).hexdigest()[:8]}"  # names of other scripts stay apart


def finite_score(value) -> float | None:
    """`value` as a score when it is a finite number; anything else (null, NaN, text from a hand-written or older
    metadata.jsonl) is a missing score, shown as – and sorted last."""
    if not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return value if math.isfinite(value) else None


def record_values(record: dict) -> dict[str, float | None]:
    """The numbers a card can be sorted and filtered by: each reward, and the verdict as 1 / 0."""
    values = {name: finite_score(value) for name, value in (record.get("rewards") or {}).items()}
    if "shapes_strict" in record:
        values[CORRECT] = finite_score(record["shapes_strict"])
    return values


def build_gallery(folder: str | Path, title: str | None = None, links: dict[str, str] | None = None) -> Path:
    """(Re)writes `folder/index.html` from its `metadata.jsonl`; `links` (text → relative URL) go in the header."""
    folder = Path(folder)
    records = read_records(folder)
    values = [record_values(r) for r in records]
    cards = [
        _card(k, record["prompt"], record.get("seed"), value,
              [_figure(record["file"], None, folder / record["file"], record["prompt"])], _scores_table(value),
              " · ".join(part for part in (_diverged_note(record), _steering_detail(record)) if part))
        for k, (record, value) in enumerate(zip(records, values))
    ]
    summary = _summary(len(records), "image", values)
    note = " · ".join(f"{name} {_setting_text(value)}" for name, value in shared_settings(records).items()
                       if value is not None)
    page = _page(title or folder.resolve().name, "single", summary, note, _names(values), cards, links or {})
    out = folder / "index.html"
    write_text_atomically(out, page)
    return out


def recorded_settings(record: dict) -> dict:
    """What a record holds of SETTINGS and of `steer`'s method options (under the name of the setting where one is
    one), null included."""
    options = record.get("options") if isinstance(record.get("options"), dict) else {}
    return {**{name: record[name] for name in SETTINGS if name in record},
            **{STEER_SETTINGS.get(name, name): value for name, value in options.items()}}


def shared_settings(records) -> dict:
    """How a folder's images were made: each setting its records hold (`recorded_settings`), with its value, or
    "varies" where they disagree."""
    each = [recorded_settings(record) for record in records]
    names = sorted(dict.fromkeys(name for settings in each for name in settings), key=_settings_order)
    return {name: each[0].get(name) if len({json.dumps(s.get(name)) for s in each}) == 1 else "varies"
            for name in names}


def _setting_text(value) -> str:
    return "–" if value is None else value if isinstance(value, str) else json.dumps(value)


def _settings_order(name: str) -> int:
    return SETTINGS.index(name) if name in SETTINGS else len(SETTINGS)  # a method option: after them, as it came


def pair_key(record: dict) -> tuple:
    """What pairs two folders' images on a comparison page: the same prompt and seed."""
    return record["prompt"], record.get("seed")


def build_comparison(folder_a: str | Path, folder_b: str | Path, out: str | Path | None = None,
                     title: str | None = None) -> Path:
    """A side-by-side page of two sample folders, pairing images by (prompt, seed), with each score's difference
    B − A per pair; written to `out` (default `folder_a/compare-<name of folder_b>.html`)."""
    folder_a, folder_b = Path(folder_a), Path(folder_b)
    out = Path(out) if out is not None else folder_a / f"compare-{safe_filename(folder_b.resolve().name)}.html"
    name_a, name_b = folder_a.resolve().name, folder_b.resolve().name
    records_a, records_b = _by_pair_key(folder_a), _by_pair_key(folder_b)
    cards, values = [], []
    for key, record_a in records_a.items():
        record_b = records_b.get(key)
        if record_b is None:
            continue
        a, b = record_values(record_a), record_values(record_b)
        value = {}
        for name in dict.fromkeys([*a, *b]):
            value[f"{name} (A)"], value[f"{name} (B)"] = a.get(name), b.get(name)
            value[f"Δ {name}"] = _difference(a.get(name), b.get(name))
        sides = (("A", name_a, folder_a / record_a["file"]), ("B", name_b, folder_b / record_b["file"]))
        figures = [_figure(_relative(image, out.parent), f"{side}: {name}", image, record_a["prompt"])
                   for side, name, image in sides]
        cards.append(_card(len(cards), record_a["prompt"], record_a.get("seed"), value, figures,
                           _comparison_table(a, b)))
        values.append(value)
    if not cards:
        raise ValueError(f"{folder_a} and {folder_b} share no (prompt, seed) pair")
    summary = _summary(len(cards), "pair", values)
    note = f"A = {name_a}, B = {name_b}; pairs matched by prompt and seed"
    for side, other, count in (("A", "B", len(records_a) - len(cards)), ("B", "A", len(records_b) - len(cards))):
        note += f"; {_count(count, 'image')} of {side} without a partner in {other}" if count else ""
    settings_a, settings_b = shared_settings(records_a.values()), shared_settings(records_b.values())
    differing = [name for name in settings_a if name in settings_b and settings_a[name] != settings_b[name]]
    if differing:  # among the settings both folders record: a folder that does not record one says nothing of it
        note += "; made differently: " + " · ".join(
            f"{name} A {_setting_text(settings_a[name])}, B {_setting_text(settings_b[name])}" for name in differing)
    page = _page(title or f"{name_a} vs {name_b}", "compare", summary, note, _names(values), cards, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, page)
    return out


def _by_pair_key(folder: Path) -> dict[tuple, dict]:
    """A folder's records by `pair_key`; ValueError when two share one, which would make the pairing ambiguous."""
    records = {}
    for record in read_records(folder):
        key = pair_key(record)
        if key in records:
            raise ValueError(f"{folder}: {record['file']} and {records[key]['file']} share prompt {key[0]!r} and seed "
                             f"{key[1]}, so their pairs with another folder would be ambiguous")
        records[key] = record
    return records


def stylesheet() -> str:
    return _static("gallery.css")


def _static(name: str) -> str:
    return (files("align_diffusion.gallery") / "static" / name).read_text(encoding="utf-8")


def label_key(prompt: str, content: bytes) -> str:
    """What a page keeps a label under, and exports as its `image`: the image's bytes and its prompt."""
    return hashlib.sha256(prompt.encode() + b"\0" + content).hexdigest()[:32]


def _image_facts(path: Path, prompt: str) -> tuple[str | None, int | None]:
    """The image's label key (None when it is not there: nothing to label) and width (None when unreadable). The
    page's script keeps a reviewer's label under the image's content and prompt, so a label follows its image
    wherever the folder goes and whatever page shows it, never shows on a new image that reuses its file name, nor
    on the same image made for another prompt (a label judges the image against its prompt)."""
    try:
        content = path.read_bytes()
    except OSError:
        return None, None
    key = label_key(prompt, content)
    try:
        return key, Image.open(io.BytesIO(content)).width
    except (UnidentifiedImageError, OSError):
        return key, None


# --- HTML pieces -----------------------------------------------------------------------------------------------
def _relative(path: Path, start: Path) -> str:
    """`path` relative to `start` as the browser resolves it: along the paths as written, not through symlinks."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()


def _names(values: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for value in values for name in value))


def format_score(value: float | None, signed: bool = False) -> str:
    """Three decimals, a huge value in scientific notation, a missing one as a dash."""
    if value is None:
        return "–"
    spec = ".3e" if abs(value) >= 1e6 else ".3f"
    return format(value, "+" + spec if signed else spec)


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _summary(count: int, noun: str, values: list[dict]) -> str:
    parts = [_count(count, noun)]
    for name in _names(values):
        present = [v[name] for v in values if v.get(name) is not None]
        if present:  # each divided first: the sum of scores near the largest float would overflow
            parts.append(f"{name} mean {format_score(sum(v / len(present) for v in present))}")
    return " · ".join(parts)


def _figure(file: str, caption: str | None, image: Path, prompt: str) -> str:
    """An image (`file` as the page links it, `image` on disk) with its label buttons."""
    image_id, width = _image_facts(image, prompt)
    sharp = ' class="pixels"' if width is not None and width <= SHARP_PIXELS_WIDTH else ""
    caption_html = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    # An image not there when the page was built gets no buttons, so no label of it is kept or exported.
    key = "" if image_id is None else f' data-image="{escape(image_id)}"'
    labels = "missing image" if image_id is None else "".join(
        f'<button type="button" data-label="{label}">{label}</button>' for label in LABELS)
    return (f'<figure data-file="{escape(file)}"{key}><img src="{escape(quote(file))}" alt="{escape(file)}"{sharp} '
            f'loading="lazy">{caption_html}<div class="labels">{labels}</div></figure>')


def _verdict(value: float | None) -> str:
    if value is None:
        return ""
    return '<span class="correct">✓ correct</span>' if value else '<span class="wrong">✗ wrong</span>'


def _diverged_note(record: dict) -> str:
    """Says why a sample that left the finite numbers (`"diverged": true`) shows black."""
    return '<span class="wrong">diverged: NaN or infinite values, saved black</span>' if record.get("diverged") else ""


def _steering_detail(record: dict) -> str:
    """What a steering method chose and spent, for records written by `steer`."""
    if record.get("budget") is None:
        return ""
    budget = record["budget"]
    seconds = finite_score(budget.get("seconds"))
    return escape(f"{record.get('method', '')} winner {record.get('winner')} · {budget.get('model_evals')} model evals"
                  f" · {budget.get('reward_evals')} reward evals" + ("" if seconds is None else f" · {seconds:.1f} s"))


def _card(index: int, prompt: str, seed, values: dict, figures: list[str], table: str, detail: str = "") -> str:
    seed_text = "" if seed is None else f"seed {escape(str(seed))}"
    verdict = _verdict(values.get(CORRECT))
    meta = " · ".join(part for part in (seed_text, verdict, detail) if part)
    # As JSON, every character escaped to ASCII: the HTML parser reads a carriage return in an attribute as a newline
    # and NUL as U+FFFD, which the script, and the exported labels, would get instead.
    prompt_attribute = escape(json.dumps(prompt))
    return (f'<article class="card" data-index="{index}" data-prompt="{prompt_attribute}" '
            f'data-seed="{escape(str(seed if seed is not None else ""))}" '
            f'data-values="{escape(json.dumps(values, allow_nan=False))}">'
            f'<div class="pair">{"".join(figures)}</div><p class="prompt">{escape(prompt)}</p>'
            f'<p class="meta">{meta}</p>{table}</article>')


def _scores_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{escape(name)}</th><td>{format_score(v)}</td></tr>"
                   for name, v in values.items() if name != CORRECT)
    return f'<table class="scores">{rows}</table>' if rows else ""


def _difference(a: float | None, b: float | None) -> float | None:
    """b − a, missing when either is or when it overflows."""
    return None if a is None or b is None else finite_score(b - a)


def _comparison_table(a: dict, b: dict) -> str:
    rows = []
    for name in dict.fromkeys([*a, *b]):
        va, vb = a.get(name), b.get(name)
        delta = _difference(va, vb)
        delta = None if delta is None else round(delta, 3) + 0.0  # as shown: no red -0.000
        trend = "" if not delta else ' class="up"' if delta > 0 else ' class="down"'
        rows.append(f"<tr><th>{escape(name)}</th><td>{format_score(va)}</td><td>{format_score(vb)}</td>"
                    f"<td{trend}>{format_score(delta, signed=True)}</td></tr>")
    header = "<tr><th></th><td>A</td><td>B</td><td>B − A</td></tr>"
    return f'<table class="scores">{header}{"".join(rows)}</table>'


def _page(title: str, mode: str, summary: str, note: str, names: list[str], cards: list[str],
          links: dict[str, str]) -> str:
    # The card's own orders go by data-sort, scores by data-key: a reward may be named "prompt" or "seed".
    sort_options = ['<option data-sort="index">page order</option>', '<option data-sort="prompt">prompt</option>',
                    '<option data-sort="seed">seed</option>']
    for name in names:
        sort_options += [f'<option data-key="{escape(name)}" data-order="desc">{escape(name)} ↓</option>',
                         f'<option data-key="{escape(name)}" data-order="asc">{escape(name)} ↑</option>']
    value_options = '<option value="">(score)</option>' + "".join(
        f'<option value="{escape(name)}">{escape(name)}</option>' for name in names)
    nav = "".join(f'<a href="{escape(quote(url))}">{escape(text)}</a>' for text, url in links.items())
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>
{stylesheet()}</style>
</head>
<body data-mode="{mode}">
<noscript><p class="note">This page filters, sorts and keeps labels with JavaScript, which is off: the images and
scores below are all there, in page order.</p></noscript>
<header>
<h1>{escape(title)}</h1>
<p class="summary">{escape(summary)}</p>
{f'<p class="note">{escape(note)}</p>' if note else ""}
{f"<nav>{nav}</nav>" if nav else ""}
<div class="controls">
<label>prompt contains <input id="filter-prompt" type="search"></label>
<label>sort by <select id="sort">{"".join(sort_options)}</select></label>
<label>show where <select id="filter-value">{value_options}</select></label>
<label>≥ <input id="filter-min" type="number" step="any"></label>
<label>≤ <input id="filter-max" type="number" step="any"></label>
<span id="shown"></span>
<button type="button" id="export">export labels (<span id="label-count">0</span>)</button>
<span id="label-store" class="warning"></span>
</div>
</header>
<main id="grid">
{chr(10).join(cards)}
</main>
<script>
{_static("gallery.js")}</script>
</body>
</html>
"""
