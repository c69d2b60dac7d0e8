#!/usr/bin/env bash
# TokenSelect on the GPU (device machine): kernel tests, agreement with dense, passkey.
# Usage: bash bench/device/tokenselect.sh OUT_DIR STAGE   (STAGE: agreement | passkey-ts | passkey-dense)
# Needs .carry/libs2 (bench/device/prepare_tokenselect.py) and the GGUF parts (see run.sh).
set -uo pipefail
out=$1
source bench/device/setup.sh
part1=/tmp/w1.part; [ -f .carry/w1/part ] && part1=.carry/w1/part
cat "$part1" .carry/w2/part > /tmp/smollm2.gguf
libs=.carry/libs2
ts="python3 -P -m tsedge.cli"  # -P: the installed copy, not ./tsedge
case $2 in
  agreement)
    bash bench/device/kernels.sh "$out"
    $ts eval agreement --model /tmp/smollm2.gguf --dense-lib $libs/dense.so --lib $libs/tokenselect-small.so \
      --lengths 4096,8192 --steps 32 -o "$out/agreement_small.json"
    $ts eval agreement --model /tmp/smollm2.gguf --dense-lib $libs/dense.so --lib $libs/tokenselect.so \
      --lengths 4096,8192 --steps 32 -o "$out/agreement_paper.json" ;;
  passkey-ts)
    $ts eval passkey --model /tmp/smollm2.gguf --lib $libs/tokenselect.so --keys "${KEYS:-10}" --depths "${DEPTHS:-0,0.25,0.5,0.75,1}" \
      --lengths "${LENGTHS:-2048,4096,8192,16384,32768,65536}" -o "$out/passkey_tokenselect.json" ;;
  passkey-dense)
    $ts eval passkey --model /tmp/smollm2.gguf --lib $libs/dense.so --keys "${KEYS:-10}" \
      --lengths "${LENGTHS:-2048,4096,8192,16384}" -o "$out/passkey_dense.json" ;;
esac
