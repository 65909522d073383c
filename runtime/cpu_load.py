"""What other processes took from the CPUs while we measured: one formula for every timing.

A figure taken beside a busy neighbour must say so. The bench (clipfuse.bench) and the fp16
timing (export/) both report it, through LoadProbe, so "busy" means the same thing everywhere.
Lives in runtime/ (the lowest layer that measures) so that export/ and the application can use it.
"""
from __future__ import annotations

import os
import time


def busy_cpu_seconds(times) -> float:
    """CPU-seconds spent working in a psutil.cpu_times() sample, summed over cores.

    user + nice + system + irq + softirq. Not idle or iowait (waiting); not steal (another virtual
    machine's time, not a process here); not guest/guest_nice, which Linux already counts inside
    user and nice (adding them would count a VM guest twice)."""
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


class LoadProbe:
    """CPU time other processes took between start (construction) and stop() (psutil).

    Our own CPU time (this process and its finished children, os.times) and that of live helper
    processes named by `pids` (e.g. worker processes still running) count as ours."""

    def __init__(self, pids=()):
        import psutil

        self._psutil = psutil
        self._procs = [psutil.Process(p) for p in pids]   # live workers: theirs is our time too
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._own()

    def _busy(self) -> float:
        return busy_cpu_seconds(self._psutil.cpu_times())

    def _own(self) -> float:
        t = os.times()
        workers = 0.0
        for p in self._procs:
            try:
                c = p.cpu_times()
                workers += c.user + c.system
            except self._psutil.Error:      # a worker that ended: its time is in children_* once reaped
                pass
        return t.user + t.system + t.children_user + t.children_system + workers

    def stop(self) -> dict:
        """{wall_s, own_cpu_s, other_processes_cpu_s, other_processes_cores} since construction."""
        wall = time.perf_counter() - self.t
        own = self._own() - self.own
        others = max(0.0, (self._busy() - self.busy) - own)
        return {"wall_s": round(wall, 1), "own_cpu_s": round(own, 1),
                "other_processes_cpu_s": round(others, 1), "other_processes_cores": round(others / wall, 3)}
