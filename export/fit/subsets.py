"""Budget-chosen backbones: exact search over every subset, the accuracy-cost frontier, the best within a budget.

With K <= 12 backbones (nine in practice: 511 subsets) every non-empty subset
is fitted (NLC, C-LOG-AVG, or any `Fitter`) on cached arrays, scored on a
held-out split, and priced as the sum of its backbones' costs (ms measured at
batch 1, or GFLOPs). Arrays are as export/fit/pipeline.py builds them:

    Split.features  K arrays (N, D_k)   each backbone's unit-norm features
    Split.logits    (N, K, C)           each backbone's class logits (its head applied)
    Split.labels    (N,)                class indices

    search_subsets(fitter, fit, held_out, costs, names, test=None) -> Frontier
    Frontier.pareto()        -> subsets no cheaper-or-equal subset beats
    Frontier.choose(budget)  -> best held-out accuracy within budget (ties: cheaper, then fewer backbones)
    nlc_fitter(config), static_fitter(config), log_avg_fitter()  -> Fitter

Accuracies carry Wilson 95% intervals (export/paired.py). The subset is CHOSEN
on `held_out`; picking the best of 511 on the same images it is scored on
flatters the winner, so pass a `test` split to get each subset's accuracy on
images the choice never saw, and report that one.

A one-backbone "ensemble" is that backbone's argmax whatever the fitter: every
controller clipfuse fits multiplies its logits by a positive temperature, which
leaves the argmax unchanged; so singles cost no fit (fit_singles=True overrides).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# export/fit/nlc.py is being split into nlc.py (fitting) + baselines.py (predictions); take either layout.
from clipfuse.core.errors import ClipfuseError

from ..paired import Interval, accuracy_interval
from .baselines import predict_log_avg
from .nlc import fit_nlc, fit_static, predict_controller

MAX_BACKBONES = 12     # 4095 fits: minutes of tiny fits; past that the exact search is refused


@dataclass
class Split:
    """One split of cached arrays: features K x (N, D_k), logits (N, K, C), labels (N,) or None."""

    features: list
    logits: np.ndarray
    labels: np.ndarray | None = None

    def check(self, what: str) -> "Split":
        Z = np.asarray(self.logits)
        if Z.ndim != 3 or Z.shape[0] == 0 or Z.shape[1] == 0:
            raise ClipfuseError(f"{what}: logits must have shape (N, K, C) with N, K >= 1, got {Z.shape}")
        N, K, _ = Z.shape
        feats = list(self.features) if self.features is not None else []
        if len(feats) != K or any(np.asarray(f).ndim != 2 or len(f) != N for f in feats):
            raise ClipfuseError(f"{what}: need {K} feature arrays of shape (N = {N}, D_k), one per backbone")
        y = None if self.labels is None else np.asarray(self.labels).reshape(-1)
        if y is not None and y.shape != (N,):
            raise ClipfuseError(f"{what}: {y.size} labels for {N} images")
        return Split([np.asarray(f) for f in feats], Z, y)

    def take(self, members: Sequence[int]) -> "Split":
        """The same images seen by a subset of the backbones."""
        m = list(members)
        return Split([self.features[k] for k in m], self.logits[:, m], self.labels)


# A Fitter fits on a Split and returns a predictor: Split -> predictions (N,).
Fitter = Callable[[Split], Callable[[Split], np.ndarray]]


def log_avg_fitter() -> Fitter:
    """LOG-AVG: nothing to fit (cheap; for tests and as a floor)."""
    return lambda fit: (lambda s: predict_log_avg(s.logits))


def static_fitter(config=None) -> Fitter:
    """C-LOG-AVG: one temperature per backbone (export/fit/nlc.py fit_static)."""

    def fitter(fit: Split):
        static = fit_static(fit.logits, fit.labels, config)
        return lambda s: predict_controller(static, np.zeros((len(s.logits), 1), np.float32), s.logits)
    return fitter


def nlc_fitter(config=None) -> Fitter:
    """NLC on the concatenated features of the subset's backbones (export/fit/nlc.py fit_nlc)."""

    def fitter(fit: Split):
        controller = fit_nlc(np.concatenate(fit.features, axis=1), fit.logits, fit.labels, config)
        return lambda s: predict_controller(controller, np.concatenate(s.features, axis=1), s.logits)
    return fitter


@dataclass(frozen=True)
class SubsetScore:
    """One subset: which backbones, what it costs, how it scored."""

    members: tuple[int, ...]       # indices into Frontier.names, ascending
    names: tuple[str, ...]
    cost: float                    # sum of its backbones' costs
    correct: int                   # held-out images right (exact, for ties)
    accuracy: Interval             # held-out accuracy, percent, Wilson interval
    test: Interval | None = None   # accuracy on the test split, when one was given

    def to_dict(self) -> dict:
        return {"members": list(self.members), "names": list(self.names), "cost": self.cost,
                "accuracy": self.accuracy.to_dict(), "test": None if self.test is None else self.test.to_dict()}


