"""Review pages in real headless Chromium: cards, sorting, filtering, the side-by-side mode, label export and
HTML escaping; and the label file read back as artifact data and as preference pairs."""

import hashlib
import html
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from align_diffusion.cli import main
from align_diffusion.gallery import build_comparison, build_gallery, build_run_page, safe_filename
from align_diffusion.gallery.labels import preference_pairs, read_labels
from align_diffusion.gallery.page import read_records
from align_diffusion.gallery.plots import plot_training
from align_diffusion.gallery.run import read_metrics
from align_diffusion.gallery.browser import headless_chromium
from align_diffusion.rewards.artifact import read_labelled_images
from align_diffusion.sampling.folder import SampleFolder, reward_record

HOSTILE = '<script>window.pwned = 1</script><b>bold</b> "quoted" & \'single\''
# (prompt, seed, shapes score, verdict); one score missing, one hostile prompt.
RECORDS_A = [
    ("a red circle", 0, 0.25, False),
    ("a blue square", 1, 1.0, True),
    ("a red circle", 2, None, None),
    (HOSTILE, 3, 0.5, False),
    ("two green triangles", 4, 0.75, True),
]
RECORDS_B = [  # the same prompts and seeds except seed 4, plus one image A lacks
    ("a red circle", 0, 0.5, True),
    ("a blue square", 1, 0.25, False),
    ("a red circle", 2, 0.125, False),
    (HOSTILE, 3, 0.5, False),
    ("a white circle", 9, 1.0, True),
]


def sample_image(k: int, root: Path) -> Image.Image:
    """Image k of a folder: a color of its own, and pixels drawn from the folder's path, so that images of
    different folders (different tests) differ, as reviewer labels follow an image's content."""
    image = Image.new("RGB", (64, 64), (40 * k, 100, 200 - 30 * k))
    for n, byte in enumerate(hashlib.sha256(str(root).encode()).digest()[:8]):
        image.putpixel((n, 0), (byte, byte, byte))
    return image


