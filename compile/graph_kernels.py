"""The device side of conditional CUDA graphs (``tsedge/cuda_graphs.py``), built with nvcc.

A Selection Cache hit makes TokenSelect's scoring and the first five top-k passes of a layer do
nothing, yet in a captured decode step each still costs a kernel node. The runtime moves them into
the body of a CUDA graph IF node (CUDA 12.4+) whose value this one-thread kernel sets from the
layer's hit flag. ``cudaGraphSetConditional`` lives in ``libcudadevrt.a``, so the kernel is compiled
relocatable and device-linked with it here, at compile time; TVM's own kernels stay as they are.
"""

from __future__ import annotations

import base64
import subprocess
import tempfile
from pathlib import Path

SET_IF_MISSED = "tsedge_set_if_missed"

_SOURCE = f"""#include <cuda_runtime.h>
// run the body (scoring and top-k) unless the Selection Cache hit: hit[0] is state[layer, 0]
extern "C" __global__ void {SET_IF_MISSED}(cudaGraphConditionalHandle handle, const int* hit) {{
  cudaGraphSetConditional(handle, hit[0] == 0 ? 1u : 0u);
}}
"""

MIN_ARCH = 90  # conditional nodes set from the device: Hopper and later


def supports_graph_kernels(arch: str) -> bool:
    """Whether a CUDA ``arch`` (``sm_90a``, ``sm_80``, ...) gets conditional graph kernels."""
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return bool(digits) and int(digits) >= MIN_ARCH


def build_graph_kernels(arch: str) -> str:
    """The device-linked cubin of ``tsedge_set_if_missed(handle u64, hit const int*)`` for ``arch``,
    base64 (stored in the library's metadata). Raises RuntimeError naming nvcc's message when nvcc
    fails or is missing."""
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, cubin = (Path(tmp) / name for name in ("set_if.cu", "set_if.o", "set_if.cubin"))
        src.write_text(_SOURCE)
        for cmd in (["nvcc", f"-arch={arch}", "-rdc=true", "-c", str(src), "-o", str(obj)],
                    ["nvcc", f"-arch={arch}", "-dlink", "-cubin", str(obj), "-lcudadevrt", "-o", str(cubin)]):
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError("nvcc not found: a CUDA library needs the CUDA toolkit's nvcc on PATH") from None
            except subprocess.CalledProcessError as err:
                raise RuntimeError(f"nvcc failed building the graph kernels: {err.stderr.strip()}") from None
        return base64.b64encode(cubin.read_bytes()).decode()
