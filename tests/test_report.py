"""fixmatch report: grouping over seeds, mean ± std, paper numbers, CSV/Markdown, figures (legible: nothing
outside the image, page-wide; no error bars from one seed; a colour bar), macro-F1 read from metrics.jsonl,
and index.html self-contained and checked in a real headless Chromium (every image decodes, no console
messages)."""
import base64
import csv
import importlib
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer

import fixmatch
from fixmatch.config import Config
from fixmatch.studies import report_figures
from fixmatch.studies.report import (
    PAPER_ERROR_RATES,
    USB_ERROR_RATES,
    ReportError,
    load_runs,
    paper_accuracy,
    usb_accuracy,
    write_report,
)


def _fake_run(root, name, accs, macro_f1=None, finished=True, **config):
    """A run directory as train() writes it, with given accuracies per evaluation (no training)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = Config(**{"dataset": "synthetic", "model": "cnn_small", "steps": 10 * len(accs), **config})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    rows = []
    for i, acc in enumerate(accs, 1):
        row = {"step": 10 * i, "test_acc": acc, "test_top5": 99.0, "raw_test_acc": acc - 1, "loss_s": 1.0 / i,
               "loss_u": 0.5 / i, "mask_rate": 0.1 * i, "pseudo_label_acc": 80.0, "lr": 0.03, "wall_s": 2.0 * i}
        if macro_f1 is not None:
            row["test_macro_f1"] = macro_f1 + i  # the row of the best accuracy is the one reported
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        summary = {"steps": 10 * len(accs), "test_acc_last": accs[-1], "test_acc_best": max(accs),
                   "test_acc_median_last20": statistics.median(accs[-20:]), "wall_s": 100.0 + cfg.seed,
                   "steps_per_s": 1.0}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _study(tmp_path):
    root = tmp_path / "study"
    for seed, shift in ((0, 0.0), (1, 2.0), (2, 4.0)):
        _fake_run(root, f"fm40-s{seed}", [50 + shift, 70 + shift, 60 + shift], macro_f1=40.0 + shift,
                  num_labels=40, seed=seed)
        _fake_run(root, f"sup40-s{seed}", [40 + shift, 45 + shift], macro_f1=30.0, num_labels=40, seed=seed,
                  method="supervised")
    _fake_run(root, "fm250-s0", [80.0, 90.0], macro_f1=85.0, num_labels=250, seed=0)
    _fake_run(root, "unfinished", [10.0], num_labels=250, seed=1, finished=False)
    (root / "sweep.json").write_text(json.dumps({"command": "fixmatch sweep studies/s.yaml --out runs/s"}))
    return root


def test_table_groups_seeds_with_mean_and_sample_std(tmp_path):
    index = write_report([_study(tmp_path)], tmp_path / "report")
    rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    by = {(r["num_labels"], r["method"]): r for r in rows}
    assert set(by) == {("40", "fixmatch"), ("40", "supervised"), ("250", "fixmatch")}
    fm = by[("40", "fixmatch")]
    # medians of [50, 70, 60] + shift = 60, 62, 64: mean 62, sample std 2
    assert (float(fm["median_last20_mean"]), float(fm["median_last20_std"])) == (62.0, 2.0)
    assert (float(fm["best_mean"]), float(fm["error_rate_mean"])) == (72.0, 38.0)
    assert (float(fm["last_mean"]), float(fm["last_std"])) == (62.0, 2.0)
    # macro-F1 of each run's best evaluation (row 2: 40 + shift + 2): 42, 44, 46
    assert (float(fm["macro_f1_mean"]), float(fm["macro_f1_std"])) == (44.0, 2.0)
    assert fm["seeds"] == "0, 1, 2" and fm["n"] == "3" and fm["steps_run"] == "30"
    assert math.isclose(float(fm["wall_s_mean"]), 101.0)  # 100 + seed, seeds 0-2
    single = by[("250", "fixmatch")]
    assert single["median_last20_std"] == "" and float(single["median_last20_mean"]) == 85.0
    md = (tmp_path / "report" / "results.md").read_text()
    # last evaluations 60, 62, 64: mean 62, std 2
    assert "| 40 | fixmatch | 30 | 0, 1, 2 | 62.00 ± 2.00 | 72.00 ± 2.00 | 62.00 ± 2.00 | 38.00 ± 2.00 | 44.00 ± 2.00 | 30 |" in md
    assert "Not finished, left out: unfinished." in md
    assert f"Reproduce: fixmatch sweep studies/s.yaml --out runs/s; fixmatch report {tmp_path / 'study'} --out " in md
    page = index.read_text()
    assert "62.00 ± 2.00" in page and "No confusion matrix" in page  # fake runs have no checkpoints
    for png in ("accuracy_vs_step.png", "best_vs_labels.png", "losses.png", "mask_rate.png",
                "pseudo_label_acc.png", "ema_vs_raw.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'data-file="{png}"' in page


def test_paper_numbers_for_matching_settings_only():
    base = dict(dataset="cifar10", num_labels=40, model="wrn28_2", method="fixmatch", strong="randaugment")
    assert paper_accuracy(base) == (86.19, 3.37)
    assert paper_accuracy({**base, "strong": "ctaugment"}) == (88.61, 3.35)
    assert paper_accuracy({**base, "strong": "randaugment-tf"}) == (86.19, 3.37)
    assert paper_accuracy({**base, "model": "resnet18"}) is None
    assert paper_accuracy({**base, "method": "supervised"}) is None
    assert paper_accuracy({**base, "dataset": "fashion-mnist"}) is None
    assert PAPER_ERROR_RATES[("stl10", 1000, "wrn37_2")]["ctaugment"] == (5.17, 0.63)


def test_a_study_with_one_label_count_gets_a_bar_per_configuration(tmp_path):
    for seed in (0, 1):
        _fake_run(tmp_path / "s", f"ra-s{seed}", [60.0, 70.0 + seed], num_labels=40, seed=seed)
        _fake_run(tmp_path / "s", f"cta-s{seed}", [50.0, 65.0 + seed], num_labels=40, seed=seed, strong="ctaugment")
    page = write_report([tmp_path / "s"], tmp_path / "r").read_text()
    assert (tmp_path / "r" / "best_by_configuration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'data-file="best_by_configuration.png"' in page and "best_vs_labels" not in page
    assert not (tmp_path / "r" / "best_vs_labels.png").exists()


def test_paper_column_in_the_table(tmp_path):
    _fake_run(tmp_path / "s", "c10", [80.0, 85.0], dataset="cifar10", model="wrn28_2", num_labels=250, steps=20)
    _fake_run(tmp_path / "s", "c10-sup", [60.0], dataset="cifar10", model="wrn28_2", num_labels=250,
              method="supervised", steps=20)
    write_report([tmp_path / "s"], tmp_path / "r")
    md = (tmp_path / "r" / "results.md").read_text()
    assert "| fixmatch | 0 | 82.50 | 85.00 | 85.00 | 17.50 |" in md and "| 94.93 ± 0.65 |" in md
    assert md.count("94.93") == 1  # the supervised row has no paper number
    assert "Sohn et al., 2020, Table 2" in md


def test_usb_numbers_for_matching_settings_and_algorithm_only():
    base = {"method": "fixmatch", "dataset": "cifar10", "num_labels": 40, "model": "wrn28_2"}
    assert usb_accuracy(base) == (91.67, 1.41)  # a run made before the algorithm key: FixMatch
    assert usb_accuracy({**base, "algorithm": "flexmatch"}) == (94.79, 0.36)
    assert usb_accuracy({**base, "algorithm": "freematch"}) == (95.03, 0.09)
    assert usb_accuracy({**base, "algorithm": "softmatch"}) == (94.94, 0.02)
    assert usb_accuracy({**base, "dataset": "cifar100", "num_labels": 400, "model": "wrn28_8",
                         "algorithm": "freematch"}) == (50.76, 2.16)
    assert usb_accuracy({**base, "model": "resnet18"}) is None
    assert usb_accuracy({**base, "method": "supervised"}) is None
    # The FixMatch paper's numbers are FixMatch's only.
    assert paper_accuracy({**base, "algorithm": "flexmatch"}) is None and paper_accuracy(base) == (86.19, 3.37)
    assert all(set(v) == {"fixmatch", "flexmatch", "freematch", "softmatch"} for v in USB_ERROR_RATES.values())


def test_usb_column_beside_runs_of_a_published_setting(tmp_path):
    _fake_run(tmp_path / "s", "flex", [90.0, 93.0], dataset="cifar10", model="wrn28_2", num_labels=40, steps=20,
              algorithm="flexmatch")
    _fake_run(tmp_path / "s", "fix", [88.0, 90.0], dataset="cifar10", model="wrn28_2", num_labels=40, steps=20)
    write_report([tmp_path / "s"], tmp_path / "r")
    md = (tmp_path / "r" / "results.md").read_text()
    header = md.splitlines()[0]
    assert header.endswith("| paper (%) | USB (%) |")
    flex_row = next(line for line in md.splitlines() if line.startswith("| flexmatch |"))
    fix_row = next(line for line in md.splitlines() if line.startswith("| fixmatch |"))
    assert flex_row.endswith("|  | 94.79 ± 0.36 |")  # no FixMatch-paper number for FlexMatch, USB's number
    assert fix_row.endswith("| 86.19 ± 3.37 | 91.67 ± 1.41 |")
    assert "USB (Wang et al., 2022)" in md
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert {r["usb_acc"] for r in rows} == {"94.79", "91.67"}


def test_threshold_curves_are_drawn_for_runs_that_logged_them(tmp_path):
    for name, algorithm, n in (("flex", "flexmatch", 10), ("soft", "softmatch", 1)):
        run = _fake_run(tmp_path / "s", name, [60.0, 70.0, 75.0], algorithm=algorithm)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for i, row in enumerate(rows):
            row["thresholds"] = [0.1 * i + 0.01 * c for c in range(n)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report([tmp_path / "s"], tmp_path / "r").read_text()
    assert (tmp_path / "r" / "thresholds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'data-file="thresholds.png"' in page


def test_no_threshold_figure_without_adaptive_thresholds(tmp_path):
    page = write_report([_study(tmp_path)], tmp_path / "r").read_text()
    assert not (tmp_path / "r" / "thresholds.png").exists() and "thresholds.png" not in page


def test_threshold_curves_are_the_mean_over_seeds_per_class():
    from fixmatch.studies.results import Run
    runs = [Run(Path("a"), {}, {}, [{"step": 10, "thresholds": [0.2, 0.4]}, {"step": 20, "thresholds": [0.6, 0.8]}]),
            Run(Path("b"), {}, {}, [{"step": 10, "thresholds": [0.4, 0.6]}, {"step": 20}])]
    steps, curves = report_figures._threshold_curves(runs)
    assert steps == [10, 20]
    assert curves == [pytest.approx([0.3, 0.6]), pytest.approx([0.5, 0.8])]


def test_paper_column_hidden_when_no_row_has_a_paper_number(tmp_path):
    _fake_run(tmp_path / "s", "a", [60.0, 70.0])  # synthetic: the paper has no number for it
    index = write_report([tmp_path / "s"], tmp_path / "r")
    md = (tmp_path / "r" / "results.md").read_text()
    assert md.splitlines()[0].endswith("| steps run | wall time (s) |") and "paper (%)" not in md
    assert "paper (%)" not in index.read_text() and "Sohn et al." not in md
    row = next(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert row["paper_acc"] == row["paper_std"] == ""  # the CSV keeps its columns


def test_index_html_embeds_its_figures_and_tables_and_the_files_stay(tmp_path):
    index = write_report([_study(tmp_path)], tmp_path / "r")
    page = index.read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(refs) == 8 and all(r.startswith("data:") for r in refs)  # nothing to fetch beside the page
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)" data-file="([^"]+)"', page)
    assert len(embedded) == 6
    for data, name in embedded:
        assert base64.b64decode(data) == (tmp_path / "r" / name).read_bytes()
    for name in ("results.md", "results.csv"):
        data = re.search(rf'href="data:text/[a-z]+;charset=utf-8;base64,([^"]+)" download="{name}"', page).group(1)
        assert base64.b64decode(data).decode() == (tmp_path / "r" / name).read_text()


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures a report draws, by file name (still usable after they are saved and closed)."""
    drawn = {}
    save = report_figures._save

    def keep(fig, path):
        save(fig, path)
        drawn[path.name] = fig
    monkeypatch.setattr(report_figures, "_save", keep)
    return drawn