def make_folder(root: Path, records, file_names=None) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for k, (prompt, seed, score, verdict) in enumerate(records):
        file = f"images/{file_names[k] if file_names else f'{k:05d}.png'}"
        sample_image(k, root).save(root / file)
        record = {"file": file, "prompt": prompt, "seed": seed, "rewards": {"shapes": score}}
        if verdict is not None:
            record["shapes_strict"] = verdict
        lines.append(json.dumps(record) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    driver = headless_chromium(download_dir=downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture
def folders(tmp_path):
    # One file name with a space and a '#', which must be URL-quoted in the page.
    a = make_folder(tmp_path / "base run", RECORDS_A, ["00000.png", "00001.png", "a #2.png", "00003.png", "00004.png"])
    b = make_folder(tmp_path / "trained", RECORDS_B)
    return a, b


def labels_loaded(browser) -> str:
    """Waits for the page's stored labels to load (the label buttons work from then on): 'kept' or 'not-kept'."""
    return WebDriverWait(browser, 10).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-labels"))


def open_page(browser, path: Path) -> None:
    """Every test's pages lie in its own folder, so no test sees the labels another left."""
    browser.get(path.resolve().as_uri())
    assert labels_loaded(browser) == "kept"


def reload(browser) -> None:
    browser.refresh()
    assert labels_loaded(browser) == "kept"


def visible_cards(browser):
    return [card for card in browser.find_elements(By.CSS_SELECTOR, ".card") if card.is_displayed()]


def card_order(browser) -> list[int]:
    return [int(card.get_attribute("data-index")) for card in visible_cards(browser)]


def choose_sort(browser, text: str) -> None:
    Select(browser.find_element(By.ID, "sort")).select_by_visible_text(text)


def test_cards_images_and_escaping(browser, folders, tmp_path):
    a, _ = folders
    open_page(browser, build_gallery(a))
    cards = visible_cards(browser)
    assert len(cards) == len(RECORDS_A)
    assert browser.find_element(By.ID, "shown").text == f"{len(RECORDS_A)} of {len(RECORDS_A)} shown"
    # Every image loaded, the one with a space and '#' in its name included.
    widths = browser.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
    assert widths == [64] * len(RECORDS_A)
    # The hostile prompt is text: shown verbatim, its script never ran, no element came out of it.
    hostile = cards[3]
    assert hostile.find_element(By.CSS_SELECTOR, ".prompt").text == HOSTILE
    assert json.loads(hostile.get_attribute("data-prompt")) == HOSTILE
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, ".card b") == []
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1  # the page's own
    # Verdicts and scores as recorded.
    assert "✓ correct" in cards[1].text and "✗ wrong" in cards[0].text
    assert "–" in cards[2].find_element(By.CSS_SELECTOR, ".scores").text  # the missing score
    shot = tmp_path / "gallery.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0


def test_sorting_and_filtering(browser, folders):
    a, _ = folders
    open_page(browser, build_gallery(a))
    choose_sort(browser, "shapes ↓")
    # Scores 0.25, 1.0, None, 0.5, 0.75: descending, the missing one last.
    assert card_order(browser) == [1, 4, 3, 0, 2]
    choose_sort(browser, "shapes ↑")
    assert card_order(browser) == [0, 3, 4, 1, 2]
    choose_sort(browser, "seed")
    assert card_order(browser) == [0, 1, 2, 3, 4]
    choose_sort(browser, "prompt")
    assert card_order(browser) == [3, 1, 0, 2, 4]  # '<' before letters; equal prompts in page order

    choose_sort(browser, "page order")
    browser.find_element(By.ID, "filter-prompt").send_keys("red circle")
    assert card_order(browser) == [0, 2]
    browser.find_element(By.ID, "filter-prompt").clear()
    browser.execute_script("document.getElementById('filter-prompt').dispatchEvent(new Event('input'))")
    Select(browser.find_element(By.ID, "filter-value")).select_by_visible_text("shapes")
    browser.find_element(By.ID, "filter-min").send_keys("0.5")
    assert card_order(browser) == [1, 3, 4]  # the card without a score is not shown
    browser.find_element(By.ID, "filter-max").send_keys("0.8")
    assert card_order(browser) == [3, 4]
    assert browser.find_element(By.ID, "shown").text == "2 of 5 shown"
    Select(browser.find_element(By.ID, "filter-value")).select_by_visible_text("correct")
    assert card_order(browser) == []  # correct is 0 or 1, never within [0.5, 0.8]


def test_a_reward_named_like_a_card_field_sorts_by_its_scores(browser, tmp_path):
    folder = make_folder(tmp_path / "named", [("b", 2, 0.5, None), ("a", 1, 0.9, None), ("c", 0, 0.1, None)])
    add_to_records(folder, rewards=[{"prompt": 0.1, "seed": 3.0}, {"prompt": 0.5, "seed": 1.0},
                                    {"prompt": 0.9, "seed": 2.0}])
    open_page(browser, build_gallery(folder))
    for choice, order in [("prompt ↓", [2, 1, 0]), ("prompt", [1, 0, 2]), ("seed ↑", [1, 2, 0]), ("seed", [2, 1, 0]),
                          ("prompt ↑", [0, 1, 2])]:
        choose_sort(browser, choice)
        assert card_order(browser) == order, choice


def test_compare_mode_pairs_by_prompt_and_seed(browser, folders):
    a, b = folders
    page = build_comparison(a, b)
    assert page == a / "compare-trained.html"
    open_page(browser, page)
    cards = visible_cards(browser)
    assert len(cards) == 4  # seed 4 has no partner in B; B's seed 9 has none in A
    note = browser.find_element(By.CSS_SELECTOR, ".note").text
    assert "1 image of A without a partner in B" in note and "1 image of B without a partner in A" in note
    images = [img.get_attribute("src") for img in cards[0].find_elements(By.TAG_NAME, "img")]
    assert "base%20run/images/00000.png" in images[0] and "trained/images/00000.png" in images[1]
    widths = browser.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
    assert widths == [64] * 8
    # B − A per pair, from the recorded scores: 0.25, -0.75, missing (A has no score), 0.
    deltas = [json.loads(card.get_attribute("data-values"))["Δ shapes"] for card in cards]
    assert deltas == [0.25, -0.75, None, 0.0]
    assert "+0.250" in cards[0].text and "-0.750" in cards[1].text
    choose_sort(browser, "Δ shapes ↓")
    assert card_order(browser) == [0, 3, 1, 2]
    choose_sort(browser, "Δ correct ↑")
    assert card_order(browser)[0] == 1  # the pair that went from correct to wrong


def wait_for_download(folder: Path, name: str, timeout: float = 20) -> Path:
    path = folder / name
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded into {folder}: {list(folder.iterdir())}")


def label(browser, card, name: str, side: int = 0) -> None:
    figure = card.find_elements(By.TAG_NAME, "figure")[side]
    figure.find_element(By.CSS_SELECTOR, f'button[data-label="{name}"]').click()


def export_labels(browser) -> Path:
    """Clicks "export labels"; the downloaded file."""
    for old in browser.downloads.glob("labels*.jsonl"):
        old.unlink()
    browser.find_element(By.ID, "export").click()
    return wait_for_download(browser.downloads, "labels.jsonl")


def label_in_another_tab(browser, page: Path, labels: dict[int, str]) -> None:
    """Opens `page` in a new tab, gives card k the label labels[k] there, closes it and comes back."""
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    open_page(browser, page)
    for k, name in labels.items():
        label(browser, visible_cards(browser)[k], name)
    browser.close()
    browser.switch_to.window(first)


def test_label_export_feeds_the_artifact_reward_and_preference_pairs(browser, folders):
    a, _ = folders
    open_page(browser, build_gallery(a))
    cards = visible_cards(browser)
    label(browser, cards[0], "good")
    label(browser, cards[1], "artifact")
    label(browser, cards[2], "bad")
    label(browser, cards[3], "good")
    label(browser, cards[3], "good")  # a second click takes the label off
    label(browser, cards[4], "good")
    assert browser.find_element(By.ID, "label-count").text == "4"
    reload(browser)  # labels survive a reload
    assert browser.find_element(By.ID, "label-count").text == "4"
    assert "label-artifact" in visible_cards(browser)[1].find_element(By.TAG_NAME, "figure").get_attribute("class")

    exported = export_labels(browser)
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(row["prompt"], row["label"]) for row in rows] == [
        ("a red circle", "good"), ("a blue square", "artifact"), ("a red circle", "bad"),
        ("two green triangles", "good")]
    assert [Path(row["file"]) for row in rows] == [(a / "images" / name).resolve()
                                                   for name in ("00000.png", "00001.png", "a #2.png", "00004.png")]
    for row in rows:  # each image named by its content and prompt, as the page keeps its label
        content = Path(row["file"]).read_bytes()
        assert row["image"] == hashlib.sha256(row["prompt"].encode() + b"\0" + content).hexdigest()[:32]

    # As the artifact reward's data: good is clean (0), artifact is 1, bad is left out.
    assert read_labelled_images(exported) == [(a / "images" / "00000.png", 0), (a / "images" / "00001.png", 1),
                                              (a / "images" / "00004.png", 0)]
    # As preference pairs: the good red circle over the bad one.
    assert preference_pairs(exported) == [{"prompt": "a red circle", "chosen": (a / "images" / "00000.png").resolve(),
                                           "rejected": (a / "images" / "a #2.png").resolve()}]


def test_a_missing_image_takes_no_label_and_a_prompts_carriage_return_is_exported_as_it_is(browser, tmp_path):
    """A missing image's label could only be kept by its path, which another folder's page may share; the HTML
    parser would read a carriage return in an attribute as a newline, and NUL as U+FFFD."""
    odd = "line\r\nbreak\rcr\0nul"
    folder = make_folder(tmp_path / "f", [(odd, 1, 0.5, None), ("a red circle", 2, 0.5, None)])
    (folder / "images" / "00001.png").unlink()
    open_page(browser, build_gallery(folder))
    cards = visible_cards(browser)
    missing = cards[1].find_element(By.TAG_NAME, "figure")
    assert missing.find_elements(By.TAG_NAME, "button") == [] and "missing image" in missing.text
    label(browser, cards[0], "artifact")
    exported = export_labels(browser)
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(row["prompt"], row["label"]) for row in rows] == [(odd, "artifact")]  # NUL came out as U+FFFD
    assert [record["prompt"] for record in read_labels(exported)] == [odd]  # its image key is of the same prompt


