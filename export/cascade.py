"""Fit a confidence cascade: per-stage thresholds (and score, and stage order) chosen on data.

Inputs are arrays another step computed: for each stage s = 0..S-1 (stage s
fuses the first s + 1 backbones of an order, with a controller fitted for
exactly them), that stage's fused logits on a calibration split and on a test
split. The last stage is the full ensemble. Routing itself (confidence scores,
`route`) lives in clipfuse.runtime.routing so the serving runtime uses the
very same code.

    required_calibration_images(max_drop, confidence, tries) -> int
    choose_thresholds(stage_logits, stage_costs, config, labels, score) -> thresholds (S - 1,)
    certify_thresholds(stage_logits, stage_costs, config, score) -> thresholds, calibration record
                                          (order and score fixed: the int8 stages' thresholds)
    fit_cascade(calib_logits, test_logits, stage_costs, names, config, ...) -> CascadeFit
    candidate_orders(costs, accuracies)   -> {rule: order}
    fit_cascade_orders(candidates, config, ...) -> CascadeFit of the cheapest order

Why the constraint is on AGREEMENT with a bound. A prototype searched
thresholds so that labelled calibration accuracy stayed within max_drop of the
full ensemble; on 150 images it met the constraint there and lost 3-4 points
on test. Two fixes, both here (CascadeConfig.constraint):
- Target agreement with the full ensemble's own answers, not labels. Each
  image the cascade answers differently can cost at most one correct answer,
  so acc(cascade) >= acc(full) - disagreement: bounding disagreement bounds the
  drop, on any data, and needs no labels. It also removes the loophole the
  labelled search exploits (images it "gains" by chance pay for images it loses).
- Bound it: the chosen thresholds must have a one-sided Clopper-Pearson upper
  bound on the disagreement RATE <= max_drop (at `confidence`, split
  Bonferroni-wise over the scores and orders tried), not just a point estimate.
  The price: zero disagreements on n images certify a rate of 1 - alpha^(1/n)
  at best (3/n at 95%), so a 0.5-point drop needs >= 598 calibration images;
  fewer is refused with the number needed.
benchmarks/cascade_study.py measures all three constraints on synthetic data
(naive labelled, agreement point estimate, agreement bound):
benchmarks/results/cascade_study.md.

Threshold search: greedy descent over per-stage grids (quantiles of that
stage's calibration confidence, plus +inf = never leave there). Start with
every threshold at +inf (the full ensemble, disagreement 0); at each step
lower, by one grid notch that changes some image's exit, the threshold whose
move costs the fewest extra disagreements per unit of cost saved while the
constraint still holds; stop when no move does. Exhaustive search is G^(S-1)
(hopeless for nine stages) and, as the prototype showed, overfits harder.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from clipfuse.errors import ClipfuseError
from clipfuse.export.paired import accuracy_interval, clopper_pearson_upper, paired_difference
from clipfuse.runtime.routing import MAX_PROB, SCORES, confidence, route

GUARDED = "agreement-bound"   # agreement with the full ensemble, Clopper-Pearson upper bound (default)
AGREEMENT = "agreement"       # agreement, point estimate (study only)
ACCURACY = "accuracy"         # labelled accuracy within max_drop, point estimate: the prototype (study only)
CONSTRAINTS = (GUARDED, AGREEMENT, ACCURACY)
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


def _stage_stack(stage_logits, what: str) -> np.ndarray:
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


def _cum_costs(stage_costs, S: int) -> np.ndarray:
    c = np.asarray(stage_costs, dtype=np.float64).reshape(-1)
    if c.shape != (S,) or not np.isfinite(c).all() or (c <= 0).any():
        raise ClipfuseError(f"stage_costs must be {S} positive numbers (cost each stage adds), got {c.tolist()}")
    return np.cumsum(c)                                                     # (S,) cost of leaving at stage s


def _loss_and_check(config: CascadeConfig, full_pred, labels, n: int, tries: int):
    """(loss(pred) -> int, ok(pred) -> bool, allowed) for the configured constraint."""
    if config.constraint == ACCURACY:
        if labels is None:
            raise ClipfuseError("the 'accuracy' constraint needs calibration labels")
        y = np.asarray(labels).reshape(-1)
        full_correct = int((full_pred == y).sum())
        allowed = math.floor(config.max_drop / 100.0 * n + 1e-9)           # correct answers it may lose
        return (lambda p: int((p != y).sum())), (lambda p: full_correct - int((p == y).sum()) <= allowed), allowed
    if config.constraint == AGREEMENT:
        allowed = math.floor(config.max_drop / 100.0 * n + 1e-9)
    else:
        allowed = allowed_disagreements(n, config.max_drop, 1.0 - (1.0 - config.confidence) / tries)
    loss = lambda p: int((p != full_pred).sum())
    return loss, (lambda p: loss(p) <= allowed), allowed


def choose_thresholds(stage_logits, stage_costs, config: CascadeConfig, labels=None, score: str = MAX_PROB,
                      tries: int = 1) -> np.ndarray:
    """Greedy threshold search (module doc) on calibration arrays: stage_logits S x (N, C) -> (S - 1,).

    +inf means "never leave at this stage". labels (N,) are needed only by the 'accuracy' constraint.
    """
    config = config.check()
    Z = _stage_stack(stage_logits, "calibration logits")
    S, N, _ = Z.shape
    cum = _cum_costs(stage_costs, S)
    conf = np.stack([confidence(z, score) for z in Z], axis=1)             # (N, S)
    stage_pred = Z.argmax(axis=2).T                                         # (N, S)
    loss, ok, _ = _loss_and_check(config, stage_pred[:, -1], labels, N, tries)
    grids = [np.concatenate([[np.inf], np.unique(np.quantile(conf[:, s], np.linspace(0, 1, config.grid)))[::-1]])
             for s in range(S - 1)]                                         # descending, inf first
    rows = np.arange(N)

    def run(ix):
        stage = route(conf, [grids[s][ix[s]] for s in range(S - 1)])
        return cum[stage].mean(), stage_pred[rows, stage]

    idx = [0] * (S - 1)
    cost, pred = run(idx)
    while True:
        best = None                                                         # (ratio, -saving, s, j, cost, pred)
        for s in range(S - 1):
            for j in range(idx[s] + 1, len(grids[s])):                      # next notch that moves an image
                c, p = run(idx[:s] + [j] + idx[s + 1:])
                if c < cost - 1e-12:
                    break
            else:
                continue
            if not ok(p):
                continue
            key = ((loss(p) - loss(pred)) / (cost - c), -(cost - c), s)
            if best is None or key < best[0]:
                best = (key, s, j, c, p)
        if best is None:
            break
        _, s, j, cost, pred = best
        idx[s] = j
    return np.array([grids[s][idx[s]] for s in range(S - 1)])


def _exits(stage: np.ndarray, S: int) -> list[float]:
    return (np.bincount(stage, minlength=S) / stage.size).tolist()


@dataclass
class CascadeFit:
    """A fitted cascade and what it was measured to do (JSON-serialisable through to_dict)."""

    names: list[str]              # backbone added at each stage, in stage order
    score: str                    # confidence score used
    thresholds: list[float]       # (S - 1,), inf = never leave there
    config: dict                  # CascadeConfig as fitted
    cum_costs: list[float]        # (S,) cost of an image leaving at stage s
    calibration: dict             # n, exit_rates, expected_cost, disagreements, allowed, disagreement_bound
    test: dict                    # n, exit_rates, expected_cost, cost_fraction, accuracies, paired difference
    scores_tried: dict            # score -> calibration expected cost (the reason for `score`)
    orders_tried: dict | None = None   # rule -> {names, calibration expected cost}, when the order was chosen

    def to_manifest(self) -> dict:
        """What the runtime needs (order, score, thresholds with null = never) and the expected exit rates."""
        return {"order": self.names, "score": self.score,
                "thresholds": [None if math.isinf(t) else float(t) for t in self.thresholds],
                "expected_exit_rates": self.test["exit_rates"], "max_drop": self.config["max_drop"],
                "constraint": self.config["constraint"]}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]
        return d


def _measure(Z: np.ndarray, thresholds, score: str, cum: np.ndarray):
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


def _calibration_record(Zc: np.ndarray, t, score: str, cum: np.ndarray, config: CascadeConfig, y_cal,
                        tries: int) -> dict:
    """What the chosen thresholds do on the calibration arrays they were chosen on (CascadeFit.calibration)."""
    S, n_cal, _ = Zc.shape
    pred_c, stage_c, cost_c = _measure(Zc, t, score, cum)
    full_c = Zc[-1].argmax(axis=1)
    _, _, allowed = _loss_and_check(config, full_c, y_cal, n_cal, tries)
    d = int((pred_c != full_c).sum())
    return {"n": int(n_cal), "exit_rates": _exits(stage_c, S), "expected_cost": cost_c,
            "disagreements": d, "allowed": int(allowed),
            "disagreement_bound": 100.0 * clopper_pearson_upper(d, n_cal, 1.0 - (1.0 - config.confidence) / tries)}


def certify_thresholds(stage_logits, stage_costs, config: CascadeConfig, score: str) -> tuple[np.ndarray, dict]:
    """Thresholds for a FIXED order and score, chosen and bounded on new calibration arrays: (thresholds,
    calibration record). What the int8 stages need (export/int8_cascade.py): int8 moves the stages'
    confidences, so fp32's thresholds no longer carry their bound. Order and score were fixed before these
    images were seen, so one configuration is tried (no Bonferroni split). Too few images: ClipfuseError
    naming the number needed (check_calibration_count)."""
    config = replace(config, score=score).check()
    Zc = _stage_stack(stage_logits, "calibration logits")
    S, n_cal, _ = Zc.shape
    check_calibration_count(n_cal, config, 1)
    cum = _cum_costs(stage_costs, S)
    t = choose_thresholds(Zc, stage_costs, config, score=score, tries=1)
    return t, _calibration_record(Zc, t, score, cum, config, None, 1)


def measure(stage_logits, thresholds, score: str, stage_costs) -> tuple[np.ndarray, np.ndarray, float]:
    """(answers (N,), stage that answered (N,) 0-based, expected cost) of a cascade on every stage's logits."""
    Z = _stage_stack(stage_logits, "stage logits")
    return _measure(Z, thresholds, score, _cum_costs(stage_costs, Z.shape[0]))


