// Review pages: filter and sort the cards, and collect reviewer labels (kept in localStorage, exported as JSONL).
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
      compare = (a, b) => Number(a.dataset.seed) - Number(b.dataset.seed) || index(a) - index(b);
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
  // Keyed by the samples too: a folder sampled again reuses its file names, and the old labels must not show.
  const storeKey = "align-diffusion-labels:" + location.pathname + ":" + document.body.dataset.samples;
  const labels = JSON.parse(localStorage.getItem(storeKey) || "{}");
  const figures = Array.from(grid.querySelectorAll("figure[data-file]"));

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

  for (const figure of figures) {
    show(figure);
    for (const button of figure.querySelectorAll("button[data-label]")) {
      button.addEventListener("click", () => {
        const file = figure.dataset.file;
        if (labels[file] === button.dataset.label) delete labels[file];
        else labels[file] = button.dataset.label;
        localStorage.setItem(storeKey, JSON.stringify(labels));
        show(figure);
        countLabels();
      });
    }
  }
  countLabels();

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
