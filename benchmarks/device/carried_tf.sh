#!/usr/bin/env bash
# Runs benchmarks/gpu_step.sh on a GPU machine that has no TensorFlow and no network: how the
# H200 figures in benchmarks/RESULTS.md were made. With `pip install tensorflow[and-cuda]`
# (the normal case) run benchmarks/gpu_step.sh directly instead.
#
#   benchmarks/device/carried_tf.sh PARTS_DIR WHEELS_DIR OUT_DIR
#
# PARTS_DIR holds tf.tar.xz.part* and WHEELS_DIR the wheels that benchmarks/device/pack_tf.sh
# made on a machine with a package registry. The lent machine (Python 3.12, PyTorch with CUDA
# 13 libraries) lacks what TensorFlow 2.21 dlopens by its CUDA 12 names. Only the CUDA 12.5
# runtime is carried (TensorFlow's own kernels register with the runtime they were built
# against); libcublas.so.12, libcudnn.so.9 and the rest are links to the machine's CUDA 13
# libraries, so before any timing a convolution, a matmul and an XLA-compiled function on the
# GPU are checked against the CPU.
set -uo pipefail
parts="$1" wheels="$2" out="$3"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
site=/tmp/carried-site
cuda12=/tmp/carried-cuda12
mkdir -p "$out" "$cuda12"
start=$SECONDS

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "$wheels"/*.whl || exit 1
cat "$parts"/tf.tar.xz.part* | xz -d -T0 | tar x -C "$site" || exit 1
# pack_tf.sh leaves out the 86 MB profiler plugin; only tf.profiler.experimental.client uses it.
echo '"""Left out of the carried TensorFlow (benchmarks/device/pack_tf.sh)."""' \
  >"$site/tensorflow/python/profiler/internal/_pywrap_profiler_plugin.py"
cp "$site/nvidia/cuda_runtime/lib/libcudart.so.12" "$cuda12/"
echo "carried_tf: unpacked in $((SECONDS - start)) s" >&2

# CUDA 12 sonames -> the machine's libraries; every folder holding them goes on the search path.
libdirs="$(python3 - "$cuda12" <<'EOF'
import glob, os, site, sys
cuda12 = sys.argv[1]
roots = [os.path.join(p, "nvidia") for p in site.getsitepackages()] + glob.glob("/usr/local/cuda*/lib64")
files = [f for r in roots for f in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)]
wanted = {
    "libcublas.so.12": "libcublas.so.1", "libcublasLt.so.12": "libcublasLt.so.1",
    "libcufft.so.11": "libcufft.so.1", "libcusolver.so.11": "libcusolver.so.1",
    "libcusparse.so.12": "libcusparse.so.1", "libcudnn.so.9": "libcudnn.so.9",
    "libnccl.so.2": "libnccl.so.2", "libcupti.so.12": "libcupti.so.1",
    "libnvJitLink.so.12": "libnvJitLink.so.1", "libcurand.so.10": "libcurand.so.1",
}
for name, prefix in wanted.items():
    exact = [f for f in files if os.path.basename(f) == name]
    close = sorted(f for f in files if os.path.basename(f).startswith(prefix))
    found = (exact or close or [None])[0]
    print(f"carried_tf: {name} -> {found}", file=sys.stderr)
    if found and not os.path.exists(os.path.join(cuda12, name)):
        os.symlink(found, os.path.join(cuda12, name))
print(":".join(sorted({os.path.dirname(f) for f in files})))
EOF
)"
export LD_LIBRARY_PATH="$cuda12:$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
libdevice="$(find /usr/local/cuda* /usr/local /opt -name libdevice.10.bc -path '*nvvm/libdevice*' 2>/dev/null | head -1)"
if [ -n "$libdevice" ]; then
  export XLA_FLAGS="--xla_gpu_cuda_data_dir=$(dirname "$(dirname "$(dirname "$libdevice")")")"
fi
echo "carried_tf: XLA_FLAGS=${XLA_FLAGS:-unset}; ptxas: $(command -v ptxas || echo none)" >&2

python3 - <<'EOF' 2>&1 | tee "$out/gpu_check.log" | grep -v "^[IW]0000"
import numpy as np
import tensorflow as tf

gpus = tf.config.list_physical_devices("GPU")
print("carried_tf: tensorflow", tf.__version__, "GPUs", gpus, flush=True)
assert gpus, "TensorFlow sees no GPU"
rng = np.random.default_rng()
x = rng.standard_normal((32, 56, 56, 64)).astype(np.float32)
w = rng.standard_normal((3, 3, 64, 128)).astype(np.float32) / 24
a = rng.standard_normal((512, 2048)).astype(np.float32)
b = rng.standard_normal((2048, 4096)).astype(np.float32) / 45


def ops():
    xla = tf.function(lambda u, v: tf.nn.relu(tf.matmul(u, v)), jit_compile=True, autograph=False)
    return tf.nn.conv2d(x, w, 1, "SAME"), tf.matmul(a, b), xla(tf.constant(a), tf.constant(b))


with tf.device("/CPU:0"):
    reference = [t.numpy().astype(np.float64) for t in ops()]
with tf.device("/GPU:0"):
    results = ops()
for name, got, want in zip(("conv2d", "matmul", "xla relu(matmul)"), results, reference):
    assert "GPU" in got.device, (name, got.device)
    error = np.linalg.norm(got.numpy() - want) / np.linalg.norm(want)
    print(f"carried_tf: {name} on {got.device}: relative error vs CPU {error:.2e} (TF32 allows ~1e-3)", flush=True)
    assert np.isfinite(error) and error < 1e-2, name
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "carried_tf: the GPU check failed; see $out/gpu_check.log" >&2; exit 1; }

cd "$root" && PYTHON=python3 benchmarks/gpu_step.sh "$out/gpu.jsonl"
