"""CPU threads for torch. When the API and a worker share a machine, each one's OpenMP pool sized to every core
oversubscribes it: on 2 cores a tiny op went from 35 us to 5 ms. `UNSLOTH_TORCH_THREADS` sets a process's pool;
`unsloth serve` splits the cores between its two processes when it is not set."""

from __future__ import annotations

import os
import sys

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_count() -> int:
    """Cores this process may run on (its affinity, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def embedded_split(cpus: int) -> tuple[int, int]:
    """(API threads, worker threads) for one machine running both: the worker trains, so it gets most cores; the
    API's generations get a quarter (at least one). Their sum never exceeds the cores."""
    api = max(1, cpus // 4)
    return api, max(1, cpus - api)


def apply_torch_threads(threads: int | None) -> None:
    """Size this process's thread pools: the OpenMP/MKL variables (read when torch loads, and inherited by child
    processes), and torch itself if it is already loaded. None leaves the defaults."""
    if threads is None:
        return
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
