"""Honest accuracy figures: one accuracy's interval, and two methods compared on the same images.

At 150 test images one image is 0.67 points and a single accuracy's 95%
interval is about 11 points wide, so "the cascade loses 0.5 points" can only be
said from the PAIRED difference: both methods scored on the same images, where
only the images they disagree on carry information.

    wilson_interval(successes, n, level)        -> Interval   (percent)
    accuracy_interval(pred, labels, level)      -> Interval   (percent)
    paired_difference(pred_a, pred_b, labels)   -> PairedDifference  (a - b, points)
    clopper_pearson_upper(k, n, confidence)     -> float      one-sided upper bound of a rate

Choices:
- A single accuracy: Wilson score interval (closed form, never outside [0, 100],
  sensible at 0 or n successes, unlike the normal approximation).
- A paired difference: percentile bootstrap over images. Resampling N images
  with replacement is the same as drawing the 2x2 table of (a right?, b right?)
  counts from a multinomial with the observed cell shares, so each resample
  costs O(1), not O(N). Identical predictions give exactly [0, 0]. Seeded, so
  the same inputs give the same interval. The exact McNemar p-value (binomial
  test on the discordant images) is given beside it.
- A one-sided upper bound on a rate (the cascade's disagreement with the full
  ensemble): exact Clopper-Pearson, by bisection on the binomial CDF (numpy
  and math only, no scipy).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from clipfuse.core.errors import ClipfuseError

BOOTSTRAP_RESAMPLES = 10000


@dataclass(frozen=True)
class Interval:
    """A rate in percent with its two-sided interval."""

    value: float          # percent
    lo: float             # percent
    hi: float             # percent
    n: int                # images it was measured on
    level: float          # e.g. 0.95
    method: str           # "wilson"

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.lo:.1f}, {self.hi:.1f}]"


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of a minus accuracy of b on the same images, in points, with its interval."""

    difference: float     # points, acc(a) - acc(b)
    lo: float             # points
    hi: float             # points
    n: int                # images
    a_only: int           # images a gets right and b wrong
    b_only: int           # images b gets right and a wrong
    agreement: Interval   # share of images where a and b predict the same class (percent)
    p_value: float        # exact two-sided McNemar (binomial on a_only vs b_only)
    level: float
    method: str           # "bootstrap (N resamples, seed S)"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["agreement"] = self.agreement.to_dict()
        return d

    def __str__(self) -> str:
        return (f"{self.difference:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}] points "
                f"(agreement {self.agreement.value:.1f}%, {self.a_only} vs {self.b_only} discordant)")


def _check_level(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0.0 < float(level) < 1.0):
        raise ClipfuseError(f"confidence level must be strictly between 0 and 1, got {level!r}")
    return float(level)


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + _check_level(level) / 2.0)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of successes / n, in percent."""
    if n <= 0:
        raise ClipfuseError("an accuracy needs at least one image (got n = 0)")
    if not 0 <= successes <= n:
        raise ClipfuseError(f"successes must be in [0, {n}], got {successes}")
    z = _z(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp rounding only: at p = 0 or 1 the bound touches the edge exactly.
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return Interval(100.0 * p, 100.0 * lo, 100.0 * hi, int(n), float(level), "wilson")


def _predictions(pred, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    if p.size == 0:
        raise ClipfuseError(f"{what}: no images (empty predictions)")
    if p.shape != y.shape:
        raise ClipfuseError(f"{what}: {p.size} predictions for {y.size} labels")
    return p, y


def accuracy_interval(pred, labels, level: float = 0.95) -> Interval:
    """Accuracy of predictions (N,) against labels (N,), percent, with its Wilson interval."""
    p, y = _predictions(pred, labels, "accuracy")
    return wilson_interval(int((p == y).sum()), int(p.size), level)


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of a_only ~ Bin(a_only + b_only, 1/2)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(k + 1)]
    return float(min(1.0, 2.0 * sum(math.exp(v) for v in logs)))


def paired_difference(pred_a, pred_b, labels, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> PairedDifference:
    """acc(a) - acc(b) on the same images (points) with a percentile-bootstrap interval, plus agreement.

    pred_a, pred_b, labels: (N,) each.
    """
    a, y = _predictions(pred_a, labels, "paired difference (method a)")
    b, _ = _predictions(pred_b, labels, "paired difference (method b)")
    level = _check_level(level)
    if resamples < 100:
        raise ClipfuseError(f"resamples must be >= 100 for a percentile interval, got {resamples}")
    n = int(y.size)
    ra, rb = a == y, b == y
    cells = np.array([(ra & rb).sum(), (ra & ~rb).sum(), (~ra & rb).sum(), (~ra & ~rb).sum()])   # (4,)
    counts = np.random.default_rng(seed).multinomial(n, cells / n, size=resamples)                  # (R, 4)
    diffs = 100.0 * (counts[:, 1] - counts[:, 2]) / n                                               # (R,)
    alpha = 1.0 - level
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    a_only, b_only = int(cells[1]), int(cells[2])
    return PairedDifference(
        difference=100.0 * (a_only - b_only) / n, lo=float(lo), hi=float(hi), n=n, a_only=a_only, b_only=b_only,
        agreement=wilson_interval(int((a == b).sum()), n, level), p_value=mcnemar_exact_p(a_only, b_only),
        level=level, method=f"bootstrap ({resamples} resamples, seed {seed})")


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Bin(n, p), summed in log space (stable for n in the tens of thousands)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    i = np.arange(k + 1)
    lg = np.vectorize(math.lgamma)
    logs = (math.lgamma(n + 1) - lg(i + 1) - lg(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p))
    top = logs.max()
    return float(math.exp(top) * np.exp(logs - top).sum())


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact upper bound u on a rate seen k times in n: P(X <= k | u) = 1 - confidence.

    The true rate is below u with probability >= confidence (over the draw of the n items).
    """
    confidence = _check_level(confidence)
    if n <= 0 or not 0 <= k <= n:
        raise ClipfuseError(f"Clopper-Pearson bound needs 0 <= k <= n and n > 0, got k = {k}, n = {n}")
    if k == n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = 0.0, 1.0                        # the CDF falls from 1 at p = 0 to 0 at p = 1
    for _ in range(60):                      # 2^-60: far below any rate that matters
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi
