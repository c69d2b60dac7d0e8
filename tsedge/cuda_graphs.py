"""Decode steps whose Selection Cache work is left out of the graph on a hit: CUDA conditional nodes.

TVM's RewriteCUDAGraph makes a decode step one captured region that the VM runs through the
builtin ``vm.builtin.cuda_graph.run_or_capture``: the first call captures the region's kernels
into a CUDA graph, later calls launch it. On a Selection Cache hit TokenSelect's scoring (3
kernels) and the first five top-k passes of each layer do nothing, yet each still costs its graph
node (~1 µs: issue 9). For an Engine that asks for it, this module takes that builtin over: it
captures the region the same way (cuda-bindings), then in each layer moves those kernels into the
body of an IF node (CUDA 12.4+) placed after the layer's ``fingerprint_check`` kernel, preceded by
a one-thread kernel (``compile/graph_kernels.py``) that sets the node to run only on a miss. Every
other node stays as TVM would have captured it; regions run by other VMs go to TVM's builtin.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator, Sequence

import tvm
import tvm_ffi

CHECK_KERNEL = "fingerprint_check_kernel"
SKIPPED_ON_HIT = frozenset({"scoring_kernel", "scoring_kernel_1", "scoring_kernel_2", "topk_kernel",
                            "topk_kernel_1", "topk_kernel_2", "topk_kernel_3", "topk_kernel_4"})
SELECT_FUNCTION = "decode_select"  # a decode step beyond the budget: one whole-step graph (compile/pipeline.py)
_BUILTIN = "vm.builtin.cuda_graph.run_or_capture"
_SET_IF_MISSED = b"tsedge_set_if_missed"  # compile/graph_kernels.py (not imported: it needs no TVM compiler, but nvcc)
_STATE_ROW_BYTES = 16  # state[num_layers, 4] int32: the hit flag of layer l at byte 16 * l

_current = threading.local()  # the ConditionalGraphs of the VM call running on this thread, if any
_tvm_run_or_capture = None


def hit_groups(names: Sequence[str | None], num_layers: int) -> list[tuple[int, int]]:
    """``[start, end)`` positions of the kernels a Selection Cache hit skips, one range a layer:
    the run of ``SKIPPED_ON_HIT`` kernels right after each ``CHECK_KERNEL``, followed by a node.

    ``names``: the nodes of a captured step in order (None for a node that is no kernel).
    Raises ValueError unless there is one such non-empty run for each of the ``num_layers``."""
    groups = []
    for i, name in enumerate(names):
        if name != CHECK_KERNEL:
            continue
        end = i + 1
        while end < len(names) and names[end] in SKIPPED_ON_HIT:
            end += 1
        if end == i + 1 or end == len(names):
            raise ValueError(f"no skippable kernels between the selection check at node {i} and a next node")
        groups.append((i + 1, end))
    if len(groups) != num_layers:
        raise ValueError(f"{len(groups)} selection checks in the captured step, expected {num_layers}")
    return groups


def _ok(result):
    """cuda-bindings calls return ``(error, *values)``: raise RuntimeError on an error, else the
    value (or the tuple of them)."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {err!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _run_or_capture(vm, capture_func, args, entry_index, *shape):
    graphs = getattr(_current, "graphs", None)
    if graphs is None:
        return _tvm_run_or_capture(vm, capture_func, args, entry_index, *shape)
    return graphs.run_or_capture(vm, capture_func, args, (int(entry_index), tuple(int(s) for s in shape[0]) if shape else ()))


def install() -> None:
    """Route TVM's CUDA-graph builtin through this module (regions of VMs made afterwards; calls
    outside ``ConditionalGraphs.active`` still go to TVM's own). Idempotent."""
    global _tvm_run_or_capture
    if _tvm_run_or_capture is None:
        _tvm_run_or_capture = tvm.get_global_func(_BUILTIN)
        tvm_ffi.register_global_func(_BUILTIN, _run_or_capture, override=True)


