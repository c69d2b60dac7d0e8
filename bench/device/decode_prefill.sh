#!/usr/bin/env bash
# GPU run of issue 8/9's benchmark (on the device machine, TVM runtime only):
#   kernel tests of the attention kernels, then `tsedge bench decode` and `tsedge bench prefill`
#   over the libraries that `bench/device/decode_prefill.sh prepare` compiled into .carry/bench-PRESET.
# Usage: bash bench/device/decode_prefill.sh prepare        (build machine)
#        bash bench/device/decode_prefill.sh run OUT_DIR    (device; prints the tables last)
# Environment: PRESET (llama3-8b), DEPTHS (0,4k,32k,128k), KINDS ("decode prefill"),
#              TTFT (0: prefill also times a prompt of this many tokens from empty),
#              QUANT (q0: float16 weights; q4f16 or q8f16: libraries in .carry/bench-PRESET-QUANT),
#              POLICIES (dense,tokenselect), SCORE_KEYS (exact; exact,int8 adds tokenselect-int8 variants),
#              KERNEL_TESTS (attention: the pytest -k expression of the GPU kernel tests run first).
set -uo pipefail
PRESET=${PRESET:-llama3-8b}
DEPTHS=${DEPTHS:-0,4k,32k,128k}
KINDS=${KINDS:-decode prefill}
TTFT=${TTFT:-0}
QUANT=${QUANT:-q0}
LIBS=.carry/bench-$PRESET$([ "$QUANT" = q0 ] || echo "-$QUANT")
variants=(--policies "${POLICIES:-dense,tokenselect}" --score-keys "${SCORE_KEYS:-exact}")
if [ "$1" = prepare ]; then
  bash bench/device/make_bundle.sh
  TSEDGE_KERNEL_MODE=cuda-build TSEDGE_KERNEL_DIR=.carry/kernels python -m pytest -q -p no:cacheprovider \
    tests/test_attention_kernels.py tests/test_tokenselect_kernels.py tests/test_matmul_kernel.py > /dev/null  # builds the CUDA kernel libraries (checks are no-ops)
  # decode's variants (dense, tokenselect, tokenselect-reselect) cover prefill's too
  python -m tsedge.cli_bench decode --compile-only --lib-dir "$LIBS" --target cuda:sm_90a --preset "$PRESET" \
    --depths "$DEPTHS" --ttft "$TTFT" --quantization "$QUANT" "${variants[@]}"
  exit 0
fi
out=$2
mkdir -p "$out"
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
bash bench/device/kernels.sh "$out" -k "${KERNEL_TESTS:-attention}" > /dev/null; tail -3 "$out/kernels.txt"
repo=$PWD
cd /tmp  # import tsedge from setup.sh's package, not the checkout's folders
for kind in $KINDS; do
  python3 -m tsedge.cli_bench "$kind" --lib-dir "$repo/$LIBS" --preset "$PRESET" --depths "$DEPTHS" \
    --ttft "$TTFT" --quantization "$QUANT" "${variants[@]}" -o "$out" 2> "$out/$kind-$PRESET-$QUANT.log"
  tail -2 "$out/$kind-$PRESET-$QUANT.log"
done
