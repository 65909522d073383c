"""Synthetic ensembles whose behaviour is known by construction: the NLC tests (test_nlc.py) and the
study behind FitConfig's defaults (benchmarks/nlc_choices.py) run on the same worlds."""
from __future__ import annotations

import math

import numpy as np

from clipfuse.errors import ClipfuseError


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