def _renderer(fig):
    """The figure drawn again as when saved (closing it took its Agg canvas away)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _outside(fig):
    """The parts of a figure (each axes with its labels, ticks and title; each figure legend) that reach past
    the image's edges."""
    renderer = _renderer(fig)
    parts = [(ax.get_ylabel() or ax.get_title() or "axes", ax.get_tightbbox(renderer)) for ax in fig.axes]
    parts += [("legend", legend.get_window_extent(renderer)) for legend in fig.legends]
    edge = fig.bbox.padded(1)
    return [name for name, box in parts
            if not (edge.x0 <= box.x0 and box.x1 <= edge.x1 and edge.y0 <= box.y0 and box.y1 <= edge.y1)]


def _png_width(path):
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def _cut_at_the_edge(path):
    """Whether anything is drawn on the saved image's outermost pixels: a label or legend cut by the edge."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"))
    edges = np.concatenate([pixels[:2].ravel(), pixels[-2:].ravel(), pixels[:, :2].ravel(), pixels[:, -2:].ravel()])
    return bool((edges < 250).any())


def test_figures_keep_their_labels_inside_and_fill_the_page_width(tmp_path, figures):
    index = write_report([_study(tmp_path)], tmp_path / "r")
    assert len(figures) == 6
    for name, fig in figures.items():
        assert _outside(fig) == [], name
        assert not _cut_at_the_edge(tmp_path / "r" / name), name
    mask = figures["mask_rate.png"].axes[0]
    label = mask.yaxis.label.get_window_extent(_renderer(mask.figure))
    assert mask.figure.bbox.contains(label.x0, label.y0) and mask.figure.bbox.contains(label.x1, label.y1)
    column = int(re.search(r"max-width: (\d+)px", index.read_text()).group(1))
    for name in figures:  # as wide as the page's text column (1400-px window), not half of it
        assert 0.9 * column <= _png_width(tmp_path / "r" / name) <= column, name


def test_confusion_matrix_has_a_colour_bar(tmp_path, figures):
    from fixmatch.studies.report import Run

    report_figures.confusion(Run(tmp_path / "run", {}, {}, []), [[5, 5], [0, 10]], ["a", "b"], tmp_path / "c.png")
    fig = figures["c.png"]
    assert fig.axes[0].images[0].colorbar is not None and fig.axes[1] is fig.axes[0].images[0].colorbar.ax
    assert fig.axes[1].get_ylabel() == "fraction of the true class" and _outside(fig) == []


def _error_bars(ax):
    """How many error bars the axes draws (each ErrorbarContainer's line collection holds one per point)."""
    return sum(len(c.lines[2][0].get_segments()) for c in ax.containers if isinstance(c, ErrorbarContainer))


@pytest.mark.slow
def test_no_error_bar_from_a_single_seed_and_n_in_the_legend(tmp_path, figures):
    _fake_run(tmp_path / "a", "ra-s0", [60.0, 70.0], num_labels=40, seed=0)
    for seed in (0, 1):
        _fake_run(tmp_path / "a", f"cta-s{seed}", [50.0, 65.0 + seed], num_labels=40, seed=seed, strong="ctaugment")
    write_report([tmp_path / "a"], tmp_path / "ra")
    ax = figures["best_by_configuration.png"].axes[0]
    assert _error_bars(ax) == 1  # the two-seed configuration only; none (not a zero-length one) for n = 1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["strong=ctaugment (n=2)", "strong=randaugment (n=1)"]

    figures.clear()
    _fake_run(tmp_path / "b", "fm40", [60.0, 70.0], num_labels=40, seed=0)
    _fake_run(tmp_path / "b", "fm250", [80.0, 90.0], num_labels=250, seed=0)
    write_report([tmp_path / "b"], tmp_path / "rb")
    fig = figures["best_vs_labels.png"]
    assert _error_bars(fig.axes[0]) == 0
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fixmatch (n=1)"]
    assert [t.get_text() for t in figures["mask_rate.png"].legends[0].get_texts()] == [
        "num_labels=40 (n=1)", "num_labels=250 (n=1)"]
    _fake_run(tmp_path / "b", "fm40-s1", [60.0, 72.0], num_labels=40, seed=1)
    write_report([tmp_path / "b"], tmp_path / "rb")
    assert _error_bars(figures["best_vs_labels.png"].axes[0]) == 1  # at 40 labels (two seeds) only


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ReportError, match="no such directory"):
        write_report([tmp_path / "nope"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run directories"):
        write_report([tmp_path / "empty"], tmp_path / "r")
    _fake_run(tmp_path / "u", "a", [1.0], finished=False)
    with pytest.raises(ReportError, match="has finished"):
        write_report([tmp_path / "u"], tmp_path / "r")
    run = _fake_run(tmp_path / "d", "a", [1.0])
    (run / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ReportError, match="line 1 is not JSON"):
        load_runs([run])
    run = _fake_run(tmp_path / "s", "a", [1.0])
    (run / "summary.json").write_text('{"steps": 1')  # cut short
    with pytest.raises(ReportError, match=r"summary.json is not JSON; re-run the run or remove it"):
        load_runs([run])
    run = _fake_run(tmp_path / "c", "a", [1.0])
    (run / "config.yaml").write_text("lr: [0.03\n")
    with pytest.raises(ReportError, match=r"cannot read .*config.yaml"):
        load_runs([run])
    (run / "config.yaml").write_text("learning_rate: 0.03\n")
    with pytest.raises(ReportError, match=r"cannot read .*config.yaml: .*learning_rate"):
        load_runs([run])
    _fake_run(tmp_path / "ok", "a", [1.0])
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ReportError, match=r"cannot write the report into .*a-file \(File exists\); give as --out"):
        write_report([tmp_path / "ok"], tmp_path / "a-file")
    from fixmatch.cli import main
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_check(index):
    """Load the page in headless Chromium; return the image status the page's script wrote, and console lines."""
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", "--allow-file-access-from-files", "--dump-dom", index.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.index('id="image-status">') + len('id="image-status">')
    status = proc.stdout[start:proc.stdout.index("</p>", start)]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return status, console


@pytest.fixture(scope="module")
def trained_study(tmp_path_factory):
    """Two tiny real runs (checkpoints included): macro-F1 from the checkpoint, a confusion matrix."""
    root = tmp_path_factory.mktemp("real")
    quick = dict(dataset="synthetic", model="cnn_small", num_labels=20, batch_size=8, mu=2, lr=0.05, ema=0.9,
                 eval_every=4, eval_batch_size=512, progress=False, device="cpu", steps=4, channels_last=False)
    fixmatch.train(Config(**quick), out=root / "study" / "fm")
    fixmatch.train(Config(**{**quick, "method": "supervised"}), out=root / "study" / "sup")
    return root


@pytest.fixture(scope="module")
def real_report(trained_study):
    return write_report([trained_study / "study"], trained_study / "report")


def test_macro_f1_and_confusion_come_from_the_best_checkpoint_when_metrics_lack_them(tmp_path, monkeypatch,
                                                                                   capsys):
    root = tmp_path / "s"
    for seed in (0, 1):
        run = _fake_run(root, f"r{seed}", [50.0 + seed, 60.0 + seed], seed=seed)
        (run / "checkpoints").mkdir()
    calls = []

    def fake_evaluate(path, device="cpu"):
        calls.append(path)
        seed = int(path.parent.parent.name[1:])
        return {"test_acc": 0.0, "macro_f1": 70.0 + 2 * seed, "per_class_acc": {"a": 50.0, "b": 100.0},
                "confusion": [[5, 5], [0, 10]]}

    monkeypatch.setattr(importlib.import_module("fixmatch.inference.evaluate"), "evaluate", fake_evaluate)
    index = write_report([root], tmp_path / "r")
    assert sorted(p.parent.parent.name for p in calls[:2]) == ["r0", "r1"]
    assert all(p.name == "best.pt" for p in calls)
    row = next(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert (float(row["macro_f1_mean"]), float(row["macro_f1_std"])) == (71.0, math.sqrt(2))
    assert calls[-1].parent.parent.name == "r1"  # the confusion matrix is the best run's (61% > 60%)
    assert (tmp_path / "r" / "confusion_best.png").is_file() and "confusion_best.png" in index.read_text()
    said = [line for line in capsys.readouterr().err.splitlines() if "macro-F1" in line]
    assert said == ["macro-F1: 2 of 2 runs have no test_macro_f1 in metrics.jsonl (made before it was logged); "
                    "evaluating their best checkpoints on the test set"]


def test_macro_f1_is_read_from_metrics_without_evaluating_checkpoints(trained_study, tmp_path, monkeypatch, capsys):
    runs = trained_study / "study"
    calls = []

    def refuse(path, **kwargs):
        calls.append(path)
        raise RuntimeError("a checkpoint was loaded")

    monkeypatch.setattr(importlib.import_module("fixmatch.inference.evaluate"), "evaluate", refuse)
    write_report([runs], tmp_path / "r")
    assert len(calls) == 1  # the confusion matrix of the best run: one evaluation, not one per run
    best_f1 = {}
    for name in ("fm", "sup"):
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        best_f1[name] = max(rows, key=lambda r: r["test_acc"])["test_macro_f1"]
    table = {r["method"]: float(r["macro_f1_mean"]) for r in csv.DictReader((tmp_path / "r" / "results.csv").open())}
    assert table == {"fixmatch": best_f1["fm"], "supervised": best_f1["sup"]}
    assert "no test_macro_f1" not in capsys.readouterr().err


def test_logged_macro_f1_is_the_best_checkpoints(trained_study):
    """train.py logs the EMA model's test macro-F1: the number an evaluation of best.pt gives."""
    from fixmatch.inference.evaluate import evaluate

    for name in ("fm", "sup"):
        run = trained_study / "study" / name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        best = max(rows, key=lambda r: r["test_acc"])
        assert best["test_macro_f1"] == pytest.approx(evaluate(run / "checkpoints" / "best.pt", device="cpu")
                                                      ["macro_f1"], abs=1e-6)


needs_per_class_metrics = pytest.mark.skipif(
    not hasattr(importlib.import_module("fixmatch.core.metrics"), "macro_f1"),
    reason="evaluate.py does not compute macro-F1 and confusion matrices yet")


@needs_per_class_metrics
def test_real_runs_get_macro_f1_and_a_confusion_matrix(real_report):
    rows = list(csv.DictReader((real_report.parent / "results.csv").open()))
    assert len(rows) == 2 and all(0 <= float(r["macro_f1_mean"]) <= 100 for r in rows)
    assert (real_report.parent / "confusion_best.png").is_file()
    assert 'data-file="confusion_best.png"' in real_report.read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (scripts/setup.sh installs it with apt)")
def test_index_html_in_headless_chromium_loads_every_image_without_console_messages(real_report, tmp_path):
    # index.html alone, without the PNG files beside it: the page is self-contained.
    alone = tmp_path / "alone"
    alone.mkdir()
    index = alone / "index.html"
    shutil.copy(real_report, index)
    status, console = _browser_check(index)
    n = index.read_text().count("<img ")
    assert n == len(list(real_report.parent.glob("*.png"))) >= 6 and status == f"all {n} images loaded"
    assert console == []
    # The check does detect a broken figure: the test would fail on a page with a damaged image.
    page = index.read_text()
    start = page.rindex('src="data:image/png;base64,', 0, page.index('data-file="losses.png"'))
    index.write_text(page[:start] + 'src="data:image/png;base64,AAAA"' + page[page.index('"', start + 5) + 1:])
    status, _ = _browser_check(index)
    assert status.startswith("error") or status == "broken images: losses.png"
