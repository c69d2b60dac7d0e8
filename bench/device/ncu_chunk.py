"""One chunk-attention call for Nsight Compute (device machine, after ``source bench/device/setup.sh``).

    ncu --kernel-name regex:chunk_attention --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis \
        --section InstructionStats python3 bench/device/ncu_chunk.py [DEPTH]

Runs ``.carry/attn/chunk.so`` (``attention_speed.py prepare``) three times on a 512-query chunk after
DEPTH (32768) cached rows at Llama-3-8B shapes; bench/results/ncu_chunk_attention_32k_h200.txt is
one such report.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
os.environ["TSEDGE_KERNEL_MODE"] = "cuda-run"
import kernel_harness  # noqa: E402,F401  (runtime-only TVM, CUDA runtime loaded)
import torch  # noqa: E402
import tvm  # noqa: E402
import tvm_ffi  # noqa: E402

from attention_speed import HEAD_DIM, HEADS, KV_HEADS, LAYERS, rope_table  # noqa: E402  (this script's folder)
from tsedge.tir_kernels import chunk_attention  # noqa: E402

QUERIES = 512
depth = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
m = depth + QUERIES
dev = torch.device("cuda")
kv = torch.randn((LAYERS, 2, KV_HEADS, m + 64, HEAD_DIM), device=dev, dtype=torch.float16)
q = torch.randn((QUERIES, HEADS, HEAD_DIM), device=dev, dtype=torch.float16)
rope = rope_table(m, dev)
rows = torch.arange(m, device=dev, dtype=torch.int32)
splits = chunk_attention.chunk_splits(m)
o = torch.empty((QUERIES, splits, HEADS, HEAD_DIM), device=dev)
lse = torch.empty((QUERIES, splits, HEADS), device=dev)
kernel = tvm.runtime.load_module(".carry/attn/chunk.so")["main"]
args = [tvm_ffi.from_dlpack(t) for t in (q, kv, rope, rows)]
for _ in range(3):
    kernel(*args, 0, tvm_ffi.from_dlpack(o), tvm_ffi.from_dlpack(lse))
torch.cuda.synchronize()
