#!/usr/bin/env bash
# The GPU measurements benchmarks/RESULTS.md lacks, in one run:
#   1. versions: PyTorch, CUDA, cuDNN, NCCL and the GPU;
#   2. the CUDA tests (tests -k cuda: augmentation on the device, training in fp32 / bf16 / fp16, fp16 resume,
#      compiled training, GPU checkpoints evaluated on the CPU);
#   3. bench_step.py for WRN-28-2, B=64, mu=7, 32x32x3: the straightforward step against the fast path in fp32,
#      then the fast path in bf16, in fp16 (GradScaler) and in bf16 with torch.compile;
#   4. DistributedDataParallel over NCCL with one process per GPU (needs two GPUs or more; skipped on one);
#   5. the cifar10 preset end to end on CIFAR-10-shaped random data (official file format, 50,000 + 10,000
#      images) for 1000 steps in bf16, with the GPU's utilisation sampled every 100 ms by nvidia-smi: steps/s
#      of the real loop, augmentation and data feeding included, and how busy the GPU was;
#   6. the step time of FlexMatch, FreeMatch and SoftMatch against FixMatch's on the cifar10 preset in bf16
#      (bench_algorithm_overhead.py: 2 rounds of 60 steps per algorithm, the first 20 of each left out).
#
# Usage: bash benchmarks/gpu_checks.sh [LOG_DIR]      (default gpu-checks/: six section logs and gpu_utilisation.csv)
#        PYTHON=python3 picks the interpreter (default: .venv/bin/python if present, else python3); the package
#        is imported from src/, so nothing needs installing beyond its dependencies.
#        DEVICE=cpu QUICK=1 rehearses the whole script on a machine without a GPU, with tiny sizes.
# Each section writes LOG_DIR/<section>.log; a failing section is reported and the next one still runs; the
# exit status is the number of sections that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu-checks}
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ -n "${QUICK:-}" ]]; then  # plumbing only: small model, few steps
    BENCH=(--model cnn_small --shape 3,32,32 --batch-size 8 --mu 2 --iters 2 --warmup 1)
    TRAIN=(--model cnn_small --batch-size 8 --mu 2 --steps 20 --eval-every 20)
    IMAGES_PER_BATCH=200
    ALGORITHMS=(--steps 6 --skip 2 --rounds 1 --set model=cnn_small batch_size=8 mu=2)
else
    BENCH=(--model wrn28_2 --shape 3,32,32 --batch-size 64 --mu 7 --iters 50 --warmup 20)
    TRAIN=(--steps 1000 --eval-every 1000)
    IMAGES_PER_BATCH=10000  # the official files' size: 5 x 10,000 training images, 10,000 test images
    ALGORITHMS=(--steps 60 --skip 20 --rounds 2 --set amp=bf16)
fi

failed=0
run_section() {  # run_section NAME COMMAND...: output to LOG/NAME.log, its tail on the terminal
    local name=$1 start rc
    shift
    echo "== $name: $*"
    start=$(date +%s)
    "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    tail -n 30 "$LOG/$name.log"
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
    if ((rc != 0)); then failed=$((failed + 1)); fi
}

versions() {
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible")
EOF
    if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
}

bench() {
    "$PYTHON" benchmarks/bench_step.py --device "$DEVICE" "${BENCH[@]}" --variants straightforward fast &&
        "$PYTHON" benchmarks/bench_step.py --device "$DEVICE" "${BENCH[@]}" --variants fast --amp bf16 || return 1
    if [[ $DEVICE == cuda* ]]; then  # fp16 with loss scaling exists on CUDA only
        "$PYTHON" benchmarks/bench_step.py --device "$DEVICE" "${BENCH[@]}" --variants fast --amp fp16 || return 1
    fi
    "$PYTHON" benchmarks/bench_step.py --device "$DEVICE" "${BENCH[@]}" --variants fast --amp bf16 --compile
}

ddp() {
    local gpus
    gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    local procs=$gpus
    if [[ $DEVICE == cpu ]]; then procs=2; fi  # gloo: the same launch, two CPU processes
    if ((procs < 2)); then
        echo "skipped: $gpus GPU(s); NCCL takes one GPU per process, so a multi-process run needs two or more"
        return 0
    fi
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$procs" -m fixmatch train \
        --dataset synthetic --model cnn_small --num-labels 40 --batch-size 16 --mu 3 --steps 60 --eval-every 30 \
        --device "$DEVICE" --out "$WORK/ddp" --no-progress && cat "$WORK/ddp/summary.json"
}

write_cifar_shaped_data() {  # random images in the official python-format files, written by the tests' writer
    "$PYTHON" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from test_datasets import write_cifar_folder; write_cifar_folder(Path(sys.argv[1]), int(sys.argv[2]))" \
        "$WORK/data" "$IMAGES_PER_BATCH"
}

train_end_to_end() {
    write_cifar_shaped_data || return 1
    local sampler=""
    if command -v nvidia-smi >/dev/null && [[ $DEVICE == cuda* ]]; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 100 \
            >"$LOG/gpu_utilisation.csv" &
        sampler=$!
    fi
    "$PYTHON" -m fixmatch train --preset cifar10 --data-dir "$WORK/data" "${TRAIN[@]}" --amp bf16 \
        --device "$DEVICE" --out "$WORK/cifar10-shape" --no-progress
    local rc=$?
    if [[ -n $sampler ]]; then kill "$sampler"; fi
    ((rc == 0)) || return $rc
    cat "$WORK/cifar10-shape/summary.json"
    if [[ -s $LOG/gpu_utilisation.csv ]]; then  # the middle 80% of the samples: neither start-up nor evaluation
        "$PYTHON" - "$LOG/gpu_utilisation.csv" <<'EOF'
import sys
rows = [line.split(",") for line in open(sys.argv[1]) if line.count(",") >= 2]
util = [float(r[1].strip().rstrip("%").strip()) for r in rows]
mid = util[len(util) // 10: len(util) - len(util) // 10] or util
print(f"GPU utilisation over the middle 80% of {len(util)} samples: mean {sum(mid) / len(mid):.1f}%, "
      f"min {min(mid):.0f}%")
EOF
    fi
}

algorithm_overhead() {
    # The train section's data, unless it failed before its last file (the meta file, written last).
    [[ -f $WORK/data/cifar-10-batches-py/batches.meta ]] || { rm -rf "$WORK/data" && write_cifar_shaped_data; } \
        || return 1
    "$PYTHON" benchmarks/bench_algorithm_overhead.py --out "$WORK/overhead" --preset cifar10 --device "$DEVICE" \
        "${ALGORITHMS[@]}" --set "data_dir=$WORK/data"
}

run_section versions versions
run_section tests "$PYTHON" -m pytest -q -p no:warnings tests -k cuda -rs
run_section bench bench
run_section ddp ddp
run_section train train_end_to_end
run_section algorithms algorithm_overhead
echo "== done: $failed section(s) failed; logs in $LOG"
exit "$failed"
