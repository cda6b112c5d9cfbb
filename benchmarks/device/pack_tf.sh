#!/usr/bin/env bash
# Packs TensorFlow for a GPU machine without TensorFlow or network (see carried_tf.sh), in
# parts small enough to carry one per call (PART_MB, default 60).
#
#   benchmarks/device/pack_tf.sh [DEST]      # default DEST: .gpu (git-ignored)
#
# DEST/parts/tf.tar.xz.partNN: the tensorflow 2.21.0 cp312 wheel's files without its C++
# headers and its 86 MB profiler plugin, xz-compressed (572 MB wheel -> about 330 MB).
# DEST/wheels: keras and the small pure dependencies the machine lacks, at requirements.lock's
# versions, and the CUDA 12.5 runtime. Versions come from requirements.lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="$(realpath -m "${1:-$root/.gpu}")"
part_mb="${PART_MB:-60}"
pin() { grep -i "^$1==" "$root/requirements.lock" | head -1; }
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest/parts" "$dest/wheels"
rm -f "$dest"/parts/tf.tar.xz.part* "$dest"/wheels/*.whl

download "$work" "$(pin tensorflow)"
download "$dest/wheels" nvidia-cuda-runtime-cu12==12.5.82 \
  "$(pin keras)" "$(pin namex)" "$(pin optree)" "$(pin astunparse)" "$(pin gast)" "$(pin google-pasta)" \
  "$(pin termcolor)" "$(pin protobuf)" "$(pin ml_dtypes)"
mkdir "$work/tree"
(cd "$work/tree" && unzip -q "$work"/tensorflow-*.whl \
  && rm -rf tensorflow/include tensorflow/python/profiler/internal/_pywrap_profiler_plugin.so \
  && tar cf - tensorflow tensorflow-*.dist-info) | xz -T0 -6 | split -b "${part_mb}M" -d - "$dest/parts/tf.tar.xz.part"
ls -l "$dest/parts" "$dest/wheels"
