"""Committed results: the cascade and budget subsets beside the full ensemble, on scikit-learn's digits.

    python benchmarks/cascade_digits.py --set five     # ViT-B-32, RN50, RN101, ViT-B-16, RN50x4; all 1797 images
    python benchmarks/cascade_digits.py --set nine     # the nine OpenAI architectures; first 30 images per class (300)
    python benchmarks/cascade_digits.py --set pair     # RN50:random:0 + ViT-B-32:random:1 (the demo's pair); 1797
    python benchmarks/cascade_digits.py --set trained  # the three towers trained here (train_towers.py) on 2000
                                                       # tower_digits.py images of the `figures` split
    ... --latency                                      # also export the cascade engine and bench it (slow)

Digits are written exactly as benchmarks/nlc_digits.py writes them (its write_digits: the feature
cache keys on image content, so the same bytes reuse its features). Towers are seeded random
(`ARCH:random:SEED`; nothing can be downloaded here), heads are linear probes on standardised features.

Splits, the same functions `clipfuse fit` uses (export/data.py): 30% eval (stratified, seed 0); of the
rest, probes on 50% (not fit's 90%: the cascade's bound needs calibration images, see below) and the
controller's pool on the other 50%; k = 4 shots per class from the pool. Every controller is fitted on the
shots; the pool images outside the shots SELECT (best single, subsets, the controller that ships, the
cascade's order and thresholds); the eval split only REPORTS. Figures, each accuracy with its Wilson 95%
interval, each method's paired difference against the full ensemble (bootstrap 95%, agreement):
- full ensemble: the controller `clipfuse fit` would ship (export/fit/select.py);
- best single: the most accurate single backbone on the pool's held-out images;
- best subsets (export/fit/subsets.py, C-LOG-AVG per subset, as `fit --budget-gflops`) at 1x, 2x and 4x the
  best single's GFLOPs;
- the cascade (export/fit/levers/plan.plan_cascade, as `fit --cascade`): --max-drop is the smallest of
  0.5, 1, 2, 3, 5, 10, 20 points that the calibration images can certify (Clopper-Pearson on agreement,
  95%), unless given.
Costs here are GFLOPs (counted, exact); latencies need --latency (the cascade engine is exported and
benched over the real exits: clipfuse bench, beside the singles and the full graph). Writes
benchmarks/results/cascade_<set>.md/.json with the exact command at the top.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import tower_digits  # noqa: E402
import train_towers  # noqa: E402
from nlc_digits import write_digits  # noqa: E402  (identical bytes: the feature cache keys on them)

ALL = ["RN50:random:0", "RN101:random:1", "RN50x4:random:2", "RN50x16:random:3", "RN50x64:random:4",
       "ViT-B-32:random:5", "ViT-B-16:random:6", "ViT-L-14:random:7", "ViT-L-14-336:random:8"]
SETS = {"five": ([ALL[5], ALL[0], ALL[1], ALL[6], ALL[2]], None),
        "nine": (ALL, 30),
        "pair": (["RN50:random:0", "ViT-B-32:random:1"], None),
        "trained": (None, None)}            # train_towers.specs(): RN50, ViT-B-32, RN101 trained here
TRAINED_IMAGES = 2000                        # benchmarks/tower_digits.py, `figures` split
DROPS = (0.5, 1, 2, 3, 5, 10, 20)
SHOTS, EVAL_FRACTION, PROBE_FRACTION = 4, 0.3, 0.5


def keep_first(folder: Path, per_class: int) -> None:
    """Keep the first `per_class` images (by index) of each class folder; the others are removed."""
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir())[per_class:]:
            f.unlink()


def arrays(backbones, folder: Path, cache_dir):
    """Features (cached), linear-probe heads and fit's splits -> a dict of arrays."""
    from clipfuse.export.data import sample_k_shot, scan_labelled_folder, seeded_split
    from clipfuse.export.fit.features import FeatureCache, compute_features, head_logits
    from clipfuse.core.log import progress_shown
    from clipfuse.export.fit.pipeline import SPLIT_SEED, _select, fit_linear_probe
    from clipfuse.export.graph import backbones as bb

    paths, labels, classes = scan_labelled_folder(folder)
    built = [bb.load_backbone(b) for b in backbones]
    fs = compute_features(built, paths, FeatureCache(cache_dir), progress=progress_shown())
    ok = set(fs.paths)
    keep = [i for i, p in enumerate(paths) if p in ok]
    paths, labels = [paths[i] for i in keep], labels[keep]
    tr, ev = seeded_split(labels, EVAL_FRACTION, SPLIT_SEED)
    tr_paths, ev_paths = [paths[i] for i in tr], [paths[i] for i in ev]
    y_tr, y_ev = labels[tr], labels[ev]
    tr_f, ev_f = _select(fs, tr_paths), _select(fs, ev_paths)
    probe, pool = seeded_split(y_tr, 1.0 - PROBE_FRACTION, SPLIT_SEED + 1)
    C = len(classes)
    heads = [fit_linear_probe(f[probe], y_tr[probe], C) for f in tr_f]
    Z = lambda feats: np.stack([head_logits(f, h) for f, h in zip(feats, heads)], axis=1)    # (N, K, C)
    pool_f = [f[pool] for f in tr_f]
    y_pool = y_tr[pool]
    return {"built": built, "heads": heads, "classes": classes, "names": [str(b.spec) for b in built],
            "pool_f": pool_f, "X_pool": np.concatenate(pool_f, 1), "Z_pool": Z(pool_f), "y_pool": y_pool,
            "ev_f": ev_f, "X_ev": np.concatenate(ev_f, 1), "Z_ev": Z(ev_f), "y_ev": y_ev, "ev_paths": ev_paths,
            "pool_paths": [tr_paths[i] for i in pool],
            "shots": sample_k_shot(y_pool, SHOTS, 0, num_classes=C),
            "gflops": [float(b.info["gflops"]) for b in built]}


