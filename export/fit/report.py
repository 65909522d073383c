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
    table = study_to_markdown(report["study"]) if report["study"] else ""
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
        *_what_ships(report),
    ]
    if report["study"]:
        lines += ["## Accuracy (%) on the eval split, mean ± std over seeds "
                  f"{report['study']['seeds']}, by shots per class", "", table,
                  "Singles, LOG-AVG, PROB-AVG, VOTE and ORACLE use no shots: their ± 0.0 holds by construction."]
    else:
        lines += ["No study of NLC against the baselines: one backbone has no ensemble to fit a controller for."]
    if same:
        lines.append(f"† every seed drew the same shots at k = {', '.join(map(str, same))} (each class has exactly k images "
                     "in the controller's pool), so C-LOG-AVG is identical across seeds and NLC differs only by its "
                     "seeded initialisation: a ± 0.0 there is no measure of spread.")
    lines.append("")
    if report["shots_skipped"]:
        lines += [f"Shots {report['shots_skipped']} skipped: a class has fewer images in the controller's pool.", ""]
    lines += [f"## The fitted controllers on the eval split (k = {s['shots']}, seed {s['seed']})", "",
              "| method | accuracy % | 95% interval (Wilson) |", "| --- | ---: | ---: |"]
    cascade = report.get("cascade")
    mark = " (last stage, model.onnx)" if cascade else " (shipped)"
    rows = dict(s["accuracy"])
    if cascade:          # what predict answers, on the same eval images (export/fit/levers/plan.py plan_cascade)
        rows = {**{m: a for m, a in rows.items() if m != "ORACLE"},
                "cascade (shipped)": cascade["test"]["accuracy_cascade"]["value"], "ORACLE": rows.get("ORACLE")}
        rows = {m: a for m, a in rows.items() if a is not None}
    lines += [f"| {m}{mark if m == s.get('row') else ''} | {a:.1f} | {_wilson(a, report['num_eval'])} |"
              for m, a in rows.items()]
    lines += ["", f"On {report['num_eval']} images one image moves an accuracy by {100 / report['num_eval']:.2f} points; "
              "compare two methods on these same images as a paired difference (clipfuse.export.paired), not by "
              "whether their intervals overlap."]
    if "diversity" in report:
        lines += ["", "## Diversity of the backbones on the eval split", "",
                  to_markdown(report["diversity"], _heat_line(report.get("heatmap")))]
    return "\n".join(lines) + "\n"


def _what_ships(report: dict) -> list[str]:
    """report.md's "What ships": the shipped controller, or on a cascade engine the cascade, whose last stage
    (the full graph) holds that controller. One statement, so report.md and eval say the same."""
    s, c = report["shipped"], report.get("cascade")
    if not c:
        return [f"## What ships: {s.get('row', 'NLC')}", "", s.get("reason", ""), *_rival_on_eval(report), ""]
    rates = ", ".join(f"{100 * r:.1f}%" for r in c["test"]["exit_rates"])
    return [f"## What ships: a cascade, {' -> '.join(c['order'])}", "",
            f"`clipfuse predict` routes each image through the stages in this order and answers at the first "
            f"confident one (exit rates on the eval split: {rates}). Stages 1..{len(c['order']) - 1}: C-LOG-AVG of "
            f"their backbones. The last stage is the full graph, model.onnx (what `predict --no-cascade` answers): "
            f"it holds {s.get('row', 'NLC')}. Why that controller: {s.get('reason', '')}",
            ""]


def _rival_on_eval(report: dict) -> list[str]:
    """A sentence when a candidate that did not ship scores at least as well on the eval split as the one that did
    (a failure signature may say so too): why it ships all the same."""
    s, n = report["shipped"], report["num_eval"]
    acc, row = s.get("accuracy", {}), s.get("row")
    rivals = {m: a for m, a in acc.items() if m != row and m in ("NLC", "C-LOG-AVG", "LOG-AVG", *report["backbones"])}
    if row not in acc or not rivals:
        return []
    best = max(rivals, key=lambda m: (rivals[m], m == "C-LOG-AVG"))
    if rivals[best] < acc[row]:
        return []
    head = f"On the eval split {best} ({rivals[best]:.1f}%) scores at least as well as {row} ({acc[row]:.1f}%). "
    if (s.get("selection") or {}).get("forced"):
        return ["", head + f"{row} ships because --controller asked for it."]
    return ["", head + f"{row} ships all the same: the choice is made on labelled images outside the eval split, "
                f"never on it (choosing there would bias the figure it reports), and on {n} eval images one image "
                f"moves an accuracy by {100 / n:.1f} points; `--controller` ships another method if you prefer."]


def format_eval(res: dict, heatmap: str | None = None) -> str:
    """eval's text: the accuracy table with the shipped row marked, then the diversity figures."""

    cascade = res.get("cascade")
    lines = [f"{res['engine']} on {res['data']}: {res['num_images']} images"
             + (f", {len(res['unreadable_images'])} unreadable (skipped)" if res["unreadable_images"] else "")]
    if res.get("fit_images_line"):
        lines.append(res["fit_images_line"] + ".")
    lines += ["", "| method | accuracy % | 95% interval (Wilson) |", "| --- | ---: | ---: |"]
    lines += [f"| {m}{' (shipped)' if m == res.get('shipped') else ''}"
              f"{' (full graph, model.onnx)' if cascade and m == res.get('full_graph') else ''} | {a:.1f} | "
              f"{_wilson(a, res['num_images'])} |" for m, a in res["accuracy"].items()]
    if cascade:
        lines += ["", f"The cascade ({' -> '.join(cascade['order'])}) is what `clipfuse predict` answers: exit rates "
                  + ", ".join(f"stage {s + 1} {100 * r:.1f}%" for s, r in enumerate(cascade["exit_rates"]))
                  + f"; it agrees with the full graph on {cascade['agreement_with_full']:.1f}% of the images. "
                  f"`predict --no-cascade` answers with the full graph ({res['full_graph']})."]
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
