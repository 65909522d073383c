"""The GPU levers of issue 25, measured side by side: part of benchmarks/gpu_check.py (its `levers` section).

For each ensemble (pair, five, nine) at each batch, one GraphedEnsemble (export/gpu/graphs.py: the code the
torch-cuda backend runs) per configuration, all interleaved round by round, CUDA events around each replay:

    serial      every tower on the capturing stream, one CUDA graph per bucket
    concurrent  one stream per tower inside the graph, joined before the controller
    compiled    concurrent, towers through torch.compile (inductor); fp16 only and only for --compile-sets
                (compile costs about a minute for the pair and three for the nine, FIELD-NOTES.md)
    single      each tower alone (its norm and head), serial graph: the floor concurrency aims at
    backend     concurrent fp16 through GraphedEnsemble.infer: pinned host copy in, outputs out (no preprocessing)

plus each configuration's graph pool (CUDA allocator, above the weights), the GPU cascade's stage costs (stage 1
the cheapest tower alone, stage 2 the others concurrently), and agreement of torch-cuda fp32/fp16 with ONNX
Runtime fp32 on the shipped photographs through the one comparator (runtime/compare.py, fp16 row).
On the CPU (--dry-run) the same code runs eagerly on tiny towers: it proves the script, not any figure.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipfuse.core import iospec
from clipfuse.export.gpu.graphs import GraphedEnsemble
from clipfuse.export.graph.backbones import load_backbone
from clipfuse.export.graph.fused import ConstantController, FusedEnsemble

PAIR = ("RN50:random:0", "ViT-B-32:random:1")
FIVE = ("ViT-B-32:random:1", "RN50:random:0", "RN101:random:2", "ViT-B-16:random:3", "RN50x4:random:4")
NINE = ("RN50:random:0", "ViT-B-32:random:1", "RN101:random:2", "ViT-B-16:random:3", "RN50x4:random:4",
        "RN50x16:random:5", "RN50x64:random:6", "ViT-L-14:random:7", "ViT-L-14-336:random:8")
SETS = {"pair": PAIR, "five": FIVE, "nine": NINE}
TINY_SETS = {"pair": ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1"),
             "five": ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1", "clipfuse-test-vit48:random:2")}
NUM_CLASSES = 10


def build(specs, device) -> dict:
    """{spec: (visual, image_size, mean, std, head)} on `device`; random heads (latency does not depend on them)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for s in specs:
        b = load_backbone(s)
        head = nn.Linear(b.embed_dim, NUM_CLASSES)
        with torch.no_grad():
            head.weight.copy_(torch.randn(NUM_CLASSES, b.embed_dim, generator=g) * 0.1)
        out[s] = (b.model.visual.eval().to(device), b.image_size, b.preprocess["mean"], b.preprocess["std"], head)
    return out


def fused(built: dict, specs) -> FusedEnsemble:
    parts = [built[s] for s in specs]
    device = next(parts[0][0].parameters()).device
    return FusedEnsemble([p[0] for p in parts], [p[4] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                         [p[3] for p in parts], ConstantController(len(parts))).eval().to(device)


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


def measure_set(name, specs, built, device, batches, precisions, compile_backend, rounds, iters, warmup, say):
    """Rows for one ensemble: every configuration at every batch, plus pools, compile seconds, cascade stages."""
    cuda = device == "cuda"
    top = max(batches)
    model = fused(built, specs)
    weights_mib = round(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
                        / 2**20, 1)
    runners, pools, compile_s = {}, {}, {}
    for prec in precisions:
        for mode, conc in (("serial", False), ("concurrent", True)):
            runners[(prec, mode)], pools[(prec, mode)] = _pool_mib(
                lambda: GraphedEnsemble(model, device, prec, top, concurrent=conc, sizes=batches), cuda)
        for s in specs:
            runners[(prec, f"single {s}")], _ = _pool_mib(
                lambda: GraphedEnsemble(fused(built, [s]), device, prec, top, concurrent=False,
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
    stages = cascade_stages(name, specs, rows, batches, precisions)
    del runners
    if cuda:
        torch.cuda.empty_cache()
    return rows, {"weights_mib": weights_mib, "compile_s": compile_s, "cascade": stages}


def cascade_stages(name, specs, rows, batches, precisions) -> list:
    """Stage 1 = the cheapest single tower (measured here), stage 2 = the others concurrently: the costs a GPU
    cascade pays (all images leave at stage 1: stage 1; none do: stage 1 + stage 2), from this run's figures."""
    prec = "fp16" if "fp16" in precisions else precisions[0]
    by = {(r["mode"], r["batch"]): r["latency_ms"]["median"] for r in rows if r["precision"] == prec}
    out = []
    for bs in batches:
        singles = {s: by[(f"single {s}", bs)] for s in specs}
        first = min(singles, key=singles.get)
        out.append({"batch": bs, "precision": prec, "stage1": first, "stage1_ms": singles[first],
                    "full_concurrent_ms": by[("concurrent", bs)], "slowest_single_ms": max(singles.values())})
    return out


def agreement(specs, device, precisions, say) -> list:
    """torch-cuda (GraphedEnsemble through the backend's infer) against ONNX Runtime fp32 on the shipped
    photographs, through the one comparator, each precision with its tolerance row."""
    from clipfuse.export.graph.engine import export_engine
    from clipfuse.runtime.backends.registry import make_backend
    from clipfuse.runtime.compare import compare_outputs, head_row_norms, photo_variants, tolerance
    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.preprocess import preprocess_image

    from clipfuse.export.gpu.backend import TorchCudaBackend

    classes = ["astronaut", "cat", "cup of coffee", "rocket", "dog", "car", "bird", "airplane"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        m = read_manifest(export_engine(list(specs), classes, Path(tmp) / "agree", quiet=True).folder)
        say(f"agreement: exported {len(specs)} towers for ONNX Runtime in {time.perf_counter() - t:.1f} s")
        images = photo_variants()
        feed = {n: np.stack([preprocess_image(im, s) for im in images]) for n, s in m.preprocess_specs().items()}
        chunks = [{k: v[i:i + 8] for k, v in feed.items()} for i in range(0, len(images), 8)]
        with make_backend(m, "onnxruntime") as ort:
            ref = {k: np.concatenate([ort.infer(c)[k] for c in chunks]) for k in iospec.OUTPUT_NAMES}
        norms = head_row_norms(m.folder, len(m.backbones))
        for prec in precisions:
            with TorchCudaBackend(m, precision=prec, device=device, max_batch=8) as b:
                got = {k: np.concatenate([o[k] for o in [b.infer(c) for c in chunks]]) for k in iospec.OUTPUT_NAMES}
            tol = tolerance(prec)
            c = compare_outputs(ref, got, m, tol, norms)
            out.append({"precision": prec, "images": len(images), "ok": bool(c["ok"]), "tolerance": tol,
                        "report": c})
            say(f"agreement torch-cuda {prec} vs onnxruntime fp32: {'ok' if c['ok'] else 'FAIL'}")
    return out


def format_md(levers: dict) -> list[str]:
    """The levers section of gpu_check.md: ratios first, then each set's memory, compile time and cascade stages."""
    lines = ["", "## The levers (issue 25): CUDA graphs per bucket, one stream per tower, fp16 islands, compile", ""]
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
