"""Conditional CUDA graphs for Selection Cache hits: which captured kernels go into each layer's IF
body (tsedge/cuda_graphs.py), and the device-linked kernel that sets it (compile/graph_kernels.py).
The graph rewrite itself runs on the GPU: bench/device/hit_graphs.py (bench/results/hit_graphs_tokenselect_h200.json)."""

from __future__ import annotations

import base64
import shutil

import pytest

from tsedge.compile.graph_kernels import SET_IF_MISSED, build_graph_kernels, supports_graph_kernels
from tsedge.cuda_graphs import CHECK_KERNEL, hit_groups

LAYER = [CHECK_KERNEL, "scoring_kernel", "scoring_kernel_1", "scoring_kernel_2", "topk_kernel", "topk_kernel_1",
         "topk_kernel_2", "topk_kernel_3", "topk_kernel_4", "topk_kernel_5", "attention_decode_kernel",
         "attention_merge_kernel", "decode_gemv_none_residual_4096x4096_kernel"]


def test_one_group_per_layer_between_the_check_and_the_rows_pass():
    names = ["decode_gemv_rmsnorm_none_6144x4096_kernel", "kv_append_kernel"] + LAYER * 3 + [None, "sample_kernel"]
    groups = hit_groups(names, 3)
    assert groups == [(3, 11), (16, 24), (29, 37)]
    for start, end in groups:
        assert names[start - 1] == CHECK_KERNEL and names[end] == "topk_kernel_5"
        assert all(name.startswith(("scoring", "topk")) for name in names[start:end])


def test_a_layer_count_that_disagrees_is_refused():
    with pytest.raises(ValueError, match="2 selection checks in the captured step, expected 3"):
        hit_groups(LAYER * 2, 3)


def test_a_check_without_skippable_kernels_after_it_is_refused():
    with pytest.raises(ValueError, match="no skippable kernels"):
        hit_groups([CHECK_KERNEL, "attention_decode_kernel"], 1)
    with pytest.raises(ValueError, match="no skippable kernels"):  # nothing after the group
        hit_groups([CHECK_KERNEL, "scoring_kernel"], 1)


def test_archs_with_device_set_conditionals():
    assert supports_graph_kernels("sm_90a") and supports_graph_kernels("sm_100")
    assert not supports_graph_kernels("sm_80") and not supports_graph_kernels("sm_89")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_the_set_kernel_is_device_linked_with_cudadevrt():
    cubin = base64.b64decode(build_graph_kernels("sm_90a"))
    assert cubin[:4] == b"\x7fELF"  # a cubin, loadable by cuModuleLoadData
    assert SET_IF_MISSED.encode() in cubin
    assert int.from_bytes(cubin[16:18], "little") == 2  # ELF ET_EXEC: device-linked, not a relocatable object
