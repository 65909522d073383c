"""`clipfuse fit`: few-shot NLC on labelled image folders, against every baseline (eval: export/fit/evaluate.py).

fit:  labelled folder -> features (cached) -> heads (zero-shot, or linear probes
      fitted on a train split) -> NLC and C-LOG-AVG on k shots per class ->
      the study table (every method, k in {1,2,4,8,16}, several seeds) ->
      an engine folder whose graph holds the controller that scored best on labelled
      images it was not fitted on (NLC, C-LOG-AVG, LOG-AVG or the best single
      backbone; see export/fit/select.py), with report.md/json and the diversity
      figures (export/fit/diversity.py) on the eval split, and the content hashes
      of every training image (runtime/fit_images.py: eval and bench leave them out).
      The reports' text: export/fit/report.py.

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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log, progress_shown, step, warn
from clipfuse.runtime.fit_images import FIT_IMAGES, fit_images_json

from ..data import check_same_classes, check_shots, sample_k_shot, scan_labelled_folder, seeded_split
from ..graph import backbones as bb, heads as hd
from ..graph.engine import export_engine
from ..graph.engine_folder import check_output_folder
from ..graph.fused import save_controller
from ..graph.heads import LINEAR_PROBE, Head
from . import baselines, certify, diversity as dv, nlc, select, study
from .levers import budget, plan
from .levers.recipe import Levers
from .levers.report import report_markdown
from .features import FeatureCache, compute_features, head_logits
from .report import HEATMAP, heatmap_bytes, render_report

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
               force: bool = False, config=None, controller: str = "auto", levers=None):
    """Fit NLC (and every baseline) on a labelled folder; write engines/<name>/ with the graph of the method
    that ships: controller "auto" (the best on held-out pool images), or forced: nlc, static, mean, single.
    levers: export/fit/levers/recipe.Levers: a budget-chosen subset (the engine holds it) or a cascade engine."""

    t0 = time.perf_counter()
    select.check_choice(controller)
    if head not in hd.HEAD_KINDS:
        raise ClipfuseError(f"--head {head!r} is not one of {', '.join(hd.HEAD_KINDS)}")
    if not backbones:
        raise ClipfuseError("no backbones given: pass --backbone ARCH[:WEIGHTS] at least once")
    specs = [bb.parse_backbone(b) if not isinstance(b, bb.BackboneSpec) else b for b in backbones]
    levers = (levers or Levers()).check(len(specs))
    check_output_folder(Path(out), force)
    if levers.certify_on is not None:  # a bad folder is refused before the minutes of building and features
        certify.check_folder(levers.certify_on)
    cache = FeatureCache(cache_dir)          # a cache folder that cannot be written is refused now, not after features
    config = (config or nlc.FitConfig()).check()
    paths, labels, class_names = scan_labelled_folder(data, classes)
    if eval_data is not None:
        ev_paths, ev_labels, ev_names = scan_labelled_folder(eval_data, classes)
        check_same_classes(ev_names, class_names, f"--eval {eval_data}", f"--data {data}")
    if head == hd.ZERO_SHOT:
        templates = hd.parse_templates(templates) if templates is None or isinstance(templates, (str, Path)) else list(templates)
    C = len(class_names)
    # before the minutes of features: the splits are stratified, so the pool's class counts follow from the labels
    check_shots(labels, shots, class_names, None if eval_data is not None else eval_fraction,
                None if head == hd.ZERO_SHOT else probe_fraction)
    log(f"{len(paths)} images in {C} classes from {data}" + (f"; eval: {len(ev_paths)} images from {eval_data}" if eval_data else ""))

    built = []
    for i, spec in enumerate(specs):
        with step(f"backbone {i + 1}/{len(specs)} {spec}: building"):
            built.append(bb.load_backbone(spec))

    all_paths = list(paths) + (list(ev_paths) if eval_data is not None else [])
    fs = compute_features(built, all_paths, cache, batch_size=batch_size, progress=progress_shown())
    log(cache.stats.line())
    if fs.failures:
        log(f"{len(fs.failures)} unreadable image(s) skipped:")
        for f in fs.failures:
            log(f"  {f.path}: {f.reason}")
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
            with step(f"backbone {i + 1}/{len(built)} {b.spec}: zero-shot head, {C} classes x {len(templates)} templates"):
                heads.append(hd.zero_shot_head(b.model, b.spec.arch, class_names, templates))
        pool = np.arange(len(paths))
    else:
        probe_idx, pool = seeded_split(labels, 1.0 - probe_fraction, SPLIT_SEED + 1)
        heads = []
        for i, b in enumerate(built):
            with step(f"backbone {i + 1}/{len(built)} {b.spec}: linear probe on {len(probe_idx)} images"):
                heads.append(fit_linear_probe(tr_feats[i][probe_idx], labels[probe_idx], C, seed=seed))
    names = [str(s) for s in specs]

    def arrays(feats):
        Z = np.stack([head_logits(f, h) for f, h in zip(feats, heads)], axis=1)    # (N, K, C)
        return np.concatenate(feats, axis=1), Z                                    # (N, sum D), (N, K, C)

    lever_report = {}
    if levers.budget is not None:      # the engine holds the chosen subset: everything below sees only it
        lever_report["budget"] = budget.apply_budget(levers, built, heads, tr_feats, ev_feats, pool, labels,
                                                     ev_labels, shots, seed, C, config)
        keep = lever_report["budget"]["members"]
        built, heads, tr_feats, ev_feats = ([x[k] for k in keep] for x in (built, heads, tr_feats, ev_feats))
        names = [str(b.spec) for b in built]
        log(f"budget {levers.budget:g} {levers.budget_unit}: chose {' + '.join(names)}")
    X_pool, Z_pool = arrays([f[pool] for f in tr_feats])
    y_pool = labels[pool]
    X_ev, Z_ev = arrays(ev_feats)

    ok_shots, skipped = feasible_shots(y_pool, C, sorted(set(study_shots) | {shots}))
    if shots in skipped:       # unreadable images left a class short
        check_shots(y_pool, shots, class_names)
    cascade_costs = unlabelled = None
    if levers.cascade:                 # refuse too few calibration images before any fitting
        shot_idx = sample_k_shot(y_pool, shots, seed, num_classes=C)
        if levers.certify_on is not None:
            fitted = [paths[i] for i in pool[shot_idx]] + ([paths[i] for i in probe_idx] if head != hd.ZERO_SHOT else [])
            calib_paths = [paths[i] for i in np.setdiff1d(pool, pool[shot_idx])]
            unlabelled = certify.certify_on_arrays(levers.certify_on, built, heads, cache, batch_size,
                                                   *([fs.digests[p] for p in ps] for ps in (fitted, calib_paths, ev_paths)))
        cascade_costs = plan.check_calibration(levers, built, heads, Z_pool, y_pool, shot_idx,
                                               0 if unlabelled is None else len(unlabelled.Z))
    alone = levers.budget is not None and len(names) == 1     # the budget kept one: no ensemble, no controller to fit
    study_table = None
    if not alone:
        with step(f"study: NLC vs baselines, k in {ok_shots}, seeds {list(study_seeds)}"):
            study_table = study.run_study(X_pool, Z_pool, y_pool, X_ev, Z_ev, ev_labels, names, shots=ok_shots,
                                          seeds=study_seeds, config=config, class_names=class_names)
    # The controllers fitted for shipping: k = shots, seed = seed; the loss curve feeds the plateau check.
    idx = sample_k_shot(y_pool, shots, seed, num_classes=C, class_names=class_names)
    # probes' and controller pool's images, not eval's; a cascade's calibration images (pool outside the shots) named
    # and the --certify-on images, which chose the exits too: eval and bench leave them all out
    cal_paths = [paths[i] for i in np.setdiff1d(pool, pool[idx])] if levers.cascade else []
    certify_digests = unlabelled.digests if unlabelled is not None else ()
    fit_images = fit_images_json([*(fs.digests[p] for p in paths), *certify_digests],
                                 [*(fs.digests[p] for p in cal_paths), *certify_digests])
    from dataclasses import replace

    run_cfg = replace(config, seed=seed)
    static = nlc.fit_static(Z_pool[idx], y_pool[idx], run_cfg)
    losses = []
    Xs, Zs, ys = (torch.as_tensor(a) for a in (np.asarray(X_pool[idx], np.float32), np.asarray(Z_pool[idx], np.float32),
                                               np.asarray(y_pool[idx], np.int64)))

    def record(_step, module):                       # full-shot loss after each step (cheap: k*C rows)
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(nlc.fuse(module(Xs), Zs), ys)))

    if alone:
        controller_nlc, choice = None, select.alone(names[0], controller)
    else:
        controller_nlc = nlc.fit_nlc(X_pool[idx], Z_pool[idx], y_pool[idx], run_cfg, on_step=record)
        with step(f"choosing the controller to ship (--controller {controller})"):
            choice = select.choose(X_pool, Z_pool, y_pool, names, shots, seed, run_cfg, forced=controller)
    shipped_module = select.shipped_controller(choice, names, static, controller_nlc)
    shipped = baselines.evaluate(X_ev, Z_ev, ev_labels, names, static=static, nlc=controller_nlc)
    log(f"shipping {choice['row']}: {choice['reason']}")

    div = dv.diversity_report(Z_ev, ev_labels, names, class_names, **({} if alone else dict(
        temperatures=nlc.controller_temperatures(controller_nlc, X_ev), accuracy=shipped, losses=losses)))
    for line in div["signatures"]:
        warn(f"warning: {line}")
    heat = heatmap_bytes(div)
    same_draws = [] if alone else identical_draws(y_pool, C, ok_shots, study_seeds)

    cascade = None
    if levers.cascade:                 # backbones, heads and controllers go into the graph in stage order
        with step(f"cascade: order, per-stage controllers and thresholds (--max-drop {levers.max_drop})"):
            planned = plan.plan_cascade(levers, built, heads, X_pool, Z_pool, y_pool, X_ev, Z_ev, ev_labels, idx,
                                        shipped_module, run_cfg, costs=cascade_costs, shipped_row=choice["row"],
                                        unlabelled=unlabelled)
        order, dims = planned["order"], [b.embed_dim for b in built]
        built, heads = [built[k] for k in order], [heads[k] for k in order]
        static, controller_nlc = (plan.permute_controller(c, order, dims) for c in (static, controller_nlc))
        shipped_module = planned["controllers"][-1]
        cascade = {"controllers": planned["controllers"], "block": planned["block"]}
        lever_report["cascade"] = planned["block"]
        log(f"cascade: {' -> '.join(planned['block']['order'])}, eval exit rates "
            f"{[round(r, 3) for r in planned['block']['test']['exit_rates']]}")
        if list(planned["block"]["order"]) != names:
            log(f"cascade: {plan.REORDERED} ({', '.join(names)})")
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
        frontier = budget.frontier_png(lever_report["budget"]["frontier"], lever_report["budget"]["chosen"])
        lever_report["budget"]["plot"] = budget.FRONTIER_PNG if isinstance(frontier, bytes) else frontier
    md = render_report(report) + report_markdown(report)
    extra = {REPORT_MD: md, REPORT_JSON: json.dumps(report, indent=2) + "\n",
             STATIC: lambda p: save_controller(static, p), FIT_IMAGES: fit_images}
    if controller_nlc is not None:
        extra[NLC_FILE] = lambda p: save_controller(controller_nlc, p)
    if isinstance(heat, bytes):
        extra[HEATMAP] = heat
    if isinstance(frontier, bytes):
        extra[budget.FRONTIER_PNG] = frontier
    fit_info = {"fit": {"data": str(data), "shots": shots, "seed": seed, "head": head,
                        "accuracy": shipped, "static_file": STATIC, "report": REPORT_MD,
                        "nlc_file": NLC_FILE if controller_nlc is not None else None,
                        "images_file": FIT_IMAGES,
                        "shipped": {k: choice[k] for k in ("method", "row", "backbone", "reason")}}}
    if "budget" in lever_report:
        fit_info["budget"] = {k: lever_report["budget"][k] for k in ("budget", "unit", "chosen", "costs")}
    result = export_engine(built, class_names, out, templates=templates if head == hd.ZERO_SHOT else None,
                           force=force, heads=heads, controller=shipped_module,
                           extra_files=extra, extra_manifest=fit_info, cascade=cascade)
    ships = f"a cascade whose last stage holds {choice['row']}" if cascade else choice["row"]
    log(f"fit + export in {time.perf_counter() - t0:.0f} s; the engine ships {ships} (report.md says why)")
    return result, report


def identical_draws(y_pool, num_classes: int, shots, seeds) -> list[int]:
    """The k for which every seed draws the same shots (each class has exactly k images in the pool)."""

    same = []
    for k in shots:
        draws = {tuple(np.sort(sample_k_shot(y_pool, k, s, num_classes=num_classes))) for s in seeds}
        if len(seeds) > 1 and len(draws) == 1:
            same.append(int(k))
    return same
