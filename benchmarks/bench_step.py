"""Time one FixMatch step, split into data+augmentation, forward, backward and optimiser+EMA.

The step is assembled from the same library functions train() uses (index streams, weak_augment,
RandAugment, the model registry, fixmatch_loss, make_optimizer, EMA), on random uint8 images of
the given shape, so it measures the hardware cost of the algorithm and nothing else.

    python benchmarks/bench_step.py --model cnn_small --shape 1,28,28 --batch-size 32 --mu 7
    python benchmarks/bench_step.py --model wrn28_2 --shape 3,32,32 --batch-size 64 --mu 7 --iters 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fixmatch.augment import RandAugment, weak_augment
from fixmatch.data.batches import IndexStream
from fixmatch.ema import EMA
from fixmatch.evaluate import normalize
from fixmatch.fixmatch import fixmatch_loss
from fixmatch.models import create_model
from fixmatch.optim import make_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model_name: str, shape: tuple[int, int, int], batch_size: int, mu: int, iters: int, warmup: int,
          device: torch.device, channels_last: bool) -> dict[str, float]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4096, *shape), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4096,))
    stream_lb = IndexStream(range(4096), batch_size, 0, 0)
    stream_ulb = IndexStream(range(4096), batch_size * mu, 0, 1)
    model = create_model(model_name, 10, shape[0]).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 0.03, 0.9, True, 5e-4)
    ema = EMA(model, 0.999)
    strong = RandAugment()
    gen = torch.Generator(device=device)
    mean = torch.full((1, shape[0], 1, 1), 0.5, device=device)
    std = torch.full((1, shape[0], 1, 1), 0.25, device=device)
    times: dict[str, list[float]] = {"data+augment": [], "forward": [], "backward": [], "optimizer+ema": []}
    n_lb, n_ulb = batch_size, batch_size * mu
    for it in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        idx_lb, idx_ulb = stream_lb.batch(it), stream_ulb.batch(it)
        x_lb = weak_augment(images[idx_lb].to(device), gen)
        u = images[idx_ulb].to(device)
        x = normalize(torch.cat([x_lb, weak_augment(u, gen), strong(weak_augment(u, gen), gen)]), mean, std, channels_last)
        y = labels[idx_lb].to(device)
        _sync(device)
        t1 = time.perf_counter()
        logits = model(x)
        loss, _ = fixmatch_loss(logits[:n_lb], y, logits[n_lb:n_lb + n_ulb], logits[n_lb + n_ulb:])
        _sync(device)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        optimizer.step()
        ema.update(model)
        _sync(device)
        t4 = time.perf_counter()
        if it >= warmup:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(dt)
    result = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result["step"] = sum(result.values())
    result["images_per_s"] = (n_lb + 2 * n_ulb) / (result["step"] / 1000)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--shape", default="1,28,28", help="C,H,W of the images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--no-channels-last", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    r = bench(args.model, shape, args.batch_size, args.mu, args.iters, args.warmup, torch.device(args.device),
              not args.no_channels_last)
    print(f"| {args.model} | {args.shape} | B={args.batch_size}, mu={args.mu} | {r['data+augment']:.1f} | "
          f"{r['forward']:.1f} | {r['backward']:.1f} | {r['optimizer+ema']:.1f} | {r['step']:.1f} | "
          f"{r['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
