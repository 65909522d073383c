"""The budget and cascade sections of `clipfuse fit`'s report.md, from the report dict (export/fit/levers)."""
from __future__ import annotations

from ..certify import certified_line
from .budget import FRONTIER_PNG
from .plan import REORDERED


def report_markdown(report: dict) -> str:
    """The budget and cascade sections of fit's report.md ('' when neither lever was used)."""
    lines = []
    b = report.get("budget")
    if b:
        c = b["chosen"]
        lines += ["", f"## Budget: {b['budget']:g} {b['unit']}", "",
                  f"Chosen: **{' + '.join(c['names'])}** at {c['cost']:.4g} {b['unit']}: held-out pool accuracy "
                  f"{_iv(c['accuracy'])} (the choice was made on these {b['selected_on']}: biased upwards), eval "
                  f"accuracy {_iv(c['test'])} ({b['reported_on']}: the figure to quote).",
                  f"Subsets fitted with {b['fitter']}; cost: {b['costs']['method']}"
                  + (f"; other processes used {b['costs']['load']['other_processes_cores']} cores meanwhile"
                     if "load" in b["costs"] else "") + ".", "", "Accuracy-cost frontier (Pareto front):", "",
                  b["frontier_table"].rstrip(), "", f"Plot: {b.get('plot', FRONTIER_PNG)}"]
    c = report.get("cascade")
    if c:
        t, cal = c["test"], c["calibration"]
        th = ", ".join("never" if v is None else f"{v:.4g}" for v in c["thresholds"])
        diff = t["paired_difference"]
        lines += ["", "## Cascade", "",
                  f"Order ({c['order_rule']}): {' -> '.join(c['order'])}; score {c['score']}; thresholds {th}."
                  + (f" {REORDERED[0].upper()}{REORDERED[1:]} ({', '.join(report['backbones'])})."
                     if list(c["order"]) != list(report["backbones"]) else ""),
                  f"Stage controllers: {c['stage_controllers']}.",
                  *([c["costs"]["fallback"] + "."] if c.get("costs", {}).get("fallback") else []),
                  f"Thresholds chosen on {c['calibration_images']}: {cal['disagreements']} disagreement(s) with the "
                  f"full ensemble, upper bound {cal['disagreement_bound']:.2f}% <= --max-drop {c['max_drop']} "
                  f"(agreement, Clopper-Pearson at {c['config']['confidence']:.0%}).",
                  *([certified_line(c["certified_on"]["unlabelled"])] if (c.get("certified_on") or {}).get("unlabelled")
                    else []),
                  f"Eval ({t['n']} images, never used to choose): cascade {_iv(t['accuracy_cascade'])}, full ensemble "
                  f"{_iv(t['accuracy_full'])}; paired difference {diff['difference']:+.2f} points "
                  f"[{diff['lo']:+.2f}, {diff['hi']:+.2f}], agreement {diff['agreement']['value']:.1f}%.",
                  f"Exit rates per stage (eval): {', '.join(f'{100 * r:.1f}%' for r in t['exit_rates'])}; expected cost "
                  f"{t['expected_cost']:.4g} {c['cost_unit']} = {100 * t['cost_fraction']:.1f}% of the full ensemble."]
    return "\n".join(lines) + ("\n" if lines else "")


def _iv(d: dict) -> str:
    return f"{d['value']:.1f}% [{d['lo']:.1f}, {d['hi']:.1f}]"
