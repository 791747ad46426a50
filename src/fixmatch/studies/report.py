"""`fixmatch report STUDY_DIR_OR_RUN_DIRS... --out REPORT_DIR`: a study's results as a table and figures.

Everything comes from the runs' files: configuration, metrics rows and summary (runs/rundir.py). Checkpoints are
evaluated only for the confusion matrix (the best run's best checkpoint, once) and for the macro-F1 of runs
made before training logged it (``test_macro_f1`` in the metrics rows). Runs that differ only in their seed form
one configuration: a row of the table with the mean and sample standard deviation over the seeds. Written
into REPORT_DIR:

    results.md, results.csv    the table
    *.png                      the figures (report_figures.py)
    index.html                 the table and every figure on one self-contained page: the figures, results.md
                               and results.csv are embedded in it (data: URIs), so it can be moved or mailed alone
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from fixmatch.config import RESUME_MUTABLE_KEYS, ConfigError, config_from_dict, parse_yaml
from fixmatch.core.atomic import atomic_path
from fixmatch.runs.rundir import BEST_NAME, CHECKPOINTS_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, RunDir, RunState
from fixmatch.studies.results import Group, Run, fmt, mean_std

# The paper's error rates (%, mean +- std over 5 folds): Sohn et al., 2020, "FixMatch: Simplifying
# Semi-Supervised Learning with Consistency and Confidence", Table 2. Keyed by (data set, labels, model);
# the model is the one the paper used for that data set.
PAPER_ERROR_RATES: dict[tuple[str, int, str], dict[str, tuple[float, float]]] = {
    ("cifar10", 40, "wrn28_2"): {"randaugment": (13.81, 3.37), "ctaugment": (11.39, 3.35)},
    ("cifar10", 250, "wrn28_2"): {"randaugment": (5.07, 0.65), "ctaugment": (5.07, 0.33)},
    ("cifar10", 4000, "wrn28_2"): {"randaugment": (4.26, 0.05), "ctaugment": (4.31, 0.15)},
    ("cifar100", 400, "wrn28_8"): {"randaugment": (48.85, 1.75), "ctaugment": (49.95, 3.01)},
    ("cifar100", 2500, "wrn28_8"): {"randaugment": (28.29, 0.11), "ctaugment": (28.64, 0.24)},
    ("cifar100", 10000, "wrn28_8"): {"randaugment": (22.60, 0.12), "ctaugment": (23.18, 0.11)},
    ("svhn", 40, "wrn28_2"): {"randaugment": (3.96, 2.17), "ctaugment": (7.65, 7.65)},
    ("svhn", 250, "wrn28_2"): {"randaugment": (2.48, 0.38), "ctaugment": (2.64, 0.64)},
    ("svhn", 1000, "wrn28_2"): {"randaugment": (2.28, 0.11), "ctaugment": (2.36, 0.19)},
    ("stl10", 1000, "wrn37_2"): {"randaugment": (7.98, 1.50), "ctaugment": (5.17, 0.63)},
}
PAPER_CITATION = "Sohn et al., 2020, Table 2 (error rate, mean ± std over 5 folds)"

# USB's published error rates (%, mean +- std over 3 seeds; USB reports each run's best error rate) for its
# "classic CV" setting (the FixMatch paper's setting, 2^20 steps): the results table of the USB repository
# (microsoft/Semi-supervised-learning, results/classic_cv). Keyed like PAPER_ERROR_RATES; per --algorithm.
USB_ERROR_RATES: dict[tuple[str, int, str], dict[str, tuple[float, float]]] = {
    ("cifar10", 40, "wrn28_2"): {"fixmatch": (8.33, 1.41), "flexmatch": (5.21, 0.36), "freematch": (4.97, 0.09),
                                 "softmatch": (5.06, 0.02)},
    ("cifar10", 250, "wrn28_2"): {"fixmatch": (4.97, 0.05), "flexmatch": (5.00, 0.05), "freematch": (4.85, 0.10),
                                  "softmatch": (4.84, 0.10)},
    ("cifar10", 4000, "wrn28_2"): {"fixmatch": (4.29, 0.10), "flexmatch": (4.28, 0.05), "freematch": (4.14, 0.19),
                                   "softmatch": (4.27, 0.12)},
    ("svhn", 40, "wrn28_2"): {"fixmatch": (2.08, 0.08), "flexmatch": (3.36, 0.37), "freematch": (3.79, 0.03),
                              "softmatch": (2.31, 0.00)},
    ("svhn", 250, "wrn28_2"): {"fixmatch": (1.99, 0.05), "flexmatch": (5.02, 1.20), "freematch": (4.09, 0.66),
                               "softmatch": (2.15, 0.05)},
    ("svhn", 1000, "wrn28_2"): {"fixmatch": (2.00, 0.04), "flexmatch": (5.43, 0.46), "freematch": (4.31, 0.00),
                                "softmatch": (2.08, 0.04)},
    ("cifar100", 400, "wrn28_8"): {"fixmatch": (53.37, 2.15), "flexmatch": (50.15, 1.51),
                                   "freematch": (49.24, 2.16), "softmatch": (49.64, 1.46)},
    ("cifar100", 2500, "wrn28_8"): {"fixmatch": (34.29, 0.43), "flexmatch": (33.35, 0.33),
                                    "freematch": (32.79, 0.21), "softmatch": (33.05, 0.05)},
    ("cifar100", 10000, "wrn28_8"): {"fixmatch": (28.28, 0.18), "flexmatch": (27.12, 0.04),
                                     "freematch": (27.17, 0.11), "softmatch": (27.26, 0.03)},
}
USB_CITATION = ("USB (Wang et al., 2022), classic CV results (best error rate, mean ± std over 3 seeds), "
                "for the run's --algorithm")

# The metrics rows' key of the EMA model's test macro-F1 (%), logged at each evaluation by training.
MACRO_F1_KEY = "test_macro_f1"

# Keys that never make two runs different configurations: where and how a run ran, and its seed.
NOT_CONFIGURATION = frozenset(RESUME_MUTABLE_KEYS | {"seed", "progress", "channels_last", "eval_batch_size"})


class ReportError(ConfigError):
    """The report cannot be made (no runs found, unreadable run files); one line, with the fix. A ConfigError,
    so that the command reports it like any other bad input."""


# --------------------------------------------------------------------------------------------- reading

def _read_yaml_config(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text(), "the file")  # no alias bombs, deep nesting or duplicate keys
        return config_from_dict(data, str(path)).to_dict()  # old runs gain the defaults of newer keys
    except (yaml.YAMLError, TypeError, ConfigError) as e:
        raise ReportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ReportError(f"{path} line {i} is not JSON; the run's metrics file is damaged") from None
    return rows


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories given directly (``RunDir.is_run``) or found under study folders (``RunDir.find``)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"no such directory: {p}; give study folders or run directories")
        if RunDir(p).is_run:
            found.append(p)
        else:
            found += [run_dir.path for run_dir in RunDir.find(p)]
    unique = list(dict.fromkeys(d.resolve() for d in found))
    if not unique:
        raise ReportError(f"no run directories (with {CONFIG_NAME} and {METRICS_NAME}) under "
                          f"{', '.join(map(str, paths))}")
    return unique


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[Path]]:
    """Finished runs (a summary and metrics rows) and the run directories left out because they are not finished."""
    runs, unfinished = [], []
    for d in find_run_dirs(paths):
        files = RunDir(d)
        rows = _read_rows(files.metrics_file) if files.metrics_file.is_file() else []
        if files.state is not RunState.FINISHED or not rows:
            unfinished.append(d)
            continue
        try:
            summary = json.loads(files.summary_file.read_text())
        except json.JSONDecodeError:
            raise ReportError(f"{files.summary_file} is not JSON; re-run the run or remove it") from None
        run = Run(d, _read_yaml_config(files.config_file), summary, rows)
        # The first best row, as training saves the best checkpoint only on a strict improvement: the fallback
        # (fill_macro_f1) evaluates that checkpoint, so both give the same number.
        best_row = max(rows, key=lambda r: r["test_acc"])
        run.macro_f1 = best_row.get(MACRO_F1_KEY)
        runs.append(run)
    return runs, unfinished


def group_runs(runs: list[Run]) -> list[Group]:
    """One group per configuration (all keys but NOT_CONFIGURATION); labelled by the keys that vary."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple(sorted((k, json.dumps(v)) for k, v in run.config.items() if k not in NOT_CONFIGURATION))
        groups.setdefault(key, Group(key, [])).runs.append(run)
    out = list(groups.values())
    varying = [k for k in out[0].config if k not in NOT_CONFIGURATION
               and len({json.dumps(g.config[k]) for g in out}) > 1] if out else []
    for g in out:
        g.values = {k: g.config[k] for k in varying}
        g.runs.sort(key=lambda r: r.config["seed"])
    order = ("dataset", "model", "method", "num_labels")
    out.sort(key=lambda g: tuple(str(g.config.get(k)).zfill(12) for k in order) + (g.label,))
    return out


