"""Which controller ships: chosen on pool images no candidate was fitted on; forced; the fallback at k = 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import synthetic_ensemble

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit import nlc, select

NAMES = ["b0", "b1", "b2"]


def test_folds_hold_out_what_the_candidates_are_fitted_on():
    y = np.repeat(np.arange(3), 4)                                       # 4 images per class
    mode, folds = select.selection_folds(y, 2, seed=7, num_classes=3)
    assert mode == "held-out pool" and len(folds) == select.SELECT_DRAWS
    for fit, held in folds:
        assert not set(fit) & set(held) and len(fit) + len(held) == len(y)
        assert np.bincount(y[fit], minlength=3).tolist() == [2, 2, 2]
    y2 = np.repeat(np.arange(3), 2)                                      # exactly k = 2 per class
    mode, folds = select.selection_folds(y2, 2, seed=0, num_classes=3)
    assert mode == "cross-validation over the shots" and len(folds) == 2
    for fit, held in folds:
        assert not set(fit) & set(held) and np.bincount(y2[held], minlength=3).tolist() == [1, 1, 1]
    assert select.selection_folds(np.arange(3), 1, seed=0, num_classes=3) == ("default", [])


def test_nlc_loses_on_held_out_images_so_the_best_single_ships():
    """One backbone right almost everywhere; at 1 shot NLC and C-LOG-AVG both end below it on held-out images."""
    X, Z, y, _ = synthetic_ensemble(8, num_classes=5, scenario="one-good", seed=1, region_strength=0.5)
    choice = select.choose(X, Z, y, NAMES, shots=1, seed=0, config=nlc.FitConfig())
    s = choice["scores"]
    assert s["NLC"] < s["b0"] and s["C-LOG-AVG"] < s["b0"]              # the case this test is about
    assert choice["method"] == "single" and choice["backbone"] == "b0" and choice["row"] == "b0"
    assert choice["mode"] == "held-out pool" and choice["held_out"] == 35 and not choice["forced"]
    assert choice["reason"].startswith("b0 scored best on labelled images no candidate was fitted on")
    assert f"b0 {s['b0']:.1f}" in choice["reason"] and f"NLC {s['NLC']:.1f}" in choice["reason"]
    forced = select.choose(X, Z, y, NAMES, shots=1, seed=0, config=nlc.FitConfig(), forced="nlc")
    assert forced["method"] == "nlc" and forced["row"] == "NLC" and forced["forced"]
    assert forced["reason"].startswith("forced by --controller nlc; auto would ship b0")


def test_ties_go_to_fewer_fitted_parameters(monkeypatch):
    X, Z, y, _ = synthetic_ensemble(4, num_classes=3, seed=0)
    tie = {"b0": 50.0, "b1": 40.0, "b2": 30.0, "LOG-AVG": 40.0, "C-LOG-AVG": 50.0, "NLC": 50.0}
    monkeypatch.setattr(select, "score_candidates", lambda *a, **k: (tie, 6))
    choice = select.choose(X, Z, y, NAMES, shots=1, seed=0, config=nlc.FitConfig())
    assert choice["method"] == "single" and "tied with C-LOG-AVG, NLC" in choice["reason"]
    monkeypatch.setattr(select, "score_candidates", lambda *a, **k: (dict(tie, NLC=50.1), 6))
    assert select.choose(X, Z, y, NAMES, shots=1, seed=0, config=nlc.FitConfig())["method"] == "nlc"


def test_fallback_when_nothing_is_left_to_choose_on():
    X, Z, y, _ = synthetic_ensemble(1, num_classes=4, scenario="one-good", seed=0)     # one image per class
    choice = select.choose(X, Z, y, NAMES, shots=1, seed=0, config=nlc.FitConfig())
    assert choice["mode"] == "default" and choice["method"] == select.FALLBACK == "static" and choice["scores"] is None
    assert "no labelled image is left to choose on" in choice["reason"] and "default C-LOG-AVG" in choice["reason"]
    forced = select.choose(X, Z, y, NAMES, shots=1, seed=0, config=nlc.FitConfig(), forced="single")
    assert forced["method"] == "single" and forced["backbone"] in NAMES


def test_single_through_the_graph_gives_that_backbones_logits_exactly():
    Z = torch.randn(16, 3, 5) * 30
    for k in range(3):
        c = select.single_controller(k, 3)
        assert torch.equal(nlc.fuse(c(torch.zeros(16, 1)), Z), Z[:, k])
    static = object()
    assert select.shipped_controller({"method": "static"}, NAMES, static, None) is static
    mean = select.shipped_controller({"method": "mean"}, NAMES, None, None)
    assert mean.kind == "constant" and torch.allclose(nlc.fuse(mean(torch.zeros(16, 1)), Z), Z.mean(1), atol=1e-4)


def test_bad_choice():
    with pytest.raises(ClipfuseError, match="--controller 'best' is not one of auto, nlc, static, mean, single"):
        select.check_choice("best")
