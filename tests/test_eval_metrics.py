"""The evaluation metrics on hand-computed cases."""
import pytest
import torch

from fixmatch.config import ConfigError
from fixmatch.core.metrics import (
    accuracy_metrics,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    per_class_accuracy,
)
from fixmatch.inference.evaluate import plot_confusion

# 3 classes, 6 images:        true 0 0 1 2 2 2      predicted 0 1 1 2 2 0
LABELS = torch.tensor([0, 0, 1, 2, 2, 2])
PREDS = torch.tensor([0, 1, 1, 2, 2, 0])


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(PREDS, LABELS, 3)
    assert cm.tolist() == [[1, 1, 0],
                           [0, 1, 0],
                           [1, 0, 2]]
    assert cm.dtype == torch.int64


def test_per_class_accuracy_is_recall_and_none_without_images():
    assert per_class_accuracy(confusion_matrix(PREDS, LABELS, 3)) == pytest.approx([50.0, 100.0, 200 / 3])
    # class 3 has no test image
    assert per_class_accuracy(confusion_matrix(PREDS, LABELS, 4))[3] is None


def test_macro_f1_by_hand():
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 1, FP 1, FN 0 -> 2/3; class 2: TP 2, FP 0, FN 1 -> 4/5
    expected = 100 * (2 / 4 + 2 / 3 + 4 / 5) / 3
    assert macro_f1(confusion_matrix(PREDS, LABELS, 3)) == pytest.approx(expected)
    # a fourth class that is neither present nor predicted does not dilute the mean
    assert macro_f1(confusion_matrix(PREDS, LABELS, 4)) == pytest.approx(expected)
    # a class that is predicted but absent counts with F1 = 0
    assert macro_f1(confusion_matrix(torch.tensor([3, 1]), torch.tensor([0, 1]), 4)) == pytest.approx(100 * (0 + 1 + 0) / 3)
    assert macro_f1(confusion_matrix(LABELS, LABELS, 3)) == pytest.approx(100.0)


def test_accuracy_and_classification_metrics_agree():
    logits = torch.tensor([[3.0, 1, 2], [1, 3, 2], [0, 3, 1], [0, 1, 3], [1, 0, 3], [3, 1, 2]])  # argmax = PREDS
    assert logits.argmax(1).tolist() == PREDS.tolist()
    m = classification_metrics(logits, LABELS, ["a", "b", "c"])
    assert m["test_acc"] == pytest.approx(100 * 4 / 6)
    # top-5 is top-3 here: every label is among all 3 classes
    assert m["test_top5"] == pytest.approx(100.0)
    assert accuracy_metrics(logits, LABELS)["top1"] == pytest.approx(m["test_acc"])
    assert m["per_class_acc"] == pytest.approx({"a": 50.0, "b": 100.0, "c": 200 / 3})
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_confusion_png_written_atomically_and_bad_paths_refused(tmp_path):
    cm = confusion_matrix(PREDS, LABELS, 3)
    out = tmp_path / "cm.png"
    plot_confusion(cm, ["a", "b", "c"], out, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left
    with pytest.raises(ConfigError, match="ending in .png"):
        plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.jpg")
    with pytest.raises(ConfigError, match="does not exist"):
        plot_confusion(cm, ["a", "b", "c"], tmp_path / "missing" / "cm.png")
