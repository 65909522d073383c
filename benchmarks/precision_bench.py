"""fp32 / fp16 / int8 side by side, on ONNX Runtime and OpenVINO: the committed precision results.

    python benchmarks/precision_bench.py --set default     # RN50:random:0 + ViT-B-32:random:1
    python benchmarks/precision_bench.py --set trained     # the three towers trained here (train_towers.py), on
                                                           # 2000 images of benchmarks/tower_digits.py's figures split
    python benchmarks/precision_bench.py --set nine --per-class 30 --shots 4 --calibration-count 32 \
        --precisions fp32,int8 --int8-target cpu --batch 1,8 --runs 2 --no-singles --no-openvino
                                                          # the nine OpenAI CLIP architectures, random weights

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

The nine cannot run the default plan on this 2-core machine: their fp32 graph takes ~7 s per
image, so the options trim it and the results say what was left out: 300 digits (the ones their
feature cache holds), 32 calibration images, fp32 and int8 only (fp16 on ONNX Runtime CPU runs
fp32 kernels between casts: 1.06-1.10x fp32's time on the pair), the CPU graph only, batch 1 and
8, 2 rounds, no singles (benchmarks/results/bench_nine.md measured them) and no OpenVINO
(slower than ONNX Runtime at every batch on the pair). `--reuse-engine` keeps an engine already
fitted by the same command (the fit and the 6.2 GB export take ~8 minutes); `--reuse-int8` also keeps
its int8 graph and record when current (the calibration and the validation over the held-out digits take
~10 minutes on the nine). Three more commands add what the first left out, one file each, because
on 24 GB the nine's workers cannot all be alive at once (fp32 holds ~8 GB at batch 8 and ~15 GB at
batch 32):

    ... --precisions fp32,fp16 --batch 1,8 --runs 2 --no-openvino --out .../precision_nine_fp16
    ... --precisions fp32,int8 --reuse-int8 --openvino-precisions int8 --batch 1,8 --runs 2
        --out .../precision_nine_openvino
    ... --precisions fp32,int8 --reuse-int8 --no-openvino --no-arena --batch 32 --runs 1
        --out .../precision_nine_b32
    (each with --set nine --per-class 30 --shots 4 --calibration-count 32 --int8-target cpu --no-singles
     --no-torch --reuse-engine; the exact command heads each file)

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
    "trained": None,         # train_towers.specs(): RN50, ViT-B-32, RN101 trained here (checkpoints, ARCH:/path)
}
TRAINED_IMAGES = 2000        # tower_digits.py, figures split: source digits the towers never trained on


def split_digits(tmp: Path, per_class: int | None = None, trained: bool = False) -> tuple[Path, Path, int]:
    """tmp/train and tmp/eval, the digits written by nlc_digits.write_digits (trained: tower_digits.write_folder's
    figures split) and moved (bytes unchanged)."""
    sys.path.insert(0, str(ROOT))
    import tower_digits
    from nlc_digits import write_digits

    from clipfuse.export.data import scan_labelled_folder, seeded_split

    n = tower_digits.write_folder(tmp / "digits", "figures", TRAINED_IMAGES) if trained else write_digits(tmp / "digits")
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


def _same_engine(engine: Path, backbones) -> bool:
    from clipfuse.core.errors import ClipfuseError
    from clipfuse.runtime.manifest import read_manifest

    try:
        return read_manifest(engine).backbone_names == list(backbones)
    except ClipfuseError:
        return False


def render(result: dict) -> str:
    from clipfuse.bench.report import format_table

    o = result.get("options") or {}
    int8 = result.get("int8")
    calib = f"; int8 calibrated on {int8['calibration']['images']} of the fit images" if int8 else ""
    left = [x for x, on in (("fp16", "fp16" in o.get("precisions", ("fp16",))), ("the TensorRT int8 graph",
            "tensorrt" in o.get("int8_targets", ("tensorrt",))), ("the singles and the naive ensemble",
            o.get("singles", True)), ("OpenVINO", o.get("openvino", True)), ("PyTorch eager", o.get("torch", True)))
            if not on]
    L = [f"<!-- made by: {result['command']} ({result['seconds']:.0f} s) -->", "", f"# Precision: {result['set']}", "",
         f"Command: `{result['command']}`", "",
         (f"Backbones: {' + '.join(result['backbones'])} (towers trained here, benchmarks/train_towers.py: a stand-in "
          "for CLIP's weights, without the outlier channels training at scale learns)." if result["set"] == "trained"
          else f"Backbones: {' + '.join(result['backbones'])} (seeded random weights: random weights have no trained "
          "outlier channels, so agreement here is likely better than on trained CLIP weights; random ResNet towers "
          "embed every image nearly alike, which makes them the opposite case: see the error-to-spread column)."),
         f"{'Images (benchmarks/tower_digits.py, figures split)' if result['set'] == 'trained' else 'Digits'}: "
         f"{result['digits']['images']} images, fit on {result['digits']['train']}, held out "
         f"{result['digits']['eval']}{calib}; int8 calibration method: {o.get('calibration_method', 'minmax')}."]
    ov = o.get("openvino")
    if isinstance(ov, str):               # --openvino-precisions: OpenVINO for some precisions only
        off = [p for p in o.get("precisions", ()) if p not in ov.split(",")]
        if off:
            left.append(f"OpenVINO for {', '.join(off)}")
    if left:
        L.append(f"Not measured in this run: {', '.join(left)} (options: see the command).")
    if o.get("int8_keep_fp32"):
        L.append(f"int8 towers kept fp32: --int8-keep-fp32 {' '.join(o['int8_keep_fp32'])} -> "
                 f"{', '.join(int8.get('float_backbones') or []) or 'none'}.")
        v8 = next((r["validation"] for n, r in result["graphs"].items() if "int8" in n), None)
        if "auto" in o["int8_keep_fp32"] and not int8.get("float_backbones") and v8:
            from clipfuse.export.precision.int8_export import failing_backbones

            failing = failing_backbones(v8)
            if failing and len(failing) == len(v8["backbones"]):
                L.append("auto keeps the towers whose own checks fail, unless that is every tower (int8 would then "
                         f"gain nothing): here all {len(failing)} fail theirs, so none is kept and the graph stays "
                         "refused.")
    L += [""] + [f"REFUSED by its validation (measured anyway, not shippable): {w}: {e}" for w, e in result["refused"].items()]
    L += ["", "## Validation against fp32 and accuracy on the held-out digits", "",
          "Agreement images: fp16 on the 32 shipped photo variants; int8 on every held-out digit (export --precision "
          "int8 --data: the task's own images; agreement and accuracy from one pass of each graph).", "",
          "| graph | min embedding cosine | worst error / spread (bound) | fused top-1 changed | accuracy % "
          "| minus fp32, points [95% paired] |",
          "|---|---:|---:|---:|---:|---|"]
    L.append(f"| model.onnx (fp32) | 1 | 0 | 0 | {result['accuracy']['fp32']:.2f} | - |")
    for name, rec in result["graphs"].items():
        v = rec["validation"]
        a = rec.get("accuracy") or v.get("accuracy")         # fp16: beside its record; int8: in its validation
        cos = min(b["cosine_min"] for b in v["backbones"])
        ratios = [b.get("error_to_spread") for b in v["backbones"] if b.get("error_to_spread") is not None]
        ratio = f"{max(ratios):.3g} ({v['bounds'].get('max_error_to_spread', '-')})" if ratios else "-"
        key = "int8" if a and "int8" in a else "fp16"
        d = a["paired"] if a else None
        L.append(f"| {name} | {cos:.5f} | {ratio} | {v['fused']['top1_changed']}/{v['images']} | "
                 + (f"{a[key]:.2f} | {d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] |" if a else "- | - |"))
    L += ["", "Per backbone (each graph against fp32, on its agreement images):", "",
          "| graph | backbone | embedding cosine min | feature error / median distance between images | "
          "own top-1 changed | kept fp32 |", "|---|---|---:|---:|---:|---|"]
    for name, rec in result["graphs"].items():
        v = rec["validation"]
        kept = set(rec.get("float_backbones") or [])
        for b in v["backbones"]:
            r = b.get("error_to_spread")
            r = (f"{b['feature_error_max']:.3g} / {b['feature_spread_median']:.3g} = {r:.3g}" if r is not None else "-")
            L.append(f"| {name} | {b['backbone']} | {b['cosine_min']:.5f} | {r} | {b['top1_changed']}/{v['images']} | "
                     f"{'yes' if b['backbone'] in kept else ''} |")
    L += ["", "## Latency, memory, side by side", "", format_table(result["bench"])]
    sys.path.insert(0, str(ROOT))
    import train_towers

    return train_towers.shorten("\n".join(L) + "\n", result["backbones"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="default")
    ap.add_argument("--backbone", action="append", default=None, help="override the set's backbones (tests)")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calibration-count", type=int, default=256)
    ap.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                    help="int8 activation ranges (export --calibration-method)")
    ap.add_argument("--per-class", type=int, default=None, help="digits per class (tests; default all 1797)")
    ap.add_argument("--shots", type=int, default=16, help="the controller's labelled images per class")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--openvino-precisions", default=None, help="only these precisions on OpenVINO too (e.g. int8: "
                    "every configuration's worker is alive at once, and the nine's cannot all be on 24 GB)")
    ap.add_argument("--no-singles", action="store_true", help="skip each backbone alone, their sum and the naive "
                    "ensemble in the bench")
    ap.add_argument("--precisions", default="fp32,fp16,int8", help="graphs made and measured (fp32 always)")
    ap.add_argument("--int8-target", choices=("both", "cpu"), default="both")
    ap.add_argument("--int8-keep-fp32", action="append", default=None, metavar="BACKBONE|auto",
                    help="towers kept fp32 in the int8 graphs (export --int8-keep-fp32)")
    ap.add_argument("--reuse-engine", action="store_true", help="keep the engine if it holds the same backbones")
    ap.add_argument("--no-arena", action="store_true", help="ONNX Runtime's CPU arena off in the timing workers: each "
                    "holds its weights between calls, not its peak (the nine at batch 32 on a 24 GB machine)")
    ap.add_argument("--reuse-int8", action="store_true", help="with --reuse-engine: keep the engine's int8 graphs and "
                    "their record (validation, accuracy) when they are current, instead of exporting them again")
    ap.add_argument("--cache", default=None, help="feature cache (default ~/.cache/clipfuse)")
    ap.add_argument("--engine", default=None, help="engine folder (default engines/precision-<set>)")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/precision_<set>)")
    args = ap.parse_args(argv)
    if not args.backbone and SETS[args.set] is None:
        sys.path.insert(0, str(ROOT))
        import train_towers

        backbones = train_towers.specs()
    else:
        backbones = args.backbone or SETS[args.set]
    engine = Path(args.engine or f"engines/precision-{args.set}")
    out = Path(args.out or ROOT / "results" / f"precision_{args.set}")
    batches = tuple(int(b) for b in args.batch.split(","))
    precisions = tuple(dict.fromkeys(["fp32"] + [p for p in args.precisions.split(",") if p]))
    targets = ("cpu", "tensorrt") if args.int8_target == "both" else ("cpu",)
    command = "python benchmarks/precision_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from clipfuse.bench.run import run_bench
    from clipfuse.core.errors import ClipfuseError
    from clipfuse.export.fit.pipeline import fit_engine
    from clipfuse.export.precision.fp16 import export_fp16
    from clipfuse.export.precision.int8_export import export_int8
    from clipfuse.export.precision.int8_validate import paired_accuracy, require_valid
    from clipfuse.runtime.manifest import read_manifest

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-precision-"))
    try:
        train, evald, n = split_digits(tmp, args.per_class, trained=args.set == "trained")
        n_train = sum(1 for _ in train.rglob("*.png"))
        if not (args.reuse_engine and _same_engine(engine, backbones)):
            fit_engine(backbones, train, engine, eval_data=evald, head="linear-probe", probe_fraction=0.8,
                       shots=args.shots, seed=0, study_shots=(args.shots,), study_seeds=(0,), cache_dir=args.cache,
                       force=True)
        refused, graphs = {}, {}
        # a graph the validation refuses is still measured (strict=False), and the refusal is said at the top
        if "fp16" in precisions:
            try:
                export_fp16(engine)
            except ClipfuseError as e:
                refused["fp16"] = str(e)
                export_fp16(engine, strict=False)
            m = read_manifest(engine)
            graphs["model.fp16.onnx"] = m.data["precisions"]["fp16"]
            graphs["model.fp16.onnx"]["accuracy"] = paired_accuracy(m, engine / "model.fp16.onnx", evald, key="fp16")
        int8 = None
        if "int8" in precisions and args.reuse_int8 and args.reuse_engine:
            from clipfuse.runtime.precisions import precision_onnx_path

            try:                             # current: made from this model.onnx, through its own record
                precision_onnx_path(read_manifest(engine), "int8")
                int8 = read_manifest(engine).data["precisions"]["int8"]
                log_reuse = f"reusing {engine}/model.int8.onnx made {int8.get('created')}"
                print(log_reuse, file=sys.stderr)
            except ClipfuseError:
                int8 = None
        if int8 is not None:
            graphs["model.int8.onnx"] = int8
            if "tensorrt" in int8:
                graphs["model.int8-trt.onnx"] = int8["tensorrt"]
            targets = tuple(int8.get("targets") or targets)
            refused_why = [f"{n}: " + "; ".join(r["validation"]["failures"])
                           for n, r in (("model.int8.onnx", int8), ("model.int8-trt.onnx", int8.get("tensorrt")))
                           if r and not r["validation"]["ok"]]
            if refused_why:
                refused["int8"] = " | ".join(refused_why)
        elif "int8" in precisions:
            # one export, not strict: the refusal it would have made is read from its validation (an export
            # of the nine takes ~20 minutes; exporting again after a refusal would double it)
            int8 = export_int8(engine, train, count=args.calibration_count, method=args.calibration_method,
                               data=evald, targets=targets,
                               keep_fp32=args.int8_keep_fp32 or (), strict=False)
            graphs["model.int8.onnx"] = int8
            if "tensorrt" in int8:
                graphs["model.int8-trt.onnx"] = int8["tensorrt"]
            why = []
            for name, rec in (("model.int8.onnx", int8), ("model.int8-trt.onnx", int8.get("tensorrt"))):
                try:
                    if rec:
                        require_valid(rec["validation"], f"{name} of {str(engine)!r}")
                except ClipfuseError as e:
                    why.append(str(e))
            if why:
                refused["int8"] = " | ".join(why)
        bench = run_bench(engine, batches=batches, runs=args.runs, precisions=precisions,
                          openvino=(False if args.no_openvino else
                                    tuple(args.openvino_precisions.split(",")) if args.openvino_precisions else True),
                          torch=not args.no_torch, out=tmp / "bench", arena=not args.no_arena,
                          command=command, singles=not args.no_singles)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    acc = (int8 or {}).get("validation", {}).get("accuracy") or (graphs.get("model.fp16.onnx") or {}).get("accuracy") or {}
    result = {"command": command, "set": args.set, "backbones": backbones, "seconds": round(time.perf_counter() - t0, 1),
              "digits": {"images": n, "train": n_train, "eval": acc.get("images")},
              "accuracy": {"fp32": acc.get("fp32")}, "refused": refused, "int8": int8, "graphs": graphs, "bench": bench,
              "options": {"precisions": precisions, "int8_targets": targets, "singles": not args.no_singles,
                          "openvino": (not args.no_openvino) and (args.openvino_precisions or True),
                          "torch": not args.no_torch,
                          "int8_keep_fp32": args.int8_keep_fp32 or [], "calibration_method": args.calibration_method}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
