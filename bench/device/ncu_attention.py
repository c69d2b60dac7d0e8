"""One attention kernel call for Nsight Compute (device machine, after ``source bench/device/setup.sh``).

    ncu --kernel-name regex:KERNEL --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
        --section InstructionStats python3 bench/device/ncu_attention.py chunk|decode [DEPTH]

``chunk``: ``.carry/attn/chunk.so`` on a 512-query chunk after DEPTH (32768) cached rows (KERNEL
``chunk_attention``); ``decode``: ``.carry/attn/mma_dense.so``, the tensor-core dense decode kernel,
over DEPTH rows (KERNEL ``attention_decode_dense``). Llama-3-8B shapes, three calls (libraries from
``attention_speed.py prepare``); bench/results/ncu_*_h200.txt are such reports.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
os.environ["TSEDGE_KERNEL_MODE"] = "cuda-run"
import kernel_harness  # noqa: E402,F401  (runtime-only TVM, CUDA runtime loaded)
import torch  # noqa: E402
import tvm  # noqa: E402
import tvm_ffi  # noqa: E402

from attention_speed import HEAD_DIM, HEADS, KV_HEADS, LAYERS, rope_table  # noqa: E402
from tsedge.tir_kernels import chunk_attention, decode_attention_mma  # noqa: E402

kind = sys.argv[1]
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
queries = 512 if kind == "chunk" else 1
m = depth + queries if kind == "chunk" else depth
dev = torch.device("cuda")
kv = torch.randn((LAYERS, 2, KV_HEADS, m + 64, HEAD_DIM), device=dev, dtype=torch.float16)
q = torch.randn((queries, HEADS, HEAD_DIM), device=dev, dtype=torch.float16)
rope = rope_table(m, dev)
if kind == "chunk":
    splits, lib = chunk_attention.chunk_splits(m), "chunk"
    rows = torch.arange(m, device=dev, dtype=torch.int32)
else:
    splits, lib = decode_attention_mma.MAX_SPLITS, "mma_dense"
    rows = torch.tensor([m], device=dev, dtype=torch.int32)  # the device length of the dense kernel
o = torch.empty((queries, splits, HEADS, HEAD_DIM), device=dev)
lse = torch.empty((queries, splits, HEADS), device=dev)
kernel = tvm.runtime.load_module(f".carry/attn/{lib}.so")["main"]
args = [tvm_ffi.from_dlpack(t) for t in (q, kv, rope, rows)]
for _ in range(3):
    kernel(*args, 0, tvm_ffi.from_dlpack(o), tvm_ffi.from_dlpack(lse))
torch.cuda.synchronize()
