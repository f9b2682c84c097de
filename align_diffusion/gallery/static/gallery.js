// Review pages: filter and sort the cards, and collect reviewer labels (kept in IndexedDB, exported as JSONL).
(function () {
  "use strict";
  const grid = document.getElementById("grid");
  const cards = Array.from(grid.querySelectorAll(".card"));
  const byId = (id) => document.getElementById(id);
  const valuesOf = new Map(cards.map((card) => [card, JSON.parse(card.dataset.values)]));
  const promptOf = new Map(cards.map((card) => [card, JSON.parse(card.dataset.prompt)]));

  // --- filter and sort ---------------------------------------------------------------------------------------
  function value(card, name) {
    const v = valuesOf.get(card)[name];
    return v === undefined || v === null ? null : v;
  }

  function applyFilter() {
    const text = byId("filter-prompt").value.trim().toLowerCase();
    const name = byId("filter-value").value;
    const min = parseFloat(byId("filter-min").value);
    const max = parseFloat(byId("filter-max").value);
    let shown = 0;
    for (const card of cards) {
      let keep = promptOf.get(card).toLowerCase().includes(text);
      if (keep && name && (!isNaN(min) || !isNaN(max))) {
        const v = value(card, name);
        keep = v !== null && (isNaN(min) || v >= min) && (isNaN(max) || v <= max);
      }
      card.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    byId("shown").textContent = shown + " of " + cards.length + " shown";
  }

  function applySort() {
    const option = byId("sort").selectedOptions[0];
    const key = option.dataset.key, order = option.dataset.sort;
    const descending = option.dataset.order === "desc";
    const index = (card) => Number(card.dataset.index);
    let compare;
    if (order === "index") {
      compare = (a, b) => index(a) - index(b);
    } else if (order === "prompt") {
      compare = (a, b) => promptOf.get(a).localeCompare(promptOf.get(b)) || index(a) - index(b);
    } else if (order === "seed") {
      // Missing (or non-numeric) seeds last, ties in page order.
      const seed = (card) => (card.dataset.seed === "" || isNaN(card.dataset.seed) ? null : Number(card.dataset.seed));
      compare = (a, b) => {
        const sa = seed(a), sb = seed(b);
        if (sa === null || sb === null) return (sa === null) - (sb === null) || index(a) - index(b);
        return sa - sb || index(a) - index(b);
      };
    } else {
      // Scores: missing values last, ties in page order.
      compare = (a, b) => {
        const va = value(a, key), vb = value(b, key);
        if (va === null || vb === null) return (va === null) - (vb === null) || index(a) - index(b);
        return (descending ? vb - va : va - vb) || index(a) - index(b);
      };
    }
    for (const card of cards.slice().sort(compare)) grid.appendChild(card);
  }

  for (const id of ["filter-prompt", "filter-value", "filter-min", "filter-max"]) {
    byId(id).addEventListener("input", applyFilter);
    byId(id).addEventListener("change", applyFilter);
  }
  byId("sort").addEventListener("change", applySort);

  // --- labels ------------------------------------------------------------------------------------------------
  // Kept in IndexedDB, not localStorage: on pages opened from disk (file://) Chromium's localStorage sometimes
  // showed an older copy after a reload, the new labels gone (4 of 80 reloads, measured); IndexedDB never did.
  // One record per image, keyed by the image's content and prompt (data-image): a label follows its image to every
  // page and folder that shows it, never shows on a new image that reuses a file name, and two open tabs each change
  // only the images they label.
  const figures = Array.from(grid.querySelectorAll("figure[data-image]"));
  const buttons = Array.from(grid.querySelectorAll("button[data-label]"));
  const labels = {};  // image id → label
  const clickedAt = {};  // image id → the number of the last click on its buttons, of `clicks` in all
  let clicks = 0;
  let database = null;  // null: labels are not kept past this page

  function show(figure) {
    const label = labels[figure.dataset.image];
    for (const name of ["good", "artifact", "bad"]) figure.classList.toggle("label-" + name, label === name);
    for (const button of figure.querySelectorAll("button[data-label]")) {
      button.classList.toggle("active", button.dataset.label === label);
    }
  }

  function countLabels() {
    byId("label-count").textContent = figures.filter((f) => labels[f.dataset.image]).length;
  }

  function save(image) {
    if (database === null) return;
    const transaction = database.transaction("images", "readwrite");
    const store = transaction.objectStore("images");
    if (labels[image]) store.put(labels[image], image);
    else store.delete(image);
    transaction.onerror = () => {
      byId("label-store").textContent = "the last label was not saved: " + transaction.error;
    };
    transaction.commit();
  }

  function refresh(problem) {
    if (problem) byId("label-store").textContent = "labels are not kept after this page closes (" + problem + ")";
    for (const figure of figures) show(figure);
    countLabels();
  }

  // Labels stored earlier load before any button works, so a click never races the load, and before the export
  // does, which would download none of them.
  function ready(problem) {
    if (!problem) byId("label-store").textContent = "";  // what waiting on an older page's tab said is past
    refresh(problem);
    for (const button of [...buttons, byId("export")]) button.disabled = false;
    document.body.dataset.labels = problem ? "not-kept" : "kept";
  }

  for (const button of [...buttons, byId("export")]) button.disabled = true;
  for (const figure of figures) {
    for (const button of figure.querySelectorAll("button[data-label]")) {
      button.addEventListener("click", () => {
        const image = figure.dataset.image;
        if (labels[image] === button.dataset.label) delete labels[image];
        else labels[image] = button.dataset.label;
        clickedAt[image] = ++clicks;
        save(image);
        for (const same of figures) if (same.dataset.image === image) show(same);
        countLabels();
      });
    }
  }

  // Reads the stored labels of this page's images, then calls `then` (with a problem, or null).
  function readLabels(then) {
    const reading = database.transaction("images");
    const store = reading.objectStore("images");
    const started = clicks;
    for (const image of new Set(figures.map((f) => f.dataset.image))) {
      store.get(image).onsuccess = (event) => {
        if ((clickedAt[image] || 0) > started) return;  // labelled while this read ran: it read the label before
        if (event.target.result) labels[image] = event.target.result;
        else delete labels[image];
      };
    }
    reading.oncomplete = () => then(null);
    reading.onerror = () => {
      database = null;  // saving now could overwrite labels that could not be read
      then("stored labels could not be read: " + reading.error);
    };
  }

  try {
    const opening = indexedDB.open("align-diffusion", 2);
    opening.onupgradeneeded = () => {
      if (!opening.result.objectStoreNames.contains("images")) opening.result.createObjectStore("images");
    };
    opening.onerror = () => ready("this browser refused storage: " + opening.error);
    opening.onblocked = () => {  // a tab still showing a page of the earlier label store holds it open
      byId("label-store").textContent = "labels load once the tabs of older review pages are closed";
    };
    opening.onsuccess = () => {
      database = opening.result;
      database.onversionchange = () => {  // a page of a later version upgrades the store: it waits on this tab
        database.close();
        database = null;
        refresh("a newer review page took the label store: reload this page to keep labelling");
      };
      readLabels(ready);
    };
  } catch (error) {
    ready("this browser keeps no storage for this page: " + error);
  }

  // Another tab (this page or another showing the same images) may have labelled since: shown on coming back.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible" || database === null) return;
    readLabels(refresh);
  });

  // Paths in the export are absolute on a page opened from disk, so the file works wherever it is saved: a
  // Windows drive's without the URL's slash before it (/C:/...), a network share's with its host (//host/...).
  function exportedPath(figure) {
    const url = new URL(figure.querySelector("img").src);  // the quoted, resolved image URL
    if (url.protocol !== "file:") return figure.dataset.file;
    const path = decodeURIComponent(url.pathname);
    if (url.host) return "//" + url.host + path;
    return /^\/[A-Za-z]:\//.test(path) ? path.slice(1) : path;
  }

  function download() {
    const lines = figures
      .filter((f) => labels[f.dataset.image])
      .map((f) => JSON.stringify({
        file: exportedPath(f),
        prompt: promptOf.get(f.closest(".card")),
        label: labels[f.dataset.image],
        image: f.dataset.image,  // the image's content and prompt: a reader refuses a file that holds another since
      }));
    const blob = new Blob([lines.map((line) => line + "\n").join("")], { type: "application/x-ndjson" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "labels.jsonl";
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  // The export reads the store again: another tab may have labelled these images since this page read it.
  byId("export").addEventListener("click", () => {
    if (database === null) download();
    else readLabels((problem) => { refresh(problem); download(); });
  });

  // Going back to the page, the browser restores the controls' values after this script ran, firing no event.
  window.addEventListener("pageshow", () => { applySort(); applyFilter(); });
  applyFilter();
})();
