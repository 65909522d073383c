"""Why fused ONNX Runtime is not 2x faster than PyTorch eager at batch 1 here: profiles and a roofline.

    python benchmarks/eager_gap.py            # ~3 min on 2 cores; needs engines/bench-default
                                              # (python benchmarks/bench_default.py builds it)

Each phase runs in its own process (an idle runtime's spinning threads slow the next one; see
clipfuse/bench/), in this order:
  torch     PyTorch eager (TorchBackend) timed, then torch.profiler: self CPU time per aten op;
  ort       the fused graph on ORT CPU timed, then ORT's profiler: kernel time per op type;
  variants  what was tried to make the fused graph faster, each timed interleaved with the baseline
            (50 ms rest before each call): ORT's transformer optimizer (attention/GELU/LayerNorm
            fusions) and the parallel executor with one thread per tower.
Then the roofline: the FLOPs of both towers at this machine's measured fp32 matmul peak is the
fastest any fp32 graph can be, so eager's time over that time is the most any graph can gain.
Writes benchmarks/results/eager_gap.{md,json}.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SETTLE = 0.05


def _time(fn, runs: int) -> list[float]:
    from clipfuse.bench.probes import timed as _timed

    out = []
    for _ in range(runs):
        time.sleep(SETTLE)
        out.append(_timed(fn) * 1e3)
    return out


def phase_torch(engine: str, runs: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from clipfuse.bench.configs import make_feed
    from clipfuse.export.graph.torch_backend import TorchBackend
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(engine)
    b = TorchBackend(m, threads=torch.get_num_threads()).open()
    feed = make_feed(m, 1)
    b.infer(feed)
    ms = _time(lambda: b.infer(feed), runs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            b.infer(feed)
    ops = collections.Counter()
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e3 / 5          # ms per run
    total = sum(ops.values())
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "latency_ms": ms,
            "profile_ms_per_run": total,
            "ops": [{"op": k, "ms": v, "pct": 100 * v / total} for k, v in ops.most_common(12)]}


def _ort_session(manifest, path: str | None = None, parallel: bool = False, threads: int | None = None,
                 profile_prefix: str | None = None):
    """A session with the runtime's own options (OnnxRuntimeBackend), on `path` (default the engine's graph)."""
    import onnxruntime as ort

    from clipfuse.runtime.backends.onnxruntime import OnnxRuntimeBackend

    so = OnnxRuntimeBackend(manifest, threads=threads, parallel=parallel).session_options()
    if parallel:
        so.inter_op_num_threads = 2         # one tower per core
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path or str(manifest.onnx_path), so, providers=["CPUExecutionProvider"])


def phase_ort(engine: str, runs: int) -> dict:
    import onnxruntime as ort

    from clipfuse.bench.configs import make_feed
    from clipfuse.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(engine)
    b = OnnxRuntimeBackend(m).open()           # the runtime's own session options
    feed = make_feed(m, 1)
    b.infer(feed)
    ms = _time(lambda: b.infer(feed), runs)
    b.close()
    with tempfile.TemporaryDirectory() as tmp:
        s = _ort_session(m, profile_prefix=str(Path(tmp) / "p"))
        for _ in range(2):
            s.run(None, feed)
        n = 5
        for _ in range(n):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    by_type, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_type[e["args"]["op_name"]] += e["dur"] / 1e3 / (n + 2)
            count[e["args"]["op_name"]] += 1
    total = sum(by_type.values())
    # Each tower's best efficiency on this machine: its single engine at batch 32, where the kernels
    # have the most work per call. A batch-1 graph cannot be expected to beat that.
    from clipfuse.bench.configs import ensure_singles

    best = []
    for k, single in enumerate(ensure_singles(m)[0]):
        sb = OnnxRuntimeBackend(single).open()
        big = make_feed(single, 32)
        sb.infer(big)
        t = min(_time(lambda: sb.infer(big), 2)) / 1e3
        best.append({"backbone": m.backbone_names[k], "gflop": m.backbones[k]["gflops"],
                     "batch32_gflops_per_s": m.backbones[k]["gflops"] * 32 / t})
        sb.close()
    return {"onnxruntime": ort.__version__, "latency_ms": ms, "profile_ms_per_run": total, "best_towers": best,
            "ops": [{"op": k, "ms": v, "pct": 100 * v / total, "nodes": count[k] // (n + 2)}
                    for k, v in by_type.most_common(12)]}


def phase_variants(engine: str, runs: int) -> dict:
    from clipfuse.bench.configs import make_feed
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(engine)
    feed = make_feed(m, 1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"baseline (runtime defaults)": _ort_session(m),
                    "parallel executor, 1 intra-op thread per tower": _ort_session(m, parallel=True, threads=1)}
        try:
            from onnxruntime.transformers import optimizer

            opt = optimizer.optimize_model(str(m.onnx_path), model_type="vit", num_heads=12, hidden_size=768,
                                           opt_level=0)
            fused_ops = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            opt.save_model_to_file(str(Path(tmp) / "opt.onnx"))
            name = "ORT transformer optimizer (" + ", ".join(f"{k} x{v}" for k, v in fused_ops.items()) + ")"
            variants[name] = _ort_session(m, str(Path(tmp) / "opt.onnx"))
        except Exception as e:              # noqa: BLE001  (report what failed, keep the rest)
            out["transformer_optimizer_error"] = f"{type(e).__name__}: {e}"[:300]
        ref = None
        for name, s in variants.items():
            y = s.run(None, feed)[0]
            ref = y if ref is None else ref
            out.setdefault("max_rel_diff", {})[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
        times = {k: [] for k in variants}
        for _ in range(runs):
            for name, s in variants.items():
                times[name] += _time(lambda: s.run(None, feed), 1)
    out["latency_ms"] = times
    return out


def run_phase(phase: str, engine: str, runs: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--phase", phase, "--engine", engine, "--runs", str(runs)],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"phase {phase} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="engines/bench-default")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--phase", choices=["torch", "ort", "variants"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.phase:
        fn = {"torch": phase_torch, "ort": phase_ort, "variants": phase_variants}[args.phase]
        print(json.dumps(fn(args.engine, args.runs)))
        return

    from clipfuse.bench.probes import matmul_peak_gflops
    from clipfuse.core.errors import ClipfuseError
    from clipfuse.runtime.cpu_load import LoadProbe
    from clipfuse.runtime.manifest import read_manifest

    try:
        m = read_manifest(args.engine)
    except ClipfuseError as e:
        sys.exit(f"error: {e}\n(the default engine is made by: python benchmarks/bench_default.py)")
    probe = LoadProbe()
    res = {"command": "python benchmarks/eager_gap.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
           "engine": args.engine, "backbones": m.backbone_names}
    for phase in ("torch", "ort", "variants"):
        print(f"[eager_gap] {phase} ...", file=sys.stderr, flush=True)
        res[phase] = run_phase(phase, args.engine, args.runs)
    res["peak"] = matmul_peak_gflops()
    res["load"] = probe.stop()
    gflop = sum(b["gflops"] for b in m.backbones)
    peak = res["peak"]["gflops_per_s"]
    eager, fused = (float(np.median(res[p]["latency_ms"])) for p in ("torch", "ort"))
    floor_ms = gflop / peak * 1e3
    best_ms = sum(b["gflop"] / b["batch32_gflops_per_s"] for b in res["ort"]["best_towers"]) * 1e3
    res["roofline"] = {"gflop": gflop, "peak_gflops_per_s": peak, "floor_ms": floor_ms, "eager_p50_ms": eager,
                       "fused_p50_ms": fused, "eager_over_fused": eager / fused, "ceiling": eager / floor_ms,
                       "eager_pct_of_peak": 100 * floor_ms / eager, "fused_pct_of_peak": 100 * floor_ms / fused,
                       "fused_needed_pct_of_peak_for_2x": 100 * floor_ms / (eager / 2),
                       "best_case_ms": best_ms, "best_case_ceiling": eager / best_ms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eager_gap.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "eager_gap.md").write_text(markdown(res))
    print(markdown(res))


def _spread(v) -> str:
    return f"{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"


def markdown(res: dict) -> str:
    r = res["roofline"]
    L = ["# Fused ONNX Runtime vs PyTorch eager at batch 1: profiles and roofline", "",
         f"Command: `{res['command']}`", "",
         f"Engine: {res['engine']}: {' + '.join(res['backbones'])}, fp32, batch 1, {res['torch']['threads']} threads "
         f"both sides; torch {res['torch']['torch']}, onnxruntime {res['ort']['onnxruntime']}. Each phase in its own "
         f"process, 50 ms rest before each timed call. Other processes took {res['load']['other_processes_cores']:.2f} "
         f"cores on average.", "",
         "## Roofline", "",
         "| | value |", "|---|---:|",
         f"| FLOPs, both towers (from the graph) | {r['gflop']:.1f} GFLOP |",
         f"| measured fp32 matmul peak (best of numpy/torch 2048^3 sgemm) | {r['peak_gflops_per_s']:.1f} GFLOP/s |",
         f"| fastest possible fp32 time = FLOPs / peak | {r['floor_ms']:.1f} ms |",
         f"| PyTorch eager p50 (min-max) | {_spread(res['torch']['latency_ms'])} ms = {r['eager_pct_of_peak']:.0f}% of peak |",
         f"| fused ORT p50 (min-max) | {_spread(res['ort']['latency_ms'])} ms = {r['fused_pct_of_peak']:.0f}% of peak |",
         f"| eager / fused, measured | {r['eager_over_fused']:.2f} |",
         f"| eager / fused, ceiling (fused at 100% of peak) | {r['ceiling']:.2f} |",
         f"| fused would need, for 2x | {r['fused_needed_pct_of_peak_for_2x']:.0f}% of peak |",
         "| each tower at its best measured efficiency (its single at batch 32): "
         + ", ".join(f"{b['backbone']} {b['batch32_gflops_per_s']:.0f} GFLOP/s" for b in res["ort"]["best_towers"])
         + f" | {r['best_case_ms']:.1f} ms |",
         f"| eager / fused, ceiling at those efficiencies | {r['best_case_ceiling']:.2f} |", "",
         "The sgemm probe is not a hard bound (ORT's convolutions beat it at large batch), so the second "
         "ceiling uses what each tower's kernels reach at their best on this machine.", "",
         "## Where the time goes", "", "| PyTorch eager (torch.profiler, self CPU) | ms/run | % |", "|---|---:|---:|"]
    L += [f"| {o['op']} | {o['ms']:.1f} | {o['pct']:.1f} |" for o in res["torch"]["ops"]]
    L += ["", "| fused ORT (ORT profiler, kernel time by op type) | ms/run | % | nodes |", "|---|---:|---:|---:|"]
    L += [f"| {o['op']} | {o['ms']:.1f} | {o['pct']:.1f} | {o['nodes']} |" for o in res["ort"]["ops"]]
    v = res["variants"]
    L += ["", "## What was tried on the fused graph (interleaved, p50 (min-max) ms)", "",
          "| variant | p50 ms | max rel. diff of logits vs baseline |", "|---|---:|---:|"]
    L += [f"| {k} | {_spread(t)} | {v['max_rel_diff'][k]:.1e} |" for k, t in v["latency_ms"].items()]
    if "transformer_optimizer_error" in v:
        L += ["", f"ORT transformer optimizer failed: {v['transformer_optimizer_error']}"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
