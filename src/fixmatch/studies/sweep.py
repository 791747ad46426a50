"""`fixmatch sweep STUDY.yaml --out STUDY_DIR`: run every configuration of a study grid, each in its own run
directory, skipping finished runs and resuming interrupted ones.

A study file is YAML::

    description: FixMatch against the supervised baseline by number of labels   # optional, shown in reports
    base:                       # a preset and/or config keys shared by every run
      preset: fashion-mnist
      steps: 500
    variants:                   # optional: named sets of keys that change together (crossed with the grid)
      sgd-cosine:   {optimizer: sgd, schedule: cosine, lr: 0.03}
      adam-plateau: {optimizer: adam, schedule: plateau, lr: 0.001}
    grid:                       # every combination of these values; the first key varies slowest
      seed: [0, 1, 2]
      num_labels: [10, 40, 250, 1000]
      method: [fixmatch, supervised]

Each run lives in STUDY_DIR/<name>, the name made of its variant and grid values
(``variant=adam-plateau,seed=0,num_labels=40``). Every configuration is resolved (and every existing run
directory compared with it) before anything starts, so a typo fails in one line, not hours later. Runs are
subprocesses (``python -m fixmatch train``), N at a time with cores/N torch threads each; a failed run writes
its error file (``RunDir.error_file``) and the others go on. The output of run NAME is in STUDY_DIR/logs/NAME.log.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fixmatch.config import (
    Config,
    ConfigError,
    check_combinations,
    read_yaml,
    resolve_config,
    short_repr,
    suggest,
    unknown_key_error,
)
from fixmatch.runs.rundir import RunDir, RunState

STUDY_KEYS = ("description", "base", "variants", "grid")
ERROR_TAIL_LINES = 40  # lines of a failed run's output kept in its error file (the whole log is in logs/)
MAX_RUNS = 10_000  # a grid of a few short lists multiplies fast: more runs than this is a mistake, not a study


@dataclass
class PlannedRun:
    name: str                    # directory name under STUDY_DIR
    values: dict[str, Any]       # the variant and grid values that make this run (for display)
    config: Config               # fully resolved


@dataclass
class Study:
    path: Path
    description: str
    runs: list[PlannedRun]


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)      # finished in this call
    skipped: list[str] = field(default_factory=list)   # already finished before
    failed: dict[str, str] = field(default_factory=dict)  # name -> one-line reason
    stopped: list[str] = field(default_factory=list)   # interrupted (checkpointed, resumable)
    interrupted: bool = False


def _name_part(value: Any) -> str:
    """A value as it appears in a directory name: printable, no separators of paths or of the name itself."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def run_name(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={_name_part(v)}" for k, v in values.items()) or "run"


def _mapping(data: Any, what: str, path: Path) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"study {path}: {short_repr(what)} must be a mapping of config keys, not "
                          f"{type(data).__name__}")
    return dict(data)


def _check_registries(config: Config, where: str) -> None:
    """Names the config check cannot see (they live in registries): the data set and the model."""
    from fixmatch.data.datasets import list_datasets
    from fixmatch.models import list_models

    if not config.dataset.startswith("folder:") and config.dataset.strip().lower() not in list_datasets():
        raise ConfigError(f"{where}: unknown dataset '{config.dataset}'; known datasets: {', '.join(list_datasets())}")
    if config.model not in list_models():
        raise ConfigError(f"{where}: unknown model '{config.model}'; known models: {', '.join(list_models())}")


def _resolve(settings: dict[str, Any], where: str) -> Config:
    settings = dict(settings)
    preset = settings.pop("preset", None)
    known = {f.name for f in fields(Config)}
    unknown = next((k for k in settings if k not in known), None)
    if unknown is not None:  # checked here so that a misspelt "preset" is suggested too
        raise ConfigError(f"{where}: {unknown_key_error(unknown, 'its settings', also=['preset'])}")
    try:
        config = resolve_config(preset, None, settings, overrides_source="its settings")
        check_combinations(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check_registries(config, where)
    return config


def load_study(path: str | Path) -> Study:
    """Read a study file and resolve every run's configuration (ConfigError naming the run otherwise)."""
    path = Path(path)
    # Within the limits of every YAML the project reads: no alias bombs, deep nesting or duplicate keys.
    data = read_yaml(path, "study file", "fixmatch sweep")
    if not isinstance(data, dict):
        raise ConfigError(f"study file {path} must be a mapping with keys {', '.join(STUDY_KEYS)}")
    unknown = sorted((k for k in data if k not in STUDY_KEYS), key=str)
    if unknown:
        raise ConfigError(f"study {path}: unknown top-level key {short_repr(unknown[0])}; "
                          f"{suggest(unknown[0], STUDY_KEYS, 'expected ' + ', '.join(STUDY_KEYS))}")
    base = _mapping(data.get("base"), "base", path)
    grid = _mapping(data.get("grid"), "grid", path)
    variants = _mapping(data.get("variants"), "variants", path)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"study {path}: grid key {short_repr(key)} needs a non-empty list of values, "
                              f"e.g. [a, b]")
    for vname, keys in variants.items():
        keys = _mapping(keys, f"variants.{vname}", path)
        clash = sorted(set(keys) & set(grid), key=str)
        if clash:
            raise ConfigError(f"study {path}: {short_repr(clash[0])} is set by variant {short_repr(vname)} and by "
                              f"the grid; keep it in one")
        variants[vname] = keys

    variant_items: list[tuple[str | None, dict[str, Any]]] = list(variants.items()) or [(None, {})]
    count = math.prod(len(v) for v in grid.values()) * len(variant_items)
    if count > MAX_RUNS:
        raise ConfigError(f"study {path}: its grid and variants make {short_repr(count)} runs, more than {MAX_RUNS}; "
                          f"split it into smaller studies")
    runs: list[PlannedRun] = []
    for combo in itertools.product(*grid.values()):
        for vname, vkeys in variant_items:
            point = dict(zip(grid, combo))
            values = ({"variant": vname} if vname is not None else {}) | point
            name = run_name(values)
            config = _resolve({**base, **vkeys, **point}, f"study {path}, run {name}")
            runs.append(PlannedRun(name, values, config))
    seen: set[str] = set()
    for dup in (r.name for r in runs):
        if dup in seen:
            raise ConfigError(f"study {path}: two runs would share the directory '{dup}'; make the grid values "
                              f"distinct")
        seen.add(dup)
    return Study(path, str(data.get("description") or ""), runs)


