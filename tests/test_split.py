import json

import numpy as np
import pytest
import torch

from fixmatch.data.split import Split, SplitError, load_split, make_split, save_split, train_digest

LABELS = torch.arange(1000) % 10  # 100 examples per class


def test_stratified_and_sorted():
    split = make_split(LABELS, num_labels=40, num_classes=10, seed=0)
    assert split.num_labels == 40 and split.seed == 0
    assert len(split.labeled) == 40 and split.labeled == sorted(split.labeled)
    assert np.bincount(LABELS.numpy()[split.labeled], minlength=10).tolist() == [4] * 10
    assert split.unlabeled == list(range(1000))
    assert set(split.labeled) <= set(split.unlabeled)


def test_deterministic_and_independent_of_torch_rng():
    torch.manual_seed(1)
    a = make_split(LABELS, 40, 10, seed=3)
    torch.manual_seed(2)
    torch.rand(10)
    b = make_split(LABELS.numpy(), 40, 10, seed=3)
    assert a == b
    assert make_split(LABELS, 40, 10, seed=4).labeled != a.labeled


def test_unbalanced_labels_use_every_class():
    labels = np.array([0] * 5 + [1] * 50 + [2] * 3)
    split = make_split(labels, 9, 3, seed=0)
    assert np.bincount(labels[split.labeled]).tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    "num_labels, match",
    [(45, "not divisible"), (0, "positive"), (-10, "positive"), (1010, "class 0 has only 100")],
)
def test_bad_requests(num_labels, match):
    with pytest.raises(SplitError, match=match):
        make_split(LABELS, num_labels, 10, seed=0)


@pytest.mark.parametrize("kwargs, match", [({"num_labels": 40.0}, "num_labels must be an integer"),
                                           ({"seed": -1}, "seed must be a non-negative integer"),
                                           ({"seed": 1.5}, "seed must be a non-negative integer"),
                                           ({"num_classes": 0}, "num_classes must be a positive integer")])
def test_bad_argument_types_are_split_errors(kwargs, match):
    with pytest.raises(SplitError, match=match):
        make_split(LABELS, **{"num_labels": 40, "num_classes": 10, "seed": 0, **kwargs})


def test_labels_out_of_range():
    with pytest.raises(SplitError, match=r"\[0, 5\)"):
        make_split(LABELS, 10, 5, seed=0)


def test_save_load_round_trip(tmp_path):
    split = make_split(LABELS, 250, 10, seed=7)
    path = save_split(split, tmp_path / "sub" / "split.json")
    assert load_split(path) == split
    assert load_split(path, num_train=1000) == split
    assert Split.from_json(json.loads(json.dumps(split.to_json()))) == split
    with pytest.raises(SplitError, match="1000 images but this one has 999"):
        load_split(path, num_train=999)


def test_custom_unlabeled_pool_round_trips():
    split = Split(labeled=[1, 2], unlabeled=[0, 1, 2, 5], seed=0, num_labels=2)
    assert Split.from_json(split.to_json()) == split
    with pytest.raises(SplitError, match="outside"):
        Split.from_json(split.to_json(), num_train=5)


def _write(path, d):
    path.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return path


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(labeled=d["labeled"][:-1] + [5000]), "outside"),
        (lambda d: d.update(labeled=d["labeled"][:-1] + [-1]), "outside"),
        (lambda d: d.update(labeled=d["labeled"][:-1] + d["labeled"][:1]), "duplicate"),
        (lambda d: d.update(labeled=[str(i) for i in d["labeled"]]), "list of integers"),
        (lambda d: d.update(num_labels=41), "num_labels"),
        (lambda d: d.update(seed="x"), "seed"),
        (lambda d: d.pop("format"), "not a fixmatch-split"),
    ],
)
def test_load_rejects_bad_files(tmp_path, mutate, match):
    d = make_split(LABELS, 40, 10, seed=0).to_json()
    mutate(d)
    with pytest.raises(SplitError, match=match):
        load_split(_write(tmp_path / "s.json", d))


def test_load_rejects_missing_and_malformed(tmp_path):
    with pytest.raises(SplitError, match="not found"):
        load_split(tmp_path / "missing.json")
    with pytest.raises(SplitError, match="cannot read"):
        load_split(_write(tmp_path / "bad.json", "{not json"))


def test_train_digest_tells_training_sets_apart():
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    d = train_digest(images, labels)
    assert d == train_digest(images.clone(), labels.clone())
    assert d != train_digest(images, labels[[1, 0, 2, 3, 4, 5]])  # same size, other labels
    assert d != train_digest(images[[1, 0, 2, 3, 4, 5]], labels)  # same images, another order
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    assert d != train_digest(other, labels)


def test_split_with_a_digest_loads_only_for_its_training_set(tmp_path):
    split = make_split(torch.tensor([0, 1] * 5), 4, 2, seed=0)
    path = save_split(Split(**{**split.__dict__, "train_digest": "abc"}), tmp_path / "split.json")
    assert load_split(path, 10, digest="abc").train_digest == "abc"
    with pytest.raises(SplitError, match="made for other training images"):
        load_split(path, 10, digest="def")
    legacy = save_split(split, tmp_path / "legacy.json")  # written before digests: taken on trust
    assert "train_digest" not in json.loads(legacy.read_text())
    assert load_split(legacy, 10, digest="def").labeled == split.labeled