def test_labels_follow_their_images_not_their_file_names_or_folders(browser, folders, tmp_path):
    a, _ = folders
    open_page(browser, build_gallery(a))
    label(browser, visible_cards(browser)[0], "good")
    label(browser, visible_cards(browser)[1], "bad")
    build_gallery(a)  # the same samples (a training run rebuilds its pages after every evaluation)
    reload(browser)
    assert browser.find_element(By.ID, "label-count").text == "2"
    # Sampled again into the same folder (`eval --overwrite`): image 0's file name now shows a new image.
    sample_image(7, tmp_path).save(a / "images" / "00000.png")
    build_gallery(a)
    reload(browser)
    assert browser.find_element(By.ID, "label-count").text == "1"
    first, second = (card.find_element(By.TAG_NAME, "figure").get_attribute("class")
                     for card in visible_cards(browser)[:2])
    assert "label-good" not in first and "label-bad" in second
    # The folder copied elsewhere (to a laptop, without its file times): the label comes along with the image.
    moved = tmp_path / "copied" / "elsewhere"
    moved.parent.mkdir()
    moved.mkdir()
    (moved / "images").mkdir()
    for path in a.rglob("*"):
        if path.is_file() and path.suffix in (".png", ".jsonl"):
            (moved / path.relative_to(a)).write_bytes(path.read_bytes())
    open_page(browser, build_gallery(moved))
    assert browser.find_element(By.ID, "label-count").text == "1"


def test_a_browser_that_keeps_no_storage_gets_a_warning_and_working_labels(browser, folders):
    a, _ = folders
    # As a browser with site storage blocked does: reading window.indexedDB throws.
    blocked = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        Object.defineProperty(window, "indexedDB", {get() { throw new DOMException("blocked", "SecurityError"); }});
    """})
    try:
        browser.get(build_gallery(a).resolve().as_uri())
        assert labels_loaded(browser) == "not-kept"
        assert "labels are not kept after this page closes" in browser.find_element(By.ID, "label-store").text
        label(browser, visible_cards(browser)[0], "good")
        assert browser.find_element(By.ID, "label-count").text == "1"
        browser.refresh()
        assert labels_loaded(browser) == "not-kept"
        assert browser.find_element(By.ID, "label-count").text == "0"
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", blocked)
    open_page(browser, build_gallery(a))
    assert browser.find_element(By.ID, "label-store").text == ""


def test_labels_load_after_an_older_pages_tab_lets_go_and_a_newer_page_takes_the_store(folders, tmp_path):
    """Waiting on an older page's tab, the export downloaded no labels, and the waiting notice stayed after the
    labels loaded; a page of a later version waited forever on this page's open store."""
    a, _ = folders
    blank = tmp_path / "blank.html"  # another page of the file:// origin, the one the review pages share
    blank.write_text("<!doctype html><title>other</title>")
    browser = headless_chromium(download_dir=tmp_path / "downloads")  # a profile no store exists in yet
    try:
        browser.get(blank.as_uri())
        older = browser.current_window_handle
        assert browser.execute_async_script("""const done = arguments[0];
            const opening = indexedDB.open("align-diffusion", 1);  // as a page of the first label store did
            opening.onsuccess = () => { window.held = opening.result; done("open"); };""") == "open"
        browser.switch_to.new_window("tab")
        browser.get(build_gallery(a).resolve().as_uri())
        store = browser.find_element(By.ID, "label-store")
        WebDriverWait(browser, 10).until(lambda _: "once the tabs of older review pages are closed" in store.text)
        assert not browser.find_element(By.ID, "export").is_enabled()
        page = browser.current_window_handle
        browser.switch_to.window(older)
        browser.execute_script("window.held.close()")
        browser.switch_to.window(page)
        assert labels_loaded(browser) == "kept"
        assert browser.find_element(By.ID, "export").is_enabled()
        assert browser.find_element(By.ID, "label-store").text == ""
        browser.switch_to.window(older)  # now a page of a later version opens the store
        assert browser.execute_async_script("""const done = arguments[0];
            const opening = indexedDB.open("align-diffusion", 3);
            opening.onsuccess = () => { opening.result.close(); done("open"); };
            opening.onblocked = () => done("blocked");""") == "open"
        browser.switch_to.window(page)
        assert "a newer review page took the label store" in browser.find_element(By.ID, "label-store").text
    finally:
        browser.quit()


def test_labels_on_a_compare_page_name_each_side(browser, folders):
    a, b = folders
    open_page(browser, build_comparison(a, b))
    card = visible_cards(browser)[1]
    label(browser, card, "good", side=0)
    label(browser, card, "bad", side=1)
    rows = [json.loads(line) for line in export_labels(browser).read_text().splitlines()]
    assert [(Path(r["file"]), r["label"]) for r in rows] == [((a / "images/00001.png").resolve(), "good"),
                                                             ((b / "images/00001.png").resolve(), "bad")]
    assert preference_pairs(browser.downloads / "labels.jsonl")[0]["rejected"] == (b / "images/00001.png").resolve()


