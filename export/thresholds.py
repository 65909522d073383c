"""Exit thresholds for a confidence cascade, chosen and certified on stage logits (numpy only).

Shared by the cascade fit (export/fit/cascade.py: order, score and thresholds chosen together) and
the int8 stages (export/precision/int8_stages.py: thresholds certified again on int8 outputs, order
and score fixed). Routing itself (confidence scores, `route`) lives in clipfuse.runtime.routing, so
the serving runtime uses the very same code.

    required_calibration_images(max_drop, confidence, tries) -> int
    choose_thresholds(stage_logits, stage_costs, config, labels, score) -> thresholds (S - 1,)
    certify_thresholds(stage_logits, stage_costs, config, score) -> thresholds, calibration record
    measure(stage_logits, thresholds, score, stage_costs) -> answers, stages, expected cost

The constraint is on AGREEMENT with the full ensemble, with a bound. Each image the cascade answers
differently can cost at most one correct answer, so acc(cascade) >= acc(full) - disagreement:
bounding disagreement bounds the drop on any data, and needs no labels. The chosen thresholds must
have a one-sided Clopper-Pearson upper bound on the disagreement RATE <= max_drop (at `confidence`,
split Bonferroni-wise over the configurations tried). Zero disagreements on n images certify a rate
of 1 - alpha^(1/n) at best (about 3/n at 95%); fewer images than needed are refused with the number.
Why not labelled accuracy: docs/decisions.md (cascade constraint). Two tighter-looking guards exist for
benchmarks/cascade_study.py only (Bonferroni over stages; a path chosen on half the images and certified
on the other half): on its synthetic stages both kept 0 violations in 20 seeds but cost more, so the
default stays (benchmarks/results/cascade_study.md). What tightens the bound is more images: any image of
the task counts, labelled or not (`fit --certify-on`, export/fit/certify.py).

Threshold search: greedy descent over per-stage grids (quantiles of that stage's calibration
confidence, plus +inf = never leave there). Start with every threshold at +inf (the full ensemble),
and at each step lower, by one notch that changes some image's exit, the threshold whose move costs
the fewest extra disagreements per unit of cost saved while the constraint still holds; stop when
no move does. Exhaustive search is G^(S-1): hopeless for nine stages, and it overfits harder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.routing import MAX_PROB, SCORES, confidence, route

from .paired import clopper_pearson_upper

GUARDED = "agreement-bound"   # agreement with the full ensemble, Clopper-Pearson upper bound (default)
AGREEMENT = "agreement"       # agreement, point estimate (study only)
ACCURACY = "accuracy"         # labelled accuracy within max_drop, point estimate: the prototype (study only)
PER_STAGE = "agreement-bound-per-stage"   # each early stage's disagreements bounded on max_drop / (S - 1) at
                                          # alpha / (S - 1) (Bonferroni over stages; study only)
HOLDOUT = "agreement-holdout"  # greedy path chosen on half the images (point estimate), then the cheapest point
                               # of it that the other half certifies, tested in path order (study only)
CONSTRAINTS = (GUARDED, AGREEMENT, ACCURACY, PER_STAGE, HOLDOUT)
AUTO = "auto"


@dataclass
class CascadeConfig:
    """How fit_cascade chooses thresholds; written into the manifest beside them."""

    max_drop: float = 0.5          # accuracy points the cascade may lose against the full ensemble
    score: str = AUTO              # "max-prob", "margin", or "auto": both, keep the cheaper on calibration
    constraint: str = GUARDED      # see module doc; the other two exist to be compared against
    confidence: float = 0.95       # of the bound, over everything tried (scores x orders, Bonferroni)
    grid: int = 64                 # threshold candidates per stage (quantiles of calibration confidence)

    def check(self) -> "CascadeConfig":
        md = self.max_drop
        if isinstance(md, bool) or not isinstance(md, (int, float)) or not math.isfinite(md) or md < 0:
            raise ClipfuseError(f"--max-drop must be a number of accuracy points >= 0 (e.g. 0.5), got {md!r}")
        if self.score not in SCORES + (AUTO,):
            raise ClipfuseError(f"cascade score {self.score!r} is not one of {', '.join(SCORES + (AUTO,))}")
        if self.constraint not in CONSTRAINTS:
            raise ClipfuseError(f"cascade constraint {self.constraint!r} is not one of {', '.join(CONSTRAINTS)}")
        if not 0.5 <= self.confidence < 1.0:
            raise ClipfuseError(f"cascade confidence must be in [0.5, 1), got {self.confidence!r}")
        if not isinstance(self.grid, int) or self.grid < 2:
            raise ClipfuseError(f"cascade grid must be an integer >= 2, got {self.grid!r}")
        return self

    def scores(self) -> tuple[str, ...]:
        return SCORES if self.score == AUTO else (self.score,)


def required_calibration_images(max_drop: float, confidence: float = 0.95, tries: int = 1) -> int:
    """Fewest calibration images on which ZERO disagreements certify a rate <= max_drop points.

    Clopper-Pearson with k = 0: upper bound 1 - alpha^(1/n) <= r  <=>  n >= ln(alpha) / ln(1 - r),
    with alpha = (1 - confidence) / tries.
    """
    CascadeConfig(max_drop=max_drop, confidence=confidence).check()
    if max_drop <= 0:
        raise ClipfuseError("--max-drop 0 cannot be certified from a finite sample: give a positive number of points")
    r = min(max_drop / 100.0, 1.0)
    if r >= 1.0:
        return 1
    alpha = (1.0 - confidence) / tries
    return int(math.ceil(math.log(alpha) / math.log1p(-r) - 1e-9))


def allowed_disagreements(n: int, max_drop: float, confidence: float) -> int:
    """Largest d with clopper_pearson_upper(d, n) <= max_drop / 100; -1 when even d = 0 is too many."""
    r = max_drop / 100.0
    d = -1
    while d + 1 <= n and clopper_pearson_upper(d + 1, n, confidence) <= r:
        d += 1
    return d


def stage_stack(stage_logits, what: str) -> np.ndarray:
    """-> (S, N, C) float64, with named errors."""
    try:
        Z = np.stack([np.asarray(z, dtype=np.float64) for z in stage_logits])
    except ValueError as e:
        raise ClipfuseError(f"{what}: every stage needs logits of the same shape (N, C) ({e})") from None
    if Z.ndim != 3:
        raise ClipfuseError(f"{what}: expected S arrays of shape (N, C), got shape {Z.shape}")
    if Z.shape[0] < 2:
        raise ClipfuseError(f"a cascade needs at least two backbones (stages); got {Z.shape[0]}: fit a plain ensemble instead")
    if Z.shape[1] == 0:
        raise ClipfuseError(f"{what}: no images")
    return Z


def cum_costs(stage_costs, S: int) -> np.ndarray:
    c = np.asarray(stage_costs, dtype=np.float64).reshape(-1)
    if c.shape != (S,) or not np.isfinite(c).all() or (c <= 0).any():
        raise ClipfuseError(f"stage_costs must be {S} positive numbers (cost each stage adds), got {c.tolist()}")
    return np.cumsum(c)                                                     # (S,) cost of leaving at stage s


def loss_and_check(config: CascadeConfig, full_pred, labels, n: int, tries: int, S: int = 2):
    """(loss(pred) -> int, ok(pred, stage) -> bool, allowed) for the configured constraint (HOLDOUT: the
    point estimate its path is chosen under; choose_thresholds tests the path on the other half)."""
    if config.constraint == ACCURACY:
        if labels is None:
            raise ClipfuseError("the 'accuracy' constraint needs calibration labels")
        y = np.asarray(labels).reshape(-1)
        full_correct = int((full_pred == y).sum())
        allowed = math.floor(config.max_drop / 100.0 * n + 1e-9)           # correct answers it may lose
        return (lambda p: int((p != y).sum())), (lambda p, _: full_correct - int((p == y).sum()) <= allowed), allowed
    loss = lambda p: int((p != full_pred).sum())
    if config.constraint == PER_STAGE:          # d_s: disagreements among images leaving at early stage s
        allowed = allowed_disagreements(n, config.max_drop / (S - 1), 1.0 - (1.0 - config.confidence) / tries / (S - 1))
        return loss, (lambda p, st: all(int(((p != full_pred) & (st == s)).sum()) <= allowed
                                        for s in range(S - 1))), allowed
    if config.constraint in (AGREEMENT, HOLDOUT):
        allowed = math.floor(config.max_drop / 100.0 * n + 1e-9)
    else:
        allowed = allowed_disagreements(n, config.max_drop, 1.0 - (1.0 - config.confidence) / tries)
    return loss, (lambda p, _: loss(p) <= allowed), allowed


def choose_thresholds(stage_logits, stage_costs, config: CascadeConfig, labels=None, score: str = MAX_PROB,
                      tries: int = 1) -> np.ndarray:
    """Greedy threshold search (module doc) on calibration arrays: stage_logits S x (N, C) -> (S - 1,).

    +inf means "never leave at this stage". labels (N,) are needed only by the 'accuracy' constraint.
    HOLDOUT: the path is chosen on the even rows, then walked on the odd rows, which keep each point of it
    while its Clopper-Pearson bound there stays <= max_drop (fixed-sequence testing: the path does not depend
    on the odd rows, so the first failure ends it and the confidence is not split over its points).
    """
    config = config.check()
    Z = stage_stack(stage_logits, "calibration logits")
    S, N, _ = Z.shape
    cum = cum_costs(stage_costs, S)
    conf = np.stack([confidence(z, score) for z in Z], axis=1)             # (N, S)
    stage_pred = Z.argmax(axis=2).T                                         # (N, S)
    rows = np.arange(N) if config.constraint != HOLDOUT else np.arange(0, N, 2)
    loss, ok, _ = loss_and_check(config, stage_pred[rows, -1], None if labels is None else np.asarray(labels)[rows],
                                 rows.size, tries, S)
    grids = [np.concatenate([[np.inf], np.unique(np.quantile(conf[rows, s], np.linspace(0, 1, config.grid)))[::-1]])
             for s in range(S - 1)]                                         # descending, inf first
    path = greedy_path(conf[rows], stage_pred[rows], cum, grids, loss, ok)
    if config.constraint == HOLDOUT:
        held = np.arange(1, N, 2)
        bound = allowed_disagreements(held.size, config.max_drop, 1.0 - (1.0 - config.confidence) / tries)
        full = stage_pred[held, -1]
        kept = path[0]
        for idx in path[1:]:
            stage = route(conf[held], [grids[s][idx[s]] for s in range(S - 1)])
            if int((stage_pred[held, stage] != full).sum()) > bound:
                break
            kept = idx
        path = [kept]
    return np.array([grids[s][path[-1][s]] for s in range(S - 1)])


def greedy_path(conf, stage_pred, cum, grids, loss, ok) -> list[list[int]]:
    """Every point (grid index per early stage) the greedy descent visits, from all +inf to where it stops."""
    S = stage_pred.shape[1]
    rows = np.arange(stage_pred.shape[0])

    def run(ix):
        stage = route(conf, [grids[s][ix[s]] for s in range(S - 1)])
        return cum[stage].mean(), stage_pred[rows, stage], stage

    idx = [0] * (S - 1)
    cost, pred, _ = run(idx)
    path = [list(idx)]
    while True:
        best = None                                                         # (key, s, j, cost, pred)
        for s in range(S - 1):
            for j in range(idx[s] + 1, len(grids[s])):                      # next notch that moves an image
                c, p, st = run(idx[:s] + [j] + idx[s + 1:])
                if c < cost - 1e-12:
                    break
            else:
                continue
            if not ok(p, st):
                continue
            key = ((loss(p) - loss(pred)) / (cost - c), -(cost - c), s)
            if best is None or key < best[0]:
                best = (key, s, j, c, p)
        if best is None:
            return path
        _, s, j, cost, pred = best
        idx[s] = j
        path.append(list(idx))


def exit_rates(stage: np.ndarray, S: int) -> list[float]:
    return (np.bincount(stage, minlength=S) / stage.size).tolist()


def measure_stack(Z: np.ndarray, thresholds, score: str, cum: np.ndarray):
    """-> (pred (N,), stage (N,), expected cost) of the cascade on stage logits Z (S, N, C)."""
    conf = np.stack([confidence(z, score) for z in Z], axis=1)
    stage = route(conf, thresholds)
    return Z.argmax(axis=2)[stage, np.arange(Z.shape[1])], stage, float(cum[stage].mean())


def check_calibration_count(n_cal: int, config: CascadeConfig, tries: int) -> None:
    """ClipfuseError naming the images needed when n_cal cannot certify config.max_drop (guarded constraint)."""
    if config.constraint != GUARDED:
        return
    need = required_calibration_images(config.max_drop, config.confidence, tries)
    if n_cal < need:
        alpha = (1.0 - config.confidence) / tries
        supported = math.ceil(1000.0 * (1.0 - alpha ** (1.0 / n_cal))) / 10.0
        raise ClipfuseError(
            f"cascade: {n_cal} calibration images cannot certify --max-drop {config.max_drop} at "
            f"{config.confidence:.0%} ({tries} configurations tried): it needs >= {need} images; "
            f"label more images or raise --max-drop to >= {supported}")


def calibration_record(Zc: np.ndarray, t, score: str, cum: np.ndarray, config: CascadeConfig, y_cal,
                        tries: int) -> dict:
    """What the chosen thresholds do on the calibration arrays they were chosen on (CascadeFit.calibration)."""
    S, n_cal, _ = Zc.shape
    pred_c, stage_c, cost_c = measure_stack(Zc, t, score, cum)
    full_c = Zc[-1].argmax(axis=1)
    _, _, allowed = loss_and_check(config, full_c, y_cal, n_cal, tries, S)
    d = int((pred_c != full_c).sum())
    return {"n": int(n_cal), "exit_rates": exit_rates(stage_c, S), "expected_cost": cost_c,
            "disagreements": d, "allowed": int(allowed),
            "disagreement_bound": 100.0 * clopper_pearson_upper(d, n_cal, 1.0 - (1.0 - config.confidence) / tries)}


def certify_thresholds(stage_logits, stage_costs, config: CascadeConfig, score: str) -> tuple[np.ndarray, dict]:
    """Thresholds for a FIXED order and score, chosen and bounded on new calibration arrays: (thresholds,
    calibration record). What the int8 stages need (export/precision/int8_stages.py): int8 moves the stages'
    confidences, so fp32's thresholds no longer carry their bound. Order and score were fixed before these
    images were seen, so one configuration is tried (no Bonferroni split). Too few images: ClipfuseError
    naming the number needed (check_calibration_count)."""
    config = replace(config, score=score).check()
    Zc = stage_stack(stage_logits, "calibration logits")
    S, n_cal, _ = Zc.shape
    check_calibration_count(n_cal, config, 1)
    cum = cum_costs(stage_costs, S)
    t = choose_thresholds(Zc, stage_costs, config, score=score, tries=1)
    return t, calibration_record(Zc, t, score, cum, config, None, 1)


def measure(stage_logits, thresholds, score: str, stage_costs) -> tuple[np.ndarray, np.ndarray, float]:
    """(answers (N,), stage that answered (N,) 0-based, expected cost) of a cascade on every stage's logits."""
    Z = stage_stack(stage_logits, "stage logits")
    return measure_stack(Z, thresholds, score, cum_costs(stage_costs, Z.shape[0]))
