"""Cascade routing: which stage answers an image, from each stage's confidence and the thresholds.

Runtime layer (numpy only, no torch, no clipfuse.export): the serving runtime
routes images with exactly the functions the fit used to choose the
thresholds, so what the fit measured is what predict serves.

A cascade has S >= 2 stages; stage s (0-based) fuses the first s + 1
backbones. An image leaves at the first stage s < S - 1 whose confidence is
>= thresholds[s]; otherwise the last stage (the full ensemble) answers.

    confidence(logits (N, C), score)            -> (N,)   in [0, 1]
    route(conf (N, S), thresholds (S - 1,))     -> (N,)   int, the stage that answers
    cascade_predict(stage_logits, thresholds, score) -> (pred (N,), stage (N,))

Every function works row by row: an image's stage and answer never depend on
the other images in its batch.
"""
from __future__ import annotations

import numpy as np

from clipfuse.core.errors import ClipfuseError

MAX_PROB = "max-prob"     # largest softmax probability (Wang et al., "Wisdom of Committees")
MARGIN = "margin"         # top-1 minus top-2 softmax probability
SCORES = (MAX_PROB, MARGIN)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (N, C) -> (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence(logits, score: str = MAX_PROB) -> np.ndarray:
    """A stage's confidence in its own answer, (N, C) fused logits -> (N,) in [0, 1]."""
    if score not in SCORES:
        raise ClipfuseError(f"confidence score {score!r} is not one of {', '.join(SCORES)}")
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ClipfuseError(f"stage logits must have shape (N, C) with C >= 2 classes, got {z.shape}")
    p = softmax(z)
    if score == MAX_PROB:
        return p.max(axis=1)
    top2 = np.partition(p, -2, axis=1)[:, -2:]                     # (N, 2): second, first
    return top2[:, 1] - top2[:, 0]


def _check_thresholds(thresholds, num_stages: int) -> np.ndarray:
    # None (how a manifest's JSON writes +inf) means "never leave at this stage".
    t = np.array([np.inf if v is None else v for v in np.asarray(thresholds, dtype=object).reshape(-1)], dtype=np.float64)
    if t.shape != (num_stages - 1,):
        raise ClipfuseError(f"a {num_stages}-stage cascade needs {num_stages - 1} thresholds, got {t.size}")
    if np.isnan(t).any():
        raise ClipfuseError(f"cascade thresholds must be numbers (inf or null = never leave there), got {t.tolist()}")
    return t


def route(conf_per_stage, thresholds) -> np.ndarray:
    """The stage (0-based) that answers each image: the first s with conf[:, s] >= thresholds[s], else S - 1.

    conf_per_stage: (N, S). Entries after an image's exit are never read, so a
    runtime that did not run those stages may leave NaN there; a NaN at a stage
    the image does reach is an error (that stage's confidence is missing).
    """
    conf = np.asarray(conf_per_stage, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[1] < 2:
        raise ClipfuseError(f"conf_per_stage must have shape (N, S) with S >= 2 stages, got {conf.shape}")
    N, S = conf.shape
    t = _check_thresholds(thresholds, S)
    stage = np.full(N, S - 1, dtype=np.int64)
    undecided = np.ones(N, dtype=bool)
    for s in range(S - 1):
        if np.isnan(conf[undecided, s]).any():
            raise ClipfuseError(f"confidence of stage {s} is missing (NaN) for an image that reaches it")
        leave = undecided & (conf[:, s] >= t[s])
        stage[leave] = s
        undecided &= ~leave
    return stage


def cascade_predict(stage_logits, thresholds, score: str = MAX_PROB) -> tuple[np.ndarray, np.ndarray]:
    """Answers of the cascade when every stage's fused logits are known (offline evaluation).

    stage_logits: (S, N, C) or a list of S arrays (N, C). Returns (pred (N,), stage (N,)).
    """
    Z = np.stack([np.asarray(z) for z in stage_logits]) if isinstance(stage_logits, (list, tuple)) else np.asarray(stage_logits)
    if Z.ndim != 3:
        raise ClipfuseError(f"stage_logits must have shape (S, N, C), got {Z.shape}")
    conf = np.stack([confidence(z, score) for z in Z], axis=1)     # (N, S)
    stage = route(conf, thresholds)                                 # (N,)
    pred = Z.argmax(axis=2)[stage, np.arange(Z.shape[1])]           # (N,)
    return pred, stage