def test_run_page_links_plots_and_evaluations(browser, tmp_path):
    run = tmp_path / "run"
    rows = [{"step": 0, "eval/reward_mean": 0.3, "eval/shapes_strict": 0.1, "eval/shapes_graded": 0.3,
             "eval/shapes_pass@4": 0.35, "eval/shapes_pass@2": 0.25}]
    rows += [{"step": s, "reward_mean": 0.2 + 0.01 * s} for s in range(1, 5)]
    rows[-1].update({"eval/reward_mean": 0.5, "eval/shapes_strict": 0.4, "eval/shapes_graded": 0.5,
                     "eval/shapes_pass@2": 0.45, "eval/shapes_pass@4": 0.55})
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_folder(run / "eval" / "step-000000", RECORDS_A)
    make_folder(run / "eval" / "step-000004", RECORDS_A)
    main(["gallery", str(run)])
    browser.get((run / "index.html").resolve().as_uri())  # a run page: plots and links, no labels
    assert [img.get_attribute("alt") for img in browser.find_elements(By.CSS_SELECTOR, ".plots img")] == [
        "reward", "accuracy"]
    assert browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth > 0)") == [True] * 2
    table = browser.find_element(By.CSS_SELECTOR, "table.runs").text.splitlines()
    assert table[0].startswith("step eval reward strict pass@2 pass@4 graded")
    assert table[1].startswith("0 0.300 0.100 0.250 0.350 0.300")
    assert table[2].startswith("4 0.500 0.400 0.450 0.550 0.500")
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "table.runs a")]
    assert len(links) == 3  # two galleries and step 4 against step 0
    for link in links:
        browser.get(link)
        assert len(visible_cards(browser)) == len(RECORDS_A)


def test_a_training_runs_evaluation_rebuilt_alone_keeps_its_title_and_link_to_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/reward_mean": 0.3}) + "\n")
    make_folder(run / "eval" / "step-000000", RECORDS_A)
    main(["gallery", str(run)])
    page = run / "eval" / "step-000000" / "index.html"
    written = page.read_text()
    assert "<title>run — step-000000</title>" in written and 'href="../../index.html"' in written
    page.unlink()
    main(["gallery", str(run / "eval" / "step-000000")])
    assert page.read_text() == written
    page.unlink()
    monkeypatch.chdir(run / "eval" / "step-000000")
    main(["gallery", "."])
    assert page.read_text() == written


def test_run_page_compares_only_evaluations_that_share_samples_with_the_first(tmp_path):
    """An eval interrupted before its first image (step 0) and one of other prompts (step 6) get galleries only;
    the comparisons are against the first evaluation that has samples (step 2)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/reward_mean": 0.5}) + "\n"
                                               for s in (0, 2, 4, 6)))
    make_folder(run / "eval" / "step-000000", [])
    make_folder(run / "eval" / "step-000002", RECORDS_A)
    make_folder(run / "eval" / "step-000004", RECORDS_A)
    make_folder(run / "eval" / "step-000006", [("three triangles", 7, 0.5, None)])
    main(["gallery", str(run)])
    links = [link for link in re.findall(r'href="([^"]+)"', (run / "index.html").read_text())
             if link.startswith("eval/")]
    assert links == [f"eval/step-{s:06d}/index.html" for s in (0, 2)] + [
        "eval/step-000004/index.html", "eval/step-000002/compare-step-000004.html", "eval/step-000006/index.html"]
    assert all((run / link).is_file() for link in links)


def test_run_page_orders_evaluations_by_step_number_and_skips_folders_not_named_for_one(tmp_path):
    """step-1000000 comes after step-900000 (by name it came first, and every page compared against it); a user's
    step-best, or step-² (a digit to str.isdigit, not to int), is no evaluation."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/reward_mean": 0.5}) + "\n"
                                               for s in (900_000, 1_000_000, 1_100_000)))
    for name in ("step-900000", "step-1000000", "step-1100000", "step-best", "step-\u00b2"):
        make_folder(run / "eval" / name, RECORDS_A)
    main(["gallery", str(run)])
    links = [link for link in re.findall(r'href="([^"]+)"', (run / "index.html").read_text())
             if link.startswith("eval/")]
    assert links == ["eval/step-900000/index.html", "eval/step-1000000/index.html",
                     "eval/step-900000/compare-step-1000000.html", "eval/step-1100000/index.html",
                     "eval/step-900000/compare-step-1100000.html"]


def test_run_page_of_merged_and_cut_short_metrics(tmp_path):
    """Metrics that repeat a step (the last row counts), hold NaN, null or a `$` in a term's name, and an evaluation
    whose samples were written but not its scores: one table row per step, that evaluation linked."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "eval/reward_mean": 0.3, "eval/shapes_strict": 0.1},
            {"step": 1, "reward_mean": 0.2, "reward/clip:/data/$\\x$/y_mean": 0.1, "reward/jpeg_mean": -3.0},
            {"step": 2, "reward_mean": None, "eval/reward_mean": 0.9, "eval/shapes_strict": 0.9},
            {"step": 1, "reward_mean": 0.25},
            {"step": 2, "reward_mean": 0.3, "eval/reward_mean": 0.4, "eval/shapes_strict": float("nan")}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in (0, 2, 3):
        make_folder(run / "eval" / f"step-{step:06d}", RECORDS_A)
    main(["gallery", str(run)])
    page = (run / "index.html").read_text()
    table = re.findall(r"<tr><td>(\d+)</td>(.*?)</tr>", page)
    assert [(step, re.findall(r"<td>([^<]*)</td>", cells)) for step, cells in table] == [
        ("0", ["0.300", "0.100"]), ("2", ["0.400", "–"]), ("3", ["–", "–"])]
    assert "eval/step-000003/index.html" in table[2][1] and "3 evaluations" in page
    assert (run / "plots" / "reward.png").is_file()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps([1, 2]) + "\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a metrics row"):
        main(["gallery", str(run)])


def test_gallery_command_and_file_names(folders, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "pages" / "side by side.html"
    main(["gallery", str(a), "--compare", str(b), "--out", str(out)])
    assert (a / "index.html").is_file() and out.is_file()
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a sample folder"):
        main(["gallery", str(tmp_path)])
    with pytest.raises(SystemExit, match="--out: names the side-by-side page, so it needs --compare"):
        main(["gallery", str(a), "--out", str(out)])
    assert safe_filename("日本").startswith("untitled-") and safe_filename("日本") != safe_filename("中国")
    for hostile in ["../../etc/passwd", "<script>alert(1)</script>", "", "..", "a/b\\c:d*e?f", "日本"]:
        name = safe_filename(hostile)
        assert name and "/" not in name and "\\" not in name and not name.startswith(".")
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def add_to_records(folder: Path, **fields) -> None:
    """Sets `fields` in every record of `folder`; a list gives one value per record."""
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for k, record in enumerate(records):
        record.update({name: value[k] if isinstance(value, list) else value for name, value in fields.items()})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def page_note(page: Path) -> str:
    """The note in the page's header."""
    return html.unescape(re.search(r'<header>.*?<p class="note">(.*?)</p>', page.read_text(), re.S).group(1))


