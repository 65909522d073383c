"""Text for people: how the CLI (the only presentation layer) shows what clipfuse.api returns.

api returns data (dicts, Predictions, reports); these functions turn it into the tables and lines
`clipfuse ...` prints. Formatting that belongs to one subsystem's own report stays with it and is
only called from here (predict's table/jsonl/csv, compare's report, the bench's Markdown).
"""
from __future__ import annotations

from clipfuse.bench.report import format_table
from clipfuse.export.paired import wilson_interval
from clipfuse.export.precision.fp16_report import format_fp16_summary
from clipfuse.export.precision.int8_export import format_int8_summary
from clipfuse.runtime.compare import format_comparison
from clipfuse.runtime.predict import format_predictions as _format


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


def format_int8(info: dict) -> str:
    """The int8 graphs' settings and validation figures, each next to its bound (export/precision/int8_export.py)."""
    return format_int8_summary(info)


def format_fp16(info: dict) -> str:
    """The fp16 validation figures, each next to its bound (export/precision/fp16_report.py writes them once)."""
    return format_fp16_summary(info)


def format_compare(report: dict) -> str:
    return format_comparison(report)


def format_predictions(preds, fmt: str, top_k: int, backbone_names, header: bool = False, stages=None) -> str:
    """Predictions as text: "table", "jsonl" (one JSON object per image) or "csv"."""

    return _format(preds, fmt, top_k, backbone_names, header=header, stages=stages)


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
