#!/usr/bin/env bash
# Runs every byol-tf benchmark in sequence, then writes benchmarks/RESULTS.md and the plot.
#
#   benchmarks/run_all.sh                 # about 25 minutes on a quiet 2-core machine (timed with the
#                                         # prototypes since removed: less now)
#   benchmarks/run_all.sh --note "text"   # kept in the results' machine record
#
# Appends one JSON line per measurement to benchmarks/results/<UTC date>.jsonl (or $BENCH_OUT),
# then runs `python -m benchmarks.report` on that file. Run it on an otherwise idle machine:
# other jobs change every absolute figure (the ratios are measured interleaved and suffer
# less). It installs the project venv and the PyTorch peer venv first if they are missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
note=""
if [ "${1:-}" = "--note" ]; then note="${2:-}"; fi

scripts/ensure_venv
benchmarks/setup_torch_venv.sh
py="$root/.venv/bin/python"
torch_py="$root/benchmarks/.venv-torch/bin/python"
out="${BENCH_OUT:-$root/benchmarks/results/$(date -u +%F).jsonl}"
mkdir -p "$(dirname "$out")"

load="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v load="$load" 'BEGIN { exit !(load > 0.5) }'; then
  echo "run_all: WARNING: load average is $load; other jobs will distort the timings" >&2
fi

start_all=$SECONDS
step() {  # step TITLE COMMAND...: runs one benchmark, appending to $out, and says how long it took
  local title="$1" start=$SECONDS
  shift
  echo "== $title: $*" >&2
  "$@" --out "$out"
  echo "== $title: $((SECONDS - start)) s (total $((SECONDS - start_all)) s)" >&2
}

"$py" -m benchmarks.common --out "$out" --note "$note"

# 1. Full step versus its parts: the demo net (mnist5k preset) and ResNet-18 (CIFAR preset).
step "step small_convnet" "$py" -m benchmarks.step --encoder small_convnet --batch 128 --size 28
step "step resnet18" "$py" -m benchmarks.step --encoder resnet18_cifar --batch 128 --size 32

# 2. Versus lightly (PyTorch), alternating steps, ResNet-18 CIFAR stem, 4096/256 heads; byol-tf with the
#    preset's XLA setting and without (XLA on CPU compiles convolutions without oneDNN).
step "peer resnet18" "$py" -m benchmarks.peer --encoder resnet18_cifar --batch 128 --size 32 --reps 10 --jit config off

# 3. Input pipeline alone, each augmentation op alone, and fit on live versus cached views (ResNet-18
#    without XLA: the faster step is the stricter test of whether the pipeline keeps up).
step "input mnist5k" "$py" -m benchmarks.input_pipeline --source mnist5k --encoder small_convnet --size 28 --batch 128
step "input 32px" "$py" -m benchmarks.input_pipeline --source synthetic --encoder resnet18_cifar --size 32 --batch 128 \
  --fit-steps 3 --rounds 2 --jit off --ops
step "input 224px" "$py" -m benchmarks.input_pipeline --source synthetic --encoder resnet50 --size 224 --batch 32 \
  --count 256 --batches 10 --blocks 2 --fit-steps 0 --ops --op-reps 5

# 4. Switches: all on the demo net; the step-level ones on ResNet-18 (batch 32 to stay affordable; the
#    jit switch compares the preset's setting with the other, the rest run without XLA, which wins on
#    CPU in the preliminary runs); tf.data at 32 px.
step "switches small_convnet" "$py" -m benchmarks.switches --encoder small_convnet --batch 128 --size 28 --processes 1
step "switches resnet18" "$py" -m benchmarks.switches --encoder resnet18_cifar --batch 32 --size 32 --reps 6 \
  --warmup 2 --jit off --processes 1 --switch jit --switch sync_bn --switch precision --switch interop
step "switches tf.data 32px" "$py" -m benchmarks.switches --encoder resnet18_cifar --batch 128 --size 32 --switch tfdata

# 5. Scaling: step time versus batch size and image size (ResNet-18 without XLA: six XLA compilations
#    alone would take minutes, and XLA loses on CPU anyway).
step "scaling small_convnet" "$py" -m benchmarks.scaling --encoder small_convnet --batches 32 64 128 256 512 \
  --batch-sweep-size 28 --sizes 16 28 32 64 --size-sweep-batch 128
step "scaling resnet18" "$py" -m benchmarks.scaling --encoder resnet18_cifar --batches 32 64 128 \
  --batch-sweep-size 32 --sizes 16 32 64 --size-sweep-batch 32 --reps 3 --warmup 1 --jit off

echo "== all benchmarks: $((SECONDS - start_all)) s" >&2
# The PyTorch venv has matplotlib for the plot; the report itself needs only the standard library.
"$torch_py" -m benchmarks.report "$out"
