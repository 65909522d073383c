"""NLC against every baseline on trained towers, k in {1, 2, 4, 8, 16}: the committed results.

    python benchmarks/trained_nlc.py        # trains the three towers first if the cache lacks them

Towers: RN50, ViT-B-32 and RN101 trained here (benchmarks/train_towers.py, loaded as user checkpoints,
`ARCH:/path/file.safetensors`). Images: the first 2000 of the `figures` split of benchmarks/tower_digits.py
(benchmarks/tower_digits.py), drawn from source digits the towers never trained on. Splits, the same
functions `clipfuse fit` uses (export/data.py), as benchmarks/nlc_digits.py: 30% eval (stratified, seed 0;
never used to fit or choose anything); of the rest, linear-probe heads on 80% and the controller's pool on
20%, from which k shots per class are drawn (seeds 0, 1, 2; nested over k). The best single is the most
accurate single on the pool (images its head never saw), chosen before any eval image is looked at.

Figures, all on the eval images: every method's accuracy (mean ± std over seeds; seed 0 with its Wilson
95% interval), and paired differences on the same images (bootstrap 95%): NLC - C-LOG-AVG and
NLC - best single at every k and seed, and every method against the full ensemble (the method `clipfuse
fit` ships for this pool: export/fit/select.py) at k = 16, seed 0. Writes
benchmarks/results/trained_nlc.md/.json with the exact command at the top.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import tower_digits  # noqa: E402
import train_towers  # noqa: E402

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
IMAGES = 2000
EVAL_FRACTION, PROBE_FRACTION = 0.3, 0.8


def arrays(backbones, folder: Path, cache_dir, eval_fraction=EVAL_FRACTION, probe_fraction=PROBE_FRACTION):
    """Features (cached), linear-probe heads and fit's splits -> a dict of arrays (pool and eval)."""
    from clipfuse.core.log import progress_shown
    from clipfuse.export.data import scan_labelled_folder, seeded_split
    from clipfuse.export.fit.features import FeatureCache, compute_features, head_logits
    from clipfuse.export.fit.pipeline import SPLIT_SEED, _select, fit_linear_probe
    from clipfuse.export.graph import backbones as bb

    paths, labels, classes = scan_labelled_folder(folder)
    built = [bb.load_backbone(b) for b in backbones]
    fs = compute_features(built, paths, FeatureCache(cache_dir), progress=progress_shown())
    ok = set(fs.paths)
    keep = [i for i, p in enumerate(paths) if p in ok]
    paths, labels = [paths[i] for i in keep], labels[keep]
    tr, ev = seeded_split(labels, eval_fraction, SPLIT_SEED)
    tr_paths, ev_paths = [paths[i] for i in tr], [paths[i] for i in ev]
    y_tr, y_ev = labels[tr], labels[ev]
    tr_f, ev_f = _select(fs, tr_paths), _select(fs, ev_paths)
    probe, pool = seeded_split(y_tr, 1.0 - probe_fraction, SPLIT_SEED + 1)
    C = len(classes)
    heads = [fit_linear_probe(f[probe], y_tr[probe], C) for f in tr_f]
    Z = lambda feats: np.stack([head_logits(f, h) for f, h in zip(feats, heads)], axis=1)    # (N, K, C)
    pool_f = [f[pool] for f in tr_f]
    return {"built": built, "heads": heads, "classes": classes, "names": [str(b.spec) for b in built],
            "pool_f": pool_f, "X_pool": np.concatenate(pool_f, 1), "Z_pool": Z(pool_f), "y_pool": y_tr[pool],
            "ev_f": ev_f, "X_ev": np.concatenate(ev_f, 1), "Z_ev": Z(ev_f), "y_ev": y_ev, "ev_paths": ev_paths,
            "probe_images": int(len(probe)), "gflops": [float(b.info["gflops"]) for b in built]}


def predictions(a: dict, static, nlc_module) -> dict[str, np.ndarray]:
    """Every method's predicted class on the eval images."""
    from clipfuse.export.fit import baselines as B
    from clipfuse.export.fit.nlc import predict_controller

    Z, names = a["Z_ev"], a["names"]
    out = {n: B.predict_single(Z, k) for k, n in enumerate(names)}
    out["LOG-AVG"], out["PROB-AVG"], out["VOTE"] = B.predict_log_avg(Z), B.predict_prob_avg(Z), B.predict_vote(Z)
    out["C-LOG-AVG"] = predict_controller(static, np.zeros((len(Z), 1), np.float32), Z)
    out["NLC"] = predict_controller(nlc_module, a["X_ev"], Z)
    return out