# --------------------------------------------------------------------------------------------- numbers

def paper_accuracy(config: dict[str, Any]) -> tuple[float, float] | None:
    """The paper's accuracy (100 - error rate, std) for this setting, when the paper has it."""
    if config.get("method") != "fixmatch" or config.get("algorithm", "fixmatch") != "fixmatch":
        return None
    entry = PAPER_ERROR_RATES.get((config["dataset"], config["num_labels"], config["model"]))
    if entry is None:
        return None
    error, std = entry["ctaugment" if config.get("strong") == "ctaugment" else "randaugment"]
    return round(100.0 - error, 2), std


def usb_accuracy(config: dict[str, Any]) -> tuple[float, float] | None:
    """USB's accuracy (100 - error rate, std) for this setting and --algorithm, when USB published it. Runs made
    before the algorithm key existed are FixMatch runs."""
    if config.get("method") != "fixmatch":
        return None
    entry = USB_ERROR_RATES.get((config["dataset"], config["num_labels"], config["model"]), {})
    found = entry.get(config.get("algorithm", "fixmatch"))
    return None if found is None else (round(100.0 - found[0], 2), found[1])


def fill_macro_f1(runs: list[Run], notes: list[str]) -> None:
    """Runs whose metrics rows lack test_macro_f1 (made before training logged it): evaluate their best
    checkpoint (EMA weights) on the test set. Slow (a test-set pass per run), hence the line on stderr."""
    from fixmatch.inference.evaluate import evaluate

    missing = [r for r in runs if r.macro_f1 is None]
    if missing:
        print(f"macro-F1: {len(missing)} of {len(runs)} runs have no {MACRO_F1_KEY} in {METRICS_NAME} (made before "
              f"it was logged); evaluating their best checkpoints on the test set", file=sys.stderr, flush=True)
    failed = []
    for run in missing:
        best = RunDir(run.path).best_checkpoint
        try:
            metrics = evaluate(best, device="cpu")
        except Exception as e:  # a missing checkpoint or data set leaves the cell empty, with a note
            failed.append(f"{run.path.name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        run.macro_f1 = metrics.get("macro_f1")
        if run.macro_f1 is None:
            failed.append(f"{run.path.name} (the evaluation code gives no macro-F1)")
    if missing:
        notes.append(f"Macro-F1: the EMA model's, at each run's best evaluation; from {METRICS_NAME} "
                     f"({MACRO_F1_KEY}) where logged, otherwise from the run's best checkpoint "
                     f"({CHECKPOINTS_NAME}/{BEST_NAME}) "
                     f"evaluated on the test set ({len(missing) - len(failed)} of {len(missing)} runs).")
    elif runs:
        notes.append(f"Macro-F1: the EMA model's, at each run's best evaluation ({METRICS_NAME}, {MACRO_F1_KEY}).")
    if failed:
        notes.append("Macro-F1 left empty for: " + "; ".join(failed) + ".")


TABLE_COLUMNS = ["seeds", "median last 20 (%)", "best (%)", "last (%)", "error rate (%)", "macro-F1 (%)", "steps run",
                 "wall time (s)", "paper (%)", "USB (%)"]


def table_rows(groups: list[Group]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Header, formatted rows (Markdown/HTML) and raw rows (CSV, with separate mean and std columns).

    The paper and USB columns are left out of the Markdown/HTML table when no row has such a number (an empty
    column says nothing); the CSV keeps its paper_* and usb_* columns, empty, so that its columns never change.
    """
    varying = list(groups[0].values) if groups else []
    with_paper = any(paper_accuracy(g.config) for g in groups)
    with_usb = any(usb_accuracy(g.config) for g in groups)
    header = varying + [c for c in TABLE_COLUMNS if (with_paper or c != "paper (%)") and (with_usb or c != "USB (%)")]
    rows, raw = [], []
    for g in groups:
        med = mean_std([r.summary["test_acc_median_last20"] for r in g.runs])
        best = mean_std([r.summary["test_acc_best"] for r in g.runs])
        last = mean_std([r.summary["test_acc_last"] for r in g.runs])
        err = mean_std([100.0 - r.summary["test_acc_median_last20"] for r in g.runs])
        f1s = [r.macro_f1 for r in g.runs if r.macro_f1 is not None]
        f1 = mean_std(f1s) if len(f1s) == len(g.runs) else (math.nan, None)
        steps = sorted({r.summary["steps"] for r in g.runs})
        wall = mean_std([r.summary["wall_s"] for r in g.runs])
        paper = paper_accuracy(g.config)
        usb = usb_accuracy(g.config)
        seeds = ", ".join(str(r.config["seed"]) for r in g.runs)
        rows.append([str(g.values[k]) for k in varying] + [
            seeds, fmt(*med), fmt(*best), fmt(*last), fmt(*err), fmt(*f1), "/".join(map(str, steps)),
            fmt(wall[0], None, 0)] + ([fmt(*paper) if paper else ""] if with_paper else [])
            + ([fmt(*usb) if usb else ""] if with_usb else []))
        raw.append({**{k: g.values[k] for k in varying}, "seeds": seeds, "n": len(g.runs),
                    "median_last20_mean": med[0], "median_last20_std": med[1], "best_mean": best[0],
                    "best_std": best[1], "last_mean": last[0], "last_std": last[1], "error_rate_mean": err[0],
                    "error_rate_std": err[1],
                    "macro_f1_mean": f1[0] if f1s else None, "macro_f1_std": f1[1], "steps_run": steps[-1],
                    "wall_s_mean": wall[0], "paper_acc": paper[0] if paper else None,
                    "paper_std": paper[1] if paper else None, "usb_acc": usb[0] if usb else None,
                    "usb_std": usb[1] if usb else None})
    return header, rows, raw


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(raw: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if raw:
        writer = csv.DictWriter(buf, fieldnames=list(raw[0]), lineterminator="\n")
        writer.writeheader()
        for r in raw:
            writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                             for k, v in r.items()})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- page

# After the page loads, a script checks that every figure decoded (naturalWidth > 0) and writes the result
# into #image-status; script errors are written there too. A headless browser reads it back (tests). Figures
# are named by their file (data-file): their src is the whole image.
_CHECK_SCRIPT = """
window.addEventListener("error", (e) => {
  const t = e.target;
  document.getElementById("image-status").textContent = "error: " + (e.message || (t && t.dataset && t.dataset.file));
}, true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0));
  const status = document.getElementById("image-status");
  if (status.textContent.startsWith("error")) return;
  status.textContent = broken.length === 0 ? `all ${images.length} images loaded`
    : "broken images: " + broken.map((img) => img.dataset.file).join(", ");
});
"""

# The text column is as wide as the wide figures (report_figures.FIG_WIDTH x DPI = 1260 px, plus a border), so
# they are shown at their own size; a narrower window scales them down.
_STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1264px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th { background: #eee; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
#image-status { color: #888; font-size: 0.8em; }
"""


