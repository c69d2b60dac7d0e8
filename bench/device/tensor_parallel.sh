#!/usr/bin/env bash
# Tensor parallelism on a multi-GPU machine (issue 14), TVM runtime only.
# Usage: bash bench/device/tensor_parallel.sh prepare      (build machine: the libraries)
#        bash bench/device/tensor_parallel.sh run OUT_DIR  (device, nvidia-h200-x2; tables last)
# Environment: PARTS ("latency check 8b 70b profile": which steps run), SHARDS (2).
# A failed all-reduce check (P2P kernel) turns the P2P kernel off for the later steps (NCCL only).
# Libraries: .carry/bench-llama3-8b (<variant>.so, <variant>-tp2.so) and .carry/bench-llama3.1-70b
# (<variant>-tp2.so: 70B in float16 does not fit one GPU).
set -uo pipefail
PARTS=${PARTS:-latency check 8b 70b profile}
SHARDS=${SHARDS:-2}
if [ "$1" = prepare ]; then
  bash bench/device/make_bundle.sh
  python -m tsedge.cli_bench decode --compile-only --lib-dir .carry/bench-llama3-8b --target cuda:sm_90a \
    --preset llama3-8b --depths 0,4k,32k,128k --tensor-parallel "1,$SHARDS"
  python -m tsedge.cli_bench decode --compile-only --lib-dir .carry/bench-llama3.1-70b --target cuda:sm_90a \
    --preset llama3.1-70b --depths 0,32k,128k --tensor-parallel "$SHARDS"
  exit 0
fi
out=$2
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi topo -m > "$out/topology.txt" 2>&1
python3 -c "from cupy.cuda import nccl; print('NCCL', nccl.get_version())" | tee -a "$out/gpu.txt"
repo=$PWD
cd /tmp  # import tsedge from setup.sh's package, not the checkout's folders
L8=$repo/.carry/bench-llama3-8b
for part in $PARTS; do
  case $part in
    latency) timeout 150 python3 "$repo/bench/device/nccl_latency.py" "$out/allreduce_latency_h200x2.json" \
               2> "$out/latency.log" || export TSEDGE_P2P_ALLREDUCE=0
             grep -q '"p2p kernel"' "$out/allreduce_latency_h200x2.json" 2>/dev/null || export TSEDGE_P2P_ALLREDUCE=0 ;;
    profile) python3 "$repo/bench/device/profile.py" "$out/profile_tp_h200.json" "$L8/dense.so:0" "$L8/dense-tp2.so:0" \
               2> "$out/profile.log" | grep -v "^ " ;;
    check) python3 "$repo/bench/device/tp_check.py" "$repo/.carry/bench-llama3-8b" "$out/tp_check_h200.json" \
             2> "$out/tp_check.log" ;;
    8b) python3 -m tsedge.cli_bench decode --lib-dir "$repo/.carry/bench-llama3-8b" --preset llama3-8b \
          --depths 0,4k,32k,128k --tensor-parallel "1,$SHARDS" --tag "decode_llama3-8b_tp_h200" -o "$out" \
          2> "$out/8b.log"; grep "all-reduce" "$out/8b.log" ;;
    70b) python3 -m tsedge.cli_bench decode --lib-dir "$repo/.carry/bench-llama3.1-70b" --preset llama3.1-70b \
           --depths 0,32k,128k --tensor-parallel "$SHARDS" --tag "decode_llama3.1-70b_tp_h200" -o "$out" \
           2> "$out/70b.log"; grep "all-reduce" "$out/70b.log" ;;
  esac
done
