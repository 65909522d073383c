"""`clipfuse fit --budget-ms/--budget-gflops` and `--cascade`: the levers that make the ensemble cheaper.

Both work on the arrays export/fit/pipeline.py has already computed from cached features (nothing is
re-encoded), with fit's own splits:

    shots   k labelled images per class from the controller's pool (what every controller is fitted on)
    pool - shots   labelled images no controller saw: the budget search SELECTS the subset on them,
                   the cascade chooses its order and thresholds on them (its bound needs no labels)
    eval    the eval split: every figure reported, never used to choose anything

Budget (`choose_budget_subset`): exact search over every subset (export/fit/subsets.py), each fitted
with C-LOG-AVG (K temperatures: 2^K - 1 fits of seconds in all; NLC per subset would be 511 MLP
fits for nine backbones, and export/fit/select.py found C-LOG-AVG no worse at few shots in the
held-out comparisons it makes), priced as the sum of its backbones' costs: ms measured here at
batch 1 (`measure_costs`: ONNX Runtime CPU on the backbone's own tower graph, median after
warm-up, with the machine's load recorded) or GFLOPs as `clipfuse backbones` counts them. The
chosen subset then goes through fit's usual path (study, shipped-method choice, export). The
selection is biased upwards on the images it was chosen on: the eval figure is the one to quote.

Cascade (`plan_cascade`): stage s = the first s backbones of an order with a controller fitted for
exactly them: C-LOG-AVG on the k shots for s < S (cheap: stages x orders fits; the shipped-method
choice per stage would multiply that by select.py's 3 draws x 2 fits, and at one shot per class it
ships C-LOG-AVG anyway), and the controller fit ships (select.py) at the last stage, so the last
stage IS model.onnx. Orders: export/fit/cascade.py candidate_orders on the pool's held-out images;
thresholds: fit_cascade_orders (agreement with the full ensemble, Clopper-Pearson bound).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log, step
from clipfuse.runtime.backends.sessions import open_session
from clipfuse.runtime.cpu_load import LoadProbe

from ..data import sample_k_shot
from ..graph.fused import ConstantController, FusedEnsemble, NLCController, StaticController
from ..graph.stages import TowerStage, _export
from ..thresholds import CascadeConfig, required_calibration_images
from . import nlc
from .cascade import candidate_orders, fit_cascade_orders
from .certify import certified_line, describe
from .features import head_logits
from .nlc import controller_temperatures
from .subsets import Split, search_subsets, static_fitter

MS, GFLOPS = "ms", "GFLOPs"
TIMING_WARMUP, TIMING_RUNS = 3, 7
# a ranking of measured costs is trusted when every pair more than 10% apart is ordered the same way in >= 75%
# of the interleaved rounds (a busy neighbour slows every tower of a round alike; noise reorders rounds)
RANK_MIN_GAP, RANK_MIN_AGREE = 0.10, 0.75
FRONTIER_PNG = "frontier.png"
# A cascade engine's graph holds its backbones in stage order (cheapest first, as chosen), not as given.
REORDERED = ("the engine holds the backbones in stage order, not in the order given: the manifest's backbones and "
             "the K axis of temperatures and backbone_logits follow the stage order")


@dataclass
class Levers:
    """What `fit` does beyond the full ensemble (validated once, written into the report and manifest)."""

    budget: float | None = None        # --budget-ms / --budget-gflops: choose the best subset within it
    budget_unit: str = MS              # "ms" (measured at batch 1) or "GFLOPs" (counted)
    cascade: bool = False              # --cascade: a confidence cascade over the backbones
    max_drop: float = 0.5              # --max-drop: accuracy points the cascade may lose vs the full ensemble
    score: str = "auto"                # --cascade-score: auto | max-prob | margin
    cascade_cost: str = GFLOPS         # --cascade-cost: how stages are priced (order, expected cost)
    certify_on: str | None = None      # --certify-on: unlabelled images that also certify the exits (fit/certify.py)

    def check(self, num_backbones: int) -> "Levers":
        if self.budget is not None and self.cascade:
            raise ClipfuseError("--budget-ms/--budget-gflops and --cascade cannot be combined yet: choose a subset "
                                "first (fit --budget-...), then fit a cascade over its backbones")
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
                raise ClipfuseError(f"--budget-{'ms' if self.budget_unit == MS else 'gflops'} must be a positive "
                                    f"number, got {b!r}")
        if self.certify_on is not None and not self.cascade:
            raise ClipfuseError("--certify-on applies to --cascade only: it certifies the cascade's exit thresholds")
        for unit, what in ((self.budget_unit, "budget unit"), (self.cascade_cost, "--cascade-cost")):
            if unit not in (MS, GFLOPS):
                raise ClipfuseError(f"{what} {unit!r} is not one of {MS}, {GFLOPS}")
        if self.cascade:
            CascadeConfig(max_drop=self.max_drop, score=self.score).check()
            if num_backbones < 2:
                raise ClipfuseError(f"--cascade needs at least 2 backbones (stages), got {num_backbones}: "
                                    "add backbones with -b")
        return self

    @property
    def active(self) -> bool:
        return self.budget is not None or self.cascade


def _visual(b):
    return b.model.visual if hasattr(b.model, "visual") else b.model


def measure_costs(built, heads, unit: str) -> tuple[list[float], dict]:
    """Per-backbone cost in `unit`: GFLOPs as counted, or ms at batch 1 on ONNX Runtime CPU (the
    backbone's own tower graph: normalise, tower, norm, head; median of TIMING_RUNS interleaved rounds
    after TIMING_WARMUP). -> (costs, {unit, method, per_backbone, load[, unreliable: why the ranking of
    the ms cannot be trusted]})."""
    names = [str(b.spec) for b in built]
    if unit == GFLOPS:
        costs = [float(b.info["gflops"]) for b in built]
        return costs, {"unit": GFLOPS, "method": "image tower GFLOPs at batch 1 (as `clipfuse backbones` counts them)",
                       "per_backbone": dict(zip(names, costs))}

    probe = LoadProbe()
    with tempfile.TemporaryDirectory(prefix="clipfuse-cost-") as tmp:
        sessions, feeds = [], []
        for i, (b, h) in enumerate(zip(built, heads)):
            with step(f"cost {i + 1}/{len(built)} {b.spec}: tower graph at batch 1, ONNX Runtime CPU"):
                fused = FusedEnsemble([_visual(b)], [h], [b.image_size], [b.preprocess["mean"]], [b.preprocess["std"]]).eval()
                path = Path(tmp) / f"tower_{i}.onnx"
                _export(TowerStage(fused, 0), (torch.zeros(2, 3, b.image_size, b.image_size, dtype=torch.uint8),),
                        ["image"], ["f", "z"], path, 18)
                sessions.append(open_session(path))
                feeds.append({"image": np.random.default_rng(0).integers(0, 256, (1, 3, b.image_size, b.image_size),
                                                                        dtype=np.uint8)})
        with step(f"timing {len(built)} towers interleaved: {TIMING_RUNS} rounds after {TIMING_WARMUP} warm-up"):
            runs = time_interleaved(sessions, feeds)
        del sessions
    costs = [float(statistics.median(r)) for r in runs]
    rows = {n: {"median_ms": c, "runs_ms": [round(t, 3) for t in r]} for n, c, r in zip(names, costs, runs)}
    info = {"unit": MS, "method": f"ONNX Runtime CPU, batch 1, median of {TIMING_RUNS} rounds after {TIMING_WARMUP} "
                                  "warm-up rounds; each round times every backbone's tower graph once, in a rotated "
                                  "order (a neighbour's load falls on all of them alike)",
            "per_backbone": rows, "load": probe.stop()}
    contested = contested_ranking(names, runs)
    if contested:
        info["unreliable"] = (f"{contested}, with other processes using {info['load']['other_processes_cores']} "
                              "cores meanwhile: the measured ranking is not reliable")
    return costs, info


def time_interleaved(sessions, feeds) -> list[list[float]]:
    """ms per run, per session: TIMING_WARMUP untimed rounds, then TIMING_RUNS rounds that each run every
    session once, round r starting at session r mod K, so no tower is always timed first or last."""
    K = len(sessions)
    runs = [[] for _ in range(K)]
    for r in range(TIMING_WARMUP + TIMING_RUNS):
        for k in [(r + j) % K for j in range(K)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            if r >= TIMING_WARMUP:
                runs[k].append(1e3 * (time.perf_counter() - t0))
    return runs


def contested_ranking(names, runs, min_gap: float = RANK_MIN_GAP, min_agree: float = RANK_MIN_AGREE) -> str | None:
    """Why the ranking of the medians cannot be trusted, or None: a pair whose medians differ by more than
    min_gap (relative; closer pairs may come either way without changing what is cheap) while fewer than
    min_agree of the rounds order them as the medians do."""
    med = [statistics.median(r) for r in runs]
    for i in range(len(runs)):
        for j in range(len(runs)):
            if med[i] < med[j] and med[j] > med[i] * (1 + min_gap):
                agree = float(np.mean([a < b for a, b in zip(runs[i], runs[j])]))
                if agree < min_agree:
                    return (f"{names[i]} (median {med[i]:.3g} ms) was timed faster than {names[j]} (median "
                            f"{med[j]:.3g} ms) in only {agree:.0%} of the rounds (bound >= {min_agree:.0%})")
    return None


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


def fused_logits(controller, X, Z) -> np.ndarray:
    """sum_k t_k(x) z_k(x) (N, C) with a fitted controller, float32 like the graph."""

    t = controller_temperatures(controller, X)                                       # (N, K)
    return (t[:, :, None] * np.asarray(Z, np.float32)).sum(axis=1)


def permute_controller(controller, order, dims):
    """The same controller for the backbones in `order` (indices into the original order, whose
    embedding widths are `dims`): temperatures follow their backbones, an NLC's input columns too."""
    import copy

    order = list(order)
    if isinstance(controller, ConstantController):
        return ConstantController(len(order)).eval()
    if isinstance(controller, StaticController):
        return StaticController(controller.value.reshape(-1)[order].clone()).eval()
    if isinstance(controller, NLCController):
        starts = np.concatenate([[0], np.cumsum(dims)])
        cols = torch.as_tensor(np.concatenate([np.arange(starts[k], starts[k + 1]) for k in order]))
        new = copy.deepcopy(controller)
        with torch.no_grad():
            new.in_mean.copy_(controller.in_mean[cols])
            new.in_std.copy_(controller.in_std[cols])
            new.fc1.weight.copy_(controller.fc1.weight[:, cols])
            new.fc2.weight.copy_(controller.fc2.weight[order])
            new.fc2.bias.copy_(controller.fc2.bias[order])
        return new.eval()
    raise ClipfuseError(f"cannot reorder a controller of kind {getattr(controller, 'kind', type(controller).__name__)!r}")


