"""atomic_path: a file is replaced whole, with the usual permissions, or left as it was."""

from __future__ import annotations

import os

import pytest

from fixmatch.core.atomic import atomic_path, default_permissions


def test_replaces_the_file_with_default_permissions_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".summary.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing is visible before the block ends
    assert path.read_text() == "new"
    assert os.stat(path).st_mode & 0o777 == default_permissions()  # not mkstemp's private 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_an_error_in_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path, suffix=".tmp.onnx") as tmp:
            assert tmp.name.endswith(".tmp.onnx")
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_two_writers_get_different_temporaries(tmp_path):
    path = tmp_path / "a.txt"
    with atomic_path(path) as first, atomic_path(path) as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert path.read_text() == "1"  # the outer block ends last and wins
