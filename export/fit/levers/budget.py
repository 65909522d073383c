"""`clipfuse fit --budget-ms/--budget-gflops`: the best subset of the backbones within a budget (export/fit/levers).

Exact search over every subset (export/fit/subsets.py) on the pool images outside the shots, priced by
costs.measure_costs; the eval split only reports. The frontier plot is optional (matplotlib).
"""
from __future__ import annotations

import numpy as np

from clipfuse.core.errors import ClipfuseError

from ...data import sample_k_shot
from ..features import head_logits
from ..subsets import Split, search_subsets, static_fitter
from .costs import measure_costs
from .recipe import Levers

FRONTIER_PNG = "frontier.png"


def _split(feats, Z, y, rows):
    return Split([f[rows] for f in feats], Z[rows], None if y is None else y[rows])


def choose_budget_subset(levers: Levers, built, heads, pool_feats, Z_pool, y_pool, ev_feats, Z_ev, y_ev, shot_idx,
                         config) -> dict:
    """The best subset within the budget -> {"members", "frontier", "chosen", "costs", ...} (JSON-able)."""

    names = [str(b.spec) for b in built]
    held = np.setdiff1d(np.arange(len(y_pool)), shot_idx)
    if held.size == 0:
        raise ClipfuseError("too few labelled images for the budget search: every pool image is one of the k shots, "
                            "so none is left to choose the subset on; label more images or lower --shots")
    costs, cost_info = measure_costs(built, heads, levers.budget_unit)
    if cost_info.get("unreliable"):
        raise ClipfuseError(f"--budget-ms: {cost_info['unreliable']}, so the subset is not chosen; rerun on a "
                            "quieter machine, or use --budget-gflops (counted, not timed)")
    frontier = search_subsets(static_fitter(config), _split(pool_feats, Z_pool, y_pool, shot_idx),
                              _split(pool_feats, Z_pool, y_pool, held), costs, names, cost_unit=levers.budget_unit,
                              test=Split(list(ev_feats), Z_ev, y_ev))
    chosen = frontier.choose(levers.budget)
    return {"budget": levers.budget, "unit": levers.budget_unit, "members": list(chosen.members),
            "chosen": chosen.to_dict(), "costs": cost_info, "fitter": "C-LOG-AVG on the k shots",
            "selected_on": f"{held.size} pool images outside the shots", "reported_on": f"{len(y_ev)} eval images",
            "bias": "the subset is the best of all subsets on the images it was chosen on, so its held-out figure "
                    "is biased upwards; quote the eval (test) figure",
            "frontier": frontier.to_dict(), "frontier_table": frontier.to_markdown()}


def frontier_png(frontier: dict, chosen: dict) -> bytes | str:
    """Accuracy (eval) vs cost of every subset, Pareto front and choice marked; a line if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "frontier plot skipped: matplotlib is not installed (pip install matplotlib)"
    import io

    subs = frontier["subsets"]
    fig, ax = plt.subplots(figsize=(6, 4))
    acc = [s["test"]["value"] if s["test"] else s["accuracy"]["value"] for s in subs]
    ax.scatter([s["cost"] for s in subs], acc, s=12, c="0.6", label="subset")
    front = [(s["cost"], a) for s, a in zip(subs, acc) if s["pareto"]]
    ax.plot(*zip(*front), "-o", ms=4, label="Pareto front (chosen on held-out pool)")
    ax.scatter([chosen["cost"]], [chosen["test"]["value"]], marker="*", s=150, c="red", label="chosen")
    ax.set_xlabel(f"cost ({frontier['cost_unit']})")
    ax.set_ylabel("eval accuracy (%)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def apply_budget(levers: Levers, built, heads, tr_feats, ev_feats, pool, labels, ev_labels, shots: int, seed: int,
                 num_classes: int, config) -> dict:
    """Run the budget search on fit's arrays (all backbones) -> choose_budget_subset's dict."""

    y_pool = labels[pool]
    pool_feats = [f[pool] for f in tr_feats]
    Z_pool = np.stack([head_logits(f, h) for f, h in zip(pool_feats, heads)], axis=1)
    Z_ev = np.stack([head_logits(f, h) for f, h in zip(ev_feats, heads)], axis=1)
    idx = sample_k_shot(y_pool, shots, seed, num_classes=num_classes)
    return choose_budget_subset(levers, built, heads, pool_feats, Z_pool, y_pool, ev_feats, Z_ev, ev_labels, idx,
                                config)