def auto_drop(n_calib: int, tries: int) -> float:
    from clipfuse.export.thresholds import required_calibration_images

    for d in DROPS:
        if required_calibration_images(d, 0.95, tries) <= n_calib:
            return float(d)
    raise SystemExit(f"{n_calib} calibration images cannot certify even {DROPS[-1]} points: use more images")


def figures(a: dict, max_drop: float | None) -> dict:
    from clipfuse.export.fit import nlc, select
    from clipfuse.export.fit.levers.plan import check_calibration, fused_logits, plan_cascade
    from clipfuse.export.fit.levers.recipe import Levers
    from clipfuse.export.fit.subsets import Split, search_subsets, static_fitter
    from clipfuse.export.paired import accuracy_interval, paired_difference

    names, y_ev, shots = a["names"], a["y_ev"], a["shots"]
    held = np.setdiff1d(np.arange(len(a["y_pool"])), shots)
    cfg = nlc.FitConfig().check()
    choice = select.choose(a["X_pool"], a["Z_pool"], a["y_pool"], names, SHOTS, 0, cfg)
    if choice["method"] == "single" and len(names) > 1:
        # "full ensemble" means every backbone: when fit would ship one backbone (the nine's 300 images leave
        # 60 to choose on), compare against the best ensemble method instead (ties to the fewest parameters)
        ens = {"mean": "LOG-AVG", "static": "C-LOG-AVG", "nlc": "NLC"}
        sc = choice["scores"] or {}
        forced = max(ens, key=lambda m: sc.get(ens[m], -1.0)) if sc else "static"
        choice = select.choose(a["X_pool"], a["Z_pool"], a["y_pool"], names, SHOTS, 0, cfg, forced=forced)
    static = nlc.fit_static(a["Z_pool"][shots], a["y_pool"][shots], cfg)
    nlc_module = nlc.fit_nlc(a["X_pool"][shots], a["Z_pool"][shots], a["y_pool"][shots], cfg)
    shipped = select.shipped_controller(choice, names, static, nlc_module)
    full = fused_logits(shipped, a["X_ev"], a["Z_ev"]).argmax(1)
    rows = {}

    def row(label, pred, members, note=""):
        rows[label] = {"backbones": [names[k] for k in members], "gflops": float(sum(a["gflops"][k] for k in members)),
                       "accuracy": accuracy_interval(pred, y_ev).to_dict(),
                       "vs_full": paired_difference(pred, full, y_ev).to_dict(), "note": note}

    K = len(names)
    row(f"full ensemble ({choice['row']})", full, range(K), choice["reason"])
    held_acc = [(a["Z_pool"][held, k].argmax(1) == a["y_pool"][held]).mean() for k in range(K)]
    best = int(np.argmax(held_acc))
    row("best single", a["Z_ev"][:, best].argmax(1), [best], "most accurate single on the pool's held-out images")
    split = lambda f, Z, y, r: Split([x[r] for x in f], Z[r], y[r])
    frontier = search_subsets(static_fitter(cfg), split(a["pool_f"], a["Z_pool"], a["y_pool"], shots),
                              split(a["pool_f"], a["Z_pool"], a["y_pool"], held), a["gflops"], names, "GFLOPs",
                              test=Split(list(a["ev_f"]), a["Z_ev"], y_ev))
    for x in (1, 2, 4):
        s = frontier.choose(x * a["gflops"][best])
        static_s = nlc.fit_static(a["Z_pool"][shots][:, list(s.members)], a["y_pool"][shots], cfg)
        pred = nlc.predict_controller(static_s, np.zeros((len(y_ev), 1), np.float32), a["Z_ev"][:, list(s.members)])
        row(f"best subset <= {x}x best single's GFLOPs", pred, s.members, "C-LOG-AVG, chosen on the pool's held-out images")
    cascade = None
    if K >= 2:
        tries = 2 * 2                     # at most two candidate orders x two scores
        drop = max_drop if max_drop is not None else auto_drop(held.size, tries)
        levers = Levers(cascade=True, max_drop=drop)
        costs = check_calibration(levers, a["built"], a["heads"], a["Z_pool"], a["y_pool"], shots)
        plan = plan_cascade(levers, a["built"], a["heads"], a["X_pool"], a["Z_pool"], a["y_pool"], a["X_ev"],
                            a["Z_ev"], y_ev, shots, shipped, cfg, costs=costs)
        t = plan["fit"].test
        cascade = {"max_drop": drop, "order": plan["fit"].names, "score": plan["fit"].score,
                   "thresholds": plan["block"]["thresholds"], "exit_rates": t["exit_rates"],
                   "expected_gflops": t["expected_cost"], "cost_fraction": t["cost_fraction"],
                   "accuracy": t["accuracy_cascade"], "vs_full": t["paired_difference"],
                   "calibration": plan["fit"].calibration}
    from clipfuse.export.fit.diversity import diversity_report

    # Are these backbones diverse? On the same eval images as the accuracies (NLC's temperatures,
    # so its failure signatures are read as fit reads them).
    div = diversity_report(a["Z_ev"], y_ev, names, list(a["classes"]),
                           temperatures=nlc.controller_temperatures(nlc_module, a["X_ev"]))
    return {"rows": rows, "cascade": cascade, "frontier": frontier.to_markdown(), "eval_images": int(len(y_ev)),
            "pool_held_out": int(held.size), "shots_per_class": SHOTS, "diversity": div}


