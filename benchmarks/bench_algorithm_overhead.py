"""Per-step cost of FlexMatch, FreeMatch and SoftMatch against FixMatch, in one run of this script.

Each algorithm trains the `fashion-mnist` preset (or --preset) for --steps steps, in --rounds rounds whose order
rotates, so that a machine that slows down or speeds up during the run weighs on every algorithm alike. Every call
of the training loop's ``train_step`` is timed (the loop's own function, wrapped here; on CUDA with a
synchronisation before and after); the first --skip steps of each run (warm-up) are left out. The table gives
the median step time of each algorithm over all its timed steps and its ratio to FixMatch's.

What differs between the algorithms happens inside ``train_step`` (the pseudo-label policy and its state update,
FreeMatch's fairness loss, SoftMatch's alignment); loading and augmenting the batch is the same for all of them,
so this ratio is the upper bound of the overhead on a whole step.

    python benchmarks/bench_algorithm_overhead.py --out overhead-runs
    python benchmarks/bench_algorithm_overhead.py --out overhead-runs --preset cifar10 --steps 60 --device cuda \
        --set data_dir=data amp=bf16
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import fixmatch
import fixmatch.training.loop as loop
from fixmatch.config import ALGORITHMS, resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_options import add_set_option, set_overrides  # noqa: E402


def timed_train_step(times: list[float], device: torch.device):
    """The loop's train_step, recording the seconds of each call into ``times``."""
    inner = loop.train_step

    def wrapper(state, batch):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = inner(state, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return stats
    return inner, wrapper


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("overhead-runs"), help="scratch folder for the runs (emptied)")
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=120, help="steps per run")
    p.add_argument("--skip", type=int, default=20, help="first steps of each run left out (warm-up)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="cpu")
    add_set_option(p, "data_dir=data amp=bf16")
    args = p.parse_args()
    extra = set_overrides(p, args.set)
    device = torch.device(args.device)
    times: dict[str, list[float]] = {a: [] for a in ALGORITHMS}
    for r in range(args.rounds):
        order = ALGORITHMS[r % len(ALGORITHMS):] + ALGORITHMS[:r % len(ALGORITHMS)]
        for algorithm in order:
            run_dir = args.out / f"{algorithm}-round{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = resolve_config(args.preset, overrides={
                "algorithm": algorithm, "steps": args.steps, "eval_every": args.steps, "progress": False,
                "device": args.device, **extra})
            step_times: list[float] = []
            inner, loop.train_step = timed_train_step(step_times, device)
            try:
                fixmatch.train(config, out=run_dir)
            finally:
                loop.train_step = inner
            times[algorithm] += step_times[args.skip:]
            print(f"round {r} {algorithm}: median {1e3 * statistics.median(step_times[args.skip:]):.2f} ms/step",
                  flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    base = statistics.median(times["fixmatch"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    settings = "".join(f", {k}={v}" for k, v in extra.items() if k != "data_dir")  # where, not what
    print(f"\n{args.preset}{settings}, {args.rounds} rounds x {args.steps - args.skip} timed steps per algorithm, "
          f"{device} ({name}), {torch.get_num_threads()} torch threads\n")
    print("| algorithm | median step (ms) | ratio to FixMatch |")
    print("|---|---|---|")
    for algorithm in ALGORITHMS:
        median = statistics.median(times[algorithm])
        print(f"| {algorithm} | {1e3 * median:.2f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
