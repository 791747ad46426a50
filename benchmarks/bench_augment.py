"""Throughput of FixMatch's augmentation: batched (fixmatch.augment) against per-image Pillow.

Both sides compute what one training step needs for its unlabeled batch: the weak view and the strong
view (its own weak view, then RandAugment as in the paper, then Cutout) of mu * B = 448 images,
starting from uint8 images in memory and ending with float32 (N, C, H, W) arrays in [0, 1]. The
per-image side is benchmarks/pil_reference.py. The two are timed alternately in one process, so
both see the same machine load, and the medians of the repeats are compared.

    python benchmarks/bench_augment.py                      # one core each: 1 torch thread, 1 process
    python benchmarks/bench_augment.py --threads 2          # 2 torch threads against 2 Pillow processes
    python benchmarks/bench_augment.py --step-model wrn28_2 --step-iters 3   # and the share of a step

``--step-model`` also times a whole FixMatch step with benchmarks/bench_step.py (B=64, mu=7) and
reports its data+augmentation part as a share of the step.
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

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
          device: torch.device) -> dict[str, float]:
    u = _images(n, shape)
    u_dev = u.to(device)
    u_hwc = u.permute(0, 2, 3, 1).contiguous().numpy()
    strong = RandAugment()
    gen = torch.Generator(device=device).manual_seed(0)
    chunks = np.array_split(u_hwc, workers)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    batched_s, pil_s = [], []
    try:
        for r in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            batched_views(u_dev, strong, gen)
            _sync(device)
            t1 = time.perf_counter()
            if pool is None:
                pil_reference.weak_and_strong(u_hwc, random.Random(r))
            else:
                pool.map(_pil_chunk, [(chunk, 1000 * r + i) for i, chunk in enumerate(chunks)])
            t2 = time.perf_counter()
            if r >= warmup:
                batched_s.append(t1 - t0)
                pil_s.append(t2 - t1)
    finally:
        if pool is not None:
            pool.close()
    b, p = statistics.median(batched_s), statistics.median(pil_s)
    return {"batched_ms": 1000 * b, "pil_ms": 1000 * p, "batched_img_s": n / b, "pil_img_s": n / p,
            "ratio": p / b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=448, help="images per batch (mu * B)")
    p.add_argument("--shape", default="3,32,32", help="C,H,W of the images")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the batched side and Pillow processes for the per-image side")
    p.add_argument("--device", default="cpu", help="device of the batched side (cpu, cuda)")
    p.add_argument("--step-model", default=None, help="also time a FixMatch step of this model (bench_step.py)")
    p.add_argument("--step-batch-size", type=int, default=64)
    p.add_argument("--step-mu", type=int, default=7)
    p.add_argument("--step-iters", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    device = torch.device(args.device)
    r = bench(args.n, shape, args.repeats, args.warmup, args.threads, device)  # type: ignore[arg-type]
    print(f"weak + strong views of {args.n} images {args.shape}, median of {args.repeats} repeats, "
          f"{args.threads} thread(s)/process(es), batched on {device}")
    print("| path | ms per batch | images/s |")
    print("|---|---|---|")
    print(f"| batched (fixmatch.augment) | {r['batched_ms']:.1f} | {r['batched_img_s']:.0f} |")
    print(f"| per-image Pillow (pil_reference.py) | {r['pil_ms']:.1f} | {r['pil_img_s']:.0f} |")
    print(f"batched / Pillow throughput: {r['ratio']:.1f}x")
    if args.step_model:
        s = bench_step.bench(args.step_model, shape, args.step_batch_size, args.step_mu, args.step_iters, 1,
                             device, True)  # type: ignore[arg-type]
        print(f"{args.step_model} step (B={args.step_batch_size}, mu={args.step_mu}): {s['step']:.1f} ms, "
              f"data+augmentation {s['data+augment']:.1f} ms = {100 * s['data+augment'] / s['step']:.2f}% "
              f"of the step")


if __name__ == "__main__":
    main()