def _iv(d):
    return f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"


def _diff(d):
    return f"{d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]", f"{d['agreement']['value']:.1f}"


def markdown(res: dict) -> str:
    f = res["figures"]
    what, towers = (("images of the `figures` split of benchmarks/tower_digits.py (scikit-learn digits at 224x224)",
                     "Towers trained here (benchmarks/train_towers.py), loaded as checkpoints")
                    if res["set"] == "trained" else ("scikit-learn digits", "Seeded random towers"))
    L = [f"<!-- made by: {res['command']} ({res['seconds']:.0f} s on this machine) -->", "",
         f"# Cascade and budget subsets: digits, set `{res['set']}`", "",
         f"{res['images']} {what} ({f['eval_images']} eval images report; {f['pool_held_out']} pool images "
         f"outside the {f['shots_per_class']} shots per class select). {towers}, linear-probe heads. "
         "Accuracies: Wilson 95%; vs full: paired difference in points (bootstrap 95%) and agreement.", "",
         "| method | backbones | GFLOPs | accuracy % [95% CI] | vs full (points) | agreement % |", "|---|---|---:|---:|---:|---:|"]
    for label, r in f["rows"].items():
        d, ag = _diff(r["vs_full"])
        L.append(f"| {label} | {' + '.join(r['backbones'])} | {r['gflops']:.4g} | {_iv(r['accuracy'])} | {d} | {ag} |")
    c = f["cascade"]
    if c:
        d, ag = _diff(c["vs_full"])
        L.append(f"| cascade (--max-drop {c['max_drop']:g}) | {' -> '.join(c['order'])} | {c['expected_gflops']:.4g} "
                 f"(expected) | {_iv(c['accuracy'])} | {d} | {ag} |")
        L += ["", f"Cascade: score {c['score']}, thresholds {c['thresholds']}, exit rates "
                  + ", ".join(f"{100 * r:.1f}%" for r in c["exit_rates"])
                  + f"; expected cost {100 * c['cost_fraction']:.1f}% of the full ensemble's GFLOPs; calibration: "
                  f"{c['calibration']['disagreements']} disagreements on {c['calibration']['n']} images, bound "
                  f"{c['calibration']['disagreement_bound']:.2f}%."]
    L += ["", "Subset frontier (GFLOPs; held-out = pool images the choice was made on, biased upwards; test = eval):",
          "", f["frontier"].rstrip()]
    if res.get("latency"):
        L += ["", "Latency (clipfuse bench on the cascade engine, eval images):", "", res["latency"]]
    if f.get("diversity"):
        from clipfuse.export.fit.diversity import to_markdown

        L += ["", "## Diversity of the backbones (eval images)", "",
              to_markdown(f["diversity"], res.get("heatmap")).rstrip()]
    return train_towers.shorten("\n".join(L) + "\n", res["backbones"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), required=True)
    ap.add_argument("--backbones", nargs="+", default=None, help="override the set's backbones (tests)")
    ap.add_argument("--images", type=int, default=None, help="override: the first N images of each class")
    ap.add_argument("--max-drop", type=float, default=None, help="default: the smallest the calibration certifies")
    ap.add_argument("--latency", action="store_true", help="export the cascade engine and bench it (slow)")
    ap.add_argument("--cache", default=None, help="feature cache (default clipfuse's)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/cascade_<set>")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    import logging
    from contextlib import nullcontext

    from clipfuse.core.log import at_level

    with at_level(logging.WARNING) if args.quiet else nullcontext():     # --quiet: warnings only
        return _run(args, argv)


