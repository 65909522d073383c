"""benchmarks/cascade_study.py's pass/fail check: it states its bound, and it fails on a guard that violates
max_drop; a tighter guard replaces the default only with no violation AND a lower cost everywhere."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "cascade_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("cascade_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(violations, cost):
    return {"violations": violations, "runs": 20, "mean_drop": 0.1, "max_drop_seen": 0.5, "mean_cost_fraction": cost}


def _guard(default, per_stage, holdout):
    return {key: {"agreement-bound": _row(*default), "agreement-bound-per-stage": _row(*per_stage),
                  "agreement-holdout": _row(*holdout)} for key in ("150,3.0", "600,1.0")}


def test_the_study_fails_when_the_default_guard_violates_max_drop():
    study = _study()
    ok, lines = study.check_guards(_guard((0, 0.8), (0, 0.9), (0, 0.9)))
    assert ok and "worst 0/20 violations over 2 configurations (bound <= 0): pass" in lines[0]
    assert all("default kept" in line for line in lines[1:])
    ok, lines = study.check_guards(_guard((1, 0.8), (0, 0.9), (0, 0.9)))
    assert not ok and "worst 1/20 violations over 2 configurations (bound <= 0): FAIL" in lines[0]


def test_a_candidate_replaces_the_default_only_when_it_never_violates_and_is_always_cheaper():
    study = _study()
    _, lines = study.check_guards(_guard((0, 0.8), (0, 0.7), (1, 0.6)))
    assert "agreement-bound-per-stage: worst 0/20 violations (bound <= 0), cheaper than the default in 2 of 2" in lines[1]
    assert lines[1].endswith("replaces the default")
    assert "agreement-holdout: worst 1/20" in lines[2] and lines[2].endswith("default kept")
