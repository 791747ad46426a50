"""Forward+backward throughput of every registered model, contiguous vs channels_last.

    python benchmarks/bench_models.py                      # all models, batch 960, 2 threads
    python benchmarks/bench_models.py --models cnn_small --iters 3 --warmup 1
    python benchmarks/bench_models.py --models resnet50 --micro-batch 120 --iters 3 --max-seconds 300

Every model runs on 32x32x3 (CIFAR), built for that size (CIFAR stems; ViTs with 4x4 patches);
``--shape 1,28,28`` measures the Fashion-MNIST input instead. vit_b16 is left out of the default list: at 32x32 its
16x16 patches leave 4 tokens, which measures nothing useful; vit_tiny_p4 / vit_small_p4 are the
32x32 ViTs. One iteration is zero_grad + forward + cross-entropy + backward (no optimizer step) over
the whole batch, in train mode so BatchNorm does its training-time work; with ``--micro-batch M``
the batch goes through in chunks of M whose gradients accumulate (the same arithmetic, less
memory: the big models' activations for 960 images do not fit in 24 GiB). Reports the median over
the timed iterations after ``--warmup`` untimed ones (first calls pay allocator and kernel
selection costs); a model stops after ``--iters`` iterations or once its timed iterations exceed
``--max-seconds``, whichever comes first (the table says how many ran). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fixmatch.models import count_parameters, create_model, list_models

NUM_CLASSES = 10


DEFAULT_SKIP = {"vit_b16"}  # 224x224 model: 4 tokens at 32x32 (see the docstring)


def time_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int, iters: int,
              micro_batch: int = 0, max_seconds: float = float("inf")) -> tuple[float, int]:
    """(median seconds of one forward+backward step over the whole batch, timed iterations)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    chunk = micro_batch or x.shape[0]
    times: list[float] = []
    for i in range(warmup + iters):
        sync()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        for j in range(0, x.shape[0], chunk):
            # Mean over the whole batch: each chunk's loss is weighted by its share of the images.
            loss = nn.functional.cross_entropy(model(x[j:j + chunk]), y[j:j + chunk], reduction="sum")
            (loss / x.shape[0]).backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if sum(times) > max_seconds:
                break
    return statistics.median(times), len(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[m for m in list_models() if m not in DEFAULT_SKIP],
                        choices=list_models())
    parser.add_argument("--batch-size", type=int, default=960)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=0, help="images per chunk (0: the whole batch at once)")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop a model's timed iterations once they add up to this many seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="3,32,32", help="channels,height,width of the input (square)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size} (chunks of {args.micro_batch or args.batch_size}), fp32, "
          f"median of up to {args.iters} after {args.warmup} warmup\n")
    print("| model | params | input | memory format | iterations | ms / step | images / s |")
    print("|---|---:|---|---|---:|---:|---:|")
    try:
        channels, size, width = (int(v) for v in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape {args.shape}: give channels,height,width as three integers, e.g. 3,32,32")
    if size != width:
        parser.error(f"--shape {args.shape}: the models are built for square inputs; give equal height and width")
    for name in args.models:
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, channels, size, size, device=device)
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        for fmt_name, fmt in [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]:
            model = create_model(name, NUM_CLASSES, in_channels=channels, image_size=size)
            model = model.to(device, memory_format=fmt).train()
            seconds, n = time_step(model, x.contiguous(memory_format=fmt), y, args.warmup, args.iters,
                                   args.micro_batch, args.max_seconds)
            print(f"| {name} | {count_parameters(model):,} | {size}x{size}x{channels} | {fmt_name} | {n} "
                  f"| {seconds * 1e3:.1f} | {args.batch_size / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
