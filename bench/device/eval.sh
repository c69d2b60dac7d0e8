#!/usr/bin/env bash
# `tsedge eval run` on the GPU (issue 10): SmolLM2-135M-Instruct (real weights), every policy.
# Usage: bash bench/device/eval.sh prepare        (build machine: CUDA libraries into .carry/eval-cache)
#        bash bench/device/eval.sh run OUT_DIR    (device; the GGUF's parts in /tmp/w1.part or .carry/w1,
#                                                  and .carry/w2, as run.sh; without .carry/w2 the
#                                                  /tmp/smollm2.gguf of an earlier call)
# Environment: LENGTHS (4k,8k,16k,32k), SAMPLES (5), TASKS (every task), HAYSTACKS (prose),
#              POLICIES (all five), BUDGET (2688: TidalDecode's budget and Recycled's K, TokenSelect's
#              n_init + top_k + n_local at its defaults, so that the selecting policies read as many rows),
#              SWEEP (TidalDecode re-selection layers, one variant each: eval run --tidal-reselect-sweep),
#              RECYCLE_K (Recycled's K: BUDGET by default; e.g. 1/8 for the paper's fraction of the prompt),
#              SCORE_KEYS (TokenSelect's --score-keys: exact, or int8 with POLICIES=tokenselect),
#              TAG (suffix of the result's name).
set -uo pipefail
LENGTHS=${LENGTHS:-4k,8k,16k,32k}
SAMPLES=${SAMPLES:-5}
HAYSTACKS=${HAYSTACKS:-prose}
POLICIES=${POLICIES:-dense,tokenselect,streaming,tidaldecode,recycled}
BUDGET=${BUDGET:-2688}
task_args=()
[ -n "${TASKS:-}" ] && task_args=(--tasks "$TASKS")
[ -n "${SWEEP:-}" ] && task_args+=(--tidal-reselect-sweep "$SWEEP")
args=(--target cuda:sm_90a --policies "$POLICIES" --lengths "$LENGTHS" --samples "$SAMPLES" --haystacks "$HAYSTACKS"
      --tidal-budget "$BUDGET" --recycle-k "${RECYCLE_K:-$BUDGET}" --score-keys "${SCORE_KEYS:-exact}" "${task_args[@]}")
if [ "$1" = prepare ]; then
  bash bench/device/make_bundle.sh
  gguf=$(python -c "from tsedge.fetch import default_model_path; print(default_model_path())")
  TSEDGE_CACHE=${CACHE:-.carry/eval-cache} python -m tsedge.cli eval run --model "$gguf" "${args[@]}" --compile-only
  exit 0
fi
out=$2
mkdir -p "$out"
source bench/device/setup.sh
if [ -f .carry/w2/part ]; then  # else the GGUF a previous call assembled on this (warm) machine
  part1=/tmp/w1.part; [ -f .carry/w1/part ] && part1=.carry/w1/part
  cat "$part1" .carry/w2/part > /tmp/smollm2.gguf
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
TSEDGE_CACHE=$PWD/${CACHE:-.carry/eval-cache} python3 -P -m tsedge.cli eval run --model /tmp/smollm2.gguf "${args[@]}" \
  -o "$out/eval_smollm2-135m_h200_${LENGTHS//,/-}${SWEEP:+_sweep}${TAG:-}.json" 2> "$out/eval.log"
tail -3 "$out/eval.log"
