"""TVM's CPU thread pool gets one thread per usable physical core (tsedge/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tsedge.threads import physical_cores, use_physical_cores


def test_physical_cores_within_the_affinity_mask():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_an_explicit_setting_wins(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    assert use_physical_cores() == 3


def test_engine_import_sizes_tvms_pool():
    """A fresh interpreter: importing the engine sets the pool before TVM starts it (TVM alone
    would take half the logical CPUs)."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = ("import tsedge.engine, tvm; from tsedge.threads import physical_cores; "
            "print(tvm.get_global_func('runtime.NumThreads')(), physical_cores())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    pool, cores = out.stdout.split()
    assert pool == cores
