"""The GPU levers, measured side by side: `clipfuse bench ENGINE --backend torch-cuda` and the levers
section of benchmarks/gpu_check.py both run this.

For an ensemble at each batch, one GraphedEnsemble (export/gpu/graphs.py: the code the torch-cuda backend runs)
per configuration, all interleaved round by round, CUDA events around each replay:

    serial      every tower on the capturing stream, one CUDA graph per bucket
    concurrent  one stream per tower inside the graph, joined before the controller
    compiled    concurrent, towers through torch.compile; fp16 where measured (compile costs minutes)
    single      each tower alone (its norm and head), serial graph: the floor concurrency aims at
    backend     concurrent through GraphedEnsemble.infer: pinned host copy in, outputs out (no preprocessing)

plus each configuration's graph pool (allocator bytes above the weights) and the GPU cascade's stage costs
(stage 1 the cheapest tower alone, then the others concurrently). On the CPU the same code runs eagerly: it
proves the code path, not any figure. Never yet run on a GPU (README "The GPU path").
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.export.gpu.cascade import sub_ensemble
from clipfuse.export.gpu.graphs import GraphedEnsemble
from clipfuse.export.graph.rebuild import rebuild_fused
from clipfuse.runtime.manifest import read_manifest


def _pool_mib(make, cuda):
    """(object, MiB the allocator holds above what it held before make())."""
    if not cuda:
        return make(), None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    obj = make()
    torch.cuda.synchronize()
    return obj, round((torch.cuda.memory_allocated() - before) / 2**20, 1)


def summary(values) -> dict:
    """median (p50), p99 (nearest rank), min, max, n of a list of milliseconds."""
    ranked = sorted(values)
    p99 = ranked[min(len(ranked) - 1, max(0, int(np.ceil(0.99 * len(ranked))) - 1))]
    return {"median": statistics.median(values), "p99": p99, "min": min(values), "max": max(values), "n": len(values)}


def time_calls(calls: dict, rounds: int, iters: int, warmup: int, cuda: bool) -> dict:
    """{key: [ms]}: calls interleaved round by round; CUDA events around each on a GPU."""
    times = {k: [] for k in calls}
    for f in calls.values():
        for _ in range(warmup):
            f()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(rounds):
        for k, f in calls.items():
            for _ in range(iters):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    f()
                    b.record()
                    b.synchronize()
                    times[k].append(a.elapsed_time(b))
                else:
                    t = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t) * 1e3)
    return times


def measure_set(name, model, names, device, batches, precisions, compile_backend, rounds, iters, warmup, say):
    """Rows for one ensemble (a FusedEnsemble on `device`; names: its towers): every configuration at every batch,
    plus graph pools, compile seconds and the GPU cascade's stage costs."""
    cuda = device == "cuda"
    top = max(batches)
    weights_mib = round(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
                        / 2**20, 1)
    runners, pools, compile_s = {}, {}, {}
    for prec in precisions:
        for mode, conc in (("serial", False), ("concurrent", True)):
            runners[(prec, mode)], pools[(prec, mode)] = _pool_mib(
                lambda: GraphedEnsemble(model, device, prec, top, concurrent=conc, sizes=batches), cuda)
        for k, s in enumerate(names):
            runners[(prec, f"single {s}")], _ = _pool_mib(
                lambda: GraphedEnsemble(sub_ensemble(model, [k]), device, prec, top, concurrent=False,
                                        sizes=batches), cuda)
    if compile_backend:           # the caller passes one only for the sets whose compile is measured
        prec = "fp16" if "fp16" in precisions else precisions[0]
        t = time.perf_counter()
        runners[(prec, "compiled")], pools[(prec, "compiled")] = _pool_mib(
            lambda: GraphedEnsemble(model, device, prec, top, concurrent=True, compile=True,
                                    compile_backend=compile_backend, sizes=batches), cuda)
        compile_s[prec] = round(time.perf_counter() - t, 1)
        say(f"{name}: compiled ({compile_backend}) and captured in {compile_s[prec]} s")
    rows = []
    for bs in batches:
        calls = {k: (lambda r=r, b=bs: r.run_bucket(b)) for k, r in runners.items()}
        bprec = "fp16" if "fp16" in precisions else precisions[0]
        host = [np.random.default_rng(0).integers(0, 256, (bs, 3, r, r), dtype=np.uint8) for r in model.resolutions]
        calls[(bprec, "backend")] = lambda r=runners[(bprec, "concurrent")], h=host: r.infer(h)
        say(f"{name} batch {bs}: timing {len(calls)} configurations")
        for (prec, mode), ts in time_calls(calls, rounds, iters, warmup, cuda).items():
            rows.append({"set": name, "precision": prec, "mode": mode, "batch": bs,
                         "latency_ms": summary(ts),
                         "graph_pool_mib": pools.get((prec, mode))})
    stages = cascade_stages(names, rows, batches, precisions)
    del runners
    if cuda:
        torch.cuda.empty_cache()
    return rows, {"weights_mib": weights_mib, "compile_s": compile_s, "cascade": stages}


