"""CPU threads for TVM's runtime thread pool.

TVM's default on x86 is half the logical CPUs (it assumes two hyper-threads a core), which on a
machine without SMT — a 2-vCPU VM, for one — runs every CPU kernel on one core. tsedge uses one
thread per physical core this process may run on, unless ``TVM_NUM_THREADS`` is already set.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs in this process's affinity mask (Linux
    sysfs); the mask's size where the topology cannot be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def use_physical_cores() -> int:
    """Set ``TVM_NUM_THREADS`` to ``physical_cores()`` unless it is set; call before TVM's pool
    starts (the first CPU kernel). Returns the thread count in effect."""
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    return int(os.environ["TVM_NUM_THREADS"])
