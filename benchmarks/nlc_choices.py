"""The study behind FitConfig's defaults (docs/decisions.md, "NLC fit choices", quotes it): each choice the paper
leaves open (optimiser, positivity map, start, step budget, standardisation, batch) changed one at a
time from the default, on two synthetic worlds whose behaviour is known by construction.

    python benchmarks/nlc_choices.py          # ~5 min on 2 cores; writes benchmarks/results/nlc_choices.md

The worlds (tests/helpers/synthetic.py) are the ones tests/export/fit/test_nlc.py runs on.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))          # the synthetic worlds live beside the tests that use them

from synthetic import synthetic_ensemble  # noqa: E402

from clipfuse.core.errors import ClipfuseError  # noqa: E402
from clipfuse.export.data import sample_k_shot  # noqa: E402
from clipfuse.export.fit.baselines import evaluate  # noqa: E402
from clipfuse.export.fit.nlc import FitConfig, fit_nlc, fit_static, predict_controller  # noqa: E402


def study_fit_choices(shots=(1, 4, 16), seeds=(0, 1, 2), budgets=(100, 300, 1000, 3000),
                      pool_per_class: int = 64, n_eval_per_class: int = 100, num_classes: int = 10, region_strength: float = 1.5,
                      variants: Sequence[str] | None = None) -> dict:
    """The numbers behind FitConfig's defaults, on two synthetic worlds (see synthetic_ensemble):

    - "complementary": NLC should climb well above LOG-AVG and the best backbone;
    - "one-good": NLC should not fall below the one good backbone (overfitting).

    For each world, k and seed one NLC run per variant is read at every step
    budget (constant lr, so a 300-step fit is the first 300 steps of the
    3000-step run). Variants change one choice from the default each. Returns
    {"rows": [{world, variant, steps, shots, mean, std}], "reference": {world: {shots: {method: mean}}}}.
    """
    base = FitConfig()
    all_variants = {
        "default": base,
        "adamw": replace(base, optimizer="adamw"),
        "exp": replace(base, positivity="exp"),
        "log-avg-init": replace(base, init="log-avg"),
        "random-init": replace(base, init="random"),
        "per-dim-std": replace(base, standardize="per-dim"),
        "batch-32": replace(base, batch_size=32),
    }
    chosen = list(all_variants) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in all_variants]
    if unknown:
        raise ClipfuseError(f"unknown study variant(s) {unknown}; choose from {list(all_variants)}")
    variants = {v: all_variants[v] for v in chosen}
    budgets = sorted(int(b) for b in budgets)
    rows, reference = [], {}
    for world in ("complementary", "one-good"):
        X, Z, y, _ = synthetic_ensemble(pool_per_class + n_eval_per_class, num_classes=num_classes, scenario=world,
                                        seed=1234, region_strength=region_strength)
        # Eval: the last n_eval_per_class of each class; train pool: the rest.
        order = np.argsort(y, kind="stable")
        per_class = order.reshape(num_classes, -1)
        ev = per_class[:, -n_eval_per_class:].reshape(-1)
        pool = per_class[:, :-n_eval_per_class].reshape(-1)
        names = [f"backbone-{k}" for k in range(Z.shape[1])]
        reference[world] = {}
        for k in shots:
            acc_runs = {}
            for seed in seeds:
                idx = pool[sample_k_shot(y[pool], k, seed, num_classes=num_classes)]
                static = fit_static(Z[idx], y[idx], replace(base, seed=seed))
                ref = evaluate(X[ev], Z[ev], y[ev], names, static=static)
                slow = fit_static(Z[idx], y[idx], replace(base, seed=seed, static_lr=base.lr))
                ref["C-LOG-AVG @ lr 2e-4"] = evaluate(X[ev], Z[ev], y[ev], names, static=slow)["C-LOG-AVG"]
                for m, v in ref.items():
                    acc_runs.setdefault(m, []).append(v)
                for vname, vcfg in variants.items():
                    cfg = replace(vcfg, seed=seed, steps=max(budgets))
                    at_budget = {}

                    def record(step, module, at_budget=at_budget):
                        if step in budgets:
                            pred = predict_controller(module, X[ev], Z[ev])
                            at_budget[step] = float(100.0 * np.mean(pred == y[ev]))

                    fit_nlc(X[idx], Z[idx], y[idx], cfg, on_step=record)
                    for b in budgets:
                        acc_runs.setdefault((vname, b), []).append(at_budget[b])
            reference[world][str(k)] = {m: float(np.mean(v)) for m, v in acc_runs.items() if isinstance(m, str)}
            for (vname, b), vals in ((key, v) for key, v in acc_runs.items() if isinstance(key, tuple)):
                rows.append({"world": world, "variant": vname, "steps": b, "shots": k,
                             "mean": float(np.mean(vals)), "std": float(np.std(vals))})
    return {"rows": rows, "reference": reference, "shots": list(shots), "seeds": list(seeds),
            "budgets": budgets, "variants": list(variants), "region_strength": region_strength}


def choices_to_markdown(result: dict) -> str:
    """One table per world: rows = variant @ steps, columns = shots; reference methods first."""
    out = []
    shots = [str(k) for k in result["shots"]]
    for world, ref in result["reference"].items():
        out.append(f"\n### {world} (region_strength {result['region_strength']}, seeds {result['seeds']})\n")
        out.append("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
        out.append("|---|" + "---:|" * len(shots))
        for m in ref[shots[0]]:
            out.append(f"| {m} | " + " | ".join(f"{ref[k][m]:.1f}" for k in shots) + " |")
        for v in result["variants"]:
            for b in result["budgets"]:
                cells = []
                for k in shots:
                    r = next(r for r in result["rows"] if r["world"] == world and r["variant"] == v
                             and r["steps"] == b and str(r["shots"]) == k)
                    cells.append(f"{r['mean']:.1f} ± {r['std']:.1f}")
                out.append(f"| NLC {v} @ {b} steps | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nlc_choices.md"))
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/nlc_choices.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    result = study_fit_choices(variants=args.variants.split(",") if args.variants else None)
    text = (f"# NLC fit choices on synthetic worlds\n\nCommand: `{command}`\n\nAccuracy %, mean ± std over seeds "
            f"{result['seeds']}.\n" + choices_to_markdown(result))
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