class ConditionalGraphs:
    """The captured decode steps of one Engine, with each layer's hit-skipped kernels in an IF node.

    ``cubin``: the library's ``graph_kernels`` (base64); ``hit_flags``: the policy's
    ``sel_state[num_layers, 4]`` int32 on the device (its column 0 is the layer's hit flag).
    Raises ImportError without cuda-bindings."""

    def __init__(self, cubin: str, hit_flags: tvm.runtime.Tensor, num_layers: int,
                 device: tvm.runtime.Device) -> None:
        from cuda.bindings import driver, runtime

        self.cu, self.rt = driver, runtime
        self.image = base64.b64decode(cubin)
        self.hit_flags, self.num_layers, self.device = hit_flags, num_layers, device
        self.entries: dict[tuple, tuple] = {}  # (entry index, shape) -> (outputs, graph exec)
        self.set_func = None  # loaded at the first capture, where TVM's context is current
        self.skipped_nodes = 0  # kernel nodes moved into IF bodies (over all captures)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """VM calls inside run their captured regions through this object."""
        _current.graphs = self
        try:
            yield
        finally:
            _current.graphs = None

    def run_or_capture(self, vm, capture_func, args, key: tuple):
        if key in self.entries:
            outputs, graph_exec = self.entries[key]
            _ok(self.rt.cudaGraphLaunch(graph_exec, tvm_ffi.get_raw_stream(self.device)))
            return outputs
        invoke = tvm.get_global_func("vm.builtin.invoke_closure")
        invoke(vm, capture_func, *args)  # warm-up: module loading, kernel attributes (as TVM does)
        stream = _ok(self.rt.cudaStreamCreate())
        with tvm_ffi.use_raw_stream(self.device, int(stream)):
            _ok(self.rt.cudaStreamBeginCapture(stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            try:
                outputs = invoke(vm, capture_func, *args)
            finally:
                graph = _ok(self.rt.cudaStreamEndCapture(stream))
        _ok(self.rt.cudaStreamDestroy(stream))
        try:
            self._skip_on_hit(graph)
        except ValueError as err:  # not TokenSelect's step as expected: the graph as TVM captures it
            print(f"note: Selection Cache hits still launch scoring and top-k ({err})", file=sys.stderr)
        graph_exec = _ok(self.rt.cudaGraphInstantiate(graph, 0))
        _ok(self.rt.cudaGraphDestroy(graph))
        self.entries[key] = (outputs, graph_exec)
        return outputs

    def _chain(self, graph) -> list:
        """The graph's nodes in order; ValueError unless they form one chain (a one-stream capture)."""
        cu = self.cu
        count = _ok(cu.cuGraphGetNodes(graph, 0))[1]
        nodes = _ok(cu.cuGraphGetNodes(graph, count))[0]
        edges = _ok(cu.cuGraphGetEdges(graph, 0))[-1]
        sources, targets = _ok(cu.cuGraphGetEdges(graph, edges))[:2]
        after = {int(a): b for a, b in zip(sources, targets)}
        if len(after) != len(sources) or len({int(b) for b in targets}) != len(targets):
            raise ValueError("the captured step is not one chain of nodes")
        roots = [n for n in nodes if int(n) not in {int(b) for b in targets}]
        if len(roots) != 1:
            raise ValueError("the captured step is not one chain of nodes")
        order = [roots[0]]
        while int(order[-1]) in after:
            order.append(after[int(order[-1])])
        if len(order) != len(nodes):
            raise ValueError("the captured step is not one chain of nodes")
        return order

    def _kernel_name(self, node) -> str | None:
        cu = self.cu
        if _ok(cu.cuGraphNodeGetType(node)) != cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
            return None
        return _ok(cu.cuFuncGetName(_ok(cu.cuGraphKernelNodeGetParams(node)).func)).decode()

    def _skip_on_hit(self, graph) -> None:
        """Each layer: check → set(IF handle from the hit flag) → IF[skippable kernels] → next."""
        cu = self.cu
        order = self._chain(graph)
        groups = hit_groups([self._kernel_name(n) for n in order], self.num_layers)
        ctx = _ok(cu.cuCtxGetCurrent())
        if self.set_func is None:
            module = _ok(cu.cuModuleLoadData(self.image))
            self.set_func = _ok(cu.cuModuleGetFunction(module, _SET_IF_MISSED))
        for layer, (start, end) in enumerate(groups):
            handle = _ok(cu.cuGraphConditionalHandleCreate(graph, ctx, 0, 0))
            setter = cu.CUDA_KERNEL_NODE_PARAMS()
            setter.func = self.set_func
            setter.gridDimX = setter.gridDimY = setter.gridDimZ = 1
            setter.blockDimX = setter.blockDimY = setter.blockDimZ = 1
            setter.sharedMemBytes = 0
            setter.kernelParams = ((int(handle), self.hit_flags.data_ptr() + _STATE_ROW_BYTES * layer),
                                   (ctypes.c_uint64, ctypes.c_void_p))
            set_node = _ok(cu.cuGraphAddKernelNode(graph, [order[start - 1]], 1, setter))
            params = cu.CUgraphNodeParams()
            params.type = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
            params.conditional.handle = handle
            params.conditional.type = cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
            params.conditional.size = 1
            params.conditional.ctx = ctx
            if_node = _ok(cu.cuGraphAddNode(graph, [set_node], None, 1, params))
            body, previous = params.conditional.phGraph_out[0], None
            for node in order[start:end]:  # copies in the IF body (arguments are copied by value)
                kernel = _ok(cu.cuGraphKernelNodeGetParams(node))
                previous = _ok(cu.cuGraphAddKernelNode(body, [previous] if previous else None,
                                                       1 if previous else 0, kernel))
            for node in order[start:end]:
                _ok(cu.cuGraphDestroyNode(node))
            _ok(cu.cuGraphAddDependencies(graph, [if_node], [order[end]], None, 1))
            self.skipped_nodes += end - start
