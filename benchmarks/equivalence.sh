#!/usr/bin/env bash
# Same seed, same machine: the numbers a restructuring of the training loop must leave unchanged.
#
#   bash benchmarks/equivalence.sh OUT_DIR [quick]
#
# Runs the quick start (--preset fashion-mnist, seed 0, 3500 steps; left out with `quick`), then four short
# runs on Fashion-MNIST: two processes under torchrun, CTAugment, AMP bf16, and a run stopped by SIGINT after
# its first checkpoint and resumed. Prints one line per run: every metrics row without its wall-clock time,
# hashed, plus the last row's test accuracy. Run it on the commit before a change and after it; the lines must
# be identical. Needs the Fashion-MNIST files (scripts/setup.sh installs them).
set -euo pipefail
out=${1:?usage: bash benchmarks/equivalence.sh OUT_DIR [quick]}
mode=${2:-full}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever the venv points at
py=.venv/bin/python
data=(--dataset fashion-mnist --model cnn_small --num-labels 40 --batch-size 16 --mu 2 --steps 40 --eval-every 20
      --no-progress --seed 0)
mkdir -p "$out"

fingerprint() {  # RUN_DIR NAME: hash of metrics.jsonl without wall_s, and the final test accuracy
  "$py" - "$1" "$2" <<'EOF'
import hashlib, json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
for r in rows:
    r.pop("wall_s", None)
text = json.dumps(rows, sort_keys=True)
print(f"{sys.argv[2]:<12} rows={len(rows)} last_test_acc={rows[-1]['test_acc']:.2f} "
      f"metrics_sha256={hashlib.sha256(text.encode()).hexdigest()[:16]}")
EOF
}

if [ "$mode" != quick ]; then
  "$py" -m fixmatch train --preset fashion-mnist --seed 0 --no-progress --out "$out/quickstart" > "$out/quickstart.log"
  fingerprint "$out/quickstart" quickstart
fi

OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m fixmatch train "${data[@]}" \
  --out "$out/two-proc" > "$out/two-proc.log" 2>&1
fingerprint "$out/two-proc" two-proc

"$py" -m fixmatch train "${data[@]}" --strong ctaugment --out "$out/ctaugment" > "$out/ctaugment.log"
fingerprint "$out/ctaugment" ctaugment

"$py" -m fixmatch train "${data[@]}" --amp bf16 --out "$out/bf16" > "$out/bf16.log"
fingerprint "$out/bf16" bf16

# Stopped after its first checkpoint (step 20), then resumed: must equal the same run without the stop.
"$py" -m fixmatch train "${data[@]}" --out "$out/resumed" > "$out/resumed.log" 2>&1 &
pid=$!
until [ -s "$out/resumed/metrics.jsonl" ] || ! kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
kill -INT "$pid" 2>/dev/null || true
wait "$pid" || true
"$py" -m fixmatch train --out "$out/resumed" --resume --no-progress >> "$out/resumed.log" 2>&1
stopped_at=$(grep -o 'interrupted at step [0-9]*' "$out/resumed.log" || echo "not interrupted (finished first)")
echo "resumed: $stopped_at" >&2
fingerprint "$out/resumed" resumed
"$py" -m fixmatch train "${data[@]}" --out "$out/unstopped" > "$out/unstopped.log"
fingerprint "$out/unstopped" unstopped