def test_pages_say_how_their_images_were_made(folders, tmp_path):
    a, b = folders
    shared = dict(model="tiny-sd3", guidance=4.5, negative_prompt="<blurry>", clip_skip=None)
    add_to_records(a, **shared, sampler="ode", lora=None, steps=[2, 2, 2, 4, 2],
                   options={"num_particles": 4, "keep": [0.4, 0.5]})
    add_to_records(b, **shared, sampler="ode", lora="run/lora", steps=2, winner=[0, 1, 0, 1, 0])
    # In SETTINGS order, then steer's options; null settings and what is no setting (the winner) left out.
    assert page_note(build_gallery(a)) == ("model tiny-sd3 · sampler ode · steps varies · guidance 4.5 · "
                                           "negative_prompt <blurry> · num_particles 4 · keep [0.4, 0.5]")
    assert page_note(build_gallery(b)) == "model tiny-sd3 · lora run/lora · sampler ode · steps 2 · guidance 4.5 · " \
                                          "negative_prompt <blurry>"
    raw = (b / "index.html").read_text()
    assert "negative_prompt &lt;blurry&gt;" in raw and "<blurry>" not in raw
    # Side by side: the settings both folders record and differ in (A's method options are not B's).
    assert page_note(build_comparison(a, b)).endswith("; made differently: lora A –, B run/lora · steps A varies, B 2")
    # steer records steps and guidance among its options, under their own names, and no sampler.
    c = make_folder(tmp_path / "steered", RECORDS_B)
    add_to_records(c, model="tiny-sd3", lora="run/lora", method="best-of-n",
                   options={"num_candidates": 4, "num_inference_steps": 2, "guidance_scale": 4.5,
                            "negative_prompt": "<blurry>"})
    assert "made differently" not in page_note(build_comparison(b, c))
    assert page_note(build_comparison(a, c)).endswith("; made differently: lora A –, B run/lora · steps A varies, B 2")


def test_a_diverged_sample_says_why_it_shows_black(folders):
    a, _ = folders
    add_to_records(a, diverged=[False, True, False, False, False])
    cards = re.findall(r'<article class="card".*?</article>', build_gallery(a).read_text(), re.S)
    assert ["diverged: NaN or infinite values, saved black" in card for card in cards] == [
        False, True, False, False, False]


def test_pages_are_replaced_whole(folders):
    a, _ = folders
    page = build_gallery(a)
    with page.open() as reader:  # a browser or server reading the page while it is rebuilt
        (a / "metadata.jsonl").write_text((a / "metadata.jsonl").read_text().replace("a blue square", "a new prompt"))
        build_gallery(a)
        old = reader.read()
    assert "a blue square" in old and old.rstrip().endswith("</html>")
    assert "a new prompt" in page.read_text()
    assert sorted(p.name for p in a.iterdir()) == ["images", "index.html", "metadata.jsonl"]  # no temporary left


def test_readers_skip_a_half_written_last_line_only(folders, tmp_path):
    a, _ = folders
    metadata = a / "metadata.jsonl"
    complete = metadata.read_text()
    metadata.write_text(complete + '{"file": "images/00005.png", "prom')  # a sampler midway through a line
    assert len(read_records(a)) == len(RECORDS_A)
    metadata.write_text(complete + '{"file": "images/00000.png", "prompt": "x"}')  # complete, just no newline
    assert len(read_records(a)) == len(RECORDS_A) + 1
    lines = complete.splitlines(keepends=True)
    metadata.write_text("".join(lines[:2]) + '{"file": "ima\n' + "".join(lines[2:]))
    with pytest.raises(ValueError, match="metadata.jsonl:3: not a JSON line"):
        read_records(a)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n{"step": 2, "rew')  # training writing
    assert read_metrics(run) == [{"step": 1, "reward_mean": 0.5}]


def test_missing_scores_stay_missing_in_the_metadata():
    record = reward_record({"shapes": torch.tensor([0.5, math.nan])}, 1)
    assert record == {"shapes": None}
    assert json.loads(json.dumps(record)) == {"shapes": None}


def test_scores_that_are_no_finite_number_show_as_missing_and_the_page_still_works(browser, tmp_path):
    # An older or hand-written metadata.jsonl: bare NaN and Infinity (which JSON.parse refuses), text, null.
    folder = make_folder(tmp_path / "odd", RECORDS_A[:4])
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"shapes": 0.25', '"shapes": NaN')
    lines[1] = lines[1].replace('"shapes": 1.0', '"shapes": Infinity').replace('"shapes_strict": true',
                                                                               '"shapes_strict": null')
    lines[2] = lines[2].replace('"shapes": null', '"shapes": 0.125')
    lines[3] = lines[3].replace('"shapes": 0.5', '"shapes": "high"')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    open_page(browser, build_gallery(folder))  # the script ran to the end: its labels loaded
    choose_sort(browser, "shapes ↓")
    assert card_order(browser) == [2, 0, 1, 3]  # the one score first, the missing ones after it in page order
    assert "4 images" in browser.find_element(By.CSS_SELECTOR, ".summary").text
    assert "nan" not in browser.find_element(By.CSS_SELECTOR, ".summary").text


def test_exported_labels_read_back_with_unicode_line_separators_in_prompts(tmp_path):
    (tmp_path / "images").mkdir()
    images = [tmp_path / "images" / f"{k:05d}.png" for k in range(2)]
    for k, image in enumerate(images):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(image)  # two images (one image labelled two ways is refused)
    prompt = "a red circle\u2028on a new line\u0085and another"
    labels = tmp_path / "labels.jsonl"
    # As the page's JSON.stringify writes them: the separators raw, not escaped.
    labels.write_text("".join(json.dumps({"file": f"images/{k:05d}.png", "prompt": prompt, "label": label},
                                         ensure_ascii=False) + "\n" for k, label in enumerate(["artifact", "good"])))
    assert "\u2028" in labels.read_text()
    assert read_labelled_images(labels) == [(images[0], 1), (images[1], 0)]
    assert [record["prompt"] for record in read_labels(labels)] == [prompt, prompt]


def test_comparison_paths_follow_the_path_as_written_through_a_symlink(folders, tmp_path):
    a, b = folders
    (tmp_path / "deep" / "er").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "deep" / "er")
    page = build_comparison(a, b, out=link / "compare.html")
    sources = re.findall(r'<img src="([^"]+)"', page.read_text())
    # The browser resolves them against .../link/, one level below tmp_path, not three.
    assert sources and all(src.startswith("../") and not src.startswith("../../") for src in sources)


