"""Loading time and peak memory of a folder data set (``--dataset folder:PATH``): first and cached load.

Generates (once) a folder of 96x96 JPEG images: 10 classes of labeled images, a test folder and an
unlabeled folder spread over nested subfolders, then loads it in fresh processes:

1. first load: every file is read, hashed, decoded and resized into the cache (.npy);
2. cached load: every file is read and hashed, the cache is memory-mapped, nothing is decoded;
3. cached load + one pass over all images (touches every page of the mapping, as an epoch would).

Each load runs in its own process, so its peak resident memory (ru_maxrss) is its own. The page
cache is not dropped between runs (that needs root): the files are read from memory after the first.

    python benchmarks/bench_folder.py --root /tmp/folder-bench --images 100000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 10


def generate(root: Path, n: int, side: int = 96, seed: int = 0) -> None:
    """n images: 5% labeled, 1% test, the rest unlabeled (1,000 per subfolder); smooth, JPEG-compressed."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    n_lab, n_test = n // 20, n // 100
    yy, xx = np.mgrid[0:side, 0:side] / side
    t0 = time.perf_counter()
    for i in range(n):
        c = i % CLASSES
        # a coloured gradient with a class-dependent frequency, plus noise: compresses like a photo
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = 127 + 80 * np.sin(2 * np.pi * (c + 1) * (xx[..., None] + yy[..., None] * 0.5) + phase)
        img = np.clip(base + rng.normal(0, 10, (side, side, 3)), 0, 255).astype(np.uint8)
        if i < n_lab:
            path = root / "labeled" / f"class{c}" / f"{i:06d}.jpg"
        elif i < n_lab + n_test:
            path = root / "test" / f"class{c}" / f"{i:06d}.jpg"
        else:
            path = root / "unlabeled" / f"part{i // 1000:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        if (i + 1) % 10000 == 0:
            print(f"  generated {i + 1} images in {time.perf_counter() - t0:.0f} s", flush=True)
    done.write_text(str(n))


def load_once(root: str, data_dir: str, touch: bool) -> dict:
    """Runs in a child process: load, optionally read every image once, report time and peak RSS."""
    from fixmatch.data import load_dataset

    t0 = time.perf_counter()
    data = load_dataset(f"folder:{root}", data_dir)
    load_s = time.perf_counter() - t0
    checksum = 0
    if touch:
        for x in (data.train_images, data.test_images, data.unlabeled_images):
            for start in range(0, x.shape[0], 4096):
                checksum += int(x[start:start + 4096].numpy().sum(dtype=np.uint64))  # reads every page
    total_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"load_s": load_s, "total_s": total_s, "peak_rss_mb": peak_mb,
            "train": len(data.train_labels), "test": len(data.test_labels),
            "unlabeled": int(data.unlabeled_images.shape[0]), "shape": list(data.train_images.shape[1:])}


def run_child(root: Path, data_dir: Path, touch: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(root), str(data_dir), str(int(touch))],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(load_once(sys.argv[2], sys.argv[3], sys.argv[4] == "1")))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/folder-bench"), help="where the images are generated")
    p.add_argument("--images", type=int, default=100_000)
    args = p.parse_args()
    images = args.root / f"images-{args.images}"
    data_dir = args.root / f"data-{args.images}"
    t0 = time.perf_counter()
    generate(images, args.images)
    jpeg_mb = sum(f.stat().st_size for f in images.rglob("*.jpg")) / 2**20
    print(f"images ready in {time.perf_counter() - t0:.0f} s ({jpeg_mb:.0f} MiB of JPEG)")
    shutil.rmtree(data_dir, ignore_errors=True)
    rows = [("first load (decode + write cache)", run_child(images, data_dir, False)),
            ("cached load", run_child(images, data_dir, False)),
            ("cached load + read every image", run_child(images, data_dir, True))]
    cache = sum(f.stat().st_size for f in (data_dir / "folder-cache").rglob("*.npy"))
    print(f"{rows[0][1]['train']} labeled, {rows[0][1]['test']} test, {rows[0][1]['unlabeled']} unlabeled images "
          f"of {rows[0][1]['shape']}; cache {cache / 2**30:.2f} GiB; {os.cpu_count()} CPUs")
    print("| load | wall s | peak RSS MiB |")
    print("|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['total_s']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
