"""Exact subset search and the choice under a budget (export/fit/subsets.py), on sets built so the answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit.subsets import (
    MAX_BACKBONES,
    Split,
    choose_subset,
    log_avg_fitter,
    nlc_fitter,
    search_subsets,
    static_fitter,
)

NAMES = ["A", "B", "C", "D"]
COSTS = [1.0, 1.2, 0.8, 10.0]


def constructed(n: int = 100, C: int = 6) -> Split:
    """Four backbones whose LOG-AVG accuracy on every subset is known by hand.

    Each backbone puts its margin on one class: the label, or on its own wrong
    class (label + k + 1) on its own block of images. A wrong on images 0-19
    (margin 3), B on 20-49 (2.5), C on 50-89 (1.5), D on 90-99 (4). So singles
    score A 80, B 70, C 60, D 90; {A, B, C} is right everywhere (on every image
    the two right ones outweigh the wrong one) at cost 3.0; pairs reach 80
    ({A, B}, {A, C}) or 90 (with D, cost >= 10.8).
    """
    y = np.arange(n) % C
    blocks = [(0, 20, 3.0), (20, 50, 2.5), (50, 90, 1.5), (90, 100, 4.0)]
    Z = np.zeros((n, 4, C))
    for k, (lo, hi, margin) in enumerate(blocks):
        target = y.copy()
        target[lo:hi] = (y[lo:hi] + k + 1) % C
        Z[np.arange(n), k, target] = margin
    feats = [np.ones((n, 2)) * (k + 1) for k in range(4)]
    return Split(feats, Z, y)


@pytest.fixture(scope="module")
def frontier():
    s = constructed()
    return search_subsets(log_avg_fitter(), s, s, COSTS, NAMES, test=s)


def test_every_subset_scored_as_constructed(frontier):
    acc = {s.names: s.accuracy.value for s in frontier.subsets}
    assert len(acc) == 15
    assert acc[("A",)] == 80 and acc[("B",)] == 70 and acc[("C",)] == 60 and acc[("D",)] == 90
    assert acc[("A", "B")] == 80 and acc[("A", "C")] == 80 and acc[("B", "C")] == 70
    assert acc[("A", "D")] == 90 and acc[("A", "B", "C")] == 100 and acc[("A", "B", "C", "D")] == 100
    abc = next(s for s in frontier.subsets if s.names == ("A", "B", "C"))
    assert abc.cost == pytest.approx(3.0) and abc.test.value == 100
    assert abc.accuracy.lo < 100 == abc.accuracy.hi            # a Wilson interval, not a point


@pytest.mark.parametrize("budget, expected", [
    (0.8, ("C",)),               # only the cheapest fits
    (1.0, ("A",)),               # A beats C
    (2.5, ("A",)),               # {A, C} and {A, B} tie A at 80: the cheaper wins
    (2.99, ("A",)),
    (3.0, ("A", "B", "C")),      # exactly on budget
    (10.0, ("A", "B", "C")),     # D (90) is affordable but worse
    (100.0, ("A", "B", "C")),    # ties at 100 with 4-backbone sets: the cheaper wins
])
def test_choice_under_budget_is_the_constructed_one(frontier, budget, expected):
    assert choose_subset(frontier, budget).names == expected


def test_pareto_front(frontier):
    assert [s.names for s in frontier.pareto()] == [("C",), ("A",), ("A", "B", "C")]
    md = frontier.to_markdown()
    assert "A + B + C" in md and "| B |" not in md
    d = frontier.to_dict()
    assert sum(s["pareto"] for s in d["subsets"]) == 3 and len(d["subsets"]) == 15


def test_singles_need_no_fit_and_every_other_subset_one():
    calls = []

    def counting(fit):
        calls.append(fit.logits.shape[1])
        return lambda s: s.logits.mean(axis=1).argmax(axis=-1)

    s = constructed()
    search_subsets(counting, s, s, COSTS, NAMES)
    assert sorted(calls) == [2] * 6 + [3] * 4 + [4]
    calls.clear()
    search_subsets(counting, s, s, COSTS, NAMES, fit_singles=True)
    assert len(calls) == 15


def test_real_fitters_run_on_cached_arrays():
    from synthetic import synthetic_ensemble

    from clipfuse.export.fit.nlc import FitConfig

    X, Z, y, _ = synthetic_ensemble(12, num_classes=4, num_backbones=2, dim=8, seed=0)
    feats = [X[:, :8], X[:, 8:]]
    fit, held = Split([f[:24] for f in feats], Z[:24], y[:24]), Split([f[24:] for f in feats], Z[24:], y[24:])
    cfg = FitConfig(steps=20, static_steps=30)
    for fitter in (static_fitter(cfg), nlc_fitter(cfg)):
        fr = search_subsets(fitter, fit, held, [1.0, 2.0], ["p", "q"], cost_unit="GFLOPs")
        assert [s.names for s in fr.subsets] == [("p",), ("q",), ("p", "q")]
        single = next(s for s in fr.subsets if s.names == ("q",))
        assert single.correct == int((Z[24:, 1].argmax(-1) == y[24:]).sum())
        assert "GFLOPs" in fr.to_markdown(all_subsets=True)


def test_budget_below_cheapest_names_it(frontier):
    with pytest.raises(ClipfuseError, match=r"below the cheapest backbone, C at 0.8 ms") as e:
        frontier.choose(0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(ClipfuseError, match="positive number"):
        frontier.choose(-1)


def test_bad_inputs_refused():
    s = constructed()
    K = MAX_BACKBONES + 1
    big = Split([np.zeros((3, 1))] * K, np.zeros((3, K, 2)), np.zeros(3, int))
    with pytest.raises(ClipfuseError, match=f"{2 ** K - 1} fits"):
        search_subsets(log_avg_fitter(), big, big, [1.0] * K)
    empty = Split([np.zeros((0, 2))] * 4, np.zeros((0, 4, 6)), np.zeros(0, int))
    with pytest.raises(ClipfuseError, match="N, K >= 1"):
        search_subsets(log_avg_fitter(), empty, s, COSTS, NAMES)
    with pytest.raises(ClipfuseError, match="positive numbers"):
        search_subsets(log_avg_fitter(), s, s, [1.0, 0.0, 1.0, 1.0], NAMES)
    with pytest.raises(ClipfuseError, match="4 positive numbers"):
        search_subsets(log_avg_fitter(), s, s, [1.0], NAMES)
    with pytest.raises(ClipfuseError, match="needs labels"):
        search_subsets(log_avg_fitter(), s, Split(s.features, s.logits, None), COSTS, NAMES)
    with pytest.raises(ClipfuseError, match="4 feature arrays"):
        search_subsets(log_avg_fitter(), Split(s.features[:3], s.logits, s.labels), s, COSTS, NAMES)