def run_state(run_dir: str | Path) -> RunState:
    """finished, resumable, or new (nothing to continue): see RunDir.state."""
    return RunDir(run_dir).state


def _check_existing(study: Study, out: Path) -> None:
    """A run directory from an earlier sweep must hold the configuration the study now asks for."""
    for run in study.runs:
        run_dir = RunDir(out / run.name)
        if run_dir.state is RunState.NEW or not run_dir.is_run:
            continue  # nothing kept from it: it starts afresh
        changes = run_dir.resume_changes(run.config)
        if changes:
            key, saved, value = changes[0]
            raise ConfigError(f"{run_dir} was run with {key}={short_repr(saved)} but the study now gives "
                              f"{short_repr(value)}; restore the study file or choose another --out")


def worker_env(workers: int, cores: int | None = None) -> dict[str, str]:
    """The environment of each training subprocess: the machine's cores shared equally between the workers."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // workers))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _command(run: PlannedRun, run_dir: Path, config_path: Path) -> list[str]:
    base = [sys.executable, "-m", "fixmatch", "train", "--out", str(run_dir), "--no-progress"]
    if run_state(run_dir) is RunState.RESUMABLE:
        return base + ["--resume"]
    return base + ["--config", str(config_path)]


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_sweep(study_path: str | Path, out: str | Path, workers: int = 1,
              echo: Callable[[str], None] = print) -> SweepResult:
    """Run (or continue) every run of the study in ``out``; returns what was done, skipped and failed."""
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, not {workers!r}")
    study = load_study(study_path)
    out = Path(out)
    _check_existing(study, out)  # everything is validated before the first run starts

    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    shutil.copyfile(study.path, out / "study.yaml")  # the report shows what the study asked for
    # The command as given (relative paths stay relative), so that a report can say how its runs were made.
    (out / "sweep.json").write_text(json.dumps({"command": f"fixmatch sweep {study_path} --out {out}"}) + "\n")
    result = SweepResult()
    todo: list[PlannedRun] = []
    for run in study.runs:
        if run_state(out / run.name) is RunState.FINISHED:
            result.skipped.append(run.name)
        else:
            todo.append(run)
    echo(f"sweep {study.path}: {len(study.runs)} runs, {len(result.skipped)} already finished, "
         f"{len(todo)} to run, {workers} at a time")

    env = worker_env(workers)
    lock = threading.Lock()
    running: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()

    def run_one(run: PlannedRun) -> None:
        if stopping.is_set():
            return
        run_dir = out / run.name
        state = run_state(run_dir)
        if state is RunState.NEW and run_dir.exists():
            shutil.rmtree(run_dir)  # an earlier attempt that left no checkpoint: nothing to continue
        error_file = RunDir(run_dir).error_file
        error_file.unlink(missing_ok=True)
        config_path = out / "configs" / f"{run.name}.yaml"
        config_path.write_text(yaml.safe_dump({**run.config.to_dict(), "progress": False}, sort_keys=False))
        log_path = out / "logs" / f"{run.name}.log"
        cmd = _command(run, run_dir, config_path)
        with lock:
            echo(f"{'resume' if state is RunState.RESUMABLE else 'start'} {run.name}")
        t0 = time.perf_counter()
        with log_path.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            with lock:
                running[run.name] = proc
            rc = proc.wait()
            with lock:
                running.pop(run.name, None)
        with lock:
            if rc == 0:
                result.done.append(run.name)
                echo(f"done  {run.name} ({time.perf_counter() - t0:.0f} s)")
                return
            if rc in (130, -signal.SIGINT):  # Ctrl-C: the run checkpointed and the next sweep resumes it
                result.stopped.append(run.name)
                echo(f"stopped {run.name} (resumable)")
                return
            reason = f"exit code {rc}"
            lines = _tail(log_path, ERROR_TAIL_LINES)
            last = next((ln for ln in reversed(lines.splitlines()) if ln.strip()), reason)
            result.failed[run.name] = last.strip()
            run_dir.mkdir(parents=True, exist_ok=True)
            error_file.write_text(f"command: {' '.join(cmd)}\n{reason}\n\n{lines}\n")
            echo(f"FAILED {run.name}: {last.strip()} (details: {error_file})")

    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(run_one, run) for run in todo]
    try:
        for f in futures:
            while not f.done():
                time.sleep(0.2)  # a plain wait here would not let Ctrl-C through
            f.result()
    except KeyboardInterrupt:
        # The training subprocesses checkpoint and stop on SIGINT (they got it too when it came from a terminal).
        result.interrupted = True
        stopping.set()
        with lock:
            for proc in running.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        echo("sweep interrupted; run the same command again to resume")
        return result
    pool.shutdown(wait=True)
    echo(f"sweep finished: {len(result.done)} done, {len(result.skipped)} skipped, {len(result.failed)} failed")
    return result
