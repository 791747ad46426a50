"""Random labels against the labels `fixmatch advise` proposes (TypiClust), on Fashion-MNIST, on this CPU.

1. `fixmatch pretrain` (SimCLR) on the training images, --pretrain-steps steps (skipped with --features pixels:
   the advisor then embeds the pixels with a fixed random projection). Timed.
2. `fixmatch advise` for every budget and advisor seed: the proposed images, their class coverage (the annotator
   is simulated from the true labels). Timed, so that pretrain + advise is the time a user waits.
3. Training with the `fashion-mnist` preset for every algorithm and budget: random labels (the paper's
   stratified draw, split seeds --random-seeds) and advised labels (`--label-selection typiclust` with the
   pretrain run's features, k-means seeded by the advisor seed, true labels). Runs that have a summary.json are
   not redone and interrupted ones resume, so an interrupted benchmark continues where it stopped. The random runs
   are named as benchmarks/bench_fashion_mnist.py names its runs: give both the same --out to share them.

Prints the advice table (coverage, time) and the accuracy table (mean, std, worst over seeds).

    python benchmarks/bench_advise.py --out bench-advise --budgets 10 40 --advisor-seeds 0 1 2 \\
        --random-seeds 0 1 2 3 4 --algorithms fixmatch
    python benchmarks/bench_advise.py --out bench-advise --budgets 40 --no-training   # pretrain + advise only
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from fixmatch.config import PretrainConfig
from fixmatch.data.datasets import load_dataset
from fixmatch.inference.advise import advise
from fixmatch.training.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fashion_mnist import run_one  # noqa: E402  (the same runs, the same names)


def pretrain_run(out: Path, steps: int, data_dir: str | None) -> tuple[Path, float]:
    """The pretrain run directory and its wall time (read back from its summary when it exists)."""
    run_dir = out / f"pretrain-{steps}"
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        config = PretrainConfig(dataset="fashion-mnist", steps=steps, progress=False, device="cpu",
                                **({"data_dir": data_dir} if data_dir else {}))
        pretrain(config, out=run_dir)
    return run_dir, json.loads(summary_path.read_text())["wall_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-advise"))
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 40])
    p.add_argument("--advisor-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--algorithms", nargs="+", default=["fixmatch"])
    p.add_argument("--features", choices=["pretrain", "pixels"], default="pretrain")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-training", action="store_true", help="pretrain and advise only")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    features, pretrain_s = (None, 0.0) if args.features == "pixels" else pretrain_run(
        args.out, args.pretrain_steps, args.data_dir)
    labels = load_dataset("fashion-mnist", args.data_dir or "data").train_labels.numpy()
    advice_rows = []
    for budget in args.budgets:
        for seed in args.advisor_seeds:
            advice_dir = args.out / f"advice-{args.features}-{budget}-seed{seed}"
            shutil.rmtree(advice_dir, ignore_errors=True)
            t0 = time.perf_counter()
            advice = advise("fashion-mnist", budget, advice_dir, features=features, seed=seed,
                            data_dir=args.data_dir, device="cpu")
            advise_s = time.perf_counter() - t0
            classes = np.bincount(labels[[pick.index for pick in advice.picks]], minlength=10)
            advice_rows.append((budget, seed, int((classes > 0).sum()), classes.tolist(), advise_s))

    print(f"features: {args.features}" + (f" (pretrain {args.pretrain_steps} steps, {pretrain_s:.0f} s)"
                                          if features else ""))
    print("\n| budget | advisor seed | classes covered | images per class | advise s | pretrain + advise s |")
    print("|---|---|---|---|---|---|")
    for budget, seed, covered, per_class, advise_s in advice_rows:
        print(f"| {budget} | {seed} | {covered}/10 | {' '.join(map(str, per_class))} | {advise_s:.0f} | "
              f"{pretrain_s + advise_s:.0f} |")
    if args.no_training:
        return

    groups: dict[tuple[str, int, str], list[float]] = {}
    advised_extra = {"label_selection": "typiclust", **({"selection_checkpoint": str(features)} if features else {})}
    for budget in args.budgets:
        for algorithm in args.algorithms:
            for seed in args.random_seeds:
                r = run_one(args.out, algorithm, budget, seed, {})
                groups.setdefault((algorithm, budget, "random"), []).append(r["test_acc_last"])
            for seed in args.advisor_seeds:
                r = run_one(args.out, algorithm, budget, seed, advised_extra, tag=f"typiclust-{args.features}")
                groups.setdefault((algorithm, budget, "advised"), []).append(r["test_acc_last"])
    print("\n| algorithm | labels | chosen | seeds | last % mean | std | worst |")
    print("|---|---|---|---|---|---|---|")
    for (algorithm, budget, chosen), accs in groups.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {algorithm} | {budget} | {chosen} | {len(accs)} | {statistics.mean(accs):.2f} | {sd:.2f} | "
              f"{min(accs):.2f} |")


if __name__ == "__main__":
    main()
