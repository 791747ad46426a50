"""Time one FixMatch step two ways in one run: the straightforward implementation and the fast path.

Each step is split into data+augmentation, forward, backward and optimiser+EMA (median over --iters steps
after --warmup), on random uint8 images of the given shape:

- straightforward: what public FixMatch code does: each image augmented on its own with Pillow
  (benchmarks/pil_reference.py: flip + reflect-padded crop; RandAugment + Cutout), converted to float one
  by one; NCHW, fp32, one forward over [labeled, weak, strong]; torch.optim.SGD with foreach=False and an
  EMA updated parameter by parameter in a Python loop.
- fast: what ``fixmatch train`` runs with its speed options: uint8 batches gathered (pinned and copied
  asynchronously on CUDA) and augmented as whole batches on the device (weak_augment, RandAugment),
  channels-last, --amp, --weak-no-grad (the weak view in a separate no-grad forward), foreach SGD and the
  foreach EMA lerp; --compile optionally.

It also reports images/s and the achieved FLOP/s of each variant: forward FLOPs (FlopCounterMode: 2 x
multiply-adds) of every image forwarded, plus 2x forward FLOPs for the backward of the images that have
a graph, divided by the step time, against the machine's matrix-multiply peak measured in the same run
(a large fp32 matmul, or bf16 with --amp bf16).

    python benchmarks/bench_step.py --model wrn28_2 --shape 3,32,32 --batch-size 64 --mu 7 --iters 3 --warmup 1
    python benchmarks/bench_step.py --model cnn_small --shape 1,28,28 --batch-size 32 --mu 7
    python benchmarks/bench_step.py --device cuda --amp bf16 --compile --iters 50 --warmup 20   # on a GPU
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fixmatch.augment import RandAugment, weak_augment
from fixmatch.core.ema import EMA
from fixmatch.core.optim import make_optimizer, parameter_groups
from fixmatch.data.batches import IndexStream
from fixmatch.data.pool import gather_pool
from fixmatch.models import create_model
from fixmatch.models.summary import count_flops
from fixmatch.training.speed import compile_module, make_grad_scaler
from fixmatch.training.step import forward_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pil_reference  # noqa: E402  (the per-image Pillow pipeline next to this script)

PARTS = ("data+augment", "forward", "backward", "optimizer+ema")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` n x n matrix products (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _pil_weak(images: np.ndarray, rng: random.Random) -> np.ndarray:
    """Weak views of uint8 (N, H, W, C) images, one Pillow image at a time (the labeled batch)."""
    views = [pil_reference.weak(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), rng) for a in images]
    return np.stack([pil_reference.to_array(v) for v in views])


def _loop_ema_update(ema: EMA, model: torch.nn.Module) -> None:
    """The straightforward EMA: one multiply-add per parameter tensor, buffers copied."""
    with torch.no_grad():
        for e, p in zip(ema.module.parameters(), model.parameters()):
            e.mul_(ema.decay).add_(p.detach(), alpha=1 - ema.decay)
        for e, b in zip(ema.module.buffers(), model.buffers()):
            e.copy_(b)


def bench(variant: str, model_name: str, shape: tuple[int, int, int], batch_size: int, mu: int, iters: int,
          warmup: int, device: torch.device, amp: str, weak_no_grad: bool, compile: bool) -> dict[str, float]:
    fast = variant == "fast"
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4096, *shape), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4096,))
    pin = fast and device.type == "cuda"  # gathered straight into page-locked memory, as fixmatch train does
    images_nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # what a PIL data set holds
    stream_lb = IndexStream(range(4096), batch_size, 0, 0)
    stream_ulb = IndexStream(range(4096), batch_size * mu, 0, 1)
    model = create_model(model_name, 10, shape[0]).to(device)
    channels_last = fast
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if fast:
        optimizer = make_optimizer(model, 0.03, 0.9, True, 5e-4)  # foreach
    else:
        optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=0.03, momentum=0.9, nesterov=True,
                                    foreach=False)
    ema = EMA(model, 0.999)
    train_model = compile_module(model, device) if fast and compile else model
    scaler = make_grad_scaler(amp, device) if fast else None
    strong = RandAugment()
    gen = torch.Generator(device=device)
    rng = random.Random(0)
    mean = torch.full((1, shape[0], 1, 1), 0.5, device=device)
    std = torch.full((1, shape[0], 1, 1), 0.25, device=device)
    times: dict[str, list[float]] = {k: [] for k in PARTS}
    n_lb, n_ulb = batch_size, batch_size * mu
    for it in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        idx_lb, idx_ulb = stream_lb.batch(it), stream_ulb.batch(it)
        if fast:
            x_lb = weak_augment(gather_pool(images, None, idx_lb, pin=pin).to(device, non_blocking=True), gen)
            u = gather_pool(images, None, idx_ulb, pin=pin).to(device, non_blocking=True)
            x_w, x_s = weak_augment(u, gen), strong(weak_augment(u, gen), gen)
        else:
            x_lb = torch.from_numpy(_pil_weak(images_nhwc[idx_lb.numpy()], rng)).to(device)
            w, s = pil_reference.weak_and_strong(images_nhwc[idx_ulb.numpy()], rng)
            x_w, x_s = torch.from_numpy(w).to(device), torch.from_numpy(s).to(device)
        y = labels[idx_lb].to(device, non_blocking=True)
        _sync(device)
        t1 = time.perf_counter()
        loss, _ = forward_loss(train_model, x_lb, y, x_w, x_s, mean, std, tau=0.95, lambda_u=1.0, T=1.0,
                               lu_norm="all", channels_last=channels_last, weak_no_grad=fast and weak_no_grad,
                               amp=amp if fast else "none", bn_model=model)
        _sync(device)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        _sync(device)
        t3 = time.perf_counter()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if fast:
            ema.update(model)
        else:
            _loop_ema_update(ema, model)
        _sync(device)
        t4 = time.perf_counter()
        if it >= warmup:
            for key, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(dt)
    result = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result["step"] = sum(result[k] for k in PARTS)
    n_images = n_lb + 2 * n_ulb
    result["images_per_s"] = n_images / (result["step"] / 1000)
    flops_per_image = count_flops(create_model(model_name, 10, shape[0]), shape)
    with_graph = n_lb + n_ulb if (fast and weak_no_grad) else n_images  # images whose backward runs
    result["flops"] = flops_per_image * (n_images + 2 * with_graph) / (result["step"] / 1000)
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wrn28_2")
    p.add_argument("--shape", default="3,32,32", help="C,H,W of the images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="fast path's precision")
    p.add_argument("--no-weak-no-grad", dest="weak_no_grad", action="store_false",
                   help="fast path: one joint forward, as the straightforward variant")
    p.add_argument("--compile", action="store_true", help="fast path: torch.compile the model")
    p.add_argument("--variants", nargs="+", default=["straightforward", "fast"],
                   choices=("straightforward", "fast"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    peak_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16 if args.amp == "fp16" else torch.float32
    peak = matmul_peak(device, peak_dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.model} {args.shape} B={args.batch_size} mu={args.mu}, median of {args.iters} steps; "
          f"matmul peak ({str(peak_dtype).removeprefix('torch.')}) {peak / 1e9:.1f} GFLOP/s")
    print("| variant | data+augment ms | forward ms | backward ms | optimizer+EMA ms | step ms | images/s | "
          "GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for variant in args.variants:
        r = bench(variant, args.model, shape, args.batch_size, args.mu, args.iters, args.warmup, device,
                  args.amp, args.weak_no_grad, args.compile)
        results[variant] = r
        print(f"| {variant} | {r['data+augment']:.1f} | {r['forward']:.1f} | {r['backward']:.1f} | "
              f"{r['optimizer+ema']:.1f} | {r['step']:.1f} | {r['images_per_s']:.0f} | {r['flops'] / 1e9:.1f} | "
              f"{100 * r['flops'] / peak:.0f} |", flush=True)
    if len(results) == 2:
        print(f"fast path: {results['straightforward']['step'] / results['fast']['step']:.2f}x the straightforward "
              f"step (amp {args.amp}, weak_no_grad {args.weak_no_grad}, compile {args.compile})")


if __name__ == "__main__":
    main()