def fit_cascade(calib_logits, test_logits, stage_costs, names=None, config: CascadeConfig | None = None,
                calib_labels=None, test_labels=None, tries: int = 1) -> CascadeFit:
    """Choose score and thresholds on the calibration split; measure the cascade on the test split.

    calib_logits: S arrays (N_cal, C); test_logits: S arrays (N_test, C); stage_costs (S,): the
    cost each stage ADDS (its backbone's ms or GFLOPs, heads and controller included if measured so).
    calib_labels (N_cal,): only for the 'accuracy' constraint (the guarded one needs no labels).
    test_labels (N_test,): required. tries: configurations fitted beside this one (orders), for the
    Bonferroni split of the confidence.
    """
    config = (config or CascadeConfig()).check()
    Zc = _stage_stack(calib_logits, "calibration logits")
    Zt = _stage_stack(test_logits, "test logits")
    S, n_cal, C = Zc.shape
    if Zt.shape[0] != S or Zt.shape[2] != C:
        raise ClipfuseError(f"test logits have {Zt.shape[0]} stages x {Zt.shape[2]} classes, calibration {S} x {C}")
    if test_labels is None or np.asarray(test_labels).reshape(-1).shape != (Zt.shape[1],):
        raise ClipfuseError(f"fit_cascade needs test_labels for the {Zt.shape[1]} test images")
    names = [str(n) for n in (names if names is not None else range(S))]
    if len(names) != S:
        raise ClipfuseError(f"{len(names)} stage names for {S} stages")
    cum = _cum_costs(stage_costs, S)
    scores = config.scores()
    tries_all = tries * len(scores)
    check_calibration_count(n_cal, config, tries_all)
    y_cal = None if calib_labels is None else np.asarray(calib_labels).reshape(-1)
    if y_cal is not None and y_cal.shape != (n_cal,):
        raise ClipfuseError(f"{y_cal.size} calibration labels for {n_cal} calibration images")

    fits = {}
    for score in scores:
        t = choose_thresholds(Zc, stage_costs, config, labels=y_cal, score=score, tries=tries_all)
        fits[score] = (t, _measure(Zc, t, score, cum))
    # Cheaper on calibration wins; ties go to max-prob (the published default), listed first in SCORES.
    score = min(scores, key=lambda s: (fits[s][1][2], scores.index(s)))
    t = fits[score][0]
    calibration = _calibration_record(Zc, t, score, cum, config, y_cal, tries_all)

    y = np.asarray(test_labels).reshape(-1)
    pred_t, stage_t, cost_t = _measure(Zt, t, score, cum)
    full_t = Zt[-1].argmax(axis=1)
    diff = paired_difference(pred_t, full_t, y)
    test = {"n": int(y.size), "exit_rates": _exits(stage_t, S), "expected_cost": cost_t,
            "cost_fraction": cost_t / float(cum[-1]),
            "accuracy_cascade": accuracy_interval(pred_t, y).to_dict(),
            "accuracy_full": accuracy_interval(full_t, y).to_dict(),
            "paired_difference": diff.to_dict(),
            "drop": -diff.difference, "within_max_drop": bool(-diff.difference <= config.max_drop)}
    return CascadeFit(names=names, score=score, thresholds=[float(v) for v in t], config=asdict(config),
                      cum_costs=cum.tolist(), calibration=calibration, test=test,
                      scores_tried={s: fits[s][1][2] for s in scores})


