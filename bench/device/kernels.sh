# Kernel tests on GPU 0 with the CUDA libraries from `TSEDGE_KERNEL_MODE=cuda-build pytest ...`.
# Usage (after `source bench/device/setup.sh`): bash bench/device/kernels.sh OUT_DIR [pytest args]
repo=$PWD
out=$1
shift
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/kernels.txt"  # the GPU the run used
cd /tmp && TSEDGE_KERNEL_MODE=cuda-run TSEDGE_KERNEL_DIR=${KERNEL_DIR:-$repo/.carry/kernels} python3 -m pytest -q -rs \
  -p no:cacheprovider --tb=short --rootdir "$repo/tests" "$repo/tests/test_attention_kernels.py" \
  "$repo/tests/test_tokenselect_kernels.py" "$repo/tests/test_matmul_kernel.py" "$repo/tests/test_gemv_kernel.py" "$@" \
  >> "$out/kernels.txt" 2>&1
echo "kernel tests exit code $?" >> "$out/kernels.txt"
tail -40 "$out/kernels.txt"
