"""Diversity figures and failure signatures on synthetic backbones whose overlap is known by construction."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from synthetic import synthetic_ensemble

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit import diversity as dv

C = 4
N = 20


def backbone(labels, wrong_on, shift=1):
    """Logits (N, C) right everywhere except on `wrong_on`, where class label+shift wins."""
    Z = np.zeros((len(labels), C))
    target = labels.copy()
    target[wrong_on] = (labels[wrong_on] + shift) % C
    Z[np.arange(len(labels)), target] = 5.0
    return Z


@pytest.fixture
def world():
    """A errs on images 0-4, B on 5-9 (disjoint), A2 is an exact copy of A; everyone is right on 10-19."""
    y = np.arange(N) % C
    A = backbone(y, np.arange(0, 5))
    B = backbone(y, np.arange(5, 10))
    Z = np.stack([A, B, A.copy()], axis=1)                     # (N, K=3, C)
    return Z, y, ["A", "B", "A2"]


def test_pairs_as_built(world):
    Z, y, names = world
    p = dv.pairwise(Z, y)
    dis, one, kap = (np.array(p[k]) for k in ("disagreement", "exactly_one_right", "kappa"))
    assert dis[0, 2] == 0.0 and kap[0, 2] == 1.0 and one[0, 2] == 0.0       # identical backbones
    assert dis[0, 1] == pytest.approx(10 / N) and one[0, 1] == pytest.approx(10 / N)
    from sklearn.metrics import cohen_kappa_score  # an independent reference
    P = Z.argmax(-1)
    assert kap[0, 1] == pytest.approx(cohen_kappa_score(P[:, 0], P[:, 1]))
    assert np.allclose(dis, dis.T) and np.allclose(np.diag(kap), 1.0)


def test_unique_contributions_and_leave_one_out_as_built(world):
    Z, y, names = world
    pb = dv.per_backbone(Z, y, names)
    rows = {r["backbone"]: r for r in pb["backbones"]}
    # B alone is right on 0-4; A's right images are all covered by its copy A2 (and B), so A adds nothing alone.
    assert [rows[n]["unique_images"] for n in names] == [0, 5, 0]
    assert pb["oracle"] == 100.0 and pb["best_single_accuracy"] == 75.0 and pb["oracle_gain"] == 25.0
    assert rows["B"]["oracle_without"] == 75.0 and rows["B"]["oracle_loss_without"] == 25.0
    assert rows["B"]["oracle_gain_without"] == 0.0          # A and A2 together are one backbone: no ORACLE gain
    assert rows["A"]["oracle_without"] == 100.0 and rows["A"]["oracle_loss_without"] == 0.0
    # Two backbones with disjoint errors: each is the only one right on its partner's 5 errors.
    pb2 = dv.per_backbone(Z[:, :2], y, names[:2])
    assert [r["unique_images"] for r in pb2["backbones"]] == [5, 5]
    assert [r["oracle_without"] for r in pb2["backbones"]] == [75.0, 75.0]


def test_per_class_specialisation_and_its_minimum(world):
    Z, y, names = world
    pc = dv.per_class(Z, y, names, ["c0", "c1", "c2", "c3"])
    assert pc["min_images"] == dv.MIN_CLASS_IMAGES and not pc["skipped"]       # 5 images per class
    # Class 0 = images 0,4,8,12,16: A/A2 wrong on 0 and 4, B wrong on 8 -> B is best there.
    c0 = next(r for r in pc["classes"] if r["class"] == "c0")
    assert c0["best"] == ["B"] and c0["margin"] == pytest.approx(20.0)
    few = dv.per_class(Z[:8], y[:8], names, ["c0", "c1", "c2", "c3"])
    assert not few["classes"] and [s["images"] for s in few["skipped"]] == [2, 2, 2, 2]
    assert "at least 5 of the held-out images" in dv.to_markdown(dv.diversity_report(Z, y, names, ["c0", "c1", "c2", "c3"]))
    # "held-out" only where true: eval names what its images are
    text = dv.to_markdown(dv.diversity_report(Z, y, names, ["c0", "c1", "c2", "c3"], images="these images"))
    assert "at least 5 of these images" in text and "held-out" not in text


def test_collapse_warning_when_the_controller_is_constant_and_not_when_it_varies():
    """A real NLCController: unfitted (fc2 weight zero, the same t for every image) vs fitted where the best
    backbone depends on the image."""
    from clipfuse.export.fit import nlc
    X, Z, y, _ = synthetic_ensemble(12, num_classes=4, scenario="complementary", seed=3, region_strength=3.0)
    names = ["b0", "b1", "b2"]
    constant = nlc.new_nlc(X, 3)
    rep = dv.diversity_report(Z, y, names, ["a", "b", "c", "d"], temperatures=nlc.controller_temperatures(constant, X))
    assert rep["temperature_spread"]["collapsed"]
    [line] = [s for s in rep["signatures"] if "collapsed" in s]
    assert "threshold 5%" in line and "0.00%" in line
    fitted = nlc.fit_nlc(X, Z, y, nlc.FitConfig(steps=300, lr=1e-2))
    rep = dv.diversity_report(Z, y, names, ["a", "b", "c", "d"], temperatures=nlc.controller_temperatures(fitted, X))
    assert not rep["temperature_spread"]["collapsed"] and not any("collapsed" in s for s in rep["signatures"])
    assert max(b["cv"] for b in rep["temperature_spread"]["backbones"]) > dv.COLLAPSE_CV
    assert "collapse threshold: std/mean < 5%" in dv.to_markdown(rep)


def test_collapse_threshold_is_the_bound():
    base = np.ones((50, 2))
    just_below = base.copy()
    just_below[:, 0] += np.where(np.arange(50) % 2, 0.049, -0.049)    # cv 0.049
    just_above = base.copy()
    just_above[:, 0] += np.where(np.arange(50) % 2, 0.051, -0.051)
    assert dv.temperature_spread(just_below)["collapsed"] and not dv.temperature_spread(just_above)["collapsed"]


def test_loss_plateau_and_nlc_no_better():
    steps = 300
    early = np.r_[np.linspace(1.0, 0.5, 10), np.full(steps - 10, 0.5)]
    steady = np.linspace(1.0, 0.5, steps)
    e, s = dv.loss_plateau(early), dv.loss_plateau(steady)
    assert e["early"] and e["plateau_step"] == 10 and not s["early"] and s["plateau_step"] > 0.9 * steps
    [line] = dv.signatures(plateau=e)
    assert "by step 10 of 300" in line and "within 5%" in line and "first 20%" in line
    assert dv.signatures(plateau=s) == []
    acc = {"A": 80.0, "B": 60.0, "C-LOG-AVG": 75.0, "NLC": 78.0}
    [line] = dv.signatures(accuracy=acc, single_names=["A", "B"])
    assert "NLC (78.0%) is no better than A (80.0%)" in line
    assert dv.signatures(accuracy=dict(acc, NLC=81.0), single_names=["A", "B"]) == []
    with pytest.raises(ClipfuseError, match="at least 2 steps"):
        dv.loss_plateau([1.0])


def test_heatmap_written_or_skipped_with_a_line(world, tmp_path, monkeypatch):
    Z, y, names = world
    rep = dv.diversity_report(Z, y, names, ["c0", "c1", "c2", "c3"])
    assert dv.save_heatmap(rep, tmp_path / "d.png") is None
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # as if the dev extra were missing
    why = dv.save_heatmap(rep, tmp_path / "e.png")
    assert why.startswith("heat map skipped: matplotlib is not installed") and not (tmp_path / "e.png").exists()


def test_bad_shapes():
    with pytest.raises(ClipfuseError, match=r"shape \(N > 0, K, C\)"):
        dv.pairwise(np.zeros((3, 2)), np.zeros(3, int))
    with pytest.raises(ClipfuseError, match="labels must have shape"):
        dv.pairwise(np.zeros((3, 2, 2)), np.zeros(4, int))
    with pytest.raises(ClipfuseError, match="2 names for K = 3"):
        dv.diversity_report(np.zeros((3, 3, 2)), np.zeros(3, int), ["a", "b"], ["x", "y"])
