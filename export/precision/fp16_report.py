"""The fp16 report: the committed benchmarks/results/fp16_validation.{md,json} and its command, and the
short summary `clipfuse export ENGINE --precision fp16` prints. Both write the validation figures
through `validation_lines`, once, each figure next to the bound that decides pass/fail.

    python -m clipfuse.export.precision.fp16_report ENGINE [--out benchmarks/results/fp16_validation] [--rounds 5] [--note ...]
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from clipfuse.runtime import agreement
from clipfuse.runtime.compare import photo_variants
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.precisions import MODEL_FP16

from ..graph.engine_folder import write_file_atomic
from .fp16 import export_fp16, validate_fp16
from .validate import _session, batched_feeds


def time_precisions(manifest, fp16_path: Path, rounds: int = 5, batch: int = 8) -> dict:
    """ORT CPU latency of the fp32 and fp16 graphs at one batch, interleaved A B A B after a warm-up,
    with the CPU time other processes took meanwhile (a busy neighbour slows both)."""
    import statistics
    import time

    import psutil

    feed = batched_feeds(manifest, photo_variants()[:batch], batch)[0]
    sessions = {"fp32": _session(manifest.onnx_path), "fp16": _session(fp16_path)}
    for s in sessions.values():
        s.run(None, feed)
    own = psutil.Process()
    cpu0, own0, t0 = psutil.cpu_times(), own.cpu_times(), time.perf_counter()
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    cpu1, own1, wall = psutil.cpu_times(), own.cpu_times(), time.perf_counter() - t0
    busy = lambda c: c.user + c.system + getattr(c, "nice", 0) + getattr(c, "irq", 0) + getattr(c, "softirq", 0)
    others = max(0.0, (busy(cpu1) - busy(cpu0)) - ((own1.user + own1.system) - (own0.user + own0.system)))
    out = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)} for k, v in times.items()}
    out["batch"], out["rounds"] = batch, rounds
    out["fp16_over_fp32"] = out["fp16"]["median_ms"] / out["fp32"]["median_ms"]
    out["other_processes_cores"] = round(others / wall, 2)
    out["wall_s"] = round(wall, 1)
    return out


def validation_lines(v: dict) -> list[str]:
    """The validation figures, each with its bound: the one place they are written as text."""
    lines = [f"bounds: {agreement.describe_bounds(v['bounds'])}; logits per backbone: {v['bounds']['logits']}"]
    lines += [agreement.backbone_line(b, detail=True) for b in v["backbones"]]
    f = v["fused"]
    lines.append(f"fused: max logit err {f['logits_max_abs']:.3g} ({f['logits_max_rel']:.2e} rel; bound "
                 f"{f['logits_bound']:.3g}), top-1 agreement {f['top1_agreement'] * 100:.1f}% ({f['top1_flips']} "
                 f"changed, bound <= {f['top1_changed_bound'] * 100:g}%)")
    for o in v["outputs"]:
        lines.append(f"{o['output']}: max |err| {o['max_abs']:.3g} (tolerance {o['tolerance']:.3g})"
                     + ("" if o["ok"] else " FAIL"))
    lines.append("verdict: " + ("PASS" if v["ok"] else "FAIL: " + "; ".join(v["failures"])))
    return lines


def format_fp16_summary(info: dict) -> str:
    """What `clipfuse export ENGINE --precision fp16` prints."""
    v = info["validation"]
    return "\n".join([f"model.fp16.onnx: fp32 islands {info['fp32_islands']}, {info['casts']} casts"
                      + (f"; towers kept fp32: {', '.join(info['float_backbones'])}" if info.get("float_backbones")
                         else ""),
                      f"fp16 vs fp32 on ONNX Runtime CPU, {v['images']} images:"]
                     + [f"  {x}" for x in validation_lines(v)])


def format_fp16_report(info: dict, manifest, command: str, note: str | None = None) -> str:
    v = info["validation"]
    lines = ["# fp16 graph against fp32 on ONNX Runtime CPU", "", f"Command: `{command}`", "",
             f"Engine folder: {manifest.folder} (fp32 graph exported {manifest.data.get('created')} by "
             f"{manifest.data['onnx'].get('exporter')}; model.fp16.onnx converted {info.get('created')})"
             + (f". {note}" if note else "") + ".", "",
             f"Engine: {' + '.join(manifest.backbone_names)}, {len(manifest.classes)} classes "
             "(seeded random weights: the figures say how fp16 treats these networks, not trained ones). "
             f"onnxruntime {v['onnxruntime']}. Images: {v['images']} (the 4 shipped photographs, whole and at "
             "3 crops, each also mirrored).", "",
             "fp32 islands kept by explicit casts (op type: count):", "",
             "- anywhere: " + ", ".join(f"{k} {n}" for k, n in info["fp32_islands"]["ops"].items()),
             "- feature L2 norm, heads, controller, combination: "
             + ", ".join(f"{k} {n}" for k, n in info["fp32_islands"]["feature_norm_and_downstream"].items()),
             f"- {info['casts']} Cast nodes in {info['nodes']}", "",
             "Figures and the bounds that decide pass/fail (everything after the raw embeddings is fp32, so a "
             "logit moves only as far as the head carries the feature error):", ""]
    lines += [f"- {x}" for x in validation_lines(v)]
    f = v["fused"]
    lines += ["", f"Median fp32 top-2 margin of the fused logits: {f['fp32_top2_margin_median']:.3g}; "
              f"max |probs error| {f['probs_max_abs']:.3g}.", ""]
    fb = {k: n for k, n in (info.get("ort_cpu_fp32_fallback_ops") or {}).items() if isinstance(n, int)}
    note_si = (info.get("ort_cpu_fp32_fallback_ops") or {}).get("shape_inference")
    lines += ["ONNX Runtime CPU has no fp16 kernel for these ops and computes them in fp32 between inserted "
              "casts (op type: nodes): " + (", ".join(f"{k} {n}" for k, n in fb.items()) or "none")
              + (" (the Max nodes are the Relus: ORT inlines an fp16 Relu as Max(x, 0))" if "Max" in fb else "")
              + (f" ({note_si})" if note_si else "") + ". So this CPU "
              "check measures fp16 weights and fp16 activations between ops, not fp16 arithmetic inside those "
              "ops; benchmarks/gpu_check.py measures fp16 arithmetic on a GPU.", ""]
    t = info.get("timing")
    if t:
        lines += [f"ORT CPU latency, batch {t['batch']}, median (min-max) over {t['rounds']} interleaved rounds: "
                  f"fp32 {t['fp32']['median_ms']:.0f} ms ({t['fp32']['min_ms']:.0f}-{t['fp32']['max_ms']:.0f}), "
                  f"fp16 {t['fp16']['median_ms']:.0f} ms ({t['fp16']['min_ms']:.0f}-{t['fp16']['max_ms']:.0f}): "
                  f"fp16 / fp32 = {t['fp16_over_fp32']:.2f}. Other processes took {t['other_processes_cores']} "
                  f"cores on average meanwhile (of {os.cpu_count()}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m clipfuse.export.precision.fp16_report ENGINE [--out benchmarks/results/fp16_validation] [--rounds 5]"""
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(description="Add model.fp16.onnx to ENGINE (if absent), validate, time, report.")
    ap.add_argument("engine")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--note", default=None, help="a line for the report, e.g. how the engine folder was made")
    args = ap.parse_args(argv)
    m = read_manifest(args.engine)
    if "fp16" not in m.data.get("precisions", {}):
        export_fp16(args.engine, strict=False)
        m = read_manifest(args.engine)
    info = dict(m.data["precisions"]["fp16"])

    # validated again, always: the figures recorded at export came from that day's comparator and bounds
    info["validation"] = validate_fp16(m, m.folder / MODEL_FP16)
    info["timing"] = time_precisions(m, m.folder / MODEL_FP16, rounds=args.rounds)
    command = "python -m clipfuse.export.precision.fp16_report " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = format_fp16_report(info, m, command, note=args.note)
    print(report)
    if args.out:

        write_file_atomic(Path(args.out + ".json"),
                          json.dumps({"command": command, "engine": m.backbone_names, **info}, indent=2) + "\n")
        write_file_atomic(Path(args.out + ".md"), report)
    return 0 if info["validation"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
