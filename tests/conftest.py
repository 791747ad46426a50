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


# Progress through long tests: with -q pytest prints a dot when a test ends, so a slow test would leave the
# terminal silent for minutes. Name each slow test as it starts (with -v pytest names every test already).
_SLOW_TESTS: set[str] = set()
_CONFIG: list[pytest.Config] = []


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG.append(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _SLOW_TESTS.update(item.nodeid for item in items if item.get_closest_marker("slow"))


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    reporter = _CONFIG[-1].pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
    if nodeid in _SLOW_TESTS and reporter is not None and reporter.verbosity <= 0:
        # In -q mode the dots share a line that pytest's ensure_newline() does not track.
        start = "\n" if getattr(reporter._tw, "width_of_current_line", 0) else ""
        reporter.write(f"{start}[slow test] {nodeid} ...\n")
