"""Command-line options shared by the benchmark scripts."""
from __future__ import annotations

import argparse

import yaml


def add_set_option(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE ...``: config overrides for every run of a benchmark (repeatable)."""
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"more config overrides for every run (YAML values), e.g. {example}")


def set_overrides(p: argparse.ArgumentParser, items: list[str]) -> dict:
    """The ``--set`` items as a config-override dict; a malformed item exits through ``p.error``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides
