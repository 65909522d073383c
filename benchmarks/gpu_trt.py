"""The TensorRT part of benchmarks/gpu_check.py: export the fused graph, build plans with 0 and 4 auxiliary
streams (export/precision/trt_plan.py), time them through the native backend; or say why it skipped."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from clipfuse.bench.gpu import summary


def tensorrt_part(built, heads, classes, templates, torch, device, batches, rounds, iters, warmup) -> dict:
    """Export the fused graph, build plans with 0 and 4 aux streams, time them; skip with the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return {"skipped": f"tensorrt does not import here ({e}); the TensorRT part needs pip install "
                           "'clipfuse[tensorrt]' on this GPU machine"}
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    from clipfuse.export.graph.engine import export_engine
    from clipfuse.export.precision.trt_plan import build_engine
    from clipfuse.runtime.backends.registry import open_backend

    out = {"tensorrt": tensorrt.__version__, "plans": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpu-check"
        for b in built:           # the exporter traces on the CPU; the timings above are done with these towers
            b.model.cpu()
        # the towers are already image-only (text towers dropped): pass the zero-shot heads made above
        export_engine([b for b in built], classes, folder, templates=templates, heads=heads)
        cache = Path(tmp) / "timing.cache"
        rng = __import__("numpy").random.default_rng(0)
        for aux in (0, 4):
            t = time.perf_counter()
            info = build_engine(folder, "fp32", batch=(1, 8, max(batches)), aux_streams=aux, timing_cache=cache)
            build_s = time.perf_counter() - t
            backend = open_backend(folder, "tensorrt")
            for bs in batches:
                feed = {i["name"]: rng.integers(0, 256, (bs, 3, i["shape"][2], i["shape"][3]), dtype="uint8")
                        for i in backend.manifest.inputs}
                for _ in range(warmup):
                    backend.infer(feed)
                ts = []
                for _ in range(rounds * iters):
                    s = time.perf_counter()
                    backend.infer(feed)            # host-to-device + run + device-to-host
                    ts.append((time.perf_counter() - s) * 1e3)
                out["plans"].append({"aux_streams": aux, "batch": bs, "build_s": round(build_s, 1),
                                     "latency_ms_with_copies": summary(ts), "plan": info})
            backend.close()
    return out
