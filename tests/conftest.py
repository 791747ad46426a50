"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Runs a test on one torch thread and restores the count after.

    Tiny models and batches gain nothing from a second thread, and on a CPU shared with other
    processes OpenMP's waiting threads can make them many times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