def test_a_new_run_in_a_folder_removes_the_side_by_side_pages_of_its_earlier_images(folders, saved, tmp_path):
    a, b = folders
    out = tmp_path / "sampled"
    common = ["sample", "--model", str(saved["sd3"]), "--prompt", "a red circle", "--steps", "1", "--height", "32",
              "--width", "32", "--out", str(out)]
    main(common)
    compare = build_comparison(out, b)
    assert compare.exists()
    main([*common, "--overwrite"])
    assert not compare.exists() and (out / "index.html").exists()


def test_a_prompt_and_seed_twice_in_a_folder_is_refused_for_pairing(folders, tmp_path):
    a, b = folders
    twice = make_folder(tmp_path / "twice", [RECORDS_B[0], RECORDS_B[1], RECORDS_B[0]])
    with pytest.raises(ValueError, match="00002.png and images/00000.png share prompt 'a red circle' and seed 0"):
        build_comparison(a, twice)


def test_two_open_tabs_keep_each_others_labels(browser, folders):
    a, _ = folders
    page = build_gallery(a)
    open_page(browser, page)
    label_in_another_tab(browser, page, {1: "bad"})
    label(browser, visible_cards(browser)[0], "good")  # in the first tab, which loaded before either label
    reload(browser)
    assert browser.find_element(By.ID, "label-count").text == "2"


def test_the_trainer_rebuilds_only_the_pages_of_new_samples(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/reward_mean": 0.5}) + "\n"
                                               for s in (0, 2, 4)))
    for step in (0, 2, 4):
        make_folder(run / "eval" / f"step-{step:06d}", RECORDS_A)
    build_run_page(run)
    pages = [run / "eval" / name for name in ("step-000000/index.html", "step-000002/index.html",
                                              "step-000000/compare-step-000002.html", "step-000004/index.html",
                                              "step-000000/compare-step-000004.html")]
    written = [page.stat().st_mtime_ns for page in pages]
    time.sleep(0.05)
    metadata = run / "eval" / "step-000004" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"shapes": 0.25', '"shapes": 0.5'))  # step 4 sampled again
    build_run_page(run, only_stale=True)
    rewritten = [page.stat().st_mtime_ns != before for page, before in zip(pages, written)]
    assert rewritten == [False, False, False, True, True]
    assert "0.500" in pages[3].read_text().split('class="scores"')[1]  # the new score
    build_run_page(run)  # the gallery command: every page
    assert all(page.stat().st_mtime_ns > before for page, before in zip(pages, written))


def test_a_score_difference_beyond_float_range_is_shown_as_none(tmp_path):
    for name, score in (("a", -1.7e308), ("b", 1e308)):
        with SampleFolder(tmp_path / name) as folder:
            folder.add(Image.new("RGB", (8, 8)), {"prompt": "a red circle", "seed": 0, "rewards": {"r": score}})
    main(["gallery", str(tmp_path / "a"), "--compare", str(tmp_path / "b")])
    page = (tmp_path / "a" / "compare-b.html").read_text()
    values = json.loads(html.unescape(re.search(r'data-values="([^"]*)"', page).group(1)))
    assert values["r (A)"] == -1.7e308 and values["r (B)"] == 1e308 and values["Δ r"] is None
    # The card's table says so too (it showed +inf, as a gain), and its numbers fit the card.
    table = re.search(r'<table class="scores">.*?</table>', page).group(0)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", table)[3:] == ["-1.700e+308", "1.000e+308", "–"]
    with SampleFolder(tmp_path / "b") as folder:  # two scores whose sum overflows: their mean does not
        folder.add(Image.new("RGB", (8, 8)), {"prompt": "a red circle", "seed": 1, "rewards": {"r": 1e308}})
    summary = re.search(r'class="summary">([^<]*)<', build_gallery(tmp_path / "b").read_text()).group(1)
    assert "r mean 1.000e+308" in summary


def test_only_small_images_are_shown_as_sharp_pixels(browser, tmp_path):
    # Scaled down pixel by pixel, 1 px stripes show as coarse false stripes: artifacts a reviewer would label.
    folder = tmp_path / "sizes"
    for k, size in enumerate((64, 1024)):
        with SampleFolder(folder) as sampled:
            if k:
                sampled.continue_earlier_run()
            sampled.add(Image.new("RGB", (size, size)), {"prompt": f"image {size}", "seed": 0})
    open_page(browser, build_gallery(folder))
    WebDriverWait(browser, 10).until(lambda b: b.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth)"))
    rendering = browser.execute_script("return Array.from(document.images).map(i => "
                                       "[i.naturalWidth, i.clientWidth, getComputedStyle(i).imageRendering])")
    (small, small_shown, small_rendering), (big, big_shown, big_rendering) = rendering
    assert small == 64 and small_shown > 64 and small_rendering == "pixelated"
    assert big == 1024 and big_shown < 1024 and big_rendering == "auto"


def test_going_back_to_a_page_shows_the_sort_and_filter_its_controls_show(browser, folders):
    a, _ = folders
    open_page(browser, build_gallery(a))
    choose_sort(browser, "shapes ↓")
    browser.find_element(By.ID, "filter-prompt").send_keys("red circle")
    assert card_order(browser) == [0, 2]
    browser.get("about:blank")
    browser.back()  # the browser restores the controls' values, firing no event
    assert labels_loaded(browser) == "kept"
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "filter-prompt").get_attribute("value"))
    assert browser.find_element(By.ID, "filter-prompt").get_attribute("value") == "red circle"
    assert Select(browser.find_element(By.ID, "sort")).first_selected_option.text == "shapes ↓"
    WebDriverWait(browser, 10).until(lambda b: card_order(b) == [0, 2])
    assert browser.find_element(By.ID, "shown").text == "2 of 5 shown"


