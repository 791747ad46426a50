"""Forward+backward throughput of every registered model, contiguous vs channels_last.

    python benchmarks/bench_models.py                      # all models, batch 960, 2 threads
    python benchmarks/bench_models.py --models cnn_small --iters 3 --warmup 1

cnn_small runs on 28x28x1 (Fashion-MNIST), the Wide ResNets on 32x32x3 (CIFAR). One
iteration is zero_grad + forward + cross-entropy + backward (no optimizer step), in
train mode so BatchNorm does its training-time work. Reports the median over ``--iters``
timed iterations after ``--warmup`` untimed ones (first calls pay allocator and kernel
selection costs). On a CPU the Wide ResNets at batch 960 take seconds to minutes per
iteration: lower --batch-size for them. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fixmatch.models import count_parameters, create_model, list_models

NUM_CLASSES = 10


def input_shape(name: str) -> tuple[int, int]:
    """(channels, size) the model is benchmarked at."""
    return (1, 28) if name.startswith("cnn") else (3, 32)


def time_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int, iters: int) -> float:
    """Median seconds of one forward+backward step."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + iters):
        sync()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--batch-size", type=int, default=960)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, fp32, median of {args.iters} after {args.warmup} warmup\n")
    print("| model | params | input | memory format | ms / step | images / s |")
    print("|---|---:|---|---|---:|---:|")
    for name in args.models:
        channels, size = input_shape(name)
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, channels, size, size, device=device)
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        for fmt_name, fmt in [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]:
            model = create_model(name, NUM_CLASSES, in_channels=channels).to(device, memory_format=fmt).train()
            seconds = time_step(model, x.contiguous(memory_format=fmt), y, args.warmup, args.iters)
            print(f"| {name} | {count_parameters(model):,} | {size}x{size}x{channels} | {fmt_name} "
                  f"| {seconds * 1e3:.1f} | {args.batch_size / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
