"""Which controller an engine ships: NLC, C-LOG-AVG, LOG-AVG or the best single backbone.

`clipfuse fit` scores the four on labelled images that none of them was fitted
on, and that are not the eval split either (the eval split reports the chosen
method's accuracy; choosing on it too would bias that number upwards). The
images come from the controller's own pool (the training images not used by
linear probes), in the first mode that the data allow:

1. "held-out pool": every class has more than k images in the pool. For
   SELECT_DRAWS seeded draws of k shots per class (the shipped draw first),
   C-LOG-AVG and NLC are fitted on the draw and every candidate is scored on
   the pool images the draw left out; scores are the mean over draws.
2. "cross-validation over the shots": some class has exactly k images in the
   pool and k >= 2. Fold j holds out the j-th shot of every class and fits on
   the other k - 1 (so the scores are for k - 1 shots).
3. "default": k = 1 and a class has a single image in the pool: nothing is
   left to choose on. FALLBACK (C-LOG-AVG) ships: its K fitted numbers cannot
   overfit one image per class the way NLC's MLP can, and NLC starts from it
   (docs/decisions.md, "What ships when nothing is left to choose on"). The best single backbone is
   then the one most accurate on the whole pool (no candidate but the fitted
   two uses those images).

Ties go to the method with fewer fitted parameters (TIE_ORDER): with a handful
of held-out images, a tie is no evidence that fitting more helped.

A single backbone ships through the same graph as a static controller with
temperature 1 on that backbone and 0 on the others: the fused logits are then
exactly that backbone's logits.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError

from ..data import sample_k_shot
from ..graph.fused import ConstantController, StaticController
from . import baselines, nlc

CHOICES = ("auto", "nlc", "static", "mean", "single")
ROW = {"nlc": "NLC", "static": "C-LOG-AVG", "mean": "LOG-AVG"}      # "single": the backbone's own name
TIE_ORDER = ("mean", "single", "static", "nlc")                     # fewest fitted parameters first
FALLBACK = "static"
SELECT_DRAWS = 3


def check_choice(controller: str) -> str:
    if controller not in CHOICES:
        raise ClipfuseError(f"--controller {controller!r} is not one of {', '.join(CHOICES)}")
    return controller


def selection_folds(y_pool: np.ndarray, shots: int, seed: int, num_classes: int, draws: int = SELECT_DRAWS):
    """-> (mode, [(fit indices, held-out indices)]) into the pool; mode "default" has no folds."""

    counts = np.bincount(y_pool, minlength=num_classes)
    if counts.min() > shots:
        folds = []
        for s in range(seed, seed + draws):
            fit = sample_k_shot(y_pool, shots, s, num_classes=num_classes)
            folds.append((fit, np.setdiff1d(np.arange(len(y_pool)), fit)))
        return "held-out pool", folds
    if shots >= 2:
        idx = sample_k_shot(y_pool, shots, seed, num_classes=num_classes).reshape(num_classes, shots)   # (C, k)
        folds = [(np.delete(idx, j, axis=1).reshape(-1), idx[:, j]) for j in range(shots)]
        return "cross-validation over the shots", folds
    return "default", []


def score_candidates(X, Z, y, folds, names, config) -> tuple[dict, int]:
    """Mean accuracy (%) over folds of every backbone, LOG-AVG, C-LOG-AVG and NLC; images held out per fold."""
    totals: dict[str, list[float]] = {}
    for i, (fit, held) in enumerate(folds):
        cfg = replace(config, seed=config.seed + i)
        static = nlc.fit_static(Z[fit], y[fit], cfg)
        controller = nlc.fit_nlc(X[fit], Z[fit], y[fit], cfg)
        acc = baselines.evaluate(X[held], Z[held], y[held], names, static=static, nlc=controller)
        for m in (*names, "LOG-AVG", "C-LOG-AVG", "NLC"):
            totals.setdefault(m, []).append(acc[m])
    return {m: float(np.mean(v)) for m, v in totals.items()}, int(np.mean([len(h) for _, h in folds]))


def best_single(scores: dict, names) -> str:
    return max(names, key=lambda n: (scores[n], -list(names).index(n)))


def choose(X_pool, Z_pool, y_pool, names, shots: int, seed: int, config, forced: str = "auto") -> dict:
    """The method to ship and why: {method, row, backbone, mode, scores, held_out, reason, auto_choice}."""
    check_choice(forced)
    C = Z_pool.shape[2]
    mode, folds = selection_folds(y_pool, shots, seed, C)
    if folds:
        scores, held = score_candidates(X_pool, Z_pool, y_pool, folds, names, config)
        single = best_single(scores, names)
        cand = {"mean": scores["LOG-AVG"], "single": scores[single], "static": scores["C-LOG-AVG"], "nlc": scores["NLC"]}
        auto = TIE_ORDER[0]
        for m in TIE_ORDER[1:]:
            if cand[m] > cand[auto]:
                auto = m
        how = (f"mean over {len(folds)} draws of {shots} shot(s) per class, each scored on the {held} pool images it left out"
               if mode == "held-out pool" else
               f"{len(folds)}-fold cross-validation over the {shots} shots per class: fitted on {shots - 1}, "
               f"scored on the held-out one ({held} images a fold)")
        table = ", ".join(f"{_label(m, single)} {cand[m]:.1f}" for m in sorted(cand, key=lambda m: -cand[m]))
        tied = [m for m in cand if cand[m] == cand[auto] and m != auto]
        why = (f"{_label(auto, single)} scored best on labelled images no candidate was fitted on and outside the eval "
               f"split ({how}): {table}")
        if tied:
            why += (f"; tied with {', '.join(_label(m, single) for m in tied)}, and ties go to fewer fitted parameters "
                    "(LOG-AVG, best single, C-LOG-AVG, NLC)")
    else:
        acc = baselines.evaluate(None, Z_pool, y_pool, names)
        scores, held, single, auto = None, 0, best_single(acc, names), FALLBACK
        why = (f"no labelled image is left to choose on (k = {shots} and a class has only {shots} image(s) in the "
               f"controller's pool), so the default {ROW[FALLBACK]} ships: its {len(names)} fitted numbers cannot overfit "
               "one shot per class the way NLC's MLP can, and NLC starts from it; best single = most accurate on the "
               "pool (which only the fitted controllers saw)")
    method = auto if forced == "auto" else forced
    reason = why if forced == "auto" else (f"forced by --controller {forced}; auto would ship {_label(auto, single)}: {why}")
    return {"method": method, "row": _label(method, single), "backbone": single if method == "single" else None,
            "best_single": single, "mode": mode, "folds": len(folds), "held_out": held, "scores": scores,
            "auto_choice": auto, "forced": forced != "auto", "reason": reason}


def alone(name: str, forced: str = "auto") -> dict:
    """choose()'s answer when one backbone is left (a budget that fits only it): it ships alone; there is no
    ensemble for a controller to weigh, so none is fitted, studied or chosen."""
    why = ("the budget leaves one backbone, so it ships alone: there is no ensemble for a controller to weigh "
           "(no controller is fitted, studied or chosen)")
    return {"method": "single", "row": name, "backbone": name, "best_single": name, "mode": "one backbone",
            "folds": 0, "held_out": 0, "scores": None, "auto_choice": "single", "forced": False,
            "reason": why + (f"; --controller {forced} has nothing to weigh" if forced != "auto" else "")}


def _label(method: str, single: str) -> str:
    return single if method == "single" else ROW[method]


def single_controller(k: int, num_backbones: int):
    """A static controller giving backbone k's logits exactly: temperature 1 on k, 0 elsewhere."""

    t = torch.zeros(num_backbones)
    t[k] = 1.0
    return StaticController(t).eval()


def shipped_controller(choice: dict, names, static, nlc_module):
    """The module that goes into the graph for choice["method"]."""

    method = choice["method"]
    if method == "nlc":
        return nlc_module
    if method == "static":
        return static
    if method == "mean":
        return ConstantController(len(names)).eval()
    return single_controller(list(names).index(choice["backbone"]), len(names))
