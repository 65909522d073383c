"""NLC fitting, C-LOG-AVG (export/fit/nlc.py), the array baselines (export/fit/baselines.py) and the few-shot study (export/fit/study.py).

The accuracy tests use synthetic_ensemble, whose backbones are complementary
by construction (checked first): every image lies in one of K regions that
the features reveal, and in region r only backbone r is reliable.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from synthetic import synthetic_ensemble

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.data import sample_k_shot
from clipfuse.export.fit.baselines import (
    evaluate,
    method_names,
    oracle_correct,
    predict_log_avg,
    predict_prob_avg,
    predict_single,
    predict_vote,
)
from clipfuse.export.fit.nlc import ExpNLCController, FitConfig, controller_temperatures, fit_nlc, fit_static, new_nlc
from clipfuse.export.fit.study import run_study, study_to_markdown
from clipfuse.export.graph.fused import NLCController, StaticController, load_controller, save_controller

NAMES = ["bb-a", "bb-b", "bb-c"]
C = 10
SEEDS = (0, 1, 2)
# The shipped defaults: the accuracy tests check what users get.
CFG = FitConfig()


def world(scenario, pool_per_class=32, eval_per_class=60, seed=11):
    """(train pool, eval) dicts of arrays from one synthetic world."""
    X, Z, y, regions = synthetic_ensemble(pool_per_class + eval_per_class, num_classes=C, scenario=scenario,
                                          seed=seed, region_strength=1.5)
    ev = np.zeros(len(y), bool)
    for c in range(C):
        ev[np.flatnonzero(y == c)[:eval_per_class]] = True
    pick = lambda m: {"X": X[m], "Z": Z[m], "y": y[m], "regions": regions[m]}
    return pick(~ev), pick(ev)


@pytest.fixture(scope="module")
def complementary():
    return world("complementary")


@pytest.fixture(scope="module")
def one_good():
    return world("one-good")


def shots(pool, k, seed):
    idx = sample_k_shot(pool["y"], k, seed)
    return pool["X"][idx], pool["Z"][idx], pool["y"][idx]


def test_synthetic_world_is_complementary_by_construction(complementary):
    _, ev = complementary
    correct = ev["Z"].argmax(-1) == ev["y"][:, None]                        # (N, K)
    for r in range(3):
        in_r = ev["regions"] == r
        assert correct[in_r, r].mean() > 0.8                               # the region's own backbone is reliable
        others = [k for k in range(3) if k != r]
        assert correct[in_r][:, others].mean() < 0.45                      # the others mostly are not
    # Each backbone alone and LOG-AVG are far from the per-image choice.
    acc = evaluate(None, ev["Z"], ev["y"], NAMES)
    assert max(acc[n] for n in NAMES) < 60 and acc["LOG-AVG"] < 70 and acc["ORACLE"] > 90


def test_nlc_beats_best_single_and_log_avg_on_complementary_backbones(complementary):
    pool, ev = complementary
    gains = []
    for seed in SEEDS:
        cfg = replace(CFG, seed=seed)
        X, Z, y = shots(pool, 8, seed)
        acc = evaluate(ev["X"], ev["Z"], ev["y"], NAMES, static=fit_static(Z, y, cfg), nlc=fit_nlc(X, Z, y, cfg))
        best_static = max(*(acc[n] for n in NAMES), acc["LOG-AVG"], acc["C-LOG-AVG"])
        gains.append(acc["NLC"] - best_static)
    # Required: >= 10 points over the best of {each backbone, LOG-AVG, C-LOG-AVG}, mean over 3 seeds, 8 shots.
    assert np.mean(gains) >= 10.0, gains


def test_nlc_keeps_a_backbone_that_is_right_everywhere(one_good):
    pool, ev = one_good
    gaps = []
    for seed in SEEDS:
        cfg = replace(CFG, seed=seed)
        X, Z, y = shots(pool, 16, seed)
        acc = evaluate(ev["X"], ev["Z"], ev["y"], NAMES, nlc=fit_nlc(X, Z, y, cfg))
        assert acc["bb-a"] > acc["LOG-AVG"] + 20                            # the world is what it claims
        gaps.append(acc["bb-a"] - acc["NLC"])
    # Required: NLC at most 3 points below the one good backbone (mean over 3 seeds, 16 shots).
    assert np.mean(gaps) <= 3.0, gaps


def test_one_shot_fit_stays_finite_and_no_worse_than_log_avg(complementary, one_good):
    for pool, ev in (complementary, one_good):
        X, Z, y = shots(pool, 1, 0)                                          # N = C = 10
        assert len(y) == C
        nlc = fit_nlc(X, Z, y, CFG)
        t = controller_temperatures(nlc, ev["X"])
        assert np.isfinite(t).all() and (t > 0).all() and t.max() < 50
        acc = evaluate(ev["X"], ev["Z"], ev["y"], NAMES, nlc=nlc)
        assert acc["NLC"] >= acc["LOG-AVG"]


def test_fit_static_weights_the_good_backbone(one_good):
    pool, _ = one_good
    _, Z, y = shots(pool, 8, 0)
    t = fit_static(Z, y, CFG).value.reshape(-1)
    assert isinstance(fit_static(Z, y, CFG), StaticController)
    assert (t > 0).all() and t[0] > 2 * t[1:].max(), t


def test_same_seed_same_temperatures_other_seed_other_temperatures(complementary):
    pool, ev = complementary
    X, Z, y = shots(pool, 2, 0)
    cfg = replace(CFG, steps=200)
    t1 = controller_temperatures(fit_nlc(X, Z, y, cfg), ev["X"])
    t2 = controller_temperatures(fit_nlc(X, Z, y, cfg), ev["X"])
    t3 = controller_temperatures(fit_nlc(X, Z, y, replace(cfg, seed=1)), ev["X"])
    assert np.array_equal(t1, t2)
    assert not np.array_equal(t1, t3)
    assert (t1 > 0).all() and (t3 > 0).all()
    # The caller's global RNG is left alone.
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    fit_nlc(X, Z, y, cfg)
    assert torch.equal(torch.rand(3), before)


def test_fresh_controller_is_log_avg_or_the_given_static_ensemble(complementary):
    pool, ev = complementary
    X, Z, y = shots(pool, 4, 0)
    K = Z.shape[1]
    nlc = new_nlc(X, K, replace(CFG, init="log-avg"))
    t = controller_temperatures(nlc, ev["X"])
    assert np.allclose(t, 1.0 / K, rtol=0, atol=1e-6)
    fused = (t[..., None] * ev["Z"]).sum(1)
    assert np.array_equal(fused.argmax(-1), predict_log_avg(ev["Z"]))
    start = np.array([0.2, 1.5, 0.7])
    t = controller_temperatures(new_nlc(X, K, CFG, start=start), ev["X"])
    assert np.allclose(t, start, atol=1e-5)
    # exp variant starts at the same place
    t = controller_temperatures(new_nlc(X, K, replace(CFG, init="log-avg", positivity="exp")), ev["X"])
    assert np.allclose(t, 1.0 / K, atol=1e-6)
    # the standardisation is fitted on the training features: mean per dim, one pooled std
    assert torch.allclose(nlc.in_mean, torch.as_tensor(X).mean(0), atol=1e-6)
    assert torch.all(nlc.in_std == nlc.in_std[0])
    assert abs(float(nlc.in_std[0]) - float(np.sqrt(X.var(0).mean()))) < 1e-5


def test_fitted_controllers_round_trip_through_safetensors(tmp_path, complementary):
    pool, ev = complementary
    X, Z, y = shots(pool, 2, 0)
    cfg = replace(CFG, steps=200)
    nlc = fit_nlc(X, Z, y, cfg)
    save_controller(nlc, tmp_path / "nlc.safetensors")
    loaded = load_controller(tmp_path / "nlc.safetensors")
    assert isinstance(loaded, NLCController) and loaded.kind == "nlc"
    feats = torch.as_tensor(ev["X"])
    with torch.no_grad():
        assert torch.equal(loaded(feats), nlc(feats))
    static = fit_static(Z, y, cfg)
    save_controller(static, tmp_path / "static.safetensors")
    assert torch.equal(load_controller(tmp_path / "static.safetensors")(feats), static(feats))
    # The exp variant is study-only: saving works, loading refuses it by name instead of computing softplus.
    exp = fit_nlc(X, Z, y, replace(cfg, positivity="exp"))
    assert isinstance(exp, ExpNLCController)
    save_controller(exp, tmp_path / "exp.safetensors")
    with pytest.raises(ClipfuseError, match="nlc-exp"):
        load_controller(tmp_path / "exp.safetensors")


# ---------------------------------------------------------------- baselines on hand-made arrays

def test_single_log_avg_and_prob_avg_disagree_where_they_should():
    # Backbone 0 is sure of class 0; backbone 1 hesitates between classes 1 and 2.
    Z = np.array([[[6.0, 0.0, 0.0], [0.0, 8.0, 7.9]]])                   # (1, 2, 3)
    assert predict_single(Z, 0).tolist() == [0] and predict_single(Z, 1).tolist() == [1]
    assert predict_log_avg(Z).tolist() == [1]       # mean logits (3, 4, 3.95)
    assert predict_prob_avg(Z).tolist() == [0]      # mean probs (0.50, 0.26, 0.24)
    with pytest.raises(ClipfuseError, match="backbone index 2"):
        predict_single(Z, 2)


def test_vote_majority_then_probability_then_lowest_class():
    big, small = 9.0, 0.5
    Z = np.array([
        # 2 votes for class 1 (weak) beat 1 vote for class 0 (very sure): majority first
        [[0, small, 0], [0, small, 0], [big, 0, 0]],
        # three-way tie: the class with the largest summed probability (class 2, the surest backbone)
        [[1, 0, 0], [0, 1, 0], [0, 0, big]],
        # identical backbones -> all tied: lowest class index
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    ], dtype=float)
    assert predict_vote(Z).tolist() == [1, 2, 0]
    # 2-2 tie between classes 0 and 1 with K = 4: class 1's voters are surer
    Z4 = np.array([[[1, 0, 0], [1, 0, 0], [0, big, 0], [0, big, 0]]], dtype=float)
    assert predict_vote(Z4).tolist() == [1]
    assert predict_vote(Z4[:, [2, 3, 0, 1]]).tolist() == [1]                # backbone order does not matter
    assert predict_prob_avg(Z[:1]).tolist() == [0]   # ... where PROB-AVG follows the sure minority


def test_oracle_and_evaluate_on_hand_made_arrays():
    Z = np.array([
        [[5, 0], [0, 5]],     # label 0: backbone a right, b wrong
        [[0, 5], [0, 5]],     # label 0: both wrong
        [[0, 5], [5, 0]],     # label 0: b right
        [[0, 5], [0, 5]],     # label 1: both right
    ], dtype=float)
    y = np.array([0, 0, 0, 1])
    assert oracle_correct(Z, y).tolist() == [True, False, True, True]
    acc = evaluate(None, Z, y, ["a", "b"])
    assert list(acc) == ["a", "b", "LOG-AVG", "PROB-AVG", "VOTE", "ORACLE"]
    assert acc["a"] == 50.0 and acc["b"] == 50.0 and acc["ORACLE"] == 75.0
    static = StaticController(torch.tensor([2.0, 1.0]))                   # a outweighs b
    acc = evaluate(np.zeros((4, 3)), Z, y, ["a", "b"], static=static)
    assert acc["C-LOG-AVG"] == 50.0
    assert method_names(["a", "b"]) == ["a", "b", "LOG-AVG", "PROB-AVG", "VOTE", "C-LOG-AVG", "NLC", "ORACLE"]
    with pytest.raises(ClipfuseError, match="backbone_names has 1 names for K = 2"):
        evaluate(None, Z, y, ["a"])
    with pytest.raises(ClipfuseError, match="distinct"):
        evaluate(None, Z, y, ["a", "VOTE"])


def test_input_and_config_errors_name_the_culprit():
    X, Z, y = np.zeros((4, 6)), np.zeros((4, 2, 3)), np.array([0, 1, 2, 0])
    with pytest.raises(ClipfuseError, match=r"features must have shape \(N=4"):
        fit_nlc(X[:3], Z, y, CFG)
    with pytest.raises(ClipfuseError, match=r"labels must lie in 0..2"):
        fit_nlc(X, Z, np.array([0, 1, 3, 0]), CFG)
    with pytest.raises(ClipfuseError, match="backbone_logits must have shape"):
        fit_static(Z[0], y, CFG)
    with pytest.raises(ClipfuseError, match="NaN"):
        fit_static(np.full((4, 2, 3), np.nan), y, CFG)
    with pytest.raises(ClipfuseError, match="FitConfig.optimizer"):
        fit_nlc(X, Z, y, replace(CFG, optimizer="sgd"))
    with pytest.raises(ClipfuseError, match="FitConfig.steps"):
        fit_static(Z, y, replace(CFG, steps=0))
    with pytest.raises(ClipfuseError, match="FitConfig.eps"):
        new_nlc(X, 2000, replace(CFG, init="log-avg"))                  # 1/K below eps


# ---------------------------------------------------------------- the study

def test_run_study_table_and_json(complementary):
    pool, ev = complementary
    cfg = replace(CFG, steps=100, static_steps=100)
    res = run_study(pool["X"], pool["Z"], pool["y"], ev["X"], ev["Z"], ev["y"], NAMES,
                    shots=(1, 2), seeds=(0, 1), config=cfg)
    assert res["methods"] == method_names(NAMES)
    assert len(res["runs"]) == 4 and res["num_eval"] == len(ev["y"])
    again = json.loads(json.dumps(res))
    assert again == res
    for m in res["methods"]:
        for k in ("1", "2"):
            vals = [r["accuracy"][m] for r in res["runs"] if str(r["shots"]) == k]
            assert res["mean"][m][k] == pytest.approx(np.mean(vals))
            assert res["std"][m][k] == pytest.approx(np.std(vals))
    md = study_to_markdown(again)
    lines = md.strip().splitlines()
    assert lines[0] == "| method | 1-shot | 2-shot |"
    assert len(lines) == 2 + len(res["methods"])
    nlc_row = next(l for l in lines if l.startswith("| NLC |"))
    assert nlc_row.count("±") == 2 and f"{res['mean']['NLC']['2']:.1f} ± {res['std']['NLC']['2']:.1f}" in nlc_row


def test_run_study_names_a_class_short_of_shots(complementary):
    pool, ev = complementary
    keep = ~((pool["y"] == 3) & (np.cumsum(pool["y"] == 3) > 2))          # class 3 keeps only 2 examples
    names = [f"class{c}" for c in range(C)]
    with pytest.raises(ClipfuseError, match=r"class 'class3' \(label 3\) has 2 example\(s\), fewer than k=4"):
        run_study(pool["X"][keep], pool["Z"][keep], pool["y"][keep], ev["X"], ev["Z"], ev["y"], NAMES,
                  shots=(4,), seeds=(0,), config=CFG, class_names=names)
