"""fp32 / fp16 / int8 side by side, on ONNX Runtime and OpenVINO: issue 16's committed results.

    python benchmarks/precision_bench.py --set default     # RN50:random:0 + ViT-B-32:random:1
    python benchmarks/precision_bench.py --set nine        # the nine OpenAI CLIP architectures, random weights

For the set's backbones (seeded random weights: nothing can be downloaded here):

1. scikit-learn's digits (1797 real 8x8 images, 10 classes) written as PNG files by
   benchmarks/nlc_digits.py's write_digits (byte-identical files: the feature cache keys on
   image content, so refits reuse it), split 70/30 (stratified, seed 0, export/data.py
   seeded_split); `clipfuse fit` on the 70% with linear-probe heads (probes on 80% of it,
   the controller's 16 shots from the rest), the 30% held out.
2. `export --precision fp16`, then `export --precision int8` calibrated on the 70% (the user's
   own, unlabelled task images; never the held-out 30%), both graphs (ONNX Runtime CPU /
   OpenVINO, and TensorRT's), each validated against fp32 and scored on the held-out 30%
   (int8 or fp16 minus fp32, a paired difference with its interval).
3. `clipfuse bench --precisions fp32,fp16,int8 --openvino`: latency by batch (1/8/32),
   peak memory per configuration, agreement with fp32, PyTorch eager beside them.

Writes benchmarks/results/precision_<set>.md and .json, the exact command at the top.
Random weights have no trained outlier channels, so agreement here is likely better than
on trained CLIP weights; the validation bounds are what real weights must meet.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SETS = {
    "default": ["RN50:random:0", "ViT-B-32:random:1"],
    "nine": ["RN50:random:0", "RN101:random:1", "RN50x4:random:2", "RN50x16:random:3", "RN50x64:random:4",
             "ViT-B-32:random:5", "ViT-B-16:random:6", "ViT-L-14:random:7", "ViT-L-14-336:random:8"],
}


def split_digits(tmp: Path, per_class: int | None = None) -> tuple[Path, Path, int]:
    """tmp/train and tmp/eval, the digits written by nlc_digits.write_digits and moved (bytes unchanged)."""
    sys.path.insert(0, str(ROOT))
    from nlc_digits import write_digits

    from clipfuse.export.data import scan_labelled_folder, seeded_split

    n = write_digits(tmp / "digits")
    paths, labels, names = scan_labelled_folder(tmp / "digits")
    if per_class:           # tests: the first per_class of each class, the rest removed
        keep = [i for c in range(len(names)) for i in [j for j, y in enumerate(labels) if y == c][:per_class]]
        paths, labels = [paths[i] for i in keep], labels[keep]
    _, ev = seeded_split(labels, 0.3, 0)
    ev = set(ev.tolist())
    for i, p in enumerate(paths):
        dst = tmp / ("eval" if i in ev else "train") / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dst)
    return tmp / "train", tmp / "eval", len(paths) if per_class else n


def render(result: dict) -> str:
    from clipfuse.bench.report import format_table

    L = [f"<!-- made by: {result['command']} ({result['seconds']:.0f} s) -->", "", f"# Precision: {result['set']}", "",
         f"Command: `{result['command']}`", "",
         f"Backbones: {' + '.join(result['backbones'])} (seeded random weights: random weights have no trained "
         "outlier channels, so agreement here is likely better than on trained CLIP weights).",
         f"Digits: {result['digits']['images']} images, fit on {result['digits']['train']}, held out "
         f"{result['digits']['eval']}; int8 calibrated on {result['int8']['calibration']['images']} of the fit images.",
         ""] + [f"REFUSED by its validation (measured anyway, not shippable): {w}: {e}" for w, e in result["refused"].items()] + [
         "", "## Validation against fp32 and accuracy on the held-out digits", "",
         "Agreement images: fp16 on the 32 shipped photo variants; int8 on up to 64 of the held-out digits "
         "(export --precision int8 --data: the task's own images).", "",
         "| graph | min embedding cosine | fused top-1 changed | accuracy % | minus fp32, points [95% paired] |",
         "|---|---:|---:|---:|---|"]
    L.append(f"| model.onnx (fp32) | 1 | 0 | {result['accuracy']['fp32']:.2f} | - |")
    for name, rec in result["graphs"].items():
        v = rec["validation"]
        a = rec.get("accuracy") or v.get("accuracy")         # fp16: beside its record; int8: in its validation
        cos = min(b["cosine_min"] for b in v["backbones"])
        d = a["paired"] if a else None
        L.append(f"| {name} | {cos:.5f} | {v['fused']['top1_changed']}/{v['images']} | "
                 f"{a['int8']:.2f} | {d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] |" if a else
                 f"| {name} | {cos:.5f} | {v['fused']['top1_changed']}/{v['images']} | - | - |")
    L += ["", "## Latency, memory, side by side", "", format_table(result["bench"])]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="default")
    ap.add_argument("--backbone", action="append", default=None, help="override the set's backbones (tests)")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calibration-count", type=int, default=256)
    ap.add_argument("--per-class", type=int, default=None, help="digits per class (tests; default all 1797)")
    ap.add_argument("--shots", type=int, default=16, help="the controller's labelled images per class")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--cache", default=None, help="feature cache (default ~/.cache/clipfuse)")
    ap.add_argument("--engine", default=None, help="engine folder (default engines/precision-<set>)")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/precision_<set>)")
    args = ap.parse_args(argv)
    backbones = args.backbone or SETS[args.set]
    engine = Path(args.engine or f"engines/precision-{args.set}")
    out = Path(args.out or ROOT / "results" / f"precision_{args.set}")
    batches = tuple(int(b) for b in args.batch.split(","))
    command = "python benchmarks/precision_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from clipfuse.bench.run import run_bench
    from clipfuse.errors import ClipfuseError
    from clipfuse.export.fit import fit_engine
    from clipfuse.export.fp16 import export_fp16
    from clipfuse.export.int8_export import export_int8
    from clipfuse.export.int8_validate import paired_accuracy
    from clipfuse.runtime.manifest import read_manifest

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-precision-"))
    try:
        train, evald, n = split_digits(tmp, args.per_class)
        n_train = sum(1 for _ in train.rglob("*.png"))
        fit_engine(backbones, train, engine, eval_data=evald, head="linear-probe", probe_fraction=0.8, shots=args.shots,
                   seed=0, study_shots=(args.shots,), study_seeds=(0,), cache_dir=args.cache, force=True, quiet=True)
        refused = {}
        # a graph the validation refuses is still measured (strict=False), and the refusal is said at the top
        try:
            export_fp16(engine, quiet=True)
        except ClipfuseError as e:
            refused["fp16"] = str(e)
            export_fp16(engine, quiet=True, strict=False)
        try:
            int8 = export_int8(engine, train, count=args.calibration_count, data=evald, quiet=True)
        except ClipfuseError as e:
            refused["int8"] = str(e)
            int8 = export_int8(engine, train, count=args.calibration_count, data=evald, quiet=True, strict=False)
        m = read_manifest(engine)
        fp16 = m.data["precisions"]["fp16"]
        fp16["accuracy"] = paired_accuracy(m, engine / "model.fp16.onnx", evald)      # keys say int8: it is fp16
        graphs = {"model.fp16.onnx": fp16, "model.int8.onnx": int8, "model.int8-trt.onnx": int8["tensorrt"]}
        bench = run_bench(engine, batches=batches, runs=args.runs, precisions=("fp32", "fp16", "int8"),
                          openvino=not args.no_openvino, torch=not args.no_torch, out=tmp / "bench", quiet=True,
                          command=command)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    acc = int8["validation"].get("accuracy") or {}
    result = {"command": command, "set": args.set, "backbones": backbones, "seconds": round(time.perf_counter() - t0, 1),
              "digits": {"images": n, "train": n_train, "eval": acc.get("images")},
              "accuracy": {"fp32": acc.get("fp32")}, "refused": refused, "int8": int8, "graphs": graphs, "bench": bench}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
