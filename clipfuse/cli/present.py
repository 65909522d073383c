"""Text for people: how the CLI (the only presentation layer) shows what clipfuse.api returns.

api and the library return data (dicts, Predictions, reports); these functions turn it into the tables
and lines `clipfuse ...` prints, byte for byte what the commands always printed. A subsystem that writes
a report FILE formats it in its own report module (export/fit/report.py, export/precision/fp16_report.py,
clipfuse/bench/report.py); the few lines a subsystem logs while it works are its own (the logger).
"""
from __future__ import annotations

import csv
import io
import json

from clipfuse.bench.report import format_table
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.paired import wilson_interval
from clipfuse.export.precision.fp16_report import validation_lines
from clipfuse.export.precision.int8_stages import format_record
from clipfuse.export.precision.int8_validate import format_checks
from clipfuse.runtime import agreement

FORMATS = ("table", "jsonl", "csv")          # clipfuse predict --format


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"      # not reached: the loop returns at GB


def format_inspect(info: dict) -> str:
    """inspect_engine's dict as the table `clipfuse inspect` prints."""
    lines = [f"engine {info['name']}  ({info['folder']}, created {info['created']})"]
    lines.append(f"head: {info['head_kind']}   controller: {info['controller']}   "
                 f"opset {info['onnx']['opset']}   classes: {len(info['classes'])}")
    lines.append("")
    lines.append(f"{'#':>2}  {'backbone':<34} {'input':<10} {'D':>5} {'params':>9} {'GFLOPs':>8}")
    for i, b in enumerate(info["backbones"]):
        name = f"{b['arch']}:{b['weights']}"
        lines.append(f"{i:>2}  {name[:34]:<34} {b['input']:<10} {b['embed_dim']:>5} "
                     f"{b['visual_params'] / 1e6:>8.1f}M {b['gflops']:>8.2f}")
    lines.append(f"    {'total':<34} {'':<10} {'':>5} {info['total_visual_params'] / 1e6:>8.1f}M {info['total_gflops']:>8.2f}")
    lines.append("")
    shown = ", ".join(info["classes"][:10]) + (f", ... (+{len(info['classes']) - 10})" if len(info["classes"]) > 10 else "")
    lines.append(f"classes: {shown}")
    lines.append("inputs:  " + "; ".join(f"{i['name']} {i['dtype']} {tuple(i['shape'])}" for i in info["inputs"]))
    lines.append("outputs: " + "; ".join(f"{o['name']} {o['dtype']} {tuple(o['shape'])}" for o in info["outputs"]))
    lines.append("files:   " + "; ".join(f"{k} {human_bytes(v)}" for k, v in info["files"].items()))
    if info["validation_max_rel"]:
        lines.append("ONNX Runtime vs PyTorch, max relative error: " +
                     ", ".join(f"{k} {v:.1e}" for k, v in info["validation_max_rel"].items()))
    return "\n".join(lines)


def format_backbones(rows: list[dict]) -> str:
    """list_backbones' rows as the table `clipfuse backbones` prints, with how to write a backbone."""
    lines = [f"{'backbone':<14} {'input':>6} {'embed':>6} {'image params':>13} {'GFLOPs':>8}"]
    lines += [f"{r['arch']:<14} {r['image_size']:>6} {r['embed_dim']:>6} {r['visual_params'] / 1e6:>12.1f}M "
              f"{r['gflops']:>8.2f}" for r in rows]
    lines += ["\nWrite a backbone as ARCH[:WEIGHTS]; WEIGHTS = openai (default), a checkpoint path, or random:SEED.",
              "GFLOPs: image tower, batch 1, multiply-add = 2 (torch.utils.flop_counter)."]
    return "\n".join(lines)


