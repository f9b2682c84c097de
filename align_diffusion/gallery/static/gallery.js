// Review pages: filter and sort the cards, and collect reviewer labels (kept in IndexedDB, exported as JSONL).
(function () {
  "use strict";
  const grid = document.getElementById("grid");
  const cards = Array.from(grid.querySelectorAll(".card"));
  const byId = (id) => document.getElementById(id);
  const valuesOf = new Map(cards.map((card) => [card, JSON.parse(card.dataset.values)]));

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
      let keep = card.dataset.prompt.toLowerCase().includes(text);
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
    const key = option.dataset.key;
    const descending = option.dataset.order === "desc";
    const index = (card) => Number(card.dataset.index);
    let compare;
    if (key === "index") {
      compare = (a, b) => index(a) - index(b);
    } else if (key === "prompt") {
      compare = (a, b) => a.dataset.prompt.localeCompare(b.dataset.prompt) || index(a) - index(b);
    } else if (key === "seed") {
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
  // Keyed by the samples too: a folder sampled again reuses its file names, and the old labels must not show.
  const storeKey = "align-diffusion-labels:" + location.pathname + ":" + document.body.dataset.samples;
  const figures = Array.from(grid.querySelectorAll("figure[data-file]"));
  const buttons = Array.from(grid.querySelectorAll("button[data-label]"));
  let labels = {};
  let database = null;  // null: labels are not kept past this page

  function show(figure) {
    const label = labels[figure.dataset.file];
    for (const name of ["good", "artifact", "bad"]) figure.classList.toggle("label-" + name, label === name);
    for (const button of figure.querySelectorAll("button[data-label]")) {
      button.classList.toggle("active", button.dataset.label === label);
    }
  }

  function countLabels() {
    byId("label-count").textContent = figures.filter((f) => labels[f.dataset.file]).length;
  }

  function save() {
    if (database === null) return;
    const transaction = database.transaction("labels", "readwrite");
    transaction.objectStore("labels").put(labels, storeKey);
    transaction.onerror = () => {
      byId("label-store").textContent = "the last label was not saved: " + transaction.error;
    };
    transaction.commit();
  }

  // Labels stored earlier load before any button works, so a click never races the load.
  function ready(stored, problem) {
    labels = stored || {};
    if (problem) byId("label-store").textContent = "labels are not kept after this page closes (" + problem + ")";
    for (const figure of figures) show(figure);
    countLabels();
    for (const button of buttons) button.disabled = false;
    document.body.dataset.labels = problem ? "not-kept" : "kept";
  }

  for (const button of buttons) button.disabled = true;
  for (const figure of figures) {
    for (const button of figure.querySelectorAll("button[data-label]")) {
      button.addEventListener("click", () => {
        const file = figure.dataset.file;
        if (labels[file] === button.dataset.label) delete labels[file];
        else labels[file] = button.dataset.label;
        save();
        show(figure);
        countLabels();
      });
    }
  }
  try {
    const opening = indexedDB.open("align-diffusion", 1);
    opening.onupgradeneeded = () => opening.result.createObjectStore("labels");
    opening.onerror = () => ready(null, "this browser refused storage: " + opening.error);
    opening.onsuccess = () => {
      database = opening.result;
      const reading = database.transaction("labels").objectStore("labels").get(storeKey);
      reading.onsuccess = () => ready(reading.result, null);
      reading.onerror = () => {
        database = null;  // saving now would overwrite the labels that could not be read
        ready(null, "stored labels could not be read: " + reading.error);
      };
    };
  } catch (error) {
    ready(null, "this browser keeps no storage for this page: " + error);
  }

  // Paths in the export are absolute on a page opened from disk, so the file works wherever it is saved.
  function exportedPath(figure) {
    const url = new URL(figure.querySelector("img").src);  // the quoted, resolved image URL
    return url.protocol === "file:" ? decodeURIComponent(url.pathname) : figure.dataset.file;
  }

  byId("export").addEventListener("click", () => {
    const lines = figures
      .filter((f) => labels[f.dataset.file])
      .map((f) => JSON.stringify({
        file: exportedPath(f),
        prompt: f.closest(".card").dataset.prompt,
        label: labels[f.dataset.file],
      }));
    const blob = new Blob([lines.map((line) => line + "\n").join("")], { type: "application/x-ndjson" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "labels.jsonl";
    document.body.appendChild(link);
    link.click();
    link.remove();
  });

  applyFilter();
})();
