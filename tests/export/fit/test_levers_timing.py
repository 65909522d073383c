"""--budget-ms / --cascade-cost ms: towers timed interleaved, and a ranking the rounds do not agree on is
refused (budget) or replaced by GFLOPs, saying so (cascade order). No timed assertions: rankings are built
from given numbers, and the interleaving is read from the order of the runs."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit.levers import budget, costs, plan
from clipfuse.export.fit.levers.recipe import GFLOPS, MS, Levers
from clipfuse.export.graph.backbones import load_backbone
from clipfuse.export.graph.heads import LINEAR_PROBE, Head

NAMES = ["RN50", "RN101"]


def test_a_consistent_ranking_is_trusted_even_when_slow():
    runs = [[210, 190, 260, 200, 230, 205, 220], [300, 280, 390, 290, 330, 310, 320]]   # a neighbour slows both
    assert costs.contested_ranking(NAMES, runs) is None


def test_rounds_that_disagree_make_the_ranking_unreliable():
    """The issue's case: sequential timing under load put RN101 (19.5 GFLOPs) below RN50 (12.2)."""
    runs = [[96, 300, 97, 95, 290, 310, 99], [214, 120, 215, 216, 118, 125, 213]]
    reason = costs.contested_ranking(NAMES, runs)
    assert reason is not None and "RN50 (median 99 ms) was timed faster than RN101 (median 213 ms)" in reason
    assert "in only 57% of the rounds (bound >= 75%)" in reason


def test_near_equal_costs_may_come_either_way():
    runs = [[100, 104, 99, 103, 101, 98, 102], [102, 99, 103, 100, 104, 101, 97]]     # within 10%
    assert costs.contested_ranking(NAMES, runs) is None


class _Recorder:
    """An ONNX Runtime session that records which tower ran, in order."""

    def __init__(self, session, k, order):
        self.session, self.k, self.order = session, k, order

    def run(self, names, feed):
        self.order.append(self.k)
        return self.session.run(names, feed)


def test_towers_are_timed_interleaved_with_a_rotating_start(monkeypatch):
    torch.manual_seed(0)
    built = [load_backbone(TINY[0]), load_backbone(TINY[2])]
    heads = [Head(torch.randn(3, b.embed_dim), torch.zeros(3), LINEAR_PROBE) for b in built]
    order, real = [], costs.open_session
    opened = []

    def recording(path):
        opened.append(path)
        return _Recorder(real(path), len(opened) - 1, order)

    monkeypatch.setattr(costs, "open_session", recording)
    got, info = costs.measure_costs(built, heads, MS)
    rounds = costs.TIMING_WARMUP + costs.TIMING_RUNS
    assert order == [k for r in range(rounds) for k in ((0, 1) if r % 2 == 0 else (1, 0))]
    assert len(got) == 2 and all(len(row["runs_ms"]) == costs.TIMING_RUNS for row in info["per_backbone"].values())
    assert "rotated order" in info["method"] and "other_processes_cores" in info["load"]


def _fake_built(gflops):
    return [SimpleNamespace(spec=f"b{k}", info={"gflops": g}) for k, g in enumerate(gflops)]


def test_budget_ms_refuses_an_unreliable_ranking(monkeypatch):
    monkeypatch.setattr(budget, "measure_costs", lambda built, heads, unit: (
        [99.0, 213.0], {"unit": MS, "unreliable": "b0 was timed faster than b1 in only 57% of the rounds"}))
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ClipfuseError, match=r"--budget-ms: b0 was timed faster .* not chosen; rerun on a quieter "
                                            r"machine, or use --budget-gflops"):
        budget.choose_budget_subset(Levers(budget=150.0), _fake_built([12.2, 19.5]), None, None, None, y, None, None,
                                None, np.array([0, 1]), None)


def test_cascade_cost_ms_falls_back_to_gflops_and_says_so(monkeypatch):
    real = plan.measure_costs

    def unreliable_ms(built, heads, unit):
        if unit == MS:
            return [99.0, 213.0], {"unit": MS, "unreliable": "the rounds disagree"}
        return real(built, heads, unit)

    monkeypatch.setattr(plan, "measure_costs", unreliable_ms)
    y = np.repeat([0, 1], 700)
    Z = np.zeros((len(y), 2, 2), np.float32)
    _, got, info = plan.check_calibration(Levers(cascade=True, cascade_cost=MS), _fake_built([12.2, 19.5]),
                                         None, Z, y, np.array([0, 700]))
    assert got == [12.2, 19.5] and info["unit"] == GFLOPS
    assert info["fallback"] == "--cascade-cost ms fell back to GFLOPs: the rounds disagree"