def format_int8(info: dict) -> str:
    """What `clipfuse export ENGINE --precision int8` prints: per graph, what was quantized and its
    figures, each next to its bound (export_int8's record, export/precision/int8_export.py)."""
    lines = []
    for rec in [info] * bool(info.get("file")) + ([info["tensorrt"]] if info.get("tensorrt") else []):
        s, c = rec["settings"], rec["calibration"]
        lines += [f"{rec['file']} (target {rec['target']}): {sum(rec['quantized'].values())} tower ops quantized "
                  f"{rec['quantized']}, activations {s['activation_type']} "
                  f"({'symmetric' if s['extra_options']['ActivationSymmetric'] else 'asymmetric'}), weights "
                  f"{s['weight_type']} per-channel; {c['images']} calibration images ({s['calibrate_method']}, "
                  f"sha256 {c['sha256'][:12]}); float: {rec['float']['islands']}"
                  + (f"; towers kept fp32: {', '.join(rec['float_backbones'])}" if rec.get("float_backbones") else ""),
                  f"{rec['file']} vs fp32 on ONNX Runtime CPU, {rec['validation']['images']} images:"]
        lines += [f"  {x.strip()}" for x in format_checks(rec["validation"])]
    if info.get("cascade"):
        lines += format_record(info["cascade"])
    return "\n".join(lines)


def format_fp16(info: dict) -> str:
    """What `clipfuse export ENGINE --precision fp16` prints: the validation figures, each next to its
    bound (export/precision/fp16_report.py writes them once)."""
    v = info["validation"]
    return "\n".join([f"model.fp16.onnx: fp32 islands {info['fp32_islands']}, {info['casts']} casts"
                      + (f"; towers kept fp32: {', '.join(info['float_backbones'])}" if info.get("float_backbones")
                         else ""),
                      f"fp16 vs fp32 on ONNX Runtime CPU, {v['images']} images:"]
                     + [f"  {x}" for x in validation_lines(v)])


def format_compare(report: dict) -> str:
    """compare_backends' report as `clipfuse compare` prints it: each backend against the reference,
    every figure next to its bound, then the verdict."""
    lines = [f"engine {report['engine']}: {report['images']} images, reference {report['reference']}"]
    for b in report["backends"]:
        lines.append(f"  {b['name']}: {b['describe']}")
    for c in report["comparisons"]:
        lines += ["", f"{c['backend']} vs {report['reference']} ({c['tolerance_set']} tolerances: "
                  + agreement.describe_bounds(c["bounds"]) + ")"]
        lines += agreement.format_lines(c)
    cas = report.get("cascade")
    if cas:
        counts = ", ".join(f"stage {s}: {n}" for s, n in cas["stage_counts"].items())
        lines += ["", f"cascade ({cas.get('precision', 'fp32')} stage graphs, routed) vs the full graph "
                      f"{cas.get('full_graph', 'model.onnx')}: {cas['images']} images ({counts}); "
                      f"top-1 agreement {100 * cas['top1_agreement']:.1f}% (early exits may differ by design)"]
        if cas["last_stage"] is None:
            lines.append("  no image reached the last stage: nothing to hold to the fp32 tolerance")
        else:
            lines += ["  images at the last stage (fp32 tolerances: "
                      + agreement.describe_bounds(cas["last_stage"]["bounds"]) + ")"]
            lines += ["  " + x for x in agreement.format_lines(cas["last_stage"])]
    lines += ["", "agree: all within tolerance" if report["ok"] else "DISAGREE: out of tolerance (see FAIL lines)"]
    return "\n".join(lines)


def printable(text: str) -> str:
    """`text` for a terminal: unchanged unless it holds a control character (a newline in a file name
    would otherwise forge a row of the table); then repr's escapes, without the quotes."""
    if text.isprintable():
        return text
    return repr(text)[1:-1]


def csv_columns(top_k: int, backbone_names: list[str], stages: bool = False) -> list[str]:
    return (["path", "error"] + [c for r in range(1, top_k + 1) for c in (f"label_{r}", f"prob_{r}")]
            + [f"temperature:{b}" for b in backbone_names] + (["stage"] if stages else []))


