#!/usr/bin/env bash
# ResNet-50 224 px BYOL train step on one GPU: XLA jit_compile on/off x float32/mixed_bfloat16.
#
#   benchmarks/gpu_step.sh [OUT.jsonl]         # PYTHON=... picks the interpreter (default: python)
#
# Each setting runs `python -m benchmarks.step --encoder resnet50 --batch 256 --size 224 --no-parts`
# in a fresh process: fit's compiled step on the ImageNet preset (4096-256 heads, LARS, online
# probe, plain BN on one replica), 3 warm-up and 20 timed steps. Settings go most useful first;
# each is capped (XLA: $GPU_STEP_XLA_LIMIT_S, default 150 s, as compiling the step took about 100 s
# on a 16-core host; without XLA: $GPU_STEP_LIMIT_S, default 90 s), so the whole stays within
# 8 minutes and a setting that hangs costs its cap, not the rest. A setting that fails or
# runs out of time prints a line saying so; the others still run. Target (issue 6): >= 1,500
# images/s on an H200 in the best setting. GPU_STEP_SMOKE=1 passes --smoke (a tiny net, seconds
# per setting: what tests/test_benchmarks.py runs on CPU).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-benchmarks/results/gpu-$(date -u +%F).jsonl}"
python="${PYTHON:-python}"
batch="${GPU_STEP_BATCH:-256}"
smoke=()
if [ -n "${GPU_STEP_SMOKE:-}" ]; then smoke=(--smoke); fi
mkdir -p "$(dirname "$out")"

"$python" -m benchmarks.common --out "$out" --note "GPU step: ResNet-50 224 px batch $batch"
start_all=$SECONDS
for setting in "on mixed_bfloat16" "off mixed_bfloat16" "off float32" "on float32"; do
  read -r jit precision <<<"$setting"
  if [ "$jit" = on ]; then limit="${GPU_STEP_XLA_LIMIT_S:-150}"; else limit="${GPU_STEP_LIMIT_S:-90}"; fi
  start=$SECONDS
  echo "== jit $jit, $precision" >&2
  timeout --kill-after=10 "$limit" "$python" -m benchmarks.step --encoder resnet50 --batch "$batch" --size 224 \
    --no-parts --jit "$jit" --precision "$precision" --reps 20 --warmup 3 --out "$out" "${smoke[@]}"
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "gpu_step: jit $jit, $precision: exit status $status (124: over the ${limit} s cap)" >&2
  fi
  echo "== jit $jit, $precision: $((SECONDS - start)) s (total $((SECONDS - start_all)) s)" >&2
done