def check_calibration(levers: Levers, built, heads, Z_pool, y_pool, shot_idx, unlabelled: int = 0):
    """Before any fitting: the candidate orders, and refuse (one line, the number needed) a pool whose
    images outside the shots, with the `unlabelled` --certify-on images, cannot certify --max-drop.
    -> (orders, costs, cost_info)."""

    cfg = CascadeConfig(max_drop=levers.max_drop, score=levers.score).check()
    calib = np.setdiff1d(np.arange(len(y_pool)), shot_idx)
    costs, cost_info = measure_costs(built, heads, levers.cascade_cost)
    if cost_info.get("unreliable"):     # the order only: GFLOPs rank the stages instead, and the report says why
        reason = cost_info["unreliable"]
        costs, cost_info = measure_costs(built, heads, GFLOPS)
        cost_info["fallback"] = f"--cascade-cost ms fell back to GFLOPs: {reason}"
        log(cost_info["fallback"])
    single_acc = [float((Z_pool[calib, k].argmax(1) == y_pool[calib]).mean()) if calib.size else 0.0
                  for k in range(len(built))]
    orders = candidate_orders(costs, single_acc)
    tries = len(orders) * len(cfg.scores())
    need = required_calibration_images(cfg.max_drop, cfg.confidence, tries)
    if calib.size + unlabelled < need:
        given = f" and --certify-on gave {unlabelled} unlabelled images" if levers.certify_on is not None else ""
        raise ClipfuseError(f"too few calibration images for --cascade --max-drop {cfg.max_drop}: the pool holds "
                            f"{calib.size} images outside the k shots{given} and the bound needs >= {need} "
                            f"({tries} configurations tried at {cfg.confidence:.0%}); give --certify-on DIR with >= "
                            f"{need - calib.size - unlabelled} more unlabelled images of your task (not the fit's), "
                            "label more images, or raise --max-drop")
    return orders, costs, cost_info


