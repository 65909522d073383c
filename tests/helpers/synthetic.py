"""Synthetic ensembles whose behaviour is known by construction: the NLC tests (test_nlc.py) and the
study behind FitConfig's defaults (benchmarks/nlc_choices.py) run on the same worlds."""
from __future__ import annotations

import math

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.export import thresholds as _thresholds
from clipfuse.export.fit import cascade as _cascade


def synthetic_ensemble(n_per_class: int, num_classes: int = 10, num_backbones: int = 3, dim: int = 16,
                       scenario: str = "complementary", seed: int = 0, margin: float = 3.0,
                       wrong_rate: float = 0.7, region_strength: float = 3.0, noise: float = 1.0):
    """Arrays (features (N, K*dim), backbone_logits (N, K, C), labels (N,), regions (N,)) built so the
    ensemble's behaviour is known by construction.

    Every image lies in one of K regions; each backbone's feature block is
    normalize(region_strength * centre_k[region] + gaussian noise), so the region
    is readable from the features (less so as region_strength drops).

    "complementary": in region r, backbone r puts `margin` on the true class;
    every other backbone puts `margin` on a random wrong class with probability
    wrong_rate (else on the true class). A per-image choice of backbone is right
    almost always; a single backbone or any static mix is not.
    "one-good": backbone 0 puts `margin` on the true class everywhere, the others
    put it on a random wrong class with probability wrong_rate.
    Logits also get N(0, noise^2) per class.
    """
    if scenario not in ("complementary", "one-good"):
        raise ClipfuseError(f"scenario must be 'complementary' or 'one-good', got {scenario!r}")
    rng = np.random.default_rng(seed)
    K, C = num_backbones, num_classes
    N = n_per_class * C
    labels = rng.permutation(np.repeat(np.arange(C), n_per_class))          # (N,)
    regions = rng.integers(K, size=N)                                        # (N,)
    centres = rng.normal(size=(K, K, dim)) / math.sqrt(dim)                  # (backbone, region, dim), unit-ish
    blocks = []
    for k in range(K):
        f = region_strength * centres[k][regions] + rng.normal(size=(N, dim)) / math.sqrt(dim)
        blocks.append(f / np.linalg.norm(f, axis=1, keepdims=True))
    features = np.concatenate(blocks, axis=1).astype(np.float32)           # (N, K*dim)

    logits = noise * rng.normal(size=(N, K, C))                              # (N, K, C)
    wrong = (labels[:, None] + rng.integers(1, C, size=(N, K))) % C          # (N, K), never the label
    is_wrong = rng.random((N, K)) < wrong_rate                               # (N, K)
    reliable = regions if scenario == "complementary" else np.zeros(N, dtype=np.int64)
    is_wrong[np.arange(N), reliable] = False
    target = np.where(is_wrong, wrong, labels[:, None])                      # (N, K)
    np.put_along_axis(logits, target[..., None], np.take_along_axis(logits, target[..., None], -1) + margin, -1)
    return features, logits.astype(np.float32), labels.astype(np.int64), regions


# ----------------------------------------------------------------------------- cascades

def synthetic_stages(n: int, num_classes: int = 10, num_stages: int = 3, seed: int = 0,
                     strengths=(1.6, 2.2, 3.0), shared: float = 0.7):
    """Stage logits of a cascade whose later stages know more, with errors correlated across stages.

    Backbone k's logits: strengths[k] * ease(x) on the true class, plus a noise
    field shared by every backbone (scale `shared`: images hard for one are
    hard for all, as with real towers) and its own N(0, 1) noise. ease(x) ~
    U(0.2, 1.8) per image, so confidence varies and early exits are possible.
    Stage s = mean of the first s + 1 backbones' logits (LOG-AVG of the prefix).
    Returns stage_logits (S, N, C) float64 and labels (N,) int64.
    """
    rng = np.random.default_rng(seed)
    S, C = num_stages, num_classes
    strengths = np.asarray(strengths, dtype=np.float64)[:S]
    y = rng.integers(C, size=n)                                              # (N,)
    ease = rng.uniform(0.2, 1.8, size=n)                                     # (N,)
    common = shared * rng.normal(size=(n, C))                                # (N, C)
    onehot = np.eye(C)[y]                                                    # (N, C)
    backbone = np.stack([k_strength * ease[:, None] * onehot + common + rng.normal(size=(n, C))
                         for k_strength in strengths])                       # (S, N, C)
    stages = np.cumsum(backbone, axis=0) / np.arange(1, S + 1)[:, None, None]
    return stages, y


def study_threshold_guard(seeds=range(20), n_cal: int = 1000, n_test: int = 20000, max_drop: float = 1.0,
                          stage_costs=(1.0, 2.0, 4.0), constraints=(_thresholds.ACCURACY, _thresholds.AGREEMENT, _thresholds.GUARDED), **synth) -> dict:
    """For each seed and constraint: fit on n_cal calibration images, score on n_test held-out ones.

    Returns {constraint: {"violations", "runs", "mean_drop", "max_drop_seen", "mean_cost_fraction"}}
    (drops in points, held-out, against the full ensemble; cost fraction of the full ensemble's).
    """
    out = {}
    for constraint in constraints:
        drops, costs = [], []
        for seed in seeds:
            Z, y = synthetic_stages(n_cal + n_test, num_stages=len(stage_costs), seed=int(seed), **synth)
            cfg = _thresholds.CascadeConfig(max_drop=max_drop, constraint=constraint, score="max-prob")
            fit = _cascade.fit_cascade(list(Z[:, :n_cal]), list(Z[:, n_cal:]), stage_costs, config=cfg,
                              calib_labels=y[:n_cal], test_labels=y[n_cal:])
            drops.append(fit.test["drop"])
            costs.append(fit.test["cost_fraction"])
        drops = np.array(drops)
        out[constraint] = {"violations": int((drops > max_drop).sum()), "runs": len(drops),
                           "mean_drop": float(drops.mean()), "max_drop_seen": float(drops.max()),
                           "mean_cost_fraction": float(np.mean(costs))}
    return out


if __name__ == "__main__":
    for n_cal, md in ((150, 3.0), (600, 1.0), (2000, 0.5), (2000, 1.0)):
        res = study_threshold_guard(n_cal=n_cal, max_drop=md)
        for c, r in res.items():
            print(f"n_cal {n_cal:5d}  max_drop {md:.1f}  {c:16s} violations {r['violations']:2d}/{r['runs']}  "
                  f"mean drop {r['mean_drop']:+.2f}  worst {r['max_drop_seen']:+.2f}  cost {r['mean_cost_fraction']:.2f}")
