"""FixMatch (and FlexMatch, FreeMatch, SoftMatch) against the supervised baseline on Fashion-MNIST, on this CPU.

Runs the `fashion-mnist` preset (or --steps/--num-labels overrides) for each seed and method,
each in its own run directory under --out; runs that already have a summary.json are not redone,
so an interrupted benchmark continues where it stopped. Prints a Markdown table per run and the
mean +- std per (method, labels) group, all read back from the runs' summary.json files.

Both methods get the same wall-clock budget (--budget-s, default 600 s). FixMatch runs the preset's
steps, which fit the budget on an idle 2-core CPU. A supervised step is about ten times cheaper, so
the baseline's number of steps (and its cosine schedule's K) is set to fill the same budget: its
speed is measured first on a short calibration run, and K = budget * steps/s.

    python benchmarks/bench_fashion_mnist.py --out bench-runs --num-labels 40 --seeds 0 1 2
    python benchmarks/bench_fashion_mnist.py --out bench-runs --num-labels 250 --seeds 0 --methods fixmatch
    python benchmarks/bench_fashion_mnist.py --out bench-runs --seeds 0 --methods fixmatch --steps 1000 \
        --set eval_every=250 weak_no_grad=true --tag weak-no-grad
    python benchmarks/bench_fashion_mnist.py --out bench-algorithms --num-labels 40 10 --seeds 0 1 2 3 4 \
        --methods flexmatch freematch softmatch fixmatch supervised --supervised-steps 30770

--methods takes `supervised` and the four `--algorithm` values (each a FixMatch-loop run with that algorithm).
Runs go seed by seed, so an interrupted benchmark has compared every method on the seeds it finished.
--supervised-steps pins the baseline's K (a calibration measured on an idle machine) instead of calibrating
on a machine that is busy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import fixmatch
from fixmatch.config import ALGORITHMS, resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_options import add_set_option, set_overrides  # noqa: E402


def supervised_steps_for(budget_s: float, out: Path, num_labels: int, calibration_steps: int = 1000) -> int:
    """Steps of the supervised baseline that fill ``budget_s`` on this machine (measured, not guessed)."""
    run_dir = out / f"calibration-supervised-{num_labels}"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        config = resolve_config("fashion-mnist", overrides={
            "method": "supervised", "num_labels": num_labels, "steps": calibration_steps,
            "eval_every": calibration_steps, "progress": False})
        summary = fixmatch.train(config, out=run_dir)
    # The calibration's wall time includes one evaluation; the real run evaluates every eval_every steps too.
    return max(1, int(budget_s * summary["steps"] / summary["wall_s"]))


def method_overrides(method: str) -> dict:
    """Config keys of a --methods entry: `supervised`, or one of the pseudo-labelling algorithms."""
    if method == "supervised":
        return {"method": "supervised"}
    if method in ALGORITHMS:
        return {"method": "fixmatch", "algorithm": method}
    raise SystemExit(f"error: unknown method {method!r}; use supervised or one of {', '.join(ALGORITHMS)}")


def run_one(out: Path, method: str, num_labels: int, seed: int, extra: dict, tag: str = "") -> dict:
    run_dir = out / f"{method}-{num_labels}-seed{seed}{'-' + tag if tag else ''}"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    config = resolve_config("fashion-mnist", overrides={**method_overrides(method), "num_labels": num_labels,
                                                         "seed": seed, "progress": False, **extra})
    return fixmatch.train(config, out=run_dir, resume=resume)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-runs"))
    p.add_argument("--num-labels", type=int, nargs="+", default=[40])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["fixmatch", "supervised"],
                   help="supervised and/or the algorithms fixmatch, flexmatch, freematch, softmatch")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps for FixMatch")
    add_set_option(p, "eval_every=250 weak_no_grad=true")
    p.add_argument("--tag", default="", help="suffix of the run directories' names (for runs with --set)")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="wall-clock budget that sets the supervised baseline's steps (0: same steps as FixMatch)")
    p.add_argument("--supervised-steps", type=int, default=None,
                   help="the supervised baseline's steps, instead of calibrating them to --budget-s here")
    args = p.parse_args()
    extra = {"steps": args.steps} if args.steps else {}
    extra.update(set_overrides(p, args.set))

    rows = []
    for method in args.methods:
        method_overrides(method)  # refuse an unknown name before anything runs
    for num_labels in args.num_labels:
        extras = {}
        for method in args.methods:
            extras[method] = dict(extra)
            if method == "supervised" and (args.supervised_steps or args.budget_s > 0):
                steps = args.supervised_steps or supervised_steps_for(args.budget_s, args.out, num_labels)
                # Evaluate about as often as the FixMatch run does (10 evaluations per run).
                extras[method].update(steps=steps, eval_every=max(1, steps // 10))
        for seed in args.seeds:
            for method in args.methods:
                rows.append(run_one(args.out, method, num_labels, seed, extras[method], args.tag))

    print("| method | labels | seed | steps | wall s | steps/s | images/s | last % | median last 20 % | best % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["method"] = r.get("algorithm", "fixmatch") if r["method"] == "fixmatch" else r["method"]
        print(f"| {r['method']} | {r['num_labels']} | {r['seed']} | {r['steps']} | {r['wall_s']:.0f} | "
              f"{r['steps_per_s']:.2f} | {r['images_per_s']:.0f} | {r['test_acc_last']:.2f} | "
              f"{r['test_acc_median_last20']:.2f} | {r['test_acc_best']:.2f} |")
    print()
    print("| method | labels | seeds | last % (mean +- std) | best % (mean +- std) |")
    print("|---|---|---|---|---|")
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["num_labels"]), []).append(r)
    for (method, num_labels), rs in groups.items():
        last = [r["test_acc_last"] for r in rs]
        best = [r["test_acc_best"] for r in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
        print(f"| {method} | {num_labels} | {len(rs)} | {statistics.mean(last):.2f} +- {sd(last):.2f} | "
              f"{statistics.mean(best):.2f} +- {sd(best):.2f} |")


if __name__ == "__main__":
    main()
