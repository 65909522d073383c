"""Confidence cascade: routing (runtime/routing.py), threshold choice and its guard (export/fit/cascade.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic import study_threshold_guard, synthetic_stages

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit.cascade import candidate_orders, fit_cascade, fit_cascade_orders
from clipfuse.export.thresholds import (
    ACCURACY,
    AGREEMENT,
    GUARDED,
    HOLDOUT,
    PER_STAGE,
    CascadeConfig,
    allowed_disagreements,
    choose_thresholds,
    required_calibration_images,
)
from clipfuse.runtime.routing import cascade_predict, confidence, route

COSTS = (1.0, 2.0, 4.0)


# ---------------------------------------------------------------- routing

def test_confidence_scores_by_hand():
    p = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    z = np.log(p)                                           # softmax(log p) = p
    assert confidence(z, "max-prob") == pytest.approx([0.6, 0.4])
    assert confidence(z, "margin") == pytest.approx([0.3, 0.05])
    with pytest.raises(ClipfuseError, match="not one of"):
        confidence(z, "entropy")


def test_route_first_confident_stage_else_last():
    conf = np.array([[0.9, 0.0, 0.0],      # leaves at 0
                     [0.5, 0.8, 0.0],      # leaves at 1 (0.8 >= 0.7)
                     [0.5, 0.6, 0.1],      # runs to the end
                     [0.8, 0.9, 0.9]])     # exactly on stage 0's threshold: leaves there
    assert route(conf, [0.8, 0.7]).tolist() == [0, 1, 2, 0]
    assert route(conf, [None, 0.7]).tolist() == [2, 1, 2, 1]          # null = never leave at stage 0
    assert route(conf, [math.inf, math.inf]).tolist() == [2, 2, 2, 2]


def test_route_ignores_stages_an_image_never_reached_and_refuses_missing_ones():
    conf = np.array([[0.95, np.nan, np.nan], [0.1, 0.9, np.nan]])
    assert route(conf, [0.9, 0.8]).tolist() == [0, 1]
    with pytest.raises(ClipfuseError, match="stage 1 is missing"):
        route(np.array([[0.1, np.nan, 0.3]]), [0.9, 0.8])
    with pytest.raises(ClipfuseError, match="needs 2 thresholds"):
        route(conf, [0.9])


def test_mixed_batch_gives_what_each_image_gives_alone():
    Z, _ = synthetic_stages(64, seed=3)                      # (S, N, C): easy and hard images mixed
    for score in ("max-prob", "margin"):
        t = [np.quantile(confidence(Z[0], score), 0.6), np.quantile(confidence(Z[1], score), 0.5)]
        pred, stage = cascade_predict(Z, t, score)
        assert len(set(stage.tolist())) == 3                  # the batch really mixes all three exits
        alone = [cascade_predict(Z[:, i:i + 1], t, score) for i in range(Z.shape[1])]
        assert pred.tolist() == [int(p[0]) for p, _ in alone]
        assert stage.tolist() == [int(s[0]) for _, s in alone]
        # And in a shuffled batch order.
        perm = np.random.default_rng(0).permutation(Z.shape[1])
        p2, s2 = cascade_predict(Z[:, perm], t, score)
        assert p2.tolist() == pred[perm].tolist() and s2.tolist() == stage[perm].tolist()


# ---------------------------------------------------------------- threshold choice

def split(n_cal=2000, n_test=10000, seed=0):
    Z, y = synthetic_stages(n_cal + n_test, seed=seed)
    return list(Z[:, :n_cal]), list(Z[:, n_cal:]), y[:n_cal], y[n_cal:]


def test_guarded_cascade_meets_max_drop_on_held_out_and_saves_cost():
    cal, test, y_cal, y_test = split()
    fit = fit_cascade(cal, test, COSTS, ["s", "m", "l"], CascadeConfig(max_drop=1.0), test_labels=y_test)
    t = fit.test
    print(f"held-out drop {t['drop']:+.2f} (bound {1.0}), cost {t['cost_fraction']:.2f} of full, exits {t['exit_rates']}")
    assert t["within_max_drop"] and t["drop"] <= 1.0
    assert t["cost_fraction"] < 0.9 and t["exit_rates"][0] > 0.03
    assert sum(t["exit_rates"]) == pytest.approx(1.0)
    c = fit.calibration
    assert c["disagreements"] <= c["allowed"] and c["disagreement_bound"] <= 1.0
    # Agreement bounds the drop image by image: drop <= 100 - agreement.
    assert t["drop"] <= 100.0 - t["paired_difference"]["agreement"]["value"] + 1e-9
    # The guarded search needs no calibration labels; giving them changes nothing.
    again = fit_cascade(cal, test, COSTS, ["s", "m", "l"], CascadeConfig(max_drop=1.0), calib_labels=y_cal, test_labels=y_test)
    assert again.thresholds == fit.thresholds


def test_naive_labelled_search_violates_max_drop_more_often_than_the_guarded_one():
    # 8 seeds, 600 calibration images, max_drop 1 point, each scored on 10000 held-out images.
    res = study_threshold_guard(seeds=range(8), n_cal=600, n_test=10000, max_drop=1.0, constraints=(ACCURACY, GUARDED))
    naive, guarded = res[ACCURACY]["violations"], res[GUARDED]["violations"]
    print(f"violations of max_drop 1.0 on held-out: naive {naive}/8, guarded {guarded}/8")
    assert naive >= 4 and guarded <= 1 and naive > guarded
    assert res[GUARDED]["max_drop_seen"] < res[ACCURACY]["max_drop_seen"]


def test_score_chosen_on_data_and_written_with_its_reason():
    cal, test, _, y_test = split(seed=1)
    fit = fit_cascade(cal, test, COSTS, config=CascadeConfig(max_drop=1.0, score="auto"), test_labels=y_test)
    assert set(fit.scores_tried) == {"max-prob", "margin"}
    assert fit.scores_tried[fit.score] == min(fit.scores_tried.values())
    m = fit.to_manifest()
    assert m["order"] == ["0", "1", "2"] and len(m["thresholds"]) == 2 and len(m["expected_exit_rates"]) == 3
    # Thresholds that never let an image leave are written as null (JSON has no inf), and route reads them back.
    from dataclasses import replace
    never = replace(fit, thresholds=[math.inf, fit.thresholds[1]]).to_manifest()["thresholds"]
    assert never[0] is None and never[1] == fit.thresholds[1]
    assert route(np.array([[1.0, 1.0, 1.0]]), never).tolist() == [1]


def test_order_chosen_on_calibration_cost_with_the_confidence_split():
    cal, test, _, y_test = split(seed=2)
    # The same three backbones the other way round (most expensive first): recover each backbone's
    # logits from the prefix means, then average them in the reverse order.
    def reverse(stages):
        b = [stages[0], 2 * stages[1] - stages[0], 3 * stages[2] - 2 * stages[1]]
        return [b[2], (b[2] + b[1]) / 2, stages[2]]
    cfg = CascadeConfig(max_drop=1.0, score="max-prob")
    cands = {"cheapest-first": (cal, test, COSTS, ["s", "m", "l"]),
             "accuracy-per-cost": (reverse(cal), reverse(test), COSTS[::-1], ["l", "m", "s"])}
    fit = fit_cascade_orders(cands, cfg, test_labels=y_test)
    tried = fit.orders_tried
    assert set(tried) == {"cheapest-first", "accuracy-per-cost"}
    assert fit.calibration["expected_cost"] == min(v["calibration_expected_cost"] for v in tried.values())
    assert fit.names == min(tried.values(), key=lambda v: v["calibration_expected_cost"])["names"]
    # Two orders tried: each is held to a 97.5% bound, so it may disagree less than a lone fit.
    alone = fit_cascade(*cands["cheapest-first"], config=cfg, test_labels=y_test)
    assert fit_cascade(*cands["cheapest-first"], config=cfg, test_labels=y_test, tries=2).calibration["allowed"] \
        < alone.calibration["allowed"]
    assert candidate_orders([4.0, 1.0, 2.0], [90, 60, 70]) == {"cheapest-first": [1, 2, 0]}    # same order: once
    assert candidate_orders([1.0, 2.0], [40, 99]) == {"cheapest-first": [0, 1], "accuracy-per-cost": [1, 0]}


def test_required_calibration_images():
    # Zero disagreements on n images certify 1 - 0.05^(1/n): 0.5 points needs 598, 1 point 299.
    assert required_calibration_images(0.5) == 598
    # the README's figures: 598 for one configuration, 875 for the four fit may try (Bonferroni)
    assert (required_calibration_images(0.5, tries=2), required_calibration_images(0.5, tries=4)) == (736, 875)
    assert required_calibration_images(1.0) == 299
    assert required_calibration_images(0.5, tries=2) > 598


def test_unguarded_constraints_still_run():
    cal, test, y_cal, y_test = split(n_cal=300, seed=4)
    for constraint in (ACCURACY, AGREEMENT):
        fit = fit_cascade(cal, test, COSTS, config=CascadeConfig(max_drop=1.0, constraint=constraint),
                          calib_labels=y_cal, test_labels=y_test)
        assert fit.calibration["disagreements"] >= 0 and fit.config["constraint"] == constraint
    thr = choose_thresholds(cal, COSTS, CascadeConfig(max_drop=100.0, constraint=AGREEMENT))
    assert np.isfinite(thr).all()                                  # allowed to disagree everywhere: everyone leaves early


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=CascadeConfig(max_drop=-0.5)), r"--max-drop must be a number of accuracy points >= 0"),
    (dict(config=CascadeConfig(max_drop=0.0)), r"--max-drop 0 cannot be certified"),
    (dict(n_cal=150), r"150 calibration images cannot certify --max-drop 0.5 at 95% \(2 configurations tried\): "
                      r"it needs >= 736 images; label more images or raise --max-drop to >= 2.5"),
    (dict(n_cal=150, config=CascadeConfig(score="max-prob")), r"needs >= 598 images.* to >= 2.0"),
    (dict(stages=1), r"a cascade needs at least two backbones"),
    (dict(config=CascadeConfig(constraint=ACCURACY, max_drop=1.0)), r"needs calibration labels"),
])
def test_bad_options_get_one_clear_line(kwargs, match):
    n_cal = kwargs.pop("n_cal", 1500)
    stages = kwargs.pop("stages", 3)
    cal, test, _, y_test = split(n_cal=n_cal, n_test=200)
    with pytest.raises(ClipfuseError, match=match) as e:
        fit_cascade(cal[:stages], test[:stages], COSTS[:stages], test_labels=y_test, **kwargs)
    assert "\n" not in str(e.value)


def test_the_study_only_guards_hold_their_own_bounds():
    """PER_STAGE: each early stage's disagreements within the allowance for max_drop / (S - 1) at alpha / (S - 1);
    HOLDOUT: the thresholds kept are certified on the odd rows the path was not chosen on."""
    Z, _ = synthetic_stages(2000, seed=3)
    full = Z[-1].argmax(1)
    t = choose_thresholds(list(Z), COSTS, CascadeConfig(max_drop=1.0, constraint=PER_STAGE))
    stage = route(np.stack([confidence(z, "max-prob") for z in Z], axis=1), t)
    pred = Z.argmax(2)[stage, np.arange(Z.shape[1])]
    allowed = allowed_disagreements(2000, 0.5, 1 - 0.05 / 2)
    assert all(int(((pred != full) & (stage == s)).sum()) <= allowed for s in (0, 1))
    assert (stage < 2).any(), "a world where early exit is possible must use it"
    t = choose_thresholds(list(Z), COSTS, CascadeConfig(max_drop=1.0, constraint=HOLDOUT))
    odd = np.arange(1, 2000, 2)
    stage = route(np.stack([confidence(z[odd], "max-prob") for z in Z], axis=1), t)
    pred = Z[:, odd].argmax(2)[stage, np.arange(odd.size)]
    assert int((pred != full[odd]).sum()) <= allowed_disagreements(odd.size, 1.0, 0.95) and (stage < 2).any()
