"""Does the cascade's guard work, and does a tighter one? Guards over seeds, on synthetic stages.

    python benchmarks/cascade_study.py        # about a minute on 2 cores; writes benchmarks/results/cascade_study.md

For each seed, thresholds are chosen on n_cal calibration images under each
constraint of export/thresholds.py (labelled accuracy: the naive search;
agreement with the full ensemble; agreement with a one-sided Clopper-Pearson
bound: the default; the same bound per early stage on max_drop / (S - 1) at
alpha / (S - 1): Bonferroni over stages; a held-out check: the greedy path
chosen on half the images by point estimate, then walked on the other half
while the Clopper-Pearson bound there holds), then the cascade is scored on
20000 held-out images (a stand-in for the population). A violation is a
held-out drop against the full ensemble above max_drop. Stages:
tests/helpers/synthetic.py's synthetic_stages (3 stages costing 1/2/4, errors
correlated across stages), as tests/export/fit/test_cascade.py.
Also: under the guard, the cost the top-2 margin score needs against max
softmax probability (10 and 100 classes).
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests" / "helpers"))   # the synthetic worlds live beside the tests that use them

CONFIGS = [(150, 3.0), (600, 1.0), (2000, 0.5), (2000, 1.0)]
COLUMNS = {"accuracy": "naive (labelled accuracy)", "agreement": "agreement (point estimate)",
           "agreement-bound": "agreement + bound (default)", "agreement-bound-per-stage": "bound per stage (Bonferroni)",
           "agreement-holdout": "held-out check (half + half)"}
DEFAULT, CANDIDATES = "agreement-bound", ("agreement-bound-per-stage", "agreement-holdout")
MAX_VIOLATIONS = 0          # a guard that lets max_drop be exceeded on held-out images in any seed fails


def check_guards(guard: dict, bound: int = MAX_VIOLATIONS) -> tuple[bool, list[str]]:
    """The study's pass/fail: the default guard keeps violations <= bound in every configuration. And the rule for
    switching the default: a candidate replaces it only with violations <= bound in every configuration AND a lower
    mean cost in every one. -> (default passes, lines that state each bound and its outcome)."""
    lines = []

    def worst(c):
        return max(r[c]["violations"] for r in guard.values()), next(iter(guard.values()))[c]["runs"]

    v, runs = worst(DEFAULT)
    ok = v <= bound
    lines.append(f"default guard ({DEFAULT}): worst {v}/{runs} violations over {len(guard)} configurations "
                 f"(bound <= {bound}): {'pass' if ok else 'FAIL'}")
    for c in CANDIDATES:
        if c not in next(iter(guard.values())):
            continue
        cv, _ = worst(c)
        cheaper = sum(r[c]["mean_cost_fraction"] < r[DEFAULT]["mean_cost_fraction"] for r in guard.values())
        switch = ok and cv <= bound and cheaper == len(guard)
        lines.append(f"{c}: worst {cv}/{runs} violations (bound <= {bound}), cheaper than the default in {cheaper} of "
                     f"{len(guard)} configurations (bound: all): {'replaces the default' if switch else 'default kept'}")
    return ok, lines


def score_costs(seeds=range(6), n_cal: int = 2000, n_test: int = 20000, max_drop: float = 1.0) -> list[dict]:
    """Expected cost fraction under the guard with each score, per class count and seed."""
    from synthetic import synthetic_stages

    from clipfuse.export.fit.cascade import fit_cascade
    from clipfuse.export.thresholds import CascadeConfig

    rows = []
    for C in (10, 100):
        for seed in seeds:
            Z, y = synthetic_stages(n_cal + n_test, num_classes=C, seed=int(seed))
            row = {"classes": C, "seed": int(seed)}
            for score in ("max-prob", "margin"):
                fit = fit_cascade(list(Z[:, :n_cal]), list(Z[:, n_cal:]), (1.0, 2.0, 4.0),
                                  config=CascadeConfig(max_drop=max_drop, score=score),
                                  calib_labels=y[:n_cal], test_labels=y[n_cal:])
                row[score] = float(fit.test["cost_fraction"])
            rows.append(row)
    return rows


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from synthetic import study_threshold_guard

    t0 = time.perf_counter()
    guard = {f"{n},{d}": study_threshold_guard(n_cal=n, max_drop=d, constraints=tuple(COLUMNS)) for n, d in CONFIGS}
    ok, verdict = check_guards(guard)
    scores = score_costs()
    out = ROOT / "results" / "cascade_study"
    out.with_suffix(".json").write_text(json.dumps({"guard": guard, "verdict": verdict, "scores": scores}, indent=2) + "\n")
    lines = ["# Cascade thresholds: naive vs guarded, and tighter guards, on synthetic stages", "",
             f"Command: `python benchmarks/{Path(__file__).name}` ({time.perf_counter() - t0:.0f} s)", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             "Violations of max_drop on held-out images / mean held-out drop (points) / mean cost as a fraction "
             "of the full ensemble's, over 20 seeds:", "",
             "| n_cal | max_drop | " + " | ".join(COLUMNS.values()) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for (n, d), key in zip(CONFIGS, guard):
        cells = [f"{r['violations']}/{r['runs']}, {r['mean_drop']:+.2f}, {r['mean_cost_fraction']:.3f}"
                 for r in (guard[key][c] for c in COLUMNS)]
        lines.append(f"| {n} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "Pass/fail, and the rule for replacing the default guard:", ""] + [f"- {v}" for v in verdict]
    if not any("replaces the default" in v for v in verdict):
        lines += ["", "Neither candidate is tighter here: Bonferroni over stages bounds each early stage on "
                  "max_drop / (S - 1) at alpha / (S - 1), so it needs more images per point of drop, not fewer; the "
                  "held-out check certifies on half the images (zero disagreements on n / 2 certify about 6 / n), and "
                  "what it saves by choosing the path on the other half does not pay for that. The default guard is "
                  "kept; more images (`fit --certify-on`) are what tighten it."]
    wins = sum(r["margin"] < r["max-prob"] for r in scores)
    lines += ["", f"Score under the guard (n_cal 2000, max_drop 1.0): margin cheaper than max-prob in {wins} of "
              f"{len(scores)} runs; cost fractions (max-prob / margin):", ""]
    lines += [f"- {r['classes']} classes, seed {r['seed']}: {r['max-prob']:.3f} / {r['margin']:.3f}" for r in scores]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