def _run(args, argv):
    backbones, per_class = SETS[args.set]
    backbones = args.backbones or backbones or train_towers.specs()
    per_class = args.images or per_class
    command = "python benchmarks/cascade_digits.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--quiet")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-cascade-digits-"))
    try:
        n = tower_digits.write_folder(tmp / "digits", "figures", 15 * per_class if per_class else TRAINED_IMAGES) \
            if args.set == "trained" else write_digits(tmp / "digits")
        if per_class:
            keep_first(tmp / "digits", per_class)
            n = sum(1 for _ in (tmp / "digits").rglob("*.png"))
        a = arrays(backbones, tmp / "digits", args.cache)
        res = {"set": args.set, "command": command, "backbones": backbones, "images": n,
               "figures": figures(a, args.max_drop)}
        if args.latency:
            res["latency"] = latency(backbones, tmp, a, res, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out or ROOT / "results" / f"cascade_{args.set}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if res["figures"].get("diversity"):
        from clipfuse.export.fit.diversity import save_heatmap

        png = out.parent / f"{out.name}_diversity.png"
        why = save_heatmap(res["figures"]["diversity"], png)
        res["heatmap"] = png.name if why is None else None
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(md)
    return res


def latency(backbones, tmp: Path, a: dict, res: dict, args) -> str:
    """Export the cascade engine (fit --cascade, same splits) and bench it on the eval images."""
    from clipfuse.bench.run import run_bench
    from clipfuse.export.fit.levers.recipe import Levers
    from clipfuse.export.fit.pipeline import fit_engine

    engine = tmp / "engine"
    fit_engine(backbones, tmp / "digits", engine, head="linear-probe", eval_fraction=EVAL_FRACTION,
               probe_fraction=PROBE_FRACTION, shots=SHOTS, study_shots=(SHOTS,), study_seeds=(0,), cache_dir=args.cache,
               levers=Levers(cascade=True, max_drop=res["figures"]["cascade"]["max_drop"]))
    ev = tmp / "eval"
    for p in a["ev_paths"]:
        (ev / Path(p).parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, ev / Path(p).parent.name / Path(p).name)
    r = run_bench(engine, data=ev, batches=(1, 8), runs=3, torch=False, memory=False, out=tmp / "bench")
    return (tmp / "bench" / "bench.md").read_text() if r else ""


if __name__ == "__main__":
    main()
