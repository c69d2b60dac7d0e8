#!/usr/bin/env bash
# Build the runtime-only TVM bundle a GPU run carries: .carry/site312.tgz (see ../shared/TVM_NOTES.md,
# "Running on the GPU machine"). The device has Python 3.12 and no package registry, so it gets
# tvm/ from this install without the compiler library and 3rdparty/, the cp312 build of tvm_ffi
# (same version as here) and the pure-Python gguf package. bench/device/setup.sh unpacks it.
set -euo pipefail
out=${1:-.carry/site312.tgz}
[ -f "$out" ] && { echo "$out exists"; exit 0; }
site=$(python -c "import tvm, os; print(os.path.dirname(os.path.dirname(tvm.__file__)))")
ffi_version=$(python -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/site" "$stage/wheel"
tar -C "$site" --exclude tvm/lib/libtvm_compiler.so --exclude tvm/3rdparty --exclude __pycache__ -cf - tvm \
  | tar -C "$stage/site" -xf -
cp -r "$site/gguf" "$stage/site/"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$stage/wheel" "apache-tvm-ffi==$ffi_version"
python -m zipfile -e "$stage"/wheel/apache_tvm_ffi-*.whl "$stage/site/"
mkdir -p "$(dirname "$out")"
tar czf "$out" -C "$stage/site" .
echo "wrote $out ($(du -h "$out" | cut -f1))"
