"""The methods the NLC is reported against, on precomputed arrays, and one scorer for them all.

    single k   argmax_c z_k                  LOG-AVG   argmax of the mean logits
    PROB-AVG   argmax of the mean softmax    VOTE      majority, ties by summed probability
    C-LOG-AVG  a fitted static controller    NLC       a fitted NLC (both from export/fit/nlc.py)
    ORACLE     right if any backbone is right: the ceiling, not a method one can run

Arrays: backbone_logits (N, K, C), labels (N,), features (N, sum D) where a controller needs them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn

from clipfuse.core.errors import ClipfuseError

from .nlc import _check_arrays, predict_controller

METHODS_AFTER_SINGLES = ("LOG-AVG", "PROB-AVG", "VOTE", "C-LOG-AVG", "NLC", "ORACLE")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _logits_np(backbone_logits) -> np.ndarray:
    Z = np.asarray(backbone_logits, dtype=np.float64)
    if Z.ndim != 3:
        raise ClipfuseError(f"backbone_logits must have shape (N, K, C), got {Z.shape}")
    return Z


def predict_single(backbone_logits, k: int) -> np.ndarray:
    """Backbone k's predictions: argmax_c z_k (N,)."""
    Z = _logits_np(backbone_logits)
    if not 0 <= k < Z.shape[1]:
        raise ClipfuseError(f"backbone index {k} is out of range: there are {Z.shape[1]} backbones")
    return Z[:, k].argmax(axis=-1)


def predict_log_avg(backbone_logits) -> np.ndarray:
    """LOG-AVG: argmax of the mean logits (N,)."""
    return _logits_np(backbone_logits).mean(axis=1).argmax(axis=-1)


def predict_prob_avg(backbone_logits) -> np.ndarray:
    """PROB-AVG: argmax of the mean softmax (N,)."""
    return _softmax(_logits_np(backbone_logits)).mean(axis=1).argmax(axis=-1)


def predict_vote(backbone_logits) -> np.ndarray:
    """VOTE: the class most backbones predict; ties go to the tied class with the largest summed
    probability, then to the lowest class index (N,)."""
    Z = _logits_np(backbone_logits)
    N, K, C = Z.shape
    votes = np.zeros((N, C))
    np.add.at(votes, (np.repeat(np.arange(N), K), Z.argmax(axis=-1).reshape(-1)), 1.0)   # (N, C)
    prob_sum = _softmax(Z).sum(axis=1)                           # (N, C), each in [0, K]
    # Lexicographic (votes, prob_sum): one vote outweighs any difference in prob_sum (< K + 1).
    return (votes * (K + 1) + prob_sum).argmax(axis=-1)


def oracle_correct(backbone_logits, labels) -> np.ndarray:
    """ORACLE: True where at least one backbone's argmax is the label (N,)."""
    Z = _logits_np(backbone_logits)
    return (Z.argmax(axis=-1) == np.asarray(labels)[:, None]).any(axis=1)


def method_names(backbone_names: Sequence[str]) -> list[str]:
    return list(backbone_names) + list(METHODS_AFTER_SINGLES)


def _check_names(backbone_names, K: int) -> list[str]:
    names = [str(n) for n in backbone_names]
    if len(names) != K:
        raise ClipfuseError(f"backbone_names has {len(names)} names for K = {K} backbones in backbone_logits")
    clash = [n for n in names if n in METHODS_AFTER_SINGLES]
    if clash or len(set(names)) != K:
        raise ClipfuseError(f"backbone_names must be distinct and not a method name {METHODS_AFTER_SINGLES}: got {names}")
    return names


def evaluate(features, backbone_logits, labels, backbone_names, static: nn.Module | None = None,
             nlc: nn.Module | None = None) -> dict[str, float]:
    """Accuracy in percent of every method, by name, in the order of method_names().

    C-LOG-AVG and NLC appear only when their controller is given.
    """
    _, Zt, yt = _check_arrays(None, backbone_logits, labels, need_features=False)
    Z, y = Zt.double().numpy(), yt.numpy()
    names = _check_names(backbone_names, Z.shape[1])
    acc = lambda pred: float(100.0 * np.mean(pred == y))
    out = {name: acc(predict_single(Z, k)) for k, name in enumerate(names)}
    out["LOG-AVG"] = acc(predict_log_avg(Z))
    out["PROB-AVG"] = acc(predict_prob_avg(Z))
    out["VOTE"] = acc(predict_vote(Z))
    if static is not None:
        out["C-LOG-AVG"] = acc(predict_controller(static, np.zeros((len(y), 1), np.float32), backbone_logits))
    if nlc is not None:
        if features is None:
            raise ClipfuseError("evaluate needs features to score an NLC controller")
        out["NLC"] = acc(predict_controller(nlc, features, backbone_logits))
    out["ORACLE"] = float(100.0 * np.mean(oracle_correct(Z, y)))
    return out
