"""Accuracy intervals and paired differences on constructed cases (export/paired.py)."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.paired import (
    accuracy_interval,
    clopper_pearson_upper,
    mcnemar_exact_p,
    paired_difference,
    wilson_interval,
)


def test_wilson_matches_closed_form_and_edges():
    # 100/150 at 95%: the textbook Wilson interval is [58.8, 73.7] (computed by hand from the formula).
    iv = wilson_interval(100, 150)
    assert iv.value == pytest.approx(66.667, abs=1e-3)
    assert (round(iv.lo, 1), round(iv.hi, 1)) == (58.8, 73.7)
    # The width the issue quotes: about 11 points at 150 images near 80%.
    assert 10.0 < wilson_interval(120, 150).hi - wilson_interval(120, 150).lo < 14.0
    zero, full = wilson_interval(0, 50), wilson_interval(50, 50)
    assert zero.lo == 0.0 and 0.0 < zero.hi < 10.0
    assert full.hi == 100.0 and 90.0 < full.lo < 100.0
    # A wider level gives a wider interval.
    assert wilson_interval(30, 60, 0.99).lo < wilson_interval(30, 60, 0.95).lo


def test_accuracy_interval_counts_correct():
    y = np.arange(40) % 4
    pred = y.copy()
    pred[:10] = (pred[:10] + 1) % 4
    iv = accuracy_interval(pred, y)
    assert iv.value == 75.0 and iv.n == 40 and iv.lo < 75.0 < iv.hi


def test_identical_predictions_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(5, size=200)
    pred = np.where(rng.random(200) < 0.7, y, (y + 1) % 5)
    d = paired_difference(pred, pred.copy(), y)
    assert (d.difference, d.lo, d.hi) == (0.0, 0.0, 0.0)
    assert d.agreement.value == 100.0 and d.a_only == d.b_only == 0 and d.p_value == 1.0


def test_paired_difference_constructed():
    y = np.zeros(200, dtype=int)
    b = y.copy()                         # b always right
    a = y.copy()
    a[:10] = 1                           # a wrong on 10 images: -5 points, agreement 95%
    d = paired_difference(a, b, y)
    assert d.difference == pytest.approx(-5.0)
    assert d.a_only == 0 and d.b_only == 10
    assert d.agreement.value == pytest.approx(95.0)
    assert d.lo < -5.0 < d.hi <= 0.0     # cannot be positive: a never beats b
    assert d.p_value == pytest.approx(2 * 0.5 ** 10)
    # Symmetric: swapping the methods flips the sign and the interval.
    e = paired_difference(b, a, y)
    assert e.difference == 5.0 and (e.lo, e.hi) == pytest.approx((-d.hi, -d.lo))


def test_paired_interval_is_much_narrower_than_two_single_intervals():
    # Two methods at ~80% that disagree on 4 of 400 images: each single interval is ~8 points wide,
    # the paired one about a point: the reason the cascade's loss is reported paired.
    rng = np.random.default_rng(1)
    y = rng.integers(10, size=400)
    a = np.where(rng.random(400) < 0.8, y, (y + 3) % 10)
    b = a.copy()
    wrong_in_b = np.flatnonzero(a == y)[:4]
    b[wrong_in_b] = (y[wrong_in_b] + 1) % 10
    d = paired_difference(b, a, y)
    single = accuracy_interval(a, y)
    assert d.difference == pytest.approx(-1.0)
    assert d.hi - d.lo < 2.5 < (single.hi - single.lo) / 2


def test_mcnemar_and_clopper_pearson_known_values():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 9) == pytest.approx(2 / 512)
    # k = 0: 1 - alpha^(1/n) exactly; k = 5 of 1000: 0.01048 (beta.ppf(0.95, 6, 995)).
    assert clopper_pearson_upper(0, 150) == pytest.approx(1 - 0.05 ** (1 / 150), rel=1e-9)
    assert clopper_pearson_upper(5, 1000) == pytest.approx(0.010484, abs=2e-6)
    assert clopper_pearson_upper(7, 7) == 1.0
    assert clopper_pearson_upper(3, 100, 0.99) > clopper_pearson_upper(3, 100, 0.95) > 0.03


@pytest.mark.parametrize("call, match", [
    (lambda: wilson_interval(1, 0), "at least one image"),
    (lambda: wilson_interval(5, 4), "successes"),
    (lambda: accuracy_interval([], []), "no images"),
    (lambda: accuracy_interval([1, 2], [1]), "2 predictions for 1 labels"),
    (lambda: paired_difference([1], [1], [1], level=1.5), "strictly between 0 and 1"),
    (lambda: clopper_pearson_upper(3, 2), "0 <= k <= n"),
])
def test_bad_input_is_one_clear_line(call, match):
    with pytest.raises(ClipfuseError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
