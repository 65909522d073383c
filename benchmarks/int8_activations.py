"""Why two int8 graphs: S8 symmetric activations (TensorRT's form) against U8 asymmetric (the CPU graph).

    python benchmarks/int8_activations.py engines/precision-default [--rounds 9] [--batch 1,8]

Needs an engine with both int8 files (`clipfuse export ENGINE --precision int8 --calibration DIR`, the
default --int8-target both). For each of model.onnx, model.int8.onnx (U8 activations) and
model.int8-trt.onnx (S8 activations): how many of the towers' Conv / MatMul / Gemm ONNX Runtime turns
into int8 kernels in its optimised graph (QLinearConv, MatMulInteger, QGemm, ...), and the latency on
ONNX Runtime CPU, the three sessions timed in turn round by round (median, min-max; a 50 ms rest before
each call, as clipfuse bench). Writes benchmarks/results/int8_activations.md.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
INT8_KERNELS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat")


def kernel_counts(path: Path) -> dict:
    """Op types of ORT's optimised graph (all levels) that matter here."""
    import onnx

    from clipfuse.runtime.backends.sessions import open_session, session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimized_path=Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        open_session(path, options=so)
        ops = collections.Counter(n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"),
                                                               load_external_data=False).graph.node)
    return {k: ops[k] for k in (*INT8_KERNELS, "Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul") if ops[k]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "int8_activations")
    args = ap.parse_args(argv)
    from clipfuse.bench.configs import make_feed
    from clipfuse.core.errors import ClipfuseError
    from clipfuse.runtime.backends.sessions import open_session
    from clipfuse.runtime.cpu_load import LoadProbe
    from clipfuse.runtime.manifest import read_manifest

    try:
        m = read_manifest(args.engine)
        graphs = {"fp32 (model.onnx)": m.onnx_path, "int8 U8 activations (model.int8.onnx)": m.folder / "model.int8.onnx",
                  "int8 S8 activations (model.int8-trt.onnx)": m.folder / "model.int8-trt.onnx"}
        for g, p in graphs.items():
            if not p.is_file():
                raise ClipfuseError(f"{args.engine} has no {p.name}: run `clipfuse export {args.engine} --precision int8 "
                                    "--calibration DIR` (both targets)")
    except ClipfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = {g: kernel_counts(p) for g, p in graphs.items()}
    sessions = {g: open_session(p) for g, p in graphs.items()}
    batches = [int(b) for b in args.batch.split(",")]
    times = {(g, b): [] for g in graphs for b in batches}
    probe = LoadProbe()
    for r in range(args.rounds + 1):                      # round 0 warms up
        for b in batches:
            feed = make_feed(m, b)
            for g, s in sessions.items():
                time.sleep(0.05)
                t0 = time.perf_counter()
                s.run(None, feed)
                if r:
                    times[(g, b)].append(1e3 * (time.perf_counter() - t0))
    load = probe.stop()
    fp32 = list(graphs)[0]
    cmd = "python benchmarks/int8_activations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    L = ["# int8 activations: S8 symmetric vs U8 asymmetric on ONNX Runtime CPU", "", f"Command: `{cmd}`", "",
         f"Engine: {' + '.join(m.backbone_names)}; onnxruntime {__import__('onnxruntime').__version__}; "
         f"{args.rounds} rounds after one warm-up; other processes took {load.get('other_processes_cores', float('nan')):.2f} "
         "of the cores meanwhile.", "",
         "| graph | int8 kernels / float Conv, MatMul, Gemm in ORT's optimised graph | " +
         " | ".join(f"batch {b}: p50 ms (min-max) | / fp32 (median of rounds)" for b in batches) + " |",
         "|---|---|" + "---:|---:|" * len(batches)]
    for g in graphs:
        cells = []
        for b in batches:
            t = np.array(times[(g, b)])
            ratio = np.median(t / np.array(times[(fp32, b)]))
            cells += [f"{np.median(t):.1f} ({t.min():.1f}-{t.max():.1f})", f"{ratio:.2f}"]
        L.append(f"| {g} | {', '.join(f'{k} {v}' for k, v in counts[g].items())} | " + " | ".join(cells) + " |")
    text = "\n".join(L) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
