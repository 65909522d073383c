"""The bench (application layer): the fused engine against each backbone alone, their sum, the naive
ensemble and PyTorch eager, side by side. One job per module:

    run.py      orchestration: run_bench (rounds, targets, memory, accuracy, the result dict)
    configs.py  what is run: the singles (exported, cached), the numpy controller, the naive ensemble
    worker.py   the child processes: timing workers (JSON-lines protocol) and memory probes
    probes.py   the machine: load of other processes, matmul peak, GPU memory, peak RSS
    profile.py  the controller + combination's share of the fused time (ONNX Runtime profiler)
    report.py   the Markdown tables, verdicts, plot and bench.json / .md / .png

A new bench figure goes into run.py (measured) and report.py (shown). Names are imported lazily so
that a worker process (python -m clipfuse.bench.worker) loads only what it uses.
"""
from __future__ import annotations

_LAZY = {
    "run_bench": "run", "format_table": "report", "write_outputs": "report", "plot_points": "report",
    "verdict": "report", "ensure_singles": "configs", "make_feed": "configs",
    "matmul_peak_gflops": "probes", "timed": "probes",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
