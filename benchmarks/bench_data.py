"""Loading time and peak memory of the data sets: Fashion-MNIST, and full-size STL-10 with its memory-mapped cache.

    python benchmarks/bench_data.py fashion-mnist
    python benchmarks/bench_data.py stl10 --root /tmp/stl10-bench      # writes 5.6 GB there on first use

Every measurement runs in a fresh Python process so that its peak resident memory (ru_maxrss, which counts
the pages of memory-mapped files the process touched as well as its own memory) belongs to that
measurement alone. "First load" evicts the data files (and for STL-10 deletes the decoded cache) from the
operating system's page cache first (posix_fadvise DONTNEED, for those files only); "cached load" runs
right after, with the files in the page cache and, for STL-10, the cache file present.

STL-10's files are generated at full size in the official binary layout (random pixels: the loader's work
does not depend on the content): 5,000 train, 8,000 test and 100,000 unlabeled 3x96x96 images.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Code run in a child process; prints one JSON object.
_CHILD = r"""
import json, os, resource, sys, time
import torch
from fixmatch.data import load_dataset

def rss():  # current (RssAnon, RssFile) in MiB
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

what, name, root = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"what": what, "after_imports_mib": round(peak())}
t0 = time.perf_counter()
data = load_dataset(name, root, download=False)
out["load_s"] = round(time.perf_counter() - t0, 2)
out["after_load_peak_mib"] = round(peak())
if what == "gather":  # random batches of mu*B = 448 unlabeled images, as the training loop draws them
    from fixmatch.data.pool import gather_pool
    g = torch.Generator().manual_seed(0)
    n, m = data.train_images.shape[0], data.num_unlabeled_extra
    times = []
    for _ in range(50):
        idx = torch.randint(n, n + m, (448,), generator=g)
        t = time.perf_counter()
        gather_pool(data.train_images, data.unlabeled_images, idx)
        times.append(time.perf_counter() - t)
    out["gather_ms_cold"] = round(1000 * sorted(times)[25], 2)  # pages read from disk on first touch
    with open(os.path.join(root, "stl10_binary", "unlabeled_X.uint8.npy"), "rb") as f:
        while f.read(1 << 24):  # plain reads put the file in the page cache without mapping it
            pass
    times = []
    for _ in range(50):
        idx = torch.randint(n, n + m, (448,), generator=g)
        t = time.perf_counter()
        gather_pool(data.train_images, data.unlabeled_images, idx)
        times.append(time.perf_counter() - t)
    out["gather_ms_warm"] = round(1000 * sorted(times)[25], 2)  # the file in the page cache
    times = []
    for _ in range(50):  # the same with torch's own advanced indexing, for comparison
        idx = torch.randint(0, m, (448,), generator=g)
        t = time.perf_counter()
        data.unlabeled_images[idx]
        times.append(time.perf_counter() - t)
    out["torch_index_ms_warm"] = round(1000 * sorted(times)[25], 2)
if what == "fullpass":  # every unlabeled image once, in random batches of 448: all of the mapped file touched
    from fixmatch.data.pool import gather_pool
    n, m = data.train_images.shape[0], data.num_unlabeled_extra
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(0)) + n
    t = time.perf_counter()
    for i in range(0, m, 448):
        gather_pool(data.train_images, data.unlabeled_images, perm[i:i + 448])
    out["fullpass_s"] = round(time.perf_counter() - t, 2)
if what == "train":
    import fixmatch, tempfile
    cfg = fixmatch.Config(dataset=name, data_dir=root, model="cnn_small", num_labels=1000, batch_size=16, mu=7,
                          steps=20, eval_every=20, eval_batch_size=256, progress=False, device="cpu")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        fixmatch.train(cfg, out=os.path.join(d, "run"))
    out["train_s"] = round(time.perf_counter() - t, 2)
anon, file_ = rss()
out.update(peak_rss_mib=round(peak()), rss_anon_mib_at_end=round(anon), rss_file_mib_at_end=round(file_))
print(json.dumps(out))
"""


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (only theirs: nothing else on the machine is affected)."""
    for p in paths:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(what: str, name: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, what, name, str(root)], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def generate_stl10(folder: Path) -> None:
    """Full-size STL-10 files in the official layout, written chunk by chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image_bytes = 3 * 96 * 96
    for name, n in (("train", 5000), ("test", 8000), ("unlabeled", 100_000)):
        path = folder / f"{name}_X.bin"
        if path.is_file() and path.stat().st_size == n * image_bytes:
            continue
        with open(path, "wb") as f:
            for start in range(0, n, 5000):
                f.write(rng.integers(0, 256, (min(5000, n - start), image_bytes), dtype=np.uint8).tobytes())
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8).tobytes())
    folds = [rng.choice(5000, 1000, replace=False) for _ in range(10)]
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + "\n" for f in folds))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["fashion-mnist", "stl10"])
    parser.add_argument("--root", type=Path, default=Path("data"), help="data directory (stl10: generated there)")
    parser.add_argument("--phases", nargs="+", default=["load", "gather", "fullpass", "train"],
                        help="stl10: which measurements to run (load deletes and rebuilds the cache)")
    args = parser.parse_args()
    rows = []
    if args.dataset == "fashion-mnist":
        from fixmatch.data.datasets import _FASHION_FILES, _FASHION_SYSTEM_DIRS, _find_idx_files

        dirs = [args.root, args.root / "fashion-mnist", args.root / "FashionMNIST" / "raw", *_FASHION_SYSTEM_DIRS]
        files = next((f for d in dirs if (f := _find_idx_files(d)) is not None), None)
        if files is None:
            sys.exit(f"Fashion-MNIST not found under {args.root}; run `fixmatch train --preset fashion-mnist` once "
                     f"or download {', '.join(_FASHION_FILES)}")
        for _ in range(3):  # alternating, to spread the noise of a shared machine over both
            evict(list(files.values()))
            rows.append({"run": "first load (files not in page cache)", **measure("load", "fashion-mnist", args.root)})
            rows.append({"run": "cached load (files in page cache)", **measure("load", "fashion-mnist", args.root)})
    else:
        folder = args.root / "stl10_binary"
        generate_stl10(folder)
        cache = folder / "unlabeled_X.uint8.npy"
        if "load" in args.phases:
            cache.unlink(missing_ok=True)
            evict(sorted(folder.glob("*.bin")))
            rows.append({"run": "first load (decodes unlabeled_X.bin into the cache)",
                         **measure("load", "stl10", args.root)})
        if "gather" in args.phases:
            evict([cache])
            rows.append({"run": "cached load, then 50 random batches of 448 from the memmap with the cache file "
                                "evicted (cold), then 50 with it in the page cache (warm)",
                         **measure("gather", "stl10", args.root)})
        if "fullpass" in args.phases:
            evict([cache])
            rows.append({"run": "cached load, then all 100,000 unlabeled images once in batches of 448",
                         **measure("fullpass", "stl10", args.root)})
        if "train" in args.phases:
            rows.append({"run": "20 FixMatch steps, cnn_small, B=16, mu=7, with evaluation on the 8,000 test images",
                         **measure("train", "stl10", args.root)})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