def test_an_export_reads_labels_stored_since_the_page_read_them(browser, folders):
    a, _ = folders
    open_page(browser, build_gallery(a))
    image = visible_cards(browser)[2].find_element(By.TAG_NAME, "figure").get_attribute("data-image")
    browser.execute_async_script("""  // as another tab stores a label, with no change of this tab's visibility
        const [image, done] = arguments;
        indexedDB.open("align-diffusion", 2).onsuccess = (event) => {
          const writing = event.target.result.transaction("images", "readwrite");
          writing.objectStore("images").put("artifact", image);
          writing.oncomplete = () => done();
        };
    """, image)
    rows = [json.loads(line) for line in export_labels(browser).read_text().splitlines()]
    assert [(row["prompt"], row["label"]) for row in rows] == [("a red circle", "artifact")]


def test_a_tab_opened_earlier_exports_and_shows_labels_made_in_another(browser, folders):
    a, _ = folders
    page = build_gallery(a)
    open_page(browser, page)
    label_in_another_tab(browser, page, {1: "bad", 4: "good"})
    rows = [json.loads(line) for line in export_labels(browser).read_text().splitlines()]
    assert [(row["prompt"], row["label"]) for row in rows] == [("a blue square", "bad"),
                                                               ("two green triangles", "good")]
    assert browser.find_element(By.ID, "label-count").text == "2"
    # Coming back to a tab shows what another tab labelled meanwhile.
    label_in_another_tab(browser, page, {0: "artifact"})
    browser.execute_script("document.dispatchEvent(new Event('visibilitychange'))")  # as switching tabs does
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "label-count").text == "3")
    assert "label-artifact" in visible_cards(browser)[0].find_element(By.TAG_NAME, "figure").get_attribute("class")


def test_the_same_image_made_for_two_prompts_takes_a_label_for_each(browser, tmp_path):
    folder = tmp_path / "same"
    with SampleFolder(folder) as sampled:
        for prompt in ("a red circle", "a blue square"):
            sampled.add(Image.new("RGB", (64, 64)), {"prompt": prompt, "seed": 0})  # a collapsed run: all black
    open_page(browser, build_gallery(folder))
    label(browser, visible_cards(browser)[0], "bad")
    assert browser.find_element(By.ID, "label-count").text == "1"
    first, second = (card.find_element(By.TAG_NAME, "figure").get_attribute("class")
                     for card in visible_cards(browser))
    assert "label-bad" in first and "label-bad" not in second


def test_merged_label_files_keep_a_file_once_and_refuse_one_labelled_two_ways(tmp_path):
    (tmp_path / "images").mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / "images" / f"{k:05d}.png")
    first = [{"file": "images/00000.png", "prompt": "a red circle", "label": "good"},
             {"file": "images/00001.png", "prompt": "a red circle", "label": "artifact"}]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(row) + "\n" for row in first + first))  # one export twice
    assert [row["label"] for row in read_labels(labels)] == ["good", "artifact"]
    assert read_labelled_images(labels) == [(tmp_path / "images" / "00000.png", 0),
                                            (tmp_path / "images" / "00001.png", 1)]
    assert len(preference_pairs(labels)) == 1
    relabelled = {**first[0], "label": "artifact"}
    labels.write_text("".join(json.dumps(row) + "\n" for row in [*first, relabelled]))
    for read, there, here in ((read_labels, "'good'", "'artifact'"), (read_labelled_images, "0", "1"),
                              (preference_pairs, "'good'", "'artifact'")):
        with pytest.raises(ValueError, match=rf"labels.jsonl:3: .*00000.png was labelled otherwise on line 1: label "
                                             rf"{there} there, {here} here$"):
            read(labels)
    (tmp_path / "sub").mkdir()
    another_path = {**first[0], "file": "sub/../images/00000.png"}  # the same file, labelled alike
    labels.write_text("".join(json.dumps(row) + "\n" for row in [*first, another_path]))
    assert [row["label"] for row in read_labels(labels)] == ["good", "artifact"]
    moved = {**first[0], "prompt": "a blue circle"}
    labels.write_text("".join(json.dumps(row) + "\n" for row in [*first, moved]))
    with pytest.raises(ValueError, match="on line 1: prompt 'a red circle' there, 'a blue circle' here$"):
        read_labels(labels)
    (tmp_path / "link.png").symlink_to(tmp_path / "images" / "00000.png")  # one image, preferred over itself
    labels.write_text("".join(json.dumps(row) + "\n" for row in [*first, {**relabelled, "file": "link.png"}]))
    for read in (read_labels, read_labelled_images, preference_pairs):
        with pytest.raises(ValueError, match="labels.jsonl:3: .*link.png was labelled otherwise on line 1"):
            read(labels)
    gone = {**first[0], "file": "images/gone.png"}  # deleted since, or a path the page exported relative to a URL
    labels.write_text("".join(json.dumps(row) + "\n" for row in [*first, gone]))
    for read in (read_labels, read_labelled_images, preference_pairs):
        with pytest.raises(ValueError, match="labels.jsonl:3: image .*images/gone.png not found"):
            read(labels)
    labels.write_text(json.dumps({"file": "images/00000.png", "label": True}) + "\n")
    with pytest.raises(ValueError, match="labels.jsonl:1: label must be 0 .* got True"):
        read_labelled_images(labels)


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "a record is an object with 'file' and 'prompt', got \\[1, 2\\]"),
    ('{"file": "images/00000.png", "prompt": 5}', "prompt must be text, got 5"),
    ('{"file": null, "prompt": "a red circle"}', "file must be a path, got None"),
    ('{"file": "images/00000.png", "prompt": "a red circle", "rewards": [1]}', "rewards must be an object"),
    ('{"file": "images/00000.png", "prompt": "a red circle", "seed": [1]}', "seed must be a whole number"),
    ('{"file": "images/00000.png", "prompt": "a red \\ud800 circle"}', "not text: surrogates not allowed"),
])
def test_a_record_of_the_wrong_shape_is_named_by_its_line(tmp_path, line, problem):
    folder = make_folder(tmp_path / "odd", RECORDS_A[:1])
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write(line + "\n")
    with pytest.raises(ValueError, match=f"metadata.jsonl:2: {problem}"):
        build_gallery(folder)


