#!/usr/bin/env bash
# GPU run on the device machine (runtime-only TVM; see bench/device/prepare.py for what it needs).
# Usage: bash bench/device/run.sh OUT_DIR   (expects /tmp/w1.part from an earlier call, or .carry/w1)
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p /tmp/site /tmp/pkg/tsedge "$out"
tar xzf .carry/site312.tgz -C /tmp/site
cp -r tsedge/. /tmp/pkg/tsedge/ && for d in models tir_kernels compile; do cp -r "$d" /tmp/pkg/tsedge/; done
export PYTHONPATH=/tmp/pkg:/tmp/site:$PWD/tests PYTHONUNBUFFERED=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
part1=/tmp/w1.part; [ -f .carry/w1/part ] && part1=.carry/w1/part
cat "$part1" .carry/w2/part > /tmp/smollm2.gguf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
TSEDGE_KERNEL_MODE=cuda-run TSEDGE_KERNEL_DIR=.carry/kernels python3 -m pytest -q -p no:cacheprovider \
  tests/test_attention_kernels.py tests/test_tokenselect_kernels.py 2>&1 | tee "$out/kernels.txt" | tail -15
python3 bench/device/gpu_bench.py /tmp/smollm2.gguf .carry/libs "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.txt"
