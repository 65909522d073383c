"""onnxruntime.quantization against NVIDIA Model Optimizer on one engine: agreement, accuracy, speed, size.

    python -m venv /tmp/mo && /tmp/mo/bin/pip install "nvidia-modelopt[onnx]==0.47.0"
    python benchmarks/int8_quantizers.py engines/precision-default --modelopt-python /tmp/mo/bin/python

The choice between the two is made on measured agreement and speed. Both quantize the
engine's model.onnx from the same 32 calibration images (evenly spaced over the digits the
engine was fitted on, benchmarks/precision_bench.py's split), MinMax ("max") ranges, with the
islands (feature norm, heads, controller, combination) excluded:

    ort-u8      clipfuse's CPU graph (export/precision/int8.py: U8 asymmetric activations, S8 per-channel weights)
    ort-s8      clipfuse's TensorRT graph (S8 symmetric activations)
    modelopt    modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_method="max",
                calibration_eps=["cpu"], high_precision_dtype="fp32", dq_only=True: int8 weights in
                the file), run in its own virtual environment (it pins its own onnx and
                onnxruntime-gpu; clipfuse does not depend on it); and the same graph with the
                islands fed the float tensor instead of a DQ copy, as clipfuse does to its own
                graphs (export/int8.float_island_inputs)

Each graph is validated against fp32 on the held-out digits by export/int8_validate.validate_int8
(the one comparator, int8 row; accuracy as a paired difference) and timed on ONNX Runtime CPU at
batch 1 and 8 (interleaved rounds, medians). ModelOpt places Q/DQ for TensorRT, which cannot run
here: its TensorRT speed is not measured, only its ONNX Runtime CPU speed.
Writes benchmarks/results/int8_quantizers.md and .json.
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


def modelopt_child(npz: str, islands: str, src: str, dst: str) -> None:
    """Runs inside the ModelOpt environment."""
    from modelopt.onnx.quantization import quantize

    d = np.load(npz)
    t = time.perf_counter()
    quantize(onnx_path=src, quantize_mode="int8", calibration_data={k: d[k] for k in d.files},
             calibration_method="max", calibration_eps=["cpu"], nodes_to_exclude=json.load(open(islands)),
             high_precision_dtype="fp32", dq_only=True, output_path=dst, log_level="WARNING")
    print(json.dumps({"seconds": time.perf_counter() - t}))


def _qdq_summary(path: Path, island: set) -> dict:
    import onnx

    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    weighted = [n for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.name not in island]
    dq_in = [n for n in weighted if n.input and producer.get(n.input[0]) is not None
             and producer[n.input[0]].op_type == "DequantizeLinear"]
    island_dq = [n.name for n in g.node if n.name in island and any(
        producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)]
    c = collections.Counter(n.op_type for n in g.node)
    return {"quantize_linear": c["QuantizeLinear"], "dequantize_linear": c["DequantizeLinear"],
            "tower_ops_with_dq_activation": len(dq_in), "tower_weighted_ops": len(weighted),
            "island_nodes_reading_dq": len(island_dq)}


def _time(paths: dict, feeds_by_batch: dict, rounds: int) -> dict:
    from clipfuse.runtime.backends.sessions import open_session

    sessions = {k: open_session(p) for k, p in paths.items()}
    times = {(k, b): [] for k in paths for b in feeds_by_batch}
    for r in range(rounds + 1):
        for b, feed in feeds_by_batch.items():
            for k, s in sessions.items():
                time.sleep(0.05)
                t = time.perf_counter()
                s.run(None, feed)
                if r:
                    times[(k, b)].append(time.perf_counter() - t)
    return {k: {str(b): float(np.median(times[(k, b)]) * 1e3) for b in feeds_by_batch} for k in paths} | {
        "ratios_to_fp32": {k: {str(b): float(np.median(np.array(times[(k, b)]) / np.array(times[("fp32", b)])))
                               for b in feeds_by_batch} for k in paths if k != "fp32"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--modelopt-python", default=None, help="python of a virtual environment with nvidia-modelopt[onnx]")
    ap.add_argument("--calibration-count", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "int8_quantizers"))
    ap.add_argument("--modelopt-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.modelopt_child:
        return modelopt_child(*args.modelopt_child)
    sys.path.insert(0, str(ROOT))
    import onnx
    from precision_bench import split_digits

    from clipfuse.export.precision.calibrate import calibrate_ranges, calibration_feeds
    from clipfuse.export.precision.int8 import quantization_plan, quantize_int8
    from clipfuse.export.precision.int8_validate import validate_int8
    from clipfuse.runtime.manifest import read_manifest

    command = "python benchmarks/int8_quantizers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(str(args.modelopt_python or "\0"), "/tmp/mo/bin/python")
    m = read_manifest(args.engine)
    res = {"command": command, "engine": str(m.folder), "backbones": m.backbone_names, "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="int8-quantizers-") as tmp:
        tmp = Path(tmp)
        train, evald, _ = split_digits(tmp)
        feeds = calibration_feeds(m, train, count=args.calibration_count)
        island, _, _, _ = quantization_plan(onnx.load(str(m.onnx_path), load_external_data=False))
        ranges = calibrate_ranges(m.onnx_path, feeds, workdir=tmp)
        paths = {"fp32": m.onnx_path}
        for name, act, sym in (("ort-u8", "u8", False), ("ort-s8", "s8", True)):
            t = time.perf_counter()
            quantize_int8(m.onnx_path, tmp / f"{name}.onnx", feeds, activations=act, activation_symmetric=sym,
                          ranges=ranges)
            res["graphs"][name] = {"quantize_s": round(time.perf_counter() - t, 1)}
            paths[name] = tmp / f"{name}.onnx"
        if args.modelopt_python:
            np.savez(tmp / "calib.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
            (tmp / "islands.json").write_text(json.dumps(sorted(island)))
            # on a copy: modelopt.onnx.quantization.quantize rewrote its input file in place (seen here: the
            # engine's model.onnx grew by 2 KB and the manifest's size check refused the engine afterwards)
            src = tmp / "modelopt-src" / m.onnx_path.name
            src.parent.mkdir()
            for f in m.folder.glob(m.onnx_path.name + "*"):          # the graph and its external data, if any
                shutil.copyfile(f, src.parent / f.name)
            p = subprocess.run([args.modelopt_python, __file__, "x", "--modelopt-child", str(tmp / "calib.npz"),
                                str(tmp / "islands.json"), str(src), str(tmp / "modelopt.onnx")],
                               capture_output=True, text=True)
            if p.returncode:
                res["graphs"]["modelopt"] = {"error": p.stderr.strip().splitlines()[-1][:300]}
            else:
                res["graphs"]["modelopt"] = {"quantize_s": round(json.loads(p.stdout.strip().splitlines()[-1])["seconds"], 1),
                                             "version": subprocess.run([args.modelopt_python, "-c", "import modelopt; "
                                                                        "print(modelopt.__version__)"], capture_output=True,
                                                                       text=True).stdout.strip()}
                paths["modelopt"] = tmp / "modelopt.onnx"
                # ModelOpt, like quantize_static, hands the islands (feature norm, heads) the DQ copy of a tower's
                # quantized output; clipfuse feeds them the float tensor (export/int8.float_island_inputs).
                # The same done to ModelOpt's graph separates its placement inside the towers from that.
                from clipfuse.export.precision.int8 import float_island_inputs

                q = onnx.load(str(tmp / "modelopt.onnx"))
                res["graphs"]["modelopt, islands fed float"] = {
                    "quantize_s": res["graphs"]["modelopt"]["quantize_s"],
                    "island_inputs_rewired": float_island_inputs(q.graph, island)}
                onnx.save(q, str(tmp / "modelopt-float-islands.onnx"))
                paths["modelopt, islands fed float"] = tmp / "modelopt-float-islands.onnx"
        cache = {}
        for name, path in paths.items():
            if name == "fp32":
                continue
            g = res["graphs"][name]
            g.update(_qdq_summary(path, island))
            g["file_over_fp32"] = round(path.stat().st_size / m.onnx_path.stat().st_size, 3)
            v = validate_int8(m, path, data=evald, ref_cache=cache)
            g["validation"] = {"ok": v["ok"], "failures": v["failures"], "images": v["images"],
                               "fused_top1_changed": v["fused"]["top1_changed"],
                               "backbones": [{k: b.get(k) for k in ("backbone", "cosine_min", "error_to_spread",
                                                                     "top1_changed")} for b in v["backbones"]],
                               "accuracy": v["accuracy"]}
        one = feeds[0]
        b1 = {k: v[:1] for k, v in one.items()}
        res["latency_ms"] = _time(paths, {1: b1, 8: one}, args.rounds)
    res["rounds"] = args.rounds
    L = [f"<!-- made by: {command} -->", "", "# int8: onnxruntime.quantization vs NVIDIA Model Optimizer", "",
         f"Command: `{command}`", "", f"Engine {m.folder}: {' + '.join(m.backbone_names)} (random weights, linear "
         f"probes on digits); {args.calibration_count} calibration images, MinMax; validation on the held-out digits "
         f"(int8 row); latency on ONNX Runtime CPU, medians of {args.rounds} interleaved rounds.", "",
         "| graph | quantize s | Q / DQ | tower ops fed by a DQ | island nodes reading a DQ | file / fp32 | fused top-1 "
         "changed | accuracy int8 - fp32 [95%] | worst error/spread | batch 1 / fp32 | batch 8 / fp32 |",
         "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    r = res["latency_ms"]["ratios_to_fp32"]
    for name, g in res["graphs"].items():
        if "error" in g:
            L.append(f"| {name} | failed: {g['error']} |")
            continue
        v = g["validation"]
        d = v["accuracy"]["paired"]
        worst = max((b["error_to_spread"] or 0) for b in v["backbones"])
        L.append(f"| {name} | {g['quantize_s']} | {g['quantize_linear']} / {g['dequantize_linear']} | "
                 f"{g['tower_ops_with_dq_activation']}/{g['tower_weighted_ops']} | {g['island_nodes_reading_dq']} | "
                 f"{g['file_over_fp32']} | {v['fused_top1_changed']}/{v['images']} | {d['difference']:+.2f} "
                 f"[{d['lo']:+.2f}, {d['hi']:+.2f}] | {worst:.3g} | {r[name]['1']:.3f} | {r[name]['8']:.3f} |")
    L += ["", f"fp32 p50: batch 1 {res['latency_ms']['fp32']['1']:.1f} ms, batch 8 {res['latency_ms']['fp32']['8']:.1f} ms."]
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    Path(args.out).with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return res


if __name__ == "__main__":
    main()
