#!/usr/bin/env bash
# Creates benchmarks/.venv-torch: the PyTorch + lightly peer for benchmarks/peer_lightly.py.
# It is NOT a dependency of byol-tf: only the comparison benchmark uses it, so it lives in its
# own (gitignored) venv. torch/torchvision are pinned to the releases this machine holds on disk.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/benchmarks/.venv-torch"
python="${BYOL_TF_PYTHON:-python3}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, torchvision, lightly" 2>/dev/null; then
  exit 0
fi
echo "byol-tf benchmarks: installing torch + lightly into $venv (a few minutes) ..." >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install --quiet lightly matplotlib
"$venv/bin/python" -c "import torch, torchvision, lightly; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightly', lightly.__version__)"
