# Kernel tests on GPU 0 with the CUDA libraries from `TSEDGE_KERNEL_MODE=cuda-build pytest ...`.
# Usage (after `source bench/device/setup.sh`): bash bench/device/kernels.sh OUT_DIR
repo=$PWD
cd /tmp && TSEDGE_KERNEL_MODE=cuda-run TSEDGE_KERNEL_DIR=$repo/.carry/kernels python3 -m pytest -q \
  -p no:cacheprovider --rootdir "$repo/tests" "$repo/tests/test_attention_kernels.py" \
  "$repo/tests/test_tokenselect_kernels.py" 2>&1 | tee "$1/kernels.txt" | tail -15