def format_predictions(preds, fmt: str, top_k: int, backbone_names, header: bool = False, stages=None) -> str:
    """Predictions as text: "table" (for people), "jsonl" (one JSON object per image) or "csv" (for programs).
    stages: show which cascade stage answered (None: when any prediction says)."""
    if stages is None:
        stages = any(p.stage is not None for p in preds)
    if fmt not in FORMATS:
        raise ClipfuseError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "jsonl":
        return "".join(json.dumps(p.to_dict()) + "\n" for p in preds)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(csv_columns(top_k, backbone_names, stages))
        for p in preds:
            pairs = [v for lab, pr in zip(p.labels, p.probs) for v in (lab, f"{pr:.6f}")]
            pairs += [""] * (2 * top_k - len(pairs))
            temps = [f"{p.temperatures[b]:.6f}" if b in p.temperatures else "" for b in backbone_names]
            w.writerow([p.name, p.error or ""] + pairs + temps
                       + ([p.stage if p.stage is not None else ""] if stages else []))
        return buf.getvalue()
    lines = []
    for p in preds:
        if not p.ok:
            lines.append(f"{printable(p.name)}\n    FAILED: {printable(p.error)}")
            continue
        width = max(len(lab) for lab in p.labels)
        lines.append(printable(p.name))
        lines += [f"  {r}. {lab:<{width}}  {pr:7.2%}" for r, (lab, pr) in enumerate(zip(p.labels, p.probs), 1)]
        lines.append("    temperatures: " + ", ".join(f"{b} {t:.3f}" for b, t in p.temperatures.items()))
        if p.stage is not None:
            lines.append(f"    answered by cascade stage {p.stage} of {len(backbone_names)}")
    return "".join(line + "\n" for line in lines)


def format_triton(model) -> str:
    """What `clipfuse triton` prints about the model folder it wrote (a cascade is a Python-backend model)."""
    lines = [f"wrote {model} (config.pbtxt checked against Triton's ModelConfig schema)"]
    if (model / "1" / "model.py").is_file():
        lines.append("cascade: a Python-backend model (1/model.py routes each image through the stages it needs); "
                     "the server's Python needs clipfuse installed")
    lines.append(f"run:  tritonserver --model-repository {model.parent}")
    return "\n".join(lines)


def format_serving(server) -> str:
    """What `clipfuse serve` says on stderr once the model is ready: where, and what is (not) protected.
    The admin token is never printed: statistics/repository endpoints are for the API (Server.headers)."""
    return (f"model {server.model_name}: {server.http_url}  {server.grpc_url}  metrics {server.metrics_url}\n"
            "inference is unauthenticated: keep the default loopback host, or put an authenticating proxy in "
            "front; statistics, repository and shared-memory endpoints are token-protected")


def format_bench(result: dict) -> str:
    """A bench result as Markdown tables."""

    return format_table(result)


def _interval(accuracy_pct: float, n) -> str:
    """ " [lo, hi] (95%, n images)": the Wilson interval of an accuracy, or "" when n is unknown."""
    if not n:
        return ""

    iv = wilson_interval(int(round(accuracy_pct * n / 100)), int(n))
    return f" [{iv.lo:.1f}, {iv.hi:.1f}] (95%, {n} images)"


def format_demo(demo: dict) -> str:
    """run_demo's result as the sections `clipfuse demo` prints: fit, predict, bench."""
    shipped = demo["fit"]["shipped"]
    parts = [f"## Fit (held-out digits, k = {shipped['shots']})\n\n"
             + "\n".join(f"- {m}{' (shipped)' if m == shipped.get('row') else ''}: {a:.1f}%"
                         + _interval(a, demo["fit"].get("num_eval")) for m, a in shipped["accuracy"].items())
             + f"\n\nThe engine ships {shipped.get('row')}: {shipped.get('reason')}\n",
             "## Predict\n\n" + format_predictions(demo["predictions"], "table", 3, demo["backbone_names"], header=True),
             "## Bench\n\n" + format_bench(demo["bench"]),
             f"plot: {demo['bench'].get('plot')}",
             f"demo done in {demo['seconds']:.0f} s"]
    return "\n".join(parts)
