"""Machine probes for the bench: the load other processes put on the CPUs, the fp32 matmul peak the
achieved GFLOP/s are compared with, device memory (NVML), a process's peak RSS, and heap trimming."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from clipfuse.runtime.backends.registry import nvidia_gpu_visible


def timed(fn) -> float:
    """Seconds one call of fn takes (wall clock)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak_gflops(n: int = 2048, tries: int = 5) -> dict:
    """This machine's fp32 matrix-multiply rate, all cores, best of a few, through numpy's BLAS and
    (when installed) torch's: the ceiling the achieved GFLOP/s are compared with is the faster one."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    fns = {"numpy": lambda: a @ b}
    if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: ta @ tb
    rates = {}
    for name, fn in fns.items():
        fn()
        rates[name] = 2.0 * n ** 3 / min(timed(fn) for _ in range(tries)) / 1e9
    return {"gflops_per_s": max(rates.values()), "by_library": rates, "n": n, "tries": tries}


def gpu_memory() -> dict | None:
    """Device memory in use per GPU through NVML, or None where no NVIDIA GPU / pynvml is present."""

    if not nvidia_gpu_visible():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        return {i: pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                for i in range(pynvml.nvmlDeviceGetCount())}
    finally:
        pynvml.nvmlShutdown()


def vm_hwm() -> int:
    """Peak RSS of this process. Not ru_maxrss: Linux keeps that across execve, so a child of a big
    parent would report the parent's peak; VmHWM belongs to the new address space."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # elsewhere: the best there is


def malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): with the nine-backbone sessions
    closed, the bench process still held ~12 GB while the memory processes needed room beside it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