def candidate_orders(costs, accuracies) -> dict[str, list[int]]:
    """Stage orders worth fitting: cheapest first (Wang et al.) and by accuracy per unit cost.

    costs, accuracies: (K,) per backbone (accuracy of each single backbone on labelled data the
    thresholds are not scored on). Duplicate orders are dropped; ties keep the given order.
    """
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if c.size < 2 or c.shape != a.shape:
        raise ClipfuseError(f"candidate_orders needs >= 2 backbones with one cost and one accuracy each, got {c.size} and {a.size}")
    if not np.isfinite(c).all() or (c <= 0).any():
        raise ClipfuseError(f"backbone costs must be positive numbers, got {c.tolist()}")
    out = {"cheapest-first": np.argsort(c, kind="stable").tolist(),
           "accuracy-per-cost": np.argsort(-a / c, kind="stable").tolist()}
    if out["accuracy-per-cost"] == out["cheapest-first"]:
        del out["accuracy-per-cost"]
    return out


def fit_cascade_orders(candidates: dict, config: CascadeConfig | None = None, calib_labels=None,
                       test_labels=None) -> CascadeFit:
    """Fit one cascade per candidate order and keep the one with the lowest CALIBRATION expected cost.

    candidates: {rule: (calib_logits, test_logits, stage_costs, names)}, each as fit_cascade takes
    them (the wiring fits a controller per prefix of each order). The confidence is split over
    every order and score tried, so the kept cascade's bound still holds at config.confidence.
    """
    if not candidates:
        raise ClipfuseError("fit_cascade_orders needs at least one candidate order")
    config = (config or CascadeConfig()).check()
    fits = {rule: fit_cascade(cl, tl, costs, names, config, calib_labels, test_labels, tries=len(candidates))
            for rule, (cl, tl, costs, names) in candidates.items()}
    rules = list(fits)
    best = min(rules, key=lambda r: (fits[r].calibration["expected_cost"], rules.index(r)))
    return replace(fits[best], orders_tried={r: {"names": f.names, "calibration_expected_cost": f.calibration["expected_cost"]}
                                             for r, f in fits.items()})