@dataclass
class Frontier:
    """Every subset's cost and accuracy; the Pareto front; the choice under a budget."""

    names: list[str]
    costs: list[float]
    cost_unit: str                                   # "ms" or "GFLOPs"
    subsets: list[SubsetScore] = field(default_factory=list)   # sorted by cost, then accuracy (desc)

    def pareto(self) -> list[SubsetScore]:
        """Subsets more accurate (held-out) than every cheaper one, by increasing cost."""
        front, best = [], -1
        for s in self.subsets:                       # cost ascending; at equal cost the most accurate first
            if s.correct > best:
                front.append(s)
                best = s.correct
        return front

    def choose(self, budget: float) -> SubsetScore:
        """The most accurate subset (held-out) costing <= budget; ties: cheaper, then fewer backbones."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise ClipfuseError(f"budget must be a positive number of {self.cost_unit}, got {budget!r}")
        k = int(np.argmin(self.costs))
        if budget < self.costs[k] - 1e-12:
            raise ClipfuseError(f"budget {budget:g} {self.cost_unit} is below the cheapest backbone, {self.names[k]} "
                                f"at {self.costs[k]:g} {self.cost_unit}: raise the budget to at least that")
        within = [s for s in self.subsets if s.cost <= budget * (1 + 1e-12)]
        return min(within, key=lambda s: (-s.correct, s.cost, len(s.members), s.members))

    def to_dict(self) -> dict:
        front = {s.members for s in self.pareto()}
        return {"names": self.names, "costs": self.costs, "cost_unit": self.cost_unit,
                "subsets": [dict(s.to_dict(), pareto=s.members in front) for s in self.subsets]}

    def to_markdown(self, all_subsets: bool = False) -> str:
        """The Pareto front (or every subset) as a table: backbones, cost, held-out and test accuracy."""
        rows = self.subsets if all_subsets else self.pareto()
        has_test = any(s.test is not None for s in rows)
        head = f"| backbones | cost ({self.cost_unit}) | held-out accuracy % [95% CI] |" + (" test accuracy % [95% CI] |" if has_test else "")
        lines = [head, "|---|---:|---:|" + ("---:|" if has_test else "")]
        for s in rows:
            cells = [" + ".join(s.names), f"{s.cost:.4g}", str(s.accuracy)] + ([str(s.test) if s.test else "-"] if has_test else [])
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _check_costs(costs, names, K: int) -> tuple[list[float], list[str]]:
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    if c.shape != (K,) or not np.isfinite(c).all() or (c <= 0).any():
        raise ClipfuseError(f"costs must be {K} positive numbers, one per backbone, got {c.tolist()}")
    names = [str(n) for n in (names if names is not None else range(K))]
    if len(names) != K or len(set(names)) != K:
        raise ClipfuseError(f"need {K} distinct backbone names, got {names}")
    return c.tolist(), names


def search_subsets(fitter: Fitter, fit: Split, held_out: Split, costs, names=None, cost_unit: str = "ms",
                   test: Split | None = None, fit_singles: bool = False, progress=None) -> Frontier:
    """Fit and score every non-empty subset of the K backbones (exact search, 2^K - 1 fits).

    fitter: see Fitter (nlc_fitter(), static_fitter(), log_avg_fitter(), or your own).
    fit / held_out / test: Splits over the same K backbones; fit and held_out need labels.
    costs (K,): per-backbone cost in cost_unit. progress(i, total, names), if given, is called per subset.
    """
    fit, held_out = fit.check("fit split"), held_out.check("held-out split")
    test = None if test is None else test.check("test split")
    K = fit.logits.shape[1]
    if K > MAX_BACKBONES:
        raise ClipfuseError(f"{K} backbones: the exact subset search needs {2 ** K - 1} fits; "
                            f"give at most {MAX_BACKBONES} backbones")
    for what, s in (("held-out split", held_out), ("test split", test)):
        if s is not None and s.logits.shape[1:] != fit.logits.shape[1:]:
            raise ClipfuseError(f"{what}: logits {s.logits.shape[1:]} do not match the fit split's {fit.logits.shape[1:]} (K, C)")
    if fit.labels is None or held_out.labels is None or (test is not None and test.labels is None):
        raise ClipfuseError("search_subsets needs labels on the fit, held-out and test splits")
    costs, names = _check_costs(costs, names, K)

    scores = []
    subsets = [m for r in range(1, K + 1) for m in itertools.combinations(range(K), r)]
    for i, members in enumerate(subsets):
        if progress is not None:
            progress(i, len(subsets), [names[k] for k in members])
        if len(members) == 1 and not fit_singles:
            k = members[0]
            predict = lambda s, k=k: s.logits[:, k].argmax(axis=-1)
        else:
            sub_predict = fitter(fit.take(members))
            predict = lambda s, m=members, f=sub_predict: f(s.take(m))
        pred = np.asarray(predict(held_out)).reshape(-1)
        acc = accuracy_interval(pred, held_out.labels)
        scores.append(SubsetScore(members=tuple(members), names=tuple(names[k] for k in members),
                                  cost=float(sum(costs[k] for k in members)),
                                  correct=int((pred == held_out.labels).sum()), accuracy=acc,
                                  test=None if test is None else accuracy_interval(predict(test), test.labels)))
    scores.sort(key=lambda s: (s.cost, -s.correct, len(s.members), s.members))
    return Frontier(names=names, costs=costs, cost_unit=cost_unit, subsets=scores)


def choose_subset(frontier: Frontier, budget: float) -> SubsetScore:
    """Best held-out accuracy within budget (ties: cheaper, then fewer backbones). See Frontier.choose."""
    return frontier.choose(budget)
