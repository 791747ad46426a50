"""The labeling page: one self-contained HTML file that turns proposed images into a ``labels.csv``.

The page works from ``file://`` with no server and no network: every image is embedded as a base64 PNG and
drawn large with ``image-rendering: pixelated`` (small images stay crisp instead of blurred). The user assigns
each image a class with a button or a number key (1..9, then 0 for the tenth class), skips it with "not sure",
steps back with undo, and saves ``labels.csv``: a header ``<id_column>,label`` and one row per labeled image,
label = class name, which ``fixmatch train --labels-csv`` reads (``index,label`` for a built-in data set,
``path,label`` for a folder). Labels given earlier (``given``: ``fixmatch advise --labels-csv``) are saved first, so
the file is the complete labeled set, never only this round's answers (``train --labels-csv`` uses only the file).
Names come from users' files, so every one is HTML-escaped where it is written into the page and set as text (never
as markup) by the script.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fixmatch.core.files import write_text_atomic

__all__ = ["write_labeling_page", "ID_COLUMNS"]

ID_COLUMNS = ("index", "path")  # built-in data sets: training-set index; folder data sets: the image's path
_SHOWN_SIDE = 320  # CSS pixels the image is drawn at, at most: an integer upscale, so pixels stay square
_KEYS = "1234567890"  # number key of class i (the first ten classes)


def write_labeling_page(path: Path, images: np.ndarray, ids: list[str], classes: list[str], *, id_column: str,
                        title: str = "fixmatch: images to label",
                        given: Sequence[tuple[str, str]] = ()) -> None:
    """Write the labeling page for ``images`` (uint8, (N, H, W, C), C in {1, 3}) to ``path``, atomically.

    ``ids[i]`` is what labels.csv's first column holds for ``images[i]``; ``id_column`` ("index" or "path") is that
    column's header; ``classes`` are the class names, in the order of their buttons and number keys. ``given``:
    (id, class name) of the images labeled earlier, which the saved labels.csv lists before the new answers.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C 1 or 3, not {images.dtype} {images.shape}")
    if len(ids) != len(images) or len(set(ids)) != len(ids):
        raise ValueError(f"ids must name each of the {len(images)} images once, got {len(ids)} ids "
                         f"({len(set(ids))} distinct)")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names, at least one, not {classes!r}")
    if id_column not in ID_COLUMNS:
        raise ValueError(f"id_column must be one of {', '.join(ID_COLUMNS)}, not {id_column!r}")
    given = [(str(i), str(name)) for i, name in given]
    given_ids = {i for i, _ in given}
    if len(given_ids) != len(given) or given_ids & {str(i) for i in ids} or not all(i and n for i, n in given):
        raise ValueError("given must name each earlier labeled image once, with a class name, and none of the "
                         "images to label")
    height, width = images.shape[1:3]
    scale = max(1, _SHOWN_SIDE // max(height, width))
    figures = "\n".join(
        f'<img class="item" data-i="{i}" hidden alt="image {html.escape(str(ids[i]))}" '
        f'width="{width * scale}" height="{height * scale}" src="{_png_data_url(image)}">'
        for i, image in enumerate(images))
    buttons = "\n".join(
        f'<button class="label" data-c="{c}">'
        + (f"<kbd>{_KEYS[c]}</kbd> " if c < len(_KEYS) else "") + f"{html.escape(name)}</button>"
        for c, name in enumerate(classes))
    # JSON inside <script>: "<" escaped so no name can close the element.
    data = json.dumps({"ids": [str(i) for i in ids], "classes": list(classes), "idColumn": id_column,
                       "given": given})
    data = data.replace("<", "\\u003c")
    parts = {"TITLE": html.escape(title), "FIGURES": figures, "BUTTONS": buttons, "DATA": data, "SCRIPT": _SCRIPT}
    # One pass: a name that happens to read "$DATA" is never substituted again.
    page = re.sub(r"\$(TITLE|FIGURES|BUTTONS|DATA|SCRIPT)\b", lambda m: parts[m.group(1)], _PAGE)
    write_text_atomic(path, page)


def _png_data_url(image: np.ndarray) -> str:
    pil = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$TITLE</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; padding: 0 1em; color: #222; }
#stage { display: flex; flex-direction: column; align-items: center; gap: .4em; min-height: 22em; }
img.item { image-rendering: pixelated; max-width: 90vw; height: auto;
           border: 1px solid #999; background: #fff; }
#caption { font-family: monospace; color: #555; }
#classes, #tools { display: flex; flex-wrap: wrap; gap: .4em; justify-content: center; margin: .8em 0; }
button { font-size: 1.05em; padding: .45em .9em; cursor: pointer; }
button.label { min-width: 7em; }
kbd { font-size: .8em; border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; color: #555; }
#progress { text-align: center; font-weight: bold; }
#status, #help { text-align: center; color: #555; }
#done { text-align: center; font-size: 1.2em; }
</style>
</head>
<body>
<h1>$TITLE</h1>
<p id="progress"></p>
<div id="stage">
$FIGURES
<p id="done" hidden>All images seen: save labels.csv, or undo to change an answer.</p>
<p id="caption"></p>
</div>
<div id="classes">
$BUTTONS
</div>
<div id="tools">
<button id="not-sure"><kbd>s</kbd> not sure</button>
<button id="undo"><kbd>u</kbd> undo</button>
<button id="save">save labels.csv</button>
</div>
<p id="status"></p>
<p id="help">Number keys 1&ndash;9 and 0 pick the first ten classes; s skips an image, u (or Backspace) undoes
the last answer. Nothing is saved until you press "save labels.csv".</p>
<script type="application/json" id="data">$DATA</script>
<script>
$SCRIPT
</script>
</body>
</html>
"""

_SCRIPT = """\
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const items = document.querySelectorAll("img.item");
const answers = [];  // answers[i]: class number of image i, or null for "not sure"; images answered in order
let savedAnswers = 0;  // answers.length when labels.csv was last saved (for the leave-page warning)

function show() {
  const i = answers.length;
  items.forEach((img, k) => { img.hidden = k !== i; });
  document.getElementById("done").hidden = i < items.length;
  document.getElementById("caption").textContent =
    i < items.length ? `${data.idColumn} ${data.ids[i]} (${i + 1} of ${items.length})` : "";
  const labeled = answers.filter((a) => a !== null).length;
  const skipped = answers.length - labeled;
  document.getElementById("progress").textContent =
    `${labeled} labeled / ${skipped} skipped / ${items.length} total` +
    (data.given.length ? ` (+ ${data.given.length} labeled earlier)` : "");
  document.querySelectorAll("button.label, #not-sure").forEach((b) => { b.disabled = i >= items.length; });
  document.getElementById("undo").disabled = i === 0;
  document.getElementById("save").disabled = labeled + data.given.length === 0;
}

function answer(a) {
  if (answers.length < items.length) { answers.push(a); show(); }
}

function undo() {
  if (answers.length > 0) { answers.pop(); show(); }
}

function csvField(s) {  // RFC 4180: quote a field holding a comma, a quote or a line break
  return /[",\\r\\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function save() {
  // The earlier labels first: the file is the whole labeled set, which train --labels-csv needs.
  const rows = [`${data.idColumn},label`];
  data.given.forEach(([id, name]) => rows.push(`${csvField(id)},${csvField(name)}`));
  answers.forEach((a, i) => { if (a !== null) rows.push(`${csvField(data.ids[i])},${csvField(data.classes[a])}`); });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([rows.join("\\n") + "\\n"], { type: "text/csv" }));
  link.download = "labels.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
  savedAnswers = answers.length;
  const earlier = data.given.length;
  document.getElementById("status").textContent = `saved labels.csv: ${rows.length - 1} labeled images` +
    (earlier ? ` (${earlier} earlier, ${rows.length - 1 - earlier} new)` : "");
}

document.querySelectorAll("button.label").forEach((b) => {
  b.addEventListener("click", () => answer(Number(b.dataset.c)));
});
document.getElementById("not-sure").addEventListener("click", () => answer(null));
document.getElementById("undo").addEventListener("click", undo);
document.getElementById("save").addEventListener("click", save);
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;  // leave the browser's own shortcuts alone
  const c = "1234567890".indexOf(e.key);
  if (c >= 0 && c < data.classes.length) answer(c);
  else if (e.key === "s") answer(null);
  else if (e.key === "u" || e.key === "Backspace") undo();
  else return;
  e.preventDefault();
});
window.addEventListener("beforeunload", (e) => {
  if (answers.length !== savedAnswers) e.preventDefault();  // unsaved answers: let the browser ask first
});
show();
"""
