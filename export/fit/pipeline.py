"""`clipfuse fit` and `clipfuse eval`: few-shot NLC on labelled image folders, against every baseline.

fit:  labelled folder -> features (cached) -> heads (zero-shot, or linear probes
      fitted on a train split) -> NLC and C-LOG-AVG on k shots per class ->
      the study table (every method, k in {1,2,4,8,16}, several seeds) ->
      an engine folder whose graph holds the controller that scored best on labelled
      images it was not fitted on (NLC, C-LOG-AVG, LOG-AVG or the best single
      backbone; see export/fit/select.py), with report.md/json and the diversity
      figures (export/fit/diversity.py) on the eval split.
eval: the exported graph (ONNX Runtime, not the PyTorch module) on a labelled
      folder -> the same table, from the graph's own outputs, the shipped row
      marked, and the diversity figures. The reports' text: export/fit/report.py.

Splits:
- eval images: a separate folder (--eval) or a stratified seeded split of
  --data (eval_fraction, split seed fixed at 0 so every fit shares it);
- zero-shot heads: NLC's k shots come from all remaining images;
- linear probes (the paper's second setting): the remaining images are split
  again, probes on `probe_fraction` (paper: 90%), NLC's shots drawn from the
  disjoint rest, so the controller never sees a probe's training image.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log, step
from clipfuse.runtime.backends.registry import open_backend
from clipfuse.runtime.images import iter_batches
from clipfuse.runtime.manifest import read_manifest

from ..data import check_shots, sample_k_shot, scan_labelled_folder, seeded_split
from ..graph import backbones as bb, heads as hd
from ..graph.engine import export_engine
from ..graph.engine_folder import check_output_folder
from ..graph.fused import load_controller, save_controller
from ..graph.heads import LINEAR_PROBE, Head
from . import baselines, diversity as dv, levers as fl, nlc, select, study
from .features import FeatureCache, compute_features, head_logits
from .report import HEATMAP, heatmap_bytes, render_report, write_eval_report

SPLIT_SEED = 0
STATIC = "static.safetensors"
NLC_FILE = "nlc.safetensors"        # the fitted NLC, kept even when another method ships (eval scores it)
REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0):
    """Multinomial logistic regression on standardised features, folded back into one linear head.

    Standardising matters: unit-norm features of random towers vary in tiny
    directions and train poorly raw. The fitted (W', b') on (f - mu) / sd is
    rewritten as W = W' / sd, b = b' - W' @ (mu / sd), so the graph applies it
    to the raw unit-norm features and computes exactly the same logits.
    Regularisation strength C is chosen by 3-fold cross-validation.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    X = np.asarray(features, np.float64)
    y = np.asarray(labels)
    present = np.unique(y)
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise ClipfuseError(f"linear probe: classes {missing} have no training image")
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xs = (X - mu) / sd
    import warnings

    from threadpoolctl import threadpool_limits

    # One BLAS thread: beside torch's own pool, OpenBLAS threads spun against it and a 150-image
    # probe fit took minutes (half of it system time); single-threaded it takes seconds.
    # scikit-learn 1.9 warns about defaults changing in 1.10/1.11 (l1_ratios, scoring, attributes);
    # the values used here are explicit in intent (L2, accuracy) and the warnings only clutter fit's output.
    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if np.bincount(y).min() >= 3:
            clf = LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=3, max_iter=2000, random_state=seed).fit(Xs, y)
        else:
            clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(Xs, y)
    Wp, bp = clf.coef_, clf.intercept_                                 # (C, D), (C,)
    W = Wp / sd
    b = bp - (Wp * (mu / sd)).sum(1)
    return Head(torch.tensor(W, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), LINEAR_PROBE)


def _check_same_classes(names_a, names_b, what_a: str, what_b: str) -> None:
    if list(names_a) != list(names_b):
        only_a = sorted(set(names_a) - set(names_b))
        only_b = sorted(set(names_b) - set(names_a))
        detail = []
        if only_a:
            detail.append(f"only in {what_a}: {', '.join(only_a[:5])}")
        if only_b:
            detail.append(f"only in {what_b}: {', '.join(only_b[:5])}")
        if not detail:
            detail.append("same names in another order")
        raise ClipfuseError(f"classes of {what_a} do not match {what_b} ({'; '.join(detail)})")