def test_a_label_file_naming_no_path_is_named_by_its_line(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"file": None, "prompt": "a red circle", "label": "good"}) + "\n")
    with pytest.raises(ValueError, match="labels.jsonl:1: file must be a path, got None"):
        read_labels(labels)


def test_an_exported_label_is_refused_once_its_file_holds_another_image(tmp_path):
    """The export names a file; sampled again into the folder (`--overwrite`), the file shows another image, which
    the label would have gone to."""
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "00000.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image)
    key = hashlib.sha256(b"a red circle\0" + image.read_bytes()).hexdigest()[:32]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"file": "images/00000.png", "prompt": "a red circle", "label": "artifact",
                                  "image": key}) + "\n")
    assert [row["label"] for row in read_labels(labels)] == ["artifact"]
    moved = {"file": "images/00000.png", "prompt": "a blue circle", "label": "artifact", "image": key}
    labels.with_name("moved.jsonl").write_text(json.dumps(moved) + "\n")  # the label given for another prompt
    with pytest.raises(ValueError, match="moved.jsonl:1: .*00000.png is not the image labelled, or not for prompt "
                                         "'a blue circle'"):
        read_labels(labels.with_name("moved.jsonl"))
    Image.new("RGB", (8, 8), (0, 0, 200)).save(image)
    for read in (read_labels, read_labelled_images, preference_pairs):
        with pytest.raises(ValueError, match="labels.jsonl:1: .*00000.png is not the image labelled"):
            read(labels)


def test_an_integer_score_beyond_float_range_shows_as_missing(tmp_path):
    folder = make_folder(tmp_path / "huge", RECORDS_A[:2])
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"shapes": 0.25', '"shapes": ' + "9" * 340)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    page = build_gallery(folder).read_text()
    values = [json.loads(html.unescape(v)) for v in re.findall(r'data-values="([^"]*)"', page)]
    assert values[0]["shapes"] is None and values[1]["shapes"] == 1.0


def test_a_curve_with_no_finite_value_is_not_plotted(tmp_path):
    """An infinite value is a gap like NaN: a curve of nothing else got a legend entry, and here a plot, of no
    points."""
    rows = [{"step": 0, "reward_mean": 0.5, "eval/shapes_strict": math.inf},
            {"step": 1, "reward_mean": 0.6, "eval/shapes_strict": 10 ** 400}]
    assert [path.name for path in plot_training(rows, tmp_path)] == ["reward.png"]


def test_a_value_between_two_gaps_of_a_long_curve_is_drawn(tmp_path):
    """Over 30 points a curve has no markers, so a finite value whose neighbours are gaps drew nothing at all."""
    rows = [{"step": step, "reward_mean": 0.5 if step == 20 else None} for step in range(40)]
    (path,) = plot_training(rows, tmp_path)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    first_color = (0x1F, 0x77, 0xB4)  # matplotlib's first line colour, C0
    assert (np.abs(pixels - first_color).sum(1) < 30).sum() >= 5


def test_a_difference_that_rounds_to_zero_shows_as_no_change(tmp_path):
    for name, score in (("a", 0.5), ("b", 0.4996)):
        with SampleFolder(tmp_path / name) as folder:
            folder.add(Image.new("RGB", (8, 8)), {"prompt": "a red circle", "seed": 0, "rewards": {"r": score}})
    page = build_comparison(tmp_path / "a", tmp_path / "b").read_text()
    assert "<td>+0.000</td>" in page and 'class="down"' not in page


def test_pages_are_written_in_utf8_whatever_the_locale(tmp_path):
    folder = make_folder(tmp_path / "unicode", [("un cercle rouge — 赤い円", 0, 0.5, True)])
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    subprocess.run([sys.executable, "-c", "import sys; from align_diffusion.gallery import build_gallery; "
                    "build_gallery(sys.argv[1])", str(folder)], env=env, check=True)
    assert "un cercle rouge — 赤い円" in (folder / "index.html").read_text(encoding="utf-8")


def test_an_interrupted_run_leaves_the_page_of_the_images_it_finished(tmp_path):
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt), SampleFolder(out) as folder:
        folder.add(Image.new("RGB", (8, 8)), {"prompt": "a red circle", "seed": 0})
        raise KeyboardInterrupt
    assert "1 image" in (out / "index.html").read_text()
    # A page that cannot be built (a record of the wrong shape) leaves the run's own error to be raised.
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="no review page .*rewards must be"):
        with SampleFolder(tmp_path / "odd") as folder:
            folder.add(Image.new("RGB", (8, 8)), {"prompt": "a red circle", "rewards": [1.0]})
            raise KeyboardInterrupt


def test_a_resumed_run_removes_the_side_by_side_pages_of_its_earlier_images(folders, saved, tmp_path):
    _, b = folders
    out = tmp_path / "sampled"
    common = ["sample", "--model", str(saved["sd3"]), "--steps", "1", "--height", "32", "--width", "32",
              "--out", str(out), "--prompt", "a red circle"]
    main(common)
    compare = build_comparison(out, b)
    main([*common, "a blue square", "--resume"])
    assert not compare.exists() and len(read_records(out)) == 2


def test_a_label_given_while_the_page_rereads_its_labels_stays(browser, folders):
    a, _ = folders
    open_page(browser, build_gallery(a))
    # The re-read (as on coming back to the tab) starts before the click and reads the image's earlier (no) label.
    browser.execute_script("""
        document.dispatchEvent(new Event("visibilitychange"));
        document.querySelector('.card figure button[data-label="good"]').click();
    """)
    time.sleep(0.5)
    assert browser.find_element(By.ID, "label-count").text == "1"
    assert "label-good" in visible_cards(browser)[0].find_element(By.TAG_NAME, "figure").get_attribute("class")
    reload(browser)
    assert browser.find_element(By.ID, "label-count").text == "1"
