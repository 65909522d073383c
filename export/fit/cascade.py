"""Fit a confidence cascade: stage order, confidence score and exit thresholds chosen on data.

Inputs are arrays another step computed: for each stage s = 0..S-1 (stage s fuses the first s + 1
backbones of an order, with a controller fitted for exactly them), that stage's fused logits on a
calibration split and on a test split. The last stage is the full ensemble. The thresholds come
from export/thresholds.py (the guarded, label-free constraint); this module tries scores and
orders, keeps the cheapest on calibration, and measures it on the test split.

    fit_cascade(calib_logits, test_logits, stage_costs, names, config, ...) -> CascadeFit
    candidate_orders(costs, accuracies)   -> {rule: order}
    fit_cascade_orders(candidates, config, ...) -> CascadeFit of the cheapest order

benchmarks/cascade_study.py measures the constraints on synthetic data: benchmarks/results/cascade_study.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from clipfuse.core.errors import ClipfuseError

from ..paired import accuracy_interval, paired_difference
from ..thresholds import (
    CascadeConfig,
    calibration_record,
    check_calibration_count,
    choose_thresholds,
    cum_costs,
    exit_rates,
    measure_stack,
    stage_stack,
)


@dataclass
class CascadeFit:
    """A fitted cascade and what it was measured to do (JSON-serialisable through to_dict)."""

    names: list[str]              # backbone added at each stage, in stage order
    score: str                    # confidence score used
    thresholds: list[float]       # (S - 1,), inf = never leave there
    config: dict                  # CascadeConfig as fitted
    cum_costs: list[float]        # (S,) cost of an image leaving at stage s
    calibration: dict             # n, exit_rates, expected_cost, disagreements, allowed, disagreement_bound
    test: dict                    # n, exit_rates, expected_cost, cost_fraction, accuracies, paired difference
    scores_tried: dict            # score -> calibration expected cost (the reason for `score`)
    orders_tried: dict | None = None   # rule -> {names, calibration expected cost}, when the order was chosen

    def to_manifest(self) -> dict:
        """What the runtime needs (order, score, thresholds with null = never) and the expected exit rates."""
        return {"order": self.names, "score": self.score,
                "thresholds": [None if math.isinf(t) else float(t) for t in self.thresholds],
                "expected_exit_rates": self.test["exit_rates"], "max_drop": self.config["max_drop"],
                "constraint": self.config["constraint"]}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]
        return d


def fit_cascade(calib_logits, test_logits, stage_costs, names=None, config: CascadeConfig | None = None,
                calib_labels=None, test_labels=None, tries: int = 1) -> CascadeFit:
    """Choose score and thresholds on the calibration split; measure the cascade on the test split.

    calib_logits: S arrays (N_cal, C); test_logits: S arrays (N_test, C); stage_costs (S,): the
    cost each stage ADDS (its backbone's ms or GFLOPs, heads and controller included if measured so).
    calib_labels (N_cal,): only for the 'accuracy' constraint (the guarded one needs no labels).
    test_labels (N_test,): required. tries: configurations fitted beside this one (orders), for the
    Bonferroni split of the confidence.
    """
    config = (config or CascadeConfig()).check()
    Zc = stage_stack(calib_logits, "calibration logits")
    Zt = stage_stack(test_logits, "test logits")
    S, n_cal, C = Zc.shape
    if Zt.shape[0] != S or Zt.shape[2] != C:
        raise ClipfuseError(f"test logits have {Zt.shape[0]} stages x {Zt.shape[2]} classes, calibration {S} x {C}")
    if test_labels is None or np.asarray(test_labels).reshape(-1).shape != (Zt.shape[1],):
        raise ClipfuseError(f"fit_cascade needs test_labels for the {Zt.shape[1]} test images")
    names = [str(n) for n in (names if names is not None else range(S))]
    if len(names) != S:
        raise ClipfuseError(f"{len(names)} stage names for {S} stages")
    cum = cum_costs(stage_costs, S)
    scores = config.scores()
    tries_all = tries * len(scores)
    check_calibration_count(n_cal, config, tries_all)
    y_cal = None if calib_labels is None else np.asarray(calib_labels).reshape(-1)
    if y_cal is not None and y_cal.shape != (n_cal,):
        raise ClipfuseError(f"{y_cal.size} calibration labels for {n_cal} calibration images")

    fits = {}
    for score in scores:
        t = choose_thresholds(Zc, stage_costs, config, labels=y_cal, score=score, tries=tries_all)
        fits[score] = (t, measure_stack(Zc, t, score, cum))
    # Cheaper on calibration wins; ties go to max-prob (the published default), listed first in SCORES.
    score = min(scores, key=lambda s: (fits[s][1][2], scores.index(s)))
    t = fits[score][0]
    calibration = calibration_record(Zc, t, score, cum, config, y_cal, tries_all)

    y = np.asarray(test_labels).reshape(-1)
    pred_t, stage_t, cost_t = measure_stack(Zt, t, score, cum)
    full_t = Zt[-1].argmax(axis=1)
    diff = paired_difference(pred_t, full_t, y)
    test = {"n": int(y.size), "exit_rates": exit_rates(stage_t, S), "expected_cost": cost_t,
            "cost_fraction": cost_t / float(cum[-1]),
            "accuracy_cascade": accuracy_interval(pred_t, y).to_dict(),
            "accuracy_full": accuracy_interval(full_t, y).to_dict(),
            "paired_difference": diff.to_dict(),
            "drop": -diff.difference, "within_max_drop": bool(-diff.difference <= config.max_drop)}
    return CascadeFit(names=names, score=score, thresholds=[float(v) for v in t], config=asdict(config),
                      cum_costs=cum.tolist(), calibration=calibration, test=test,
                      scores_tried={s: fits[s][1][2] for s in scores})


def candidate_orders(costs, accuracies) -> dict[str, list[int]]:
    """Stage orders worth fitting: cheapest first (Wang et al.) and by accuracy per unit cost.

    costs, accuracies: (K,) per backbone (accuracy of each single backbone on labelled data the
    thresholds are not scored on). Duplicate orders are dropped; ties keep the given order.
    """
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if c.size < 2 or c.shape != a.shape:
        raise ClipfuseError(f"candidate_orders needs >= 2 backbones with one cost and one accuracy each, got {c.size} and {a.size}")
    if not np.isfinite(c).all() or (c <= 0).any():
        raise ClipfuseError(f"backbone costs must be positive numbers, got {c.tolist()}")
    out = {"cheapest-first": np.argsort(c, kind="stable").tolist(),
           "accuracy-per-cost": np.argsort(-a / c, kind="stable").tolist()}
    if out["accuracy-per-cost"] == out["cheapest-first"]:
        del out["accuracy-per-cost"]
    return out


def fit_cascade_orders(candidates: dict, config: CascadeConfig | None = None, calib_labels=None,
                       test_labels=None) -> CascadeFit:
    """Fit one cascade per candidate order and keep the one with the lowest CALIBRATION expected cost.

    candidates: {rule: (calib_logits, test_logits, stage_costs, names)}, each as fit_cascade takes
    them (the wiring fits a controller per prefix of each order). The confidence is split over
    every order and score tried, so the kept cascade's bound still holds at config.confidence.
    """
    if not candidates:
        raise ClipfuseError("fit_cascade_orders needs at least one candidate order")
    config = (config or CascadeConfig()).check()
    fits = {rule: fit_cascade(cl, tl, costs, names, config, calib_labels, test_labels, tries=len(candidates))
            for rule, (cl, tl, costs, names) in candidates.items()}
    rules = list(fits)
    best = min(rules, key=lambda r: (fits[r].calibration["expected_cost"], rules.index(r)))
    return replace(fits[best], orders_tried={r: {"names": f.names, "calibration_expected_cost": f.calibration["expected_cost"]}
                                             for r, f in fits.items()})
