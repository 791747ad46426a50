"""Every study file under studies/ is runnable as is: each of its configurations resolves, and the CPU-sized
Fashion-MNIST counterpart of each CIFAR-10 study exists and stays CPU-sized."""
from pathlib import Path

import pytest

from fixmatch.studies.sweep import load_study

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))


def test_studies_exist():
    names = {p.stem for p in STUDIES}
    topics = ("labels", "backbones", "augmentation", "label-selection", "optimiser", "threshold")
    assert {f"{d}-{t}" for d in ("cifar10", "fashion-mnist") for t in topics} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_configuration_of_every_study_resolves(path):
    study = load_study(path)  # raises ConfigError naming the run otherwise
    assert study.runs and study.description
    seeds = {r.config.seed for r in study.runs}
    assert len(seeds) >= 3  # mean ± std over seeds
    if path.stem.startswith("fashion-mnist"):
        assert all(r.config.dataset == "fashion-mnist" and r.config.steps <= 2000 for r in study.runs)
        assert "cnn_small" in {r.config.model for r in study.runs}
    else:
        assert all(r.config.dataset == "cifar10" for r in study.runs)


def test_label_studies_have_the_issue_label_counts_and_the_supervised_baseline():
    for name, counts in (("cifar10-labels", {10, 40, 250, 4000}), ("fashion-mnist-labels", {10, 40, 250, 1000})):
        runs = load_study(STUDIES[[p.stem for p in STUDIES].index(name)]).runs
        assert {r.config.num_labels for r in runs} == counts
        assert {r.config.method for r in runs} == {"fixmatch", "supervised"}


def test_ablation_studies_vary_what_they_are_about():
    def values(name, key):
        runs = load_study(STUDIES[[p.stem for p in STUDIES].index(name)]).runs
        return {getattr(r.config, key) for r in runs}

    for d in ("cifar10", "fashion-mnist"):
        assert values(f"{d}-label-selection", "label_selection") == {"random", "representative", "unrepresentative"}
        assert values(f"{d}-optimiser", "optimizer") == {"sgd", "adam", "adamw"}
        assert values(f"{d}-optimiser", "schedule") == {"cosine", "constant", "plateau"}
        assert 0.0 in values(f"{d}-optimiser", "ema")
        assert values(f"{d}-threshold", "lu_norm") == {"all", "masked"} and len(values(f"{d}-threshold", "tau")) >= 4
        assert {"randaugment", "ctaugment"} <= values(f"{d}-augmentation", "strong")
        assert len(values(f"{d}-augmentation", "cutout")) >= 2
        assert len(values(f"{d}-backbones", "model")) >= 2
    assert values("fashion-mnist-weak-no-grad", "weak_no_grad") == {True, False}
    assert values("fashion-mnist-dist-align", "dist_align") == {True, False}
    for d in ("cifar10", "fashion-mnist"):
        assert values(f"{d}-algorithms", "algorithm") == {"fixmatch", "flexmatch", "freematch", "softmatch"}
    assert values("fashion-mnist-algorithms", "dist_align") == {True, False}
    assert values("fashion-mnist-algorithms", "num_labels") == {10, 40}
    assert values("fashion-mnist-advised-labels", "label_selection") == {"random", "typiclust"}
    assert values("fashion-mnist-advised-labels", "selection_checkpoint") == {"runs/fashion-mnist-pretrain"}
