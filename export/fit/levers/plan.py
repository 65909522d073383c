"""`clipfuse fit --cascade`: the cascade's order, per-stage controllers and thresholds (export/fit/levers).

check_calibration refuses, before any fitting, too few calibration images for --max-drop (naming the number
needed and --certify-on); plan_cascade fits C-LOG-AVG per stage, tries the candidate orders and scores
(export/fit/cascade.py) and reorders the shipped controller for the last stage.
"""
from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log

from ...graph.fused import ConstantController, NLCController, StaticController
from ...thresholds import CascadeConfig, required_calibration_images
from .. import nlc
from ..cascade import candidate_orders, fit_cascade_orders
from ..certify import describe
from ..nlc import controller_temperatures
from .costs import measure_costs
from .recipe import GFLOPS, Levers

# A cascade engine's graph holds its backbones in stage order (cheapest first, as chosen), not as given.
REORDERED = ("the engine holds the backbones in stage order, not in the order given: the manifest's backbones and "
             "the K axis of temperatures and backbone_logits follow the stage order")


def fused_logits(controller, X, Z) -> np.ndarray:
    """sum_k t_k(x) z_k(x) (N, C) with a fitted controller, float32 like the graph."""

    t = controller_temperatures(controller, X)                                       # (N, K)
    return (t[:, :, None] * np.asarray(Z, np.float32)).sum(axis=1)


def permute_controller(controller, order, dims):
    """The same controller for the backbones in `order` (indices into the original order, whose
    embedding widths are `dims`): temperatures follow their backbones, an NLC's input columns too."""
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
