#!/usr/bin/env bash
# Whole GPU run on the device machine: kernel tests, greedy check vs CPU, decode speed.
# Usage: bash bench/device/run.sh OUT_DIR   (the GGUF's first part in /tmp/w1.part or .carry/w1)
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
source bench/device/setup.sh
part1=/tmp/w1.part; [ -f .carry/w1/part ] && part1=.carry/w1/part
cat "$part1" .carry/w2/part > /tmp/smollm2.gguf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
bash bench/device/kernels.sh "$out"
python3 bench/device/gpu_bench.py /tmp/smollm2.gguf .carry/libs "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.txt"
