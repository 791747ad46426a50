"""Throughput of FixMatch's augmentation: batched (fixmatch.augment) against per-image Pillow.

Both sides compute what one training step needs for its unlabeled batch: the weak view and the strong
view (its own weak view, then RandAugment as in the paper, then Cutout) of mu * B = 448 images,
starting from uint8 images in memory and ending with float32 (N, C, H, W) arrays in [0, 1]. The
per-image side is benchmarks/pil_reference.py. The two are timed alternately in one process, so
both see the same machine load, and the medians of the repeats are compared.

    python benchmarks/bench_augment.py                      # one core each: 1 torch thread, 1 process
    python benchmarks/bench_augment.py --clock cpu          # CPU time of the process: for a shared machine
    python benchmarks/bench_augment.py --threads 2          # 2 torch threads against 2 Pillow processes
    python benchmarks/bench_augment.py --step-model wrn28_2 --step-iters 3   # and the share of a step

``--step-model`` also times a whole FixMatch step with benchmarks/bench_step.py (B=64, mu=7) and
reports its data+augmentation part as a share of the step.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
import pil_reference  # noqa: E402

from fixmatch.augment import RandAugment, weak_augment  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batched_views(u: torch.Tensor, strong: RandAugment, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabeled half of train()'s augmentation: weak(u) and strong(weak(u))."""
    return weak_augment(u, gen), strong(weak_augment(u, gen), gen)


def load_augment_at(ref: str) -> ModuleType:
    """Imports src/fixmatch/augment as it was at git revision ``ref`` (to time an older version in the same run)."""
    root = Path(tempfile.mkdtemp(prefix="augment-"))
    files = subprocess.run(["git", "ls-tree", "--name-only", ref, "src/fixmatch/augment/"], capture_output=True,
                           text=True, check=True).stdout.split()
    (root / "augment_at_ref").mkdir()
    for f in files:
        if f.endswith(".py"):
            text = subprocess.run(["git", "show", f"{ref}:{f}"], capture_output=True, text=True, check=True).stdout
            (root / "augment_at_ref" / Path(f).name).write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("augment_at_ref")


def _pil_chunk(args: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    images, seed = args
    return pil_reference.weak_and_strong(images, random.Random(seed))


def _images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (so AutoContrast, Equalize and the geometric ops do real work)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    x = torch.rand(n, c, h // 4 + 1, w // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def bench(n: int, shape: tuple[int, int, int], repeats: int, warmup: int, workers: int,
          device: torch.device, clock: Callable[[], float] = time.perf_counter,
          baseline: ModuleType | None = None) -> dict[str, float]:
    u = _images(n, shape)
    u_dev = u.to(device)
    u_hwc = u.permute(0, 2, 3, 1).contiguous().numpy()
    strong = RandAugment()
    gen = torch.Generator(device=device).manual_seed(0)
    chunks = np.array_split(u_hwc, workers)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    batched_s, pil_s, base_s = [], [], []
    base_strong = baseline.RandAugment() if baseline is not None else None
    try:
        for r in range(warmup + repeats):
            _sync(device)
            t0 = clock()
            batched_views(u_dev, strong, gen)
            _sync(device)
            t1 = clock()
            if pool is None:
                pil_reference.weak_and_strong(u_hwc, random.Random(r))
            else:
                pool.map(_pil_chunk, [(chunk, 1000 * r + i) for i, chunk in enumerate(chunks)])
            t2 = clock()
            if baseline is not None:
                baseline.weak_augment(u_dev, gen), base_strong(baseline.weak_augment(u_dev, gen), gen)
                _sync(device)
            t3 = clock()
            if r >= warmup:
                batched_s.append(t1 - t0)
                pil_s.append(t2 - t1)
                base_s.append(t3 - t2)
    finally:
        if pool is not None:
            pool.close()
    b, p = statistics.median(batched_s), statistics.median(pil_s)
    result = {"batched_ms": 1000 * b, "pil_ms": 1000 * p, "batched_img_s": n / b, "pil_img_s": n / p,
              "ratio": p / b}
    if baseline is not None:
        result["baseline_ms"] = 1000 * statistics.median(base_s)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=448, help="images per batch (mu * B)")
    p.add_argument("--shape", default="3,32,32", help="C,H,W of the images")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the batched side and Pillow processes for the per-image side")
    p.add_argument("--device", default="cpu", help="device of the batched side (cpu, cuda)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (1 thread, CPU only: not slowed by other processes "
                        "sharing the cores)")
    p.add_argument("--baseline-ref", default=None,
                   help="also time the batched augmentation of this git revision (e.g. an older commit)")
    p.add_argument("--step-model", default=None, help="also time a FixMatch step of this model (bench_step.py)")
    p.add_argument("--step-batch-size", type=int, default=64)
    p.add_argument("--step-mu", type=int, default=7)
    p.add_argument("--step-iters", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    device = torch.device(args.device)
    if args.clock == "cpu" and (args.threads != 1 or device.type != "cpu"):
        p.error("--clock cpu measures one process on the CPU: use it with --threads 1 and --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    baseline = load_augment_at(args.baseline_ref) if args.baseline_ref else None
    r = bench(args.n, shape, args.repeats, args.warmup, args.threads, device, clock, baseline)  # type: ignore[arg-type]
    print(f"weak + strong views of {args.n} images {args.shape}, median of {args.repeats} repeats, "
          f"{args.threads} thread(s)/process(es), batched on {device}, {args.clock} time")
    print("| path | ms per batch | images/s |")
    print("|---|---|---|")
    print(f"| batched (fixmatch.augment) | {r['batched_ms']:.1f} | {r['batched_img_s']:.0f} |")
    print(f"| per-image Pillow (pil_reference.py) | {r['pil_ms']:.1f} | {r['pil_img_s']:.0f} |")
    if baseline is not None:
        print(f"| batched at {args.baseline_ref} | {r['baseline_ms']:.1f} | {args.n / r['baseline_ms'] * 1000:.0f} |")
    print(f"batched / Pillow throughput: {r['ratio']:.1f}x")
    if baseline is not None:
        print(f"batched now / batched at {args.baseline_ref}: {r['baseline_ms'] / r['batched_ms']:.1f}x")
    if args.step_model:
        # The training step's default path: fp32, no compilation, weak and strong views in one forward pass.
        s = bench_step.bench("fast", args.step_model, shape, args.step_batch_size, args.step_mu, args.step_iters, 1,
                             device, "none", False, False)  # type: ignore[arg-type]
        print(f"{args.step_model} step (B={args.step_batch_size}, mu={args.step_mu}): {s['step']:.1f} ms, "
              f"data+augmentation {s['data+augment']:.1f} ms = {100 * s['data+augment'] / s['step']:.2f}% "
              f"of the step")


if __name__ == "__main__":
    main()