def _select(fs, paths):
    """Rows of a FeatureSet for `paths` (all of which loaded)."""
    index = {p: i for i, p in enumerate(fs.paths)}
    rows = [index[p] for p in paths]
    return [f[rows] for f in fs.features]


def feasible_shots(labels: np.ndarray, num_classes: int, shots) -> tuple[list[int], list[int]]:
    fewest = int(np.bincount(labels, minlength=num_classes).min())
    return [k for k in shots if k <= fewest], [k for k in shots if k > fewest]


def fit_engine(backbones, data, out, classes=None, eval_data=None, eval_fraction: float = 0.3, shots: int = 1,
               seed: int = 0, head: str = "zero-shot", templates=None, probe_fraction: float = 0.9,
               study_shots=(1, 2, 4, 8, 16), study_seeds=(0, 1, 2), cache_dir=None, batch_size: int = 32,
               force: bool = False, quiet: bool = False, config=None, controller: str = "auto", levers=None):
    """Fit NLC (and every baseline) on a labelled folder; write engines/<name>/ with the graph of the method
    that ships: controller "auto" (the best on held-out pool images), or forced: nlc, static, mean, single.
    levers: export/fit_levers.Levers: a budget-chosen subset (the engine holds it) or a cascade engine."""

    t0 = time.perf_counter()
    select.check_choice(controller)
    if head not in hd.HEAD_KINDS:
        raise ClipfuseError(f"--head {head!r} is not one of {', '.join(hd.HEAD_KINDS)}")
    if not backbones:
        raise ClipfuseError("no backbones given: pass --backbone ARCH[:WEIGHTS] at least once")
    specs = [bb.parse_backbone(b) if not isinstance(b, bb.BackboneSpec) else b for b in backbones]
    levers = (levers or fl.Levers()).check(len(specs))
    check_output_folder(Path(out), force)
    config = (config or nlc.FitConfig()).check()
    paths, labels, class_names = scan_labelled_folder(data, classes)
    if eval_data is not None:
        ev_paths, ev_labels, ev_names = scan_labelled_folder(eval_data, classes)
        _check_same_classes(ev_names, class_names, f"--eval {eval_data}", f"--data {data}")
    if head == hd.ZERO_SHOT:
        templates = hd.parse_templates(templates) if templates is None or isinstance(templates, (str, Path)) else list(templates)
    C = len(class_names)
    # before the minutes of features: the splits are stratified, so the pool's class counts follow from the labels
    check_shots(labels, shots, class_names, None if eval_data is not None else eval_fraction,
                None if head == hd.ZERO_SHOT else probe_fraction)
    log(f"{len(paths)} images in {C} classes from {data}" + (f"; eval: {len(ev_paths)} images from {eval_data}" if eval_data else ""), quiet)

    built = []
    for i, spec in enumerate(specs):
        with step(f"backbone {i + 1}/{len(specs)} {spec}: building", quiet):
            built.append(bb.load_backbone(spec))

    cache = FeatureCache(cache_dir)
    all_paths = list(paths) + (list(ev_paths) if eval_data is not None else [])
    fs = compute_features(built, all_paths, cache, batch_size=batch_size, progress=not quiet)
    log(cache.stats.line(), quiet)
    if fs.failures:
        log(f"{len(fs.failures)} unreadable image(s) skipped:", quiet)
        for f in fs.failures:
            log(f"  {f.path}: {f.reason}", quiet)
    ok = set(fs.paths)
    keep = [i for i, p in enumerate(paths) if p in ok]
    paths, labels = [paths[i] for i in keep], labels[keep]
    if eval_data is not None:
        keep_ev = [i for i, p in enumerate(ev_paths) if p in ok]
        ev_paths, ev_labels = [ev_paths[i] for i in keep_ev], ev_labels[keep_ev]
    else:
        tr_idx, ev_idx = seeded_split(labels, eval_fraction, SPLIT_SEED)
        ev_paths, ev_labels = [paths[i] for i in ev_idx], labels[ev_idx]
        paths, labels = [paths[i] for i in tr_idx], labels[tr_idx]
    for c in range(C):
        if not (labels == c).any():
            raise ClipfuseError(f"class {class_names[c]!r} has no readable training image left")

    tr_feats, ev_feats = _select(fs, paths), _select(fs, ev_paths)
    # Heads: zero-shot from the text towers, or probes on a disjoint split of the training pool.
    if head == hd.ZERO_SHOT:
        heads = []
        for i, b in enumerate(built):
            with step(f"backbone {i + 1}/{len(built)} {b.spec}: zero-shot head, {C} classes x {len(templates)} templates", quiet):
                heads.append(hd.zero_shot_head(b.model, b.spec.arch, class_names, templates))
        pool = np.arange(len(paths))
    else:
        probe_idx, pool = seeded_split(labels, 1.0 - probe_fraction, SPLIT_SEED + 1)
        heads = []
        for i, b in enumerate(built):
            with step(f"backbone {i + 1}/{len(built)} {b.spec}: linear probe on {len(probe_idx)} images", quiet):
                heads.append(fit_linear_probe(tr_feats[i][probe_idx], labels[probe_idx], C, seed=seed))
    names = [str(s) for s in specs]

    def arrays(feats):
        Z = np.stack([head_logits(f, h) for f, h in zip(feats, heads)], axis=1)    # (N, K, C)
        return np.concatenate(feats, axis=1), Z                                    # (N, sum D), (N, K, C)

    lever_report = {}
    if levers.budget is not None:      # the engine holds the chosen subset: everything below sees only it
        lever_report["budget"] = fl.apply_budget(levers, built, heads, tr_feats, ev_feats, pool, labels, ev_labels,
                                                 shots, seed, C, config, quiet)
        keep = lever_report["budget"]["members"]
        built, heads, tr_feats, ev_feats = ([x[k] for k in keep] for x in (built, heads, tr_feats, ev_feats))
        names = [str(b.spec) for b in built]
        log(f"budget {levers.budget:g} {levers.budget_unit}: chose {' + '.join(names)}", quiet)
    X_pool, Z_pool = arrays([f[pool] for f in tr_feats])
    y_pool = labels[pool]
    X_ev, Z_ev = arrays(ev_feats)

    ok_shots, skipped = feasible_shots(y_pool, C, sorted(set(study_shots) | {shots}))
    if shots in skipped:       # unreadable images left a class short
        check_shots(y_pool, shots, class_names)
    cascade_costs = None
    if levers.cascade:                 # refuse too few calibration images before any fitting
        cascade_costs = fl.check_calibration(levers, built, heads, Z_pool, y_pool,
                                             sample_k_shot(y_pool, shots, seed, num_classes=C), quiet)
    with step(f"study: NLC vs baselines, k in {ok_shots}, seeds {list(study_seeds)}", quiet):
        study_table = study.run_study(X_pool, Z_pool, y_pool, X_ev, Z_ev, ev_labels, names, shots=ok_shots,
                              seeds=study_seeds, config=config, class_names=class_names)
    # The controllers fitted for shipping: k = shots, seed = seed; the loss curve feeds the plateau check.
    idx = sample_k_shot(y_pool, shots, seed, num_classes=C, class_names=class_names)
    from dataclasses import replace

    run_cfg = replace(config, seed=seed)
    static = nlc.fit_static(Z_pool[idx], y_pool[idx], run_cfg)
    losses = []
    Xs, Zs, ys = (torch.as_tensor(a) for a in (np.asarray(X_pool[idx], np.float32), np.asarray(Z_pool[idx], np.float32),
                                               np.asarray(y_pool[idx], np.int64)))

    def record(_step, module):                       # full-shot loss after each step (cheap: k*C rows)
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(nlc.fuse(module(Xs), Zs), ys)))

    controller_nlc = nlc.fit_nlc(X_pool[idx], Z_pool[idx], y_pool[idx], run_cfg, on_step=record)
    with step(f"choosing the controller to ship (--controller {controller})", quiet):
        choice = select.choose(X_pool, Z_pool, y_pool, names, shots, seed, run_cfg, forced=controller)
    shipped_module = select.shipped_controller(choice, names, static, controller_nlc)
    shipped = baselines.evaluate(X_ev, Z_ev, ev_labels, names, static=static, nlc=controller_nlc)
    log(f"shipping {choice['row']}: {choice['reason']}", quiet)

    div = dv.diversity_report(Z_ev, ev_labels, names, class_names,
                              temperatures=nlc.controller_temperatures(controller_nlc, X_ev), accuracy=shipped, losses=losses)
    for line in div["signatures"]:
        log(f"warning: {line}", quiet)
    heat = heatmap_bytes(div)
    same_draws = identical_draws(y_pool, C, ok_shots, study_seeds)

    cascade = None
    if levers.cascade:                 # backbones, heads and controllers go into the graph in stage order
        with step(f"cascade: order, per-stage controllers and thresholds (--max-drop {levers.max_drop})", quiet):
            plan = fl.plan_cascade(levers, built, heads, X_pool, Z_pool, y_pool, X_ev, Z_ev, ev_labels, idx,
                                   shipped_module, run_cfg, quiet, costs=cascade_costs)
        order, dims = plan["order"], [b.embed_dim for b in built]
        built, heads = [built[k] for k in order], [heads[k] for k in order]
        static, controller_nlc = (fl.permute_controller(c, order, dims) for c in (static, controller_nlc))
        shipped_module = plan["controllers"][-1]
        cascade = {"controllers": plan["controllers"], "block": plan["block"]}
        lever_report["cascade"] = plan["block"]
        log(f"cascade: {' -> '.join(plan['block']['order'])}, eval exit rates "
            f"{[round(r, 3) for r in plan['block']['test']['exit_rates']]}", quiet)
    report = {
        "data": str(data), "eval": str(eval_data) if eval_data else f"seeded split of --data ({eval_fraction:.0%}, seed {SPLIT_SEED})",
        "head": head, "classes": class_names, "backbones": names,
        "num_train_pool": int(len(y_pool)), "num_eval": int(len(ev_labels)),
        "probe_images": int(len(paths) - len(pool)) if head != hd.ZERO_SHOT else 0,
        "unreadable_images": [{"path": str(f.path), "reason": f.reason} for f in fs.failures],
        "shots_skipped": skipped,
        "identical_draws": same_draws,
        "shipped": {"shots": shots, "seed": seed, "accuracy": shipped,
                    "method": choice["method"], "row": choice["row"], "backbone": choice["backbone"],
                    "reason": choice["reason"], "selection": choice,
                    "static_temperatures": [float(v) for v in static.value.reshape(-1)]},
        "loss_curve": losses,
        "diversity": div,
        "heatmap": HEATMAP if isinstance(heat, bytes) else heat,
        "config": asdict(run_cfg),
        "study": study_table,
        "cache": asdict(cache.stats),
        **lever_report,
    }
    frontier = None
    if "budget" in lever_report:
        frontier = fl.frontier_png(lever_report["budget"]["frontier"], lever_report["budget"]["chosen"])
        lever_report["budget"]["plot"] = fl.FRONTIER_PNG if isinstance(frontier, bytes) else frontier
    md = render_report(report) + fl.report_markdown(report)
    extra = {REPORT_MD: md, REPORT_JSON: json.dumps(report, indent=2) + "\n",
             STATIC: lambda p: save_controller(static, p), NLC_FILE: lambda p: save_controller(controller_nlc, p)}
    if isinstance(heat, bytes):
        extra[HEATMAP] = heat
    if isinstance(frontier, bytes):
        extra[fl.FRONTIER_PNG] = frontier
    fit_info = {"fit": {"data": str(data), "shots": shots, "seed": seed, "head": head,
                        "accuracy": shipped, "static_file": STATIC, "nlc_file": NLC_FILE, "report": REPORT_MD,
                        "shipped": {k: choice[k] for k in ("method", "row", "backbone", "reason")}}}
    if "budget" in lever_report:
        fit_info["budget"] = {k: lever_report["budget"][k] for k in ("budget", "unit", "chosen", "costs")}
    result = export_engine(built, class_names, out, templates=templates if head == hd.ZERO_SHOT else None,
                           force=force, heads=heads, controller=shipped_module, quiet=quiet,
                           extra_files=extra, extra_manifest=fit_info, cascade=cascade)
    log(f"fit + export in {time.perf_counter() - t0:.0f} s; the engine ships {choice['row']} (report.md says why)", quiet)
    return result, report