def figures(a: dict, shots=SHOTS, seeds=SEEDS) -> dict:
    from clipfuse.export.data import sample_k_shot
    from clipfuse.export.fit import nlc, select
    from clipfuse.export.fit.baselines import oracle_correct
    from clipfuse.export.fit.levers.plan import fused_logits
    from clipfuse.export.paired import accuracy_interval, paired_difference

    y, names, C = a["y_ev"], a["names"], len(a["classes"])
    pool_acc = [float((a["Z_pool"][:, k].argmax(1) == a["y_pool"]).mean()) for k in range(len(names))]
    best = names[int(np.argmax(pool_acc))]
    cfg = nlc.FitConfig().check()
    runs = []
    for k in shots:
        for seed in seeds:
            idx = sample_k_shot(a["y_pool"], k, seed, num_classes=C)
            c = replace(cfg, seed=seed)
            static = nlc.fit_static(a["Z_pool"][idx], a["y_pool"][idx], c)
            module = nlc.fit_nlc(a["X_pool"][idx], a["Z_pool"][idx], a["y_pool"][idx], c)
            pred = predictions(a, static, module)
            runs.append({"shots": k, "seed": seed,
                         "accuracy": {m: accuracy_interval(p, y).to_dict() for m, p in pred.items()},
                         "nlc_vs_clogavg": paired_difference(pred["NLC"], pred["C-LOG-AVG"], y).to_dict(),
                         "nlc_vs_best_single": paired_difference(pred["NLC"], pred[best], y).to_dict()})
            if k == max(shots) and seed == seeds[0]:
                choice = select.choose(a["X_pool"], a["Z_pool"], a["y_pool"], names, k, seed, cfg)
                shipped = select.shipped_controller(choice, names, static, module)
                full = fused_logits(shipped, a["X_ev"], a["Z_ev"]).argmax(1)
                vs_full = {"full": choice["row"], "reason": choice["reason"],
                           "rows": {m: {"accuracy": accuracy_interval(p, y).to_dict(),
                                        "vs_full": paired_difference(p, full, y).to_dict()} for m, p in pred.items()}}
    oracle = float(100 * oracle_correct(a["Z_ev"], y).mean())
    return {"names": names, "best_single": best, "pool_accuracy": dict(zip(names, pool_acc)), "runs": runs,
            "vs_full": vs_full, "oracle": oracle, "eval_images": int(len(y)), "pool_images": int(len(a["y_pool"])),
            "probe_images": a["probe_images"], "shots": list(shots), "seeds": list(seeds)}


def _iv(d):
    return f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"


def _pd(d):
    return f"{d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def markdown(res: dict) -> str:
    f = res["figures"]
    shots, seeds = f["shots"], f["seeds"]
    methods = list(f["runs"][0]["accuracy"])
    dn = train_towers.display_name
    sm = {m: dn(m) for m in methods}
    L = [f"<!-- made by: {res['command']} ({res['seconds']:.0f} s on this machine) -->", "",
         "# NLC against every baseline on trained towers", "",
         f"Towers trained here (benchmarks/train_towers.py): {', '.join(res['towers'])}. Images: {res['images']} "
         f"images of the `figures` split of benchmarks/tower_digits.py (source digits the towers never trained on); {f['eval_images']} "
         f"eval images report, {f['probe_images']} fitted the linear-probe heads, the controllers' k shots come "
         f"from the other {f['pool_images']} (the pool). Best single, chosen on the pool: {dn(f['best_single'])}. "
         "Accuracies: percent; paired differences: points, bootstrap 95%, on the same eval images.", "",
         "## Accuracy (%) on the eval images, mean ± std over seeds " + ", ".join(map(str, seeds)), "",
         "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---:|" * len(shots)]
    for m in methods:
        cells = []
        for k in shots:
            v = np.array([r["accuracy"][m]["value"] for r in f["runs"] if r["shots"] == k])
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}")
        L.append(f"| {sm[m]} | " + " | ".join(cells) + " |")
    L.append("| ORACLE | " + " | ".join(f"{f['oracle']:.1f}" for _ in shots) + " |")
    L += ["", f"Seed {seeds[0]} with Wilson 95% intervals:", "",
          "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---:|" * len(shots)]
    for m in methods:
        L.append(f"| {sm[m]} | " + " | ".join(_iv(r["accuracy"][m]) for k in shots for r in f["runs"]
                                           if r["shots"] == k and r["seed"] == seeds[0]) + " |")
    for key, title in (("nlc_vs_clogavg", "NLC - C-LOG-AVG"),
                       ("nlc_vs_best_single", f"NLC - best single ({dn(f['best_single'])})")):
        L += ["", f"## {title}, paired (points [95%]) on the eval images", "",
              "| shots | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
        for k in shots:
            rs = [r for r in f["runs"] if r["shots"] == k]
            L.append(f"| {k} | " + " | ".join(_pd(r[key]) for r in rs)
                     + f" | {np.mean([r[key]['difference'] for r in rs]):+.2f} |")
    v = f["vs_full"]
    L += ["", f"## Every method against the full ensemble ({dn(v['full'])}: what fit ships at {shots[-1]} shots, "
          f"seed {seeds[0]})", "", f"fit's choice: {v['reason']}", "",
          "| method | accuracy % [95%] | vs full (points [95%]) | agreement % |", "|---|---:|---:|---:|"]
    for m, r in v["rows"].items():
        L.append(f"| {sm[m]} | {_iv(r['accuracy'])} | {_pd(r['vs_full'])} | {r['vs_full']['agreement']['value']:.1f} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=None, help="override the trained towers (tests)")
    ap.add_argument("--images", type=int, default=IMAGES)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    ap.add_argument("--cache", default=None, help="feature cache (default clipfuse's)")
    ap.add_argument("--out", default=str(ROOT / "results" / "trained_nlc"))
    ap.add_argument("--render", default=None, metavar="JSON", help="only write the .md again from a results .json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(res))
        return res
    command = "python benchmarks/trained_nlc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    backbones = args.backbones or train_towers.specs()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-trained-nlc-"))
    try:
        tower_digits.write_folder(tmp / "images", "figures", args.images)
        a = arrays(backbones, tmp / "images", args.cache)
        res = {"command": command.strip(), "towers": [str(Path(b.split(":", 1)[1]).name) if ":/" in b else b
                                                       for b in backbones],
               "images": args.images, "figures": figures(a, shots=tuple(args.shots), seeds=tuple(args.seeds))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
