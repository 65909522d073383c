"""The bench's orchestration: what fusing K backbones costs, side by side, and what it buys.

    from clipfuse.bench import run_bench
    result = run_bench("engines/NAME", batches=(1, 8), runs=5, out="engines/NAME/bench")

Configurations (clipfuse.bench.configs), interleaved (every round runs each configuration once per
batch size, A B C A B C ...) so that drift and a busy neighbour hit all alike: fused, each single,
their per-round sum, the naive ensemble and PyTorch eager.

Figures: latency p50/p90/p99 and min-max per batch size, throughput, GFLOPs (from the manifest)
and achieved GFLOP/s against this machine's measured fp32 matmul peak, peak host memory per
configuration in a separate process each, device memory through NVML where a GPU exists, the
share of the fused time spent in the controller + combination (ONNX Runtime profiler), accuracy
per method when labelled data is given, and the CPU time other processes took meanwhile.
Writes bench.json, bench.md and (with data) bench.png: accuracy against latency, Pareto front marked.
No timing is asserted anywhere: the numbers are reported, never tested.

Each configuration group (fused; the singles and the naive ensemble; PyTorch eager) lives in its own
worker process (clipfuse.bench.worker), and the parent waits `settle` seconds (default 50 ms) before
each timed call. Both because an idle runtime does not leave the cores alone: ONNX Runtime's intra-op threads and
PyTorch's OpenMP threads spin after a run, so timed back to back in one process the configuration that
ran next paid for it (measured: docs/decisions.md, "The bench").
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.export.graph.engine_folder import check_writable_folder
from clipfuse.runtime.backends.registry import unavailable_reason
from clipfuse.runtime.cascade import int8_stages, is_cascade
from clipfuse.runtime.cpu_load import LoadProbe
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.precisions import with_precision

from .cascade_exits import bench_cascade
from .configs import SINGLES, config_label, ensure_singles, precision_configs
from .probes import gpu_memory, malloc_trim, matmul_peak_gflops
from .profile import profile_overhead
from .report import write_outputs
from .worker import TimingWorker, measure_memory, worker_groups


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def ratio_stats(a, b) -> dict:
    """Per-round ratios a_r / b_r (both measured in the same round): median and min-max."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": float(statistics.median(r)), "min": float(min(r)), "max": float(max(r)), "n": len(r)}