def identical_draws(y_pool, num_classes: int, shots, seeds) -> list[int]:
    """The k for which every seed draws the same shots (each class has exactly k images in the pool)."""

    same = []
    for k in shots:
        draws = {tuple(np.sort(sample_k_shot(y_pool, k, s, num_classes=num_classes))) for s in seeds}
        if len(seeds) > 1 and len(draws) == 1:
            same.append(int(k))
    return same


def eval_engine(engine, data, classes=None, batch_size: int = 32, quiet: bool = False, report_dir=None) -> dict:
    """Accuracy of every method from the exported graph's own outputs on a labelled folder, the row the
    engine ships marked, and the diversity figures; report_dir: also write eval.md, eval.json, diversity.png."""

    m = read_manifest(engine)
    paths, labels, names = scan_labelled_folder(data, classes)
    _check_same_classes(names, m.classes, f"--data {data}", f"engine {engine}")
    # The runtime's own ONNX Runtime backend (its measured session options): eval scores what predict serves.
    backend = open_backend(m, "onnxruntime", quiet=True)
    outs = {"backbone_logits": [], "logits": [], "temperatures": [], "features": []}
    kept, failures = [], []
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="eval", unit="img", disable=quiet, file=sys.stderr)
    label_of = dict(zip(paths, labels))
    for batch in iter_batches(paths, m.preprocess_specs(), batch_size=batch_size):
        failures += batch.failures
        if batch.paths:
            res = backend.infer(batch.inputs)
            for k in outs:
                outs[k].append(res[k])
            kept += batch.paths
        bar.update(len(batch.paths) + len(batch.failures))
    bar.close()
    backend.close()
    if not kept:
        raise ClipfuseError(f"no readable image in {data}")
    y = np.array([label_of[p] for p in kept])
    Z, X = np.concatenate(outs["backbone_logits"]), np.concatenate(outs["features"])
    fused = np.concatenate(outs["logits"])
    T = np.concatenate(outs["temperatures"])
    side = {f: load_controller(m.folder / f) if (m.folder / f).is_file() else None for f in (STATIC, NLC_FILE)}
    acc = baselines.evaluate(X, Z, y, m.backbone_names, static=side[STATIC], nlc=side[NLC_FILE])
    kind = m.data.get("controller", {}).get("kind", "constant")
    shipped = m.data.get("fit", {}).get("shipped", {}).get("row") or ("NLC" if kind == "nlc" else f"ENGINE ({kind})")
    engine_acc = float(100.0 * np.mean(fused.argmax(-1) == y))
    ordered = {}
    for name, v in acc.items():
        if name == "ORACLE" and shipped not in acc:
            ordered[shipped] = engine_acc
        ordered[name] = engine_acc if name == shipped else v     # the shipped row: the graph's own number
    # Collapse is a property of an NLC: the graph's temperatures if it ships one, else the saved one's.
    temps = T if kind == "nlc" else (nlc.controller_temperatures(side[NLC_FILE], X) if side[NLC_FILE] is not None else None)
    div = dv.diversity_report(Z, y, m.backbone_names, m.classes, temperatures=temps, accuracy=ordered)
    result = {"engine": str(m.folder), "data": str(data), "num_images": int(len(y)), "accuracy": ordered,
              "shipped": shipped, "engine_accuracy": engine_acc, "diversity": div,
              "unreadable_images": [{"path": str(f.path), "reason": f.reason} for f in failures],
              "predictions": fused.argmax(-1).tolist(), "paths": [str(p) for p in kept], "temperatures": T.tolist()}
    if report_dir is not None:
        result["report"] = write_eval_report(result, Path(report_dir))
    return result