def plan_cascade(levers: Levers, built, heads, X_pool, Z_pool, y_pool, X_ev, Z_ev, y_ev, shot_idx, shipped,
                 config, costs=None, shipped_row: str | None = None, unlabelled=None) -> dict:
    """Order, per-stage controllers and thresholds -> {"order", "controllers" (stage order, the last =
    `shipped` reordered), "fit" (CascadeFit), "block" (the manifest's cascade entry)}.
    costs: check_calibration's result when fit already ran it; shipped_row: what `shipped` is, in the
    report's words (NLC, C-LOG-AVG, LOG-AVG or a backbone's name); unlabelled: the --certify-on images
    (export/fit/certify.CertifyImages), calibration images beside the pool's."""

    names = [str(b.spec) for b in built]
    K = len(names)
    cfg = CascadeConfig(max_drop=levers.max_drop, score=levers.score).check()
    calib = np.setdiff1d(np.arange(len(y_pool)), shot_idx)
    X_u, Z_u, found = (unlabelled.X, unlabelled.Z, unlabelled.found) if unlabelled is not None \
        else (X_pool[:0], Z_pool[:0], None)
    orders, costs, cost_info = costs or check_calibration(levers, built, heads, Z_pool, y_pool, shot_idx, len(Z_u))
    X_cal, Z_cal = np.concatenate([X_pool[calib], X_u]), np.concatenate([Z_pool[calib], Z_u])   # no labels needed
    full_cal = fused_logits(shipped, X_cal, Z_cal)
    full_ev = fused_logits(shipped, X_ev, Z_ev)
    statics, candidates = {}, {}
    for rule, order in orders.items():
        cal, ev = [], []
        for s in range(1, K):
            members = order[:s]
            st = nlc.fit_static(Z_pool[shot_idx][:, members], y_pool[shot_idx], config)
            statics[(rule, s)] = st
            t = st.value.reshape(-1).numpy()
            cal.append((t[None, :, None] * Z_cal[:, members]).sum(1))
            ev.append((t[None, :, None] * Z_ev[:, members]).sum(1))
        candidates[rule] = (cal + [full_cal], ev + [full_ev], [costs[k] for k in order], [names[k] for k in order])
    fit = fit_cascade_orders(candidates, cfg, test_labels=y_ev)
    rule = next(r for r, c in candidates.items() if c[3] == fit.names)
    order = orders[rule]
    dims = [int(b.embed_dim) for b in built]
    controllers = [statics[(rule, s)] for s in range(1, K)] + [permute_controller(shipped, order, dims)]
    block = dict(fit.to_manifest(), order_rule=rule, cost_unit=cost_info["unit"], cum_costs=fit.cum_costs,
                 costs=cost_info, calibration=fit.calibration, test=fit.test, scores_tried=fit.scores_tried,
                 orders_tried=fit.orders_tried, config=asdict(cfg),
                 stage_controllers=f"C-LOG-AVG fitted on the k shots for stages 1..{K - 1}; stage {K} = the full "
                                   f"graph model.onnx, with the controller fit chose for it "
                                   f"({shipped_row or getattr(shipped, 'kind', '?')})",
                 calibration_images=describe(calib.size, found),
                 certified_on={"labelled_pool": int(calib.size), "unlabelled": found.to_dict() if found else None})
    return {"order": order, "controllers": controllers, "fit": fit, "block": block}


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