def data_uri(data: bytes, mime: str) -> str:
    """The bytes as a data: URI, so that the page carries them instead of linking a file beside it."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def html_page(title: str, description: str, header: list[str], rows: list[list[str]], notes: list[str],
              figures: list[tuple[str, str, bytes]], downloads: list[tuple[str, str, bytes]]) -> str:
    """The page, self-contained: ``figures`` are (file name, caption, PNG bytes) and ``downloads`` (file name,
    MIME type, content), all embedded as data: URIs; the file names say which file each one also is."""
    esc = html.escape
    thead = "".join(f"<th>{esc(h)}</th>" for h in header)
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    links = " and ".join(f'<a href="{data_uri(content, mime)}" download="{esc(name)}">{esc(name)}</a>'
                         for name, mime, content in downloads)
    figs = "".join(f'<figure><img src="{data_uri(png, "image/png")}" data-file="{esc(name)}" alt="{esc(caption)}">'
                   f"<figcaption>{esc(caption)} ({esc(name)})</figcaption></figure>\n"
                   for name, caption, png in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p>{esc(description)}</p>
<h2>Results</h2>
<table><thead><tr>{thead}</tr></thead><tbody>
{tbody}</tbody></table>
<p>Download the table: {links}.</p>
<ul>{notes_html}</ul>
<h2>Figures</h2>
{figs}<p id="image-status">checking images…</p>
<script>{_CHECK_SCRIPT}</script>
</body></html>
"""


