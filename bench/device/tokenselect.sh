#!/usr/bin/env bash
# TokenSelect on the GPU (device machine): kernel tests, agreement with dense, passkey, selection probe.
# Usage: bash bench/device/tokenselect.sh OUT_DIR STAGE [LIB ...]
#   kernels                     kernel tests (needs .carry/kernels from a cuda-build pytest run)
#   agreement DENSE_LIB LIB...  top-1 agreement / KL of each LIB against DENSE_LIB at 4K, 8K
#   passkey LIB...              passkey table per LIB (env KEYS, LENGTHS, DEPTHS)
#   probe LIB...                bench/device/probe_selection.py per LIB (env LENGTHS, DEPTH)
# Libraries come from bench/device/prepare_tokenselect.py; the GGUF parts as in run.sh.
set -uo pipefail
out=$1
stage=$2
shift 2
source bench/device/setup.sh
part1=/tmp/w1.part; [ -f .carry/w1/part ] && part1=.carry/w1/part
cat "$part1" .carry/w2/part > /tmp/smollm2.gguf
ts="python3 -P -m tsedge.cli"  # -P: the installed copy, not ./tsedge
name() { echo "$(basename "$(dirname "$1")")_$(basename "$1" .so)"; }
case $stage in
  kernels)
    bash bench/device/kernels.sh "$out" ;;
  agreement)
    dense=$1; shift
    for lib in "$@"; do
      $ts eval agreement --model /tmp/smollm2.gguf --dense-lib "$dense" --lib "$lib" \
        --lengths 4096,8192 --steps 32 -o "$out/agreement_$(name "$lib").json"
    done ;;
  passkey)
    for lib in "$@"; do
      start=$SECONDS
      $ts eval passkey --model /tmp/smollm2.gguf --lib "$lib" --keys "${KEYS:-10}" \
        --depths "${DEPTHS:-0,0.25,0.5,0.75,1}" --lengths "${LENGTHS:-2048,4096,8192,16384,32768}" \
        -o "$out/passkey_$(name "$lib").json"
      echo "$lib: $((SECONDS - start)) s"
    done ;;
  probe)
    for lib in "$@"; do
      python3 -P bench/device/probe_selection.py --model /tmp/smollm2.gguf --lib "$lib" \
        --lengths "${LENGTHS:-57344,63488}" --depth "${DEPTH:-1}" -o "$out/probe_$(name "$lib").json"
    done ;;
esac
