"""How many threads torch uses on the CPU: what the machine can give this process, not every core it has.

torch starts one intra-op thread per physical core and its OpenMP threads spin while they wait for each other. When
other processes (another engine, the eval sandbox, a build) hold some of the cores, every parallel region waits for
its slowest thread: on a busy 2-core machine one generate took 13.1 s with the default and 2.3 s with one thread.
So, unless the user chose (`OMP_NUM_THREADS`, honoured as it is), dllm sets the count once per process to the
cores this process may run on (affinity mask, cgroup CPU quota) less those already busy (the 1-minute load
average), at least one. `torch.set_num_threads` after building an `LLM` overrides it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_configured = False


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cores, quota)) if quota else max(1, cores)


def _cgroup_quota(path: Path) -> int | None:
    try:
        limit, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(1, int(limit) // int(period))


def choose_threads(cores: int, busy: float, default: int) -> int:
    """Threads for a machine with `cores` usable cores of which `busy` are in use, never above torch's default."""
    return max(1, min(default, cores, int(cores - busy + 0.5)))


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads once per process (see the module docstring); return the count in use."""
    global _configured
    if _configured:
        return torch.get_num_threads()
    _configured = True
    if os.environ.get("OMP_NUM_THREADS"):   # the user's choice; torch read it when it started
        logger.info("using %d CPU thread(s) (OMP_NUM_THREADS)", torch.get_num_threads())
        return torch.get_num_threads()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = choose_threads(available_cores(), busy, torch.get_num_threads())
    torch.set_num_threads(threads)
    logger.info("using %d CPU thread(s): %d usable core(s), load %.1f (set OMP_NUM_THREADS to choose)",
                threads, available_cores(), busy)
    return threads