def _write_text(path: Path, text: str) -> None:
    """Atomic, like the figures: an interrupted report leaves the previous file whole, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(paths: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Write the table, the figures and index.html into ``out``; returns the path of index.html."""
    try:
        from fixmatch.studies.report_figures import make_figures
    except ImportError as e:
        raise ReportError(f"the report's figures need matplotlib ({e}); install it: pip install 'fixmatch[report]'"
                          ) from None

    runs, unfinished = load_runs(paths)
    if not runs:
        raise ReportError(f"none of the {len(unfinished)} run directories found has finished ({SUMMARY_NAME}); "
                          f"finish them (fixmatch sweep again resumes them) before reporting")
    out = Path(out)
    notes = [f"{len(runs)} finished runs in {len(group_runs(runs))} configurations. Accuracy is the EMA model's "
             f"top-1 test accuracy; 'median last 20' is the median over a run's last 20 evaluations (the paper's "
             f"statistic), 'best' its highest evaluation, 'last' the last; mean ± sample std (n - 1) over the "
             f"seeds (no ± for a single seed); error rate = 100 - median last 20."]
    if unfinished:
        notes.append("Not finished, left out: " + ", ".join(d.name for d in unfinished) + ".")
    fill_macro_f1(runs, notes)
    groups = group_runs(runs)
    if any(paper_accuracy(g.config) for g in groups):
        notes.append(f"Paper: accuracy = 100 - error rate of {PAPER_CITATION}, for the same data set, labels and "
                     f"model, RandAugment or CTAugment as the run's strong augmentation.")
    if any(usb_accuracy(g.config) for g in groups):
        notes.append(f"USB: accuracy = 100 - error rate of {USB_CITATION}, for the same data set, labels and model. "
                     f"USB reports each run's best error rate: compare it with the 'best' column.")
    header, rows, raw = table_rows(groups)
    try:
        out.mkdir(parents=True, exist_ok=True)
        table_csv = csv_text(raw)
        _write_text(out / "results.csv", table_csv)
        figures = make_figures(groups, out, notes)
        notes.append("Reproduce: " + "; ".join(_sweep_commands(paths) + [
            "fixmatch report " + " ".join(map(str, paths)) + f" --out {out}"]) + ".")
        table_md = markdown_table(header, rows) + "\n" + "".join(f"- {n}\n" for n in notes)
        _write_text(out / "results.md", table_md)
        page = html_page(title or "FixMatch study report", _study_description(paths), header, rows, notes,
                         [(name, caption, (out / name).read_bytes()) for name, caption in figures],
                         [("results.md", "text/markdown;charset=utf-8", table_md.encode()),
                          ("results.csv", "text/csv;charset=utf-8", table_csv.encode())])
        _write_text(out / "index.html", page)
    except OSError as e:
        raise ReportError(f"cannot write the report into {out} ({e.strerror or e}); give as --out a "
                          f"writable folder on a disk with free space") from None
    return out / "index.html"


def _sweep_commands(paths: list[str | Path]) -> list[str]:
    """The `fixmatch sweep` commands that made the given study folders (sweep.json), where recorded."""
    commands = []
    for p in map(Path, paths):
        try:
            commands.append(json.loads((p / "sweep.json").read_text())["command"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return commands


def _study_description(paths: list[str | Path]) -> str:
    """The description line of the study files (study.yaml written by fixmatch sweep), where there are any."""
    texts = []
    for p in map(Path, paths):
        study = p / "study.yaml"
        if study.is_file():
            try:
                data = parse_yaml(study.read_text(), str(study))
            except ConfigError:
                continue
            if isinstance(data, dict) and data.get("description"):
                texts.append(str(data["description"]).strip())
    return " ".join(texts)