def cascade_stages(names, rows, batches, precisions) -> list:
    """Stage 1 = the cheapest single tower (measured here), stage 2 = the others concurrently: the costs a GPU
    cascade pays (all images leave at stage 1: stage 1; none do: stage 1 + stage 2), from this run's figures."""
    prec = "fp16" if "fp16" in precisions else precisions[0]
    by = {(r["mode"], r["batch"]): r["latency_ms"]["median"] for r in rows if r["precision"] == prec}
    out = []
    for bs in batches:
        singles = {s: by[(f"single {s}", bs)] for s in names}
        first = min(singles, key=singles.get)
        out.append({"batch": bs, "precision": prec, "stage1": first, "stage1_ms": singles[first],
                    "full_concurrent_ms": by[("concurrent", bs)], "slowest_single_ms": max(singles.values())})
    return out


def format_md(levers: dict) -> list[str]:
    """The levers section of gpu_check.md: ratios first, then each set's memory, compile time and cascade stages."""
    lines = ["", "## The levers: CUDA graphs per bucket, one stream per tower, fp16 islands, compile", ""]
    if levers.get("dry_run"):
        lines += ["DRY RUN on the CPU with tiny towers: eager forward, no graphs, no streams; these numbers check "
                  "that the script runs and measure nothing.", ""]
    lines += ["Latency from CUDA events around each graph replay (inputs already on the device); `backend` is "
              "GraphedEnsemble.infer with pinned host copies in and outputs out, no preprocessing. Median (p50) ms; "
              "p99 of each configuration in the JSON.", "",
              "| set | batch | precision | serial | concurrent | concurrent / serial | compiled | slowest single "
              "| backend |", "|---|---|---|---|---|---|---|---|---|"]
    facts = []
    for name, part in levers["sets"].items():
        by = {(r["precision"], r["mode"], r["batch"]): r["latency_ms"]["median"] for r in part["rows"]}
        for bs in sorted({r["batch"] for r in part["rows"]}):
            for prec in levers["precisions"]:
                s, c = by[(prec, "serial", bs)], by[(prec, "concurrent", bs)]
                singles = [v for (p, m, b), v in by.items() if p == prec and b == bs and m.startswith("single ")]
                comp, back = by.get((prec, "compiled", bs)), by.get((prec, "backend", bs))
                lines.append(f"| {name} | {bs} | {prec} | {s:.3f} | {c:.3f} | {c / s:.2f} | "
                             f"{'' if comp is None else f'{comp:.3f}'} | {max(singles):.3f} | "
                             f"{'' if back is None else f'{back:.3f}'} |")
        pools = {f"{r['precision']} {r['mode']}": r["graph_pool_mib"] for r in part["rows"]
                 if r["graph_pool_mib"] is not None and not r["mode"].startswith("single")}
        facts.append(f"- {name}: weights {part['weights_mib']} MiB; graph pools (MiB, all its buckets): "
                     f"{pools or 'n/a (CPU)'}; compile s: {part['compile_s'] or 'not compiled'}")
        for st in part["cascade"]:
            facts.append(f"  - GPU cascade, batch {st['batch']} {st['precision']}: stage 1 {st['stage1']} "
                         f"{st['stage1_ms']:.3f} ms; all towers concurrently {st['full_concurrent_ms']:.3f} ms")
    lines += [""] + facts + [""]
    for a in levers.get("agreement", []):
        lines.append(f"- torch-cuda {a['precision']} vs ONNX Runtime fp32, {a['images']} photographs: "
                     f"{'within' if a['ok'] else 'OUTSIDE'} the {a['precision']} tolerances")
    return lines


def bench_torch_cuda(engine, batches=(1, 8), runs: int = 5, iters: int = 10, warmup: int = 3,
                     precisions=("fp32", "fp16"), compile: bool = False, out=None, stem: str = "bench_gpu",
                     command: str | None = None, device: str = "cuda") -> dict:
    """`clipfuse bench ENGINE --backend torch-cuda`: the levers on this engine's ensemble; writes STEM.json/.md
    into out (default ENGINE/bench) atomically and returns the result (with its "markdown")."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ClipfuseError("bench --backend torch-cuda needs a CUDA GPU and torch sees none "
                            "(torch.cuda.is_available() is False)")
    m = read_manifest(engine)
    model = rebuild_fused(m).to(device)
    names = m.backbone_names
    batches = sorted({int(b) for b in batches})
    rows, facts = measure_set(m.folder.name, model, names, device, batches, list(precisions),
                              "inductor" if compile else None, runs, iters, warmup, log)
    result = {"command": command, "engine": str(m.folder), "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "levers": {"precisions": list(precisions), "batches": batches, "dry_run": device != "cuda",
                         "sets": {m.folder.name: {"specs": names, "rows": rows, **facts}}}}
    result["markdown"] = "\n".join([f"# torch-cuda levers: {m.folder.name}", "", f"Command: `{command}`"]
                                   + format_md(result["levers"])) + "\n"
    folder = Path(out) if out else m.folder / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", result["markdown"])):
        target = folder / f"{stem}{suffix}"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return result