def run_bench(engine, data=None, batches=(1, 8), runs: int = 5, warmup: int = 1, out=None, backend: str = "onnxruntime",
              threads: int | None = None, torch: bool = True, memory: bool = True, profile: bool = True,
              classes=None, command: str | None = None, stem: str = "bench",
              memory_batch: int | None = None, memory_infers: int = 2, settle: float = 0.05,
              precisions=("fp32",), openvino=False, singles: bool = True, arena: bool = True,
              include_fit_images: bool = False) -> dict:
    """Benchmark an engine folder against its single backbones, the naive ensemble and PyTorch eager.

    engine: engine folder; data: labelled folder (DATA/<class>/<images>) for accuracy per method;
    batches: batch sizes; runs: timed rounds (each configuration runs once per batch per round, after
    `warmup` untimed rounds); out: folder for bench.json / bench.md / bench.png (default <engine>/bench);
    backend: "onnxruntime" (CPU; the only one whose singles and naive ensemble are built here);
    torch / memory / profile: include PyTorch eager, the per-configuration memory processes, the
    controller-overhead profile; memory_batch / memory_infers: batch size (default the largest <= 8) and
    inferences of each memory process; settle: seconds of rest before each timed call (see the module
    docstring); precisions: the fused graph's precisions side by side (fp32, fp16, int8: ONNX Runtime CPU,
    one worker each); openvino: also each precision on OpenVINO's CPU plugin (True), or only the precisions
    listed; singles: also each backbone
    alone, their sum and the naive ensemble (False: the fused graph's precisions and PyTorch only, for an
    ensemble whose singles were measured before and cost as much again); arena: False turns ONNX Runtime's
    CPU memory arena off in the timing workers, so each holds its weights between calls and not its peak
    (the nine at batch 32 on a 24 GB machine); include_fit_images: also score the --data images the engine
    was fitted on (left out by default, and counted: runtime/fit_images.py). Returns the result dict (also
    written as JSON)."""
    from clipfuse.export.fit.evaluate import eval_engine

    if backend == "torch-cuda":     # the GPU levers side by side (clipfuse/bench/gpu.py); imports torch
        from .gpu import bench_torch_cuda

        gpu_precisions = tuple(p for p in precisions if p != "int8") or ("fp32",)
        if "int8" in precisions:
            raise ClipfuseError("--backend torch-cuda benches fp32 and fp16; int8 runs on onnxruntime, openvino or "
                                "tensorrt")
        return bench_torch_cuda(engine, batches=batches, runs=runs, warmup=max(warmup, 1),
                                precisions=gpu_precisions if precisions != ("fp32",) else ("fp32", "fp16"),
                                out=out, stem=stem if stem != "bench" else "bench_gpu", command=command)
    if backend != "onnxruntime":
        raise ClipfuseError(f"--backend {backend!r}: the side-by-side bench runs on ONNX Runtime CPU (onnxruntime) "
                            "or, on a CUDA GPU, torch-cuda's levers (torch-cuda); others are measured by their own "
                            "issue's tools")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ClipfuseError(f"--batch needs positive batch sizes, got {batches}")
    if runs < 1:
        raise ClipfuseError(f"--runs must be at least 1, got {runs}")
    if not 0 <= settle <= 10:
        raise ClipfuseError(f"settle must be between 0 and 10 seconds, got {settle}")
    bad = [p for p in precisions if p not in ("fp32", "fp16", "int8")]
    if bad or not precisions:
        raise ClipfuseError(f"--precisions {','.join(precisions)}: valid are fp32, fp16, int8")
    t_start = time.perf_counter()
    m = read_manifest(engine)
    extra = precision_configs(precisions, openvino)

    for p in precisions:
        with_precision(m, p)            # refuse a missing graph now, not after minutes of singles and peaks
    if openvino and unavailable_reason("openvino"):
        raise ClipfuseError(unavailable_reason("openvino"))
    # results, and the singles with them under --out, go where they can be written: checked before the work
    singles_root = Path(out) / SINGLES if out else None
    out = check_writable_folder(Path(out) if out else m.folder / "bench",
                                "bench results folder" + ("" if singles_root else " (pass --out to write elsewhere)"))
    K = len(m.backbones)
    names = m.backbone_names
    single_ms, reused = ensure_singles(m, singles_root) if singles else (None, None)
    single_dirs = [s.folder for s in single_ms] if singles else None

    import onnxruntime

    log("measuring this machine's fp32 matmul peak", tag="bench")
    peak_info = matmul_peak_gflops()
    peak = peak_info["gflops_per_s"]
    malloc_trim()                       # exporting the singles may have left GBs in this process's heap
    gpu_before = gpu_memory()
    groups = worker_groups(K, torch)
    if not singles:
        groups = [g for g in groups if "naive" not in g]
    groups = groups[:1] + [[c] for c in extra] + groups[1:]      # each precision x backend alone in its worker
    order_run = [c for g in groups for c in g]
    pool: list[TimingWorker] = []
    workers: dict[str, TimingWorker] = {}
    try:
        for group in groups:
            log(f"opening {', '.join(group)} in a worker process"
                + (" (PyTorch rebuilds the backbones)" if group == ["torch"] else ""), tag="bench")
            pool.append(TimingWorker(m.folder, group, batches, threads, arena=arena, singles=single_dirs))
            workers.update({c: pool[-1] for c in group})

        # The naive ensemble must compute what the fused graph computes; a bench of a wrong thing is worthless.
        check = {c: workers[c].logits(c, batches[0]) for c in ("fused", "naive", "torch", *extra) if c in workers}
        ref = check["fused"]
        agreement = {c: float(np.abs(v - ref).max() / max(1e-12, np.abs(ref).max())) for c, v in check.items()}
        if agreement.get("naive", 0.0) > 1e-3:
            raise ClipfuseError(f"the naive ensemble's logits differ from the fused graph's by {agreement['naive']:.1e} "
                                f"(relative): the singles in {', '.join(sorted({repr(str(Path(d).parent)) for d in single_dirs}))} "
                                "do not match; delete that folder")

        times = {(c, bs): [] for c in order_run for bs in batches}
        load = LoadProbe(pids=[w.pid for w in pool])
        for r in range(warmup + runs):
            t_round = time.perf_counter()
            for bs in batches:
                for c in order_run:
                    if settle:
                        time.sleep(settle)       # let the last runtime's spinning threads go idle
                    dt = workers[c].time(c, bs)
                    if r >= warmup:
                        times[(c, bs)].append(dt)
            what = "warm-up" if r < warmup else f"round {r - warmup + 1}/{runs}"
            log(f"{what} done in {time.perf_counter() - t_round:.1f} s", tag="bench")
        timing_load = load.stop()
        gpu_after = gpu_memory()
    finally:
        for w in pool:                   # free the sessions before the memory processes load theirs
            w.close()
    for bs in batches if singles else ():
        n = len(times[("fused", bs)])
        times[("sum", bs)] = [sum(times[(f"single:{k}", bs)][i] for k in range(K)) for i in range(n)]
    single_configs = [f"single:{k}" for k in range(K)] if singles else []

    labels = {"fused": "fused (ONNX Runtime)", "sum": "sum of singles", "naive": "naive (K sessions + numpy)",
              "torch": "PyTorch eager"}
    labels.update({f"single:{k}": f"single {names[k]}" for k in range(K)})
    labels.update({c: config_label(c) for c in extra})
    order = ["fused", *extra, *single_configs, *(["sum", "naive"] if singles else [])] + (["torch"] if torch else [])
    gflops = {c: sum(b["gflops"] for b in m.backbones) for c in ("fused", "sum", "naive", "torch", *extra)}
    gflops.update({f"single:{k}": m.backbones[k]["gflops"] for k in range(K)})
    latency = {}
    for c in order:
        latency[c] = {}
        for bs in batches:
            ts = times[(c, bs)]
            s = stats([t * 1e3 for t in ts])
            latency[c][str(bs)] = {"latency_ms": s, "images_per_s": bs / (s["p50"] / 1e3),
                                   "gflops": gflops[c] * bs, "achieved_gflops_per_s": gflops[c] * bs / (s["p50"] / 1e3),
                                   "pct_of_matmul_peak": 100.0 * gflops[c] * bs / (s["p50"] / 1e3) / peak}
    targets = {"fused_over_sum": {str(bs): ratio_stats(times[("fused", bs)], times[("sum", bs)]) for bs in batches},
               "naive_over_fused": {str(bs): ratio_stats(times[("naive", bs)], times[("fused", bs)]) for bs in batches}
               } if singles else {}
    for c in extra:          # each precision x backend against ONNX Runtime fp32, per round
        targets[f"{c}_over_fused"] = {str(bs): ratio_stats(times[(c, bs)], times[("fused", bs)]) for bs in batches}
        if torch:
            targets[f"torch_over_{c}"] = {str(bs): ratio_stats(times[("torch", bs)], times[(c, bs)]) for bs in batches}
    if torch:
        targets["torch_over_fused"] = {str(bs): ratio_stats(times[("torch", bs)], times[("fused", bs)]) for bs in batches}
        # The most any graph could gain on eager here: the same FLOPs at 100% of the measured matmul peak.
        targets["torch_over_fused_ceiling"] = {bs: 100.0 / x["pct_of_matmul_peak"] for bs, x in latency["torch"].items()}

    overhead = None
    if profile:
        log("profiling the fused graph: controller + combination", tag="bench")
        overhead = profile_overhead(m, batches[0], max(3, min(runs, 10)), threads)
        overhead["fused_p50_ms"] = latency["fused"][str(batches[0])]["latency_ms"]["p50"]
        overhead["pct_of_fused_p50"] = 100.0 * overhead["controller_combination_ms"] / overhead["fused_p50_ms"]

    mem = {}
    if memory:
        mem_load = LoadProbe()
        bs = memory_batch or (max(b for b in batches if b <= 8) if any(b <= 8 for b in batches) else batches[0])
        for c in ["fused", *extra, *single_configs, *(["naive"] if singles else [])] + (["torch"] if torch else []):
            log(f"peak memory: {labels[c]} in its own process (batch {bs})", tag="bench")
            mem[c] = measure_memory(m.folder, c, bs, threads, infers=memory_infers, singles=single_dirs)
        if singles:
            for key in ("peak_rss_bytes", "net_peak_bytes"):
                mem.setdefault("sum", {"config": "sum", "batch": bs})[key] = sum(mem[f"single:{k}"][key]
                                                                                for k in range(K))
            targets["fused_memory_over_sum"] = {k: mem["fused"][k] / mem["sum"][k]
                                                for k in ("peak_rss_bytes", "net_peak_bytes")}
        mem_load = mem_load.stop()
    accuracy = None
    if data is not None:

        log(f"accuracy on {data}", tag="bench")
        ev = eval_engine(m.folder, data, classes=classes, include_fit_images=include_fit_images)
        accuracy = {"data": str(data), "num_images": ev["num_images"], "methods": ev["accuracy"],
                    "fit_images": ev["fit_images"], "fit_images_line": ev["fit_images_line"]}

    cascade = cascade_int8 = None
    if is_cascade(m):               # over the real distribution of exits: needs labelled images
        if data is None:
            log("cascade engine: pass --data to measure the cascade over real images (exits depend on them)",
                tag="bench")
        else:

            cascade_batches = [b for b in batches if b in (1, 8)] or batches[:1]
            cascade = bench_cascade(m, data, batches=cascade_batches, threads=threads, classes=classes,
                                    settle=settle, include_fit_images=include_fit_images)
            if "int8" in precisions:        # the int8 stages, when the int8 export certified them

                try:
                    int8_stages(m)
                except ClipfuseError as e:
                    log(f"cascade: no int8 stages to measure ({e})", tag="bench")
                else:
                    cascade_int8 = bench_cascade(m, data, batches=cascade_batches, threads=threads, classes=classes,
                                                 settle=settle, precision="int8",
                                                 include_fit_images=include_fit_images)

    result = {
        "command": command, "engine": str(m.folder), "backbones": names, "classes": len(m.classes),
        "controller": m.data.get("controller", {}).get("kind"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "numpy": np.__version__, "matmul_peak_gflops": peak, "matmul_peak": peak_info},
        "precisions": {"configs": extra, "files": {c: _graph_file(m, c) for c in ["fused", *extra]},
                       "file_bytes": {c: _graph_bytes(m, c) for c in ["fused", *extra]}},
        "settings": {"batches": batches, "runs": runs, "warmup": warmup, "ort_threads": threads or "default",
                     "ort_execution_mode": "sequential", "torch_threads": threads or os.cpu_count(),
                     "ort_cpu_arena": arena,
                     "processes": groups, "settle_s": settle,
                     "note": "ORT CPU defaults as measured in benchmarks/results/runtime_thin.md"},
        "singles_cache_reused": reused, "agreement_with_fused_rel": agreement,
        "order": order, "labels": labels, "latency": latency, "targets": targets, "overhead": overhead,
        "memory": mem or None, "device_memory": {"before": gpu_before, "after": gpu_after} if gpu_before else None,
        "accuracy": accuracy, "cascade": cascade, "cascade_int8": cascade_int8,
        "load": {"timing": timing_load, **({"memory": mem_load} if memory else {})},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if openvino:
        import openvino as _ov

        result["machine"]["openvino"] = _ov.__version__
    paths = write_outputs(result, out, stem)
    log("wrote " + ", ".join(str(p) for p in paths.values()), tag="bench")
    return result


def _graph_file(m, config: str) -> str:
    p = config.rsplit("-", 1)[1] if config.endswith(("-fp16", "-int8")) else "fp32"
    return with_precision(m, p).onnx_path.name


def _graph_bytes(m, config: str) -> int:
    """The graph file's size plus its external data: what a precision costs on disk."""

    p = config.rsplit("-", 1)[1] if config.endswith(("-fp16", "-int8")) else "fp32"
    g = with_precision(m, p)
    data = g.data["onnx"].get("external_data")
    names = [g.onnx_path.name] + ([data] if isinstance(data, str) else list(data or []))
    return sum((m.folder / n).stat().st_size for n in names if (m.folder / n).is_file())
