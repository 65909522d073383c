"""The one ONNX Runtime session loader, with the measured defaults.

Every ONNX Runtime session in clipfuse (the runtime's backends, export validation, fp16 and int8
validation, the bench's profiler) is made here, so a setting measured once applies everywhere.

CPU defaults: sequential execution with ORT's own intra-op thread count (one per physical core);
ORT_PARALLEL's inter-op pool competes with the intra-op one for the same cores. Graph optimisation
level ALL. `spinning=False` stops idle intra-op threads from spinning; it gained nothing for predict,
so it is left to ORT unless asked. The measurements: docs/decisions.md, "ONNX Runtime CPU session
settings" (benchmarks/results/runtime_thin.md).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from clipfuse.core.errors import ClipfuseError

from ..manifest import Manifest, rebuild_hint

CPU = "CPUExecutionProvider"


def import_onnxruntime():
    """onnxruntime, or ClipfuseError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ClipfuseError("onnxruntime is not installed: pip install onnxruntime "
                            "(or onnxruntime-gpu for the CUDA and TensorRT execution providers)") from None
    return onnxruntime


MAX_THREADS_PER_CPU = 4     # a bound on --threads: past a few per core they only cost (measured: 1000 threads, 30 s for one image)


def check_threads(threads, label: str = "--threads") -> int | None:
    """threads as given (None: the backend's default), or ClipfuseError when it is not a count in
    1..4 x the CPUs: every thread is created up front, so a huge count stalls before any work is done."""
    if threads is None:
        return None
    cpus = os.cpu_count() or 1
    bound = MAX_THREADS_PER_CPU * cpus
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= bound:
        raise ClipfuseError(f"{label} {threads!r} is outside 1..{bound} ({MAX_THREADS_PER_CPU} x this machine's "
                            f"{cpus} CPUs); give at most {bound}, or leave it out for the measured default")
    return threads


def session_options(threads: int | None = None, parallel: bool = False, spinning: bool | None = None,
                    optimized_path: str | os.PathLike | None = None, profile_prefix: str | None = None,
                    optimization: str = "all", arena: bool = True):
    """SessionOptions with clipfuse's measured defaults (see the module docstring).

    threads: intra-op threads (None: ORT's default, one per physical core); parallel: ORT_PARALLEL
    (measured slower here); spinning: None leaves ORT's default; optimized_path: where ORT writes
    the optimised graph; profile_prefix: turn on ORT's profiler with this file prefix;
    optimization: "all" | "basic" | "none"; arena: False turns ONNX Runtime's CPU memory arena off, so a
    session gives a run's activations back after it instead of holding its peak (the bench's batch-32 run
    of the nine: every configuration's worker is alive at once, and the fp32 one alone peaks near 15 GB).
    """
    ort = import_onnxruntime()
    check_threads(threads, "threads")
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so = ort.SessionOptions()
    so.log_severity_level = 3           # ORT's warnings are about its internals; ours name the cause
    so.graph_optimization_level = levels[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = threads
    if not arena:
        so.enable_cpu_mem_arena = False
    if spinning is not None:            # idle intra-op threads spin by default, taking cores from decoders
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return so


def open_session(path: str | os.PathLike, options=None, providers=(CPU,), hint: str = "", **option_kw):
    """An InferenceSession on `path` (CPU by default), or ClipfuseError naming the file and the cause.

    options: a SessionOptions (default: session_options(**option_kw)); providers: as ONNX Runtime
    takes them (names or (name, options) pairs); hint: what to do if the graph cannot be loaded.
    """
    ort = import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise ClipfuseError(f"ONNX file {str(path)!r} does not exist{'; ' + hint if hint else ''}")
    so = options if options is not None else session_options(**option_kw)
    try:
        with warnings.catch_warnings():   # ORT warns of a missing provider and falls back; callers check
            warnings.simplefilter("ignore")
            return ort.InferenceSession(str(path), so, providers=list(providers))
    except Exception as e:      # ORT raises its own pybind exception types for a bad graph
        raise ClipfuseError(f"onnxruntime {ort.__version__} cannot load {str(path)!r}: "
                            f"{type(e).__name__}: {str(e)[:300]}{'. ' + hint if hint else ''}") from None


def onnxruntime_max_opset() -> int | None:
    """The highest ai.onnx opset the installed onnxruntime implements, from its operator schemas;
    None where this build does not expose them (then loading the graph is the test)."""
    try:
        from onnxruntime.capi import _pybind_state as C

        return max(s.since_version for s in C.get_all_operator_schema() if s.domain in ("", "ai.onnx"))
    except Exception:       # a minimal build without schemas, or a renamed private module
        return None


def check_onnxruntime_can_run(manifest: Manifest, max_opset: int | None = None) -> None:
    """Refuse, before loading, a graph whose opset the installed onnxruntime does not implement."""
    opset = manifest.data.get("onnx", {}).get("opset")
    if max_opset is None:
        max_opset = onnxruntime_max_opset()
    if opset is None or max_opset is None or int(opset) <= max_opset:
        return
    import onnxruntime

    raise ClipfuseError(f"engine {str(manifest.folder)!r} is an opset {opset} graph; the installed onnxruntime "
                        f"{onnxruntime.__version__} implements opsets up to {max_opset}. Upgrade onnxruntime "
                        f"(pip install -U onnxruntime), or rebuild the engine for it: "
                        f"{rebuild_hint(manifest)[:-1]} --opset {max(17, min(max_opset, 18))}`")
