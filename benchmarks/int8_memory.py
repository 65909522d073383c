"""Peak host memory of int8 quantization: the whole graph at once vs tower by tower.

    python benchmarks/int8_memory.py engines/precision-default [--images 32]

Each way runs in its own process on the same calibration images (the first N digits written
by benchmarks/nlc_digits.write_digits) and the engine's model.onnx, and reports the child's
peak RSS (getrusage ru_maxrss) and wall time:

    whole graph   what export/precision/int8.py did before: the fused model loaded with its weights and
                  handed to quantize_static, which calibrates the whole graph in one session
    tower by tower  export/int8.quantize_int8 now: ranges from export/precision/calibrate.py, one
                  tower at a time, then quantize_static from the ranges (the calibration cache)

Both write the U8 CPU graph. Writes benchmarks/results/int8_memory.md (and .json) with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def child(way: str, engine: str, images: str, n: int, out: str) -> None:
    import onnx

    from clipfuse.export.precision.calibrate import _reader, calibration_feeds, muted_root_logger
    from clipfuse.export.precision.int8 import quantization_plan, quantize_int8
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(engine)
    feeds = calibration_feeds(m, images, count=n)
    t = time.perf_counter()
    if way == "tower":
        quantize_int8(m.onnx_path, Path(out), feeds, activations="u8", activation_symmetric=False)
    else:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        model = onnx.load(str(m.onnx_path))
        island, _, to_quantize, _ = quantization_plan(model)
        with muted_root_logger():
            quantize_static(model, out, _reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=to_quantize, nodes_to_exclude=sorted(island),
                            use_external_data_format=True,
                            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True,
                                           "ActivationSymmetric": False})
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--ways", default="whole,tower")
    ap.add_argument("--out", default=str(ROOT / "results" / "int8_memory"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        way, images, out, _ = args.child
        return child(way, args.engine, images, args.images, out)
    sys.path.insert(0, str(ROOT))
    from nlc_digits import write_digits

    command = "python benchmarks/int8_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-mem-") as tmp:
        write_digits(Path(tmp) / "digits")
        from clipfuse.runtime.manifest import read_manifest

        m = read_manifest(args.engine)
        size = m.onnx_path.stat().st_size + sum(p.stat().st_size for p in m.folder.glob(m.onnx_path.name + ".data"))
        for way in args.ways.split(","):
            out = Path(tmp) / f"{way}.onnx"
            t = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, args.engine, "--images", str(args.images), "--child", way,
                                str(Path(tmp) / "digits"), str(out), "-"], capture_output=True, text=True)
            wall = time.perf_counter() - t
            if p.returncode:
                rows.append({"way": way, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
                continue
            got = json.loads(p.stdout.strip().splitlines()[-1])       # the child's own peak (ru_maxrss of itself)
            rows.append({"way": way, "peak_rss_mb": round(got["peak_rss_mb"]), "quantize_s": round(got["seconds"], 1),
                         "process_s": round(wall, 1)})
            for f in Path(tmp).glob(f"{way}.onnx*"):
                f.unlink()
    res = {"command": command, "engine": str(args.engine), "model_mb": round(size / 2**20), "images": args.images,
           "rows": rows, "cpu_count": os.cpu_count()}
    lines = [f"<!-- made by: {command} -->", "", "# int8 quantization: peak host memory", "",
             f"Command: `{command}`", "",
             f"Engine {args.engine} (model.onnx + data: {res['model_mb']} MB), {args.images} calibration images, "
             "U8 CPU graph, each way in its own process.", "",
             "| way | peak RSS MB | quantize s | process s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['way']} | {r.get('peak_rss_mb', '-')} | {r.get('quantize_s', '-')} | "
                     f"{r.get('process_s', r.get('error', '-'))} |")
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
