"""The text of `clipfuse fit`'s and `clipfuse eval`'s reports: Markdown for report.md / eval.md, the same
text on the terminal, and the diversity heat map beside them (see export/fit/diversity.py)."""
from __future__ import annotations

import json
from pathlib import Path

from clipfuse.core.errors import ClipfuseError

from ..graph.engine_folder import write_file_atomic
from ..paired import wilson_interval
from .diversity import save_heatmap, to_markdown
from .study import study_to_markdown

HEATMAP = "diversity.png"


def heatmap_bytes(div: dict):
    """The diversity heat map as PNG bytes, or the line saying why it was skipped."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        why = save_heatmap(div, Path(d) / HEATMAP)
        return why if why is not None else (Path(d) / HEATMAP).read_bytes()


def _heat_line(heatmap: str | None) -> str:
    return f"![pairwise diversity]({heatmap})" if heatmap == HEATMAP else (heatmap or "")


def _wilson(accuracy_pct: float, n: int) -> str:
    """The Wilson 95% interval of an accuracy measured on n images, as "[lo, hi]"."""

    iv = wilson_interval(int(round(accuracy_pct * n / 100)), n)
    return f"[{iv.lo:.1f}, {iv.hi:.1f}]"


def render_report(report: dict) -> str:
    s = report["shipped"]
    same = report.get("identical_draws", [])
    table = study_to_markdown(report["study"])
    if same:                                    # mark the columns whose seeds all drew the same shots
        head, rest = table.split("\n", 1)
        for k in same:
            head = head.replace(f" {k}-shot |", f" {k}-shot † |")
        table = head + "\n" + rest
    lines = [
        f"# clipfuse fit: {', '.join(report['backbones'])}",
        "",
        f"- data: {report['data']}; eval: {report['eval']} ({report['num_eval']} images)",
        f"- head: {report['head']}; controller pool: {report['num_train_pool']} images"
        + (f"; probes fitted on {report['probe_images']} other images" if report["probe_images"] else ""),
        f"- unreadable images skipped: {len(report['unreadable_images'])}",
        "",
        f"## What ships: {s.get('row', 'NLC')}",
        "",
        s.get("reason", ""),
        "",
        "## Accuracy (%) on the eval split, mean ± std over seeds "
        f"{report['study']['seeds']}, by shots per class",
        "",
        table,
        "Singles, LOG-AVG, PROB-AVG, VOTE and ORACLE use no shots: their ± 0.0 holds by construction.",
    ]
    if same:
        lines.append(f"† every seed drew the same shots at k = {', '.join(map(str, same))} (each class has exactly k images "
                     "in the controller's pool), so C-LOG-AVG is identical across seeds and NLC differs only by its "
                     "seeded initialisation: a ± 0.0 there is no measure of spread.")
    lines.append("")
    if report["shots_skipped"]:
        lines += [f"Shots {report['shots_skipped']} skipped: a class has fewer images in the controller's pool.", ""]
    lines += [f"## The fitted controllers on the eval split (k = {s['shots']}, seed {s['seed']})", "",
              "| method | accuracy % | 95% interval (Wilson) |", "| --- | ---: | ---: |"]
    lines += [f"| {m}{' (shipped)' if m == s.get('row') else ''} | {a:.1f} | {_wilson(a, report['num_eval'])} |"
              for m, a in s["accuracy"].items()]
    lines += ["", f"On {report['num_eval']} images one image moves an accuracy by {100 / report['num_eval']:.2f} points; "
              "compare two methods on these same images as a paired difference (clipfuse.export.paired), not by "
              "whether their intervals overlap."]
    if "diversity" in report:
        lines += ["", "## Diversity of the backbones on the eval split", "",
                  to_markdown(report["diversity"], _heat_line(report.get("heatmap")))]
    return "\n".join(lines) + "\n"


def format_eval(res: dict, heatmap: str | None = None) -> str:
    """eval's text: the accuracy table with the shipped row marked, then the diversity figures."""

    lines = [f"{res['engine']} on {res['data']}: {res['num_images']} images"
             + (f", {len(res['unreadable_images'])} unreadable (skipped)" if res["unreadable_images"] else ""),
             "", "| method | accuracy % | 95% interval (Wilson) |", "| --- | ---: | ---: |"]
    lines += [f"| {m}{' (shipped)' if m == res.get('shipped') else ''} | {a:.1f} | {_wilson(a, res['num_images'])} |"
              for m, a in res["accuracy"].items()]
    lines += ["", "## Diversity of the backbones on these images", "", to_markdown(res["diversity"], heatmap)]
    return "\n".join(lines)


def write_eval_report(res: dict, folder: Path) -> dict:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipfuseError(f"cannot create the report folder {str(folder)!r}: {e.strerror}") from None
    why = save_heatmap(res["diversity"], folder / HEATMAP)
    heat = HEATMAP if why is None else why
    md, js = folder / "eval.md", folder / "eval.json"
    write_file_atomic(md, format_eval(res, _heat_line(heat)) + "\n")
    write_file_atomic(js, json.dumps({k: v for k, v in res.items() if k != "report"}, indent=2) + "\n")
    return {"markdown": str(md), "json": str(js), "heatmap": str(folder / HEATMAP) if why is None else None,
            "heatmap_line": f"heat map: {folder / HEATMAP}" if why is None else why}
