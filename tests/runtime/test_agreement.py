"""The one comparator (clipfuse.runtime.agreement): every bound that decides pass/fail can fail, and
is printed. Synthetic outputs with known heads: no engine, no backend."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.core import iospec
from clipfuse.runtime import agreement


def _outputs(rng, n=32, dims=(8, 6), classes=5, head_scale=10.0):
    f = [rng.normal(size=(n, d)) for d in dims]
    f = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in f]
    w = [rng.normal(size=(classes, d)) * head_scale for d in dims]
    z = np.stack([x @ wk.T for x, wk in zip(f, w)], axis=1)
    t = np.full((n, len(dims)), 0.5)
    logits = (t[..., None] * z).sum(1)
    e = np.exp(logits - logits.max(1, keepdims=True))
    out = {iospec.FEATURES: np.concatenate(f, 1), iospec.BACKBONE_LOGITS: z, iospec.TEMPERATURES: t,
           iospec.LOGITS: logits, iospec.PROBS: e / e.sum(1, keepdims=True)}
    backbones = [(f"b{k}:x", d) for k, d in enumerate(dims)]
    norms = [float(np.linalg.norm(wk, axis=1).max()) for wk in w]
    return out, backbones, norms


def _copy(out):
    return {k: v.copy() for k, v in out.items()}


def _run(ref, got, backbones, norms, precision="fp32", **kw):
    return agreement.compare_outputs(ref, got, backbones, iospec.tolerance(precision), norms, **kw)


def test_identical_outputs_pass_and_every_bound_is_reported():
    ref, bbs, norms = _outputs(np.random.default_rng(0))
    r = _run(ref, _copy(ref), bbs, norms)
    assert r["ok"] and r["worst"] is None and r["failures"] == []
    assert {o["output"] for o in r["outputs"]} == set(iospec.OUTPUT_NAMES)
    assert all(b["cosine_bound"] == 0.99999 and b["top1_changed_bound"] == 0.0 for b in r["backbones"])
    assert r["fused"]["top1_changed_bound"] == 0.0 and r["fused"]["top1_agreement"] == 1.0
    text = "\n".join(agreement.format_lines(r)) + agreement.describe_bounds(r["bounds"])
    for bound in ("tolerance", "bound >= 0.99999", "changed <= 0%", "top-1 changed <= 0%", "rtol 0.0001"):
        assert bound in text, bound


def test_probs_bound_fails():
    ref, bbs, norms = _outputs(np.random.default_rng(1))
    got = _copy(ref)
    got[iospec.PROBS][0] += 0.01          # probabilities wrong while the logits are right
    r = _run(ref, got, bbs, norms)
    assert not r["ok"] and r["worst"].startswith("probs: max |err|")


def test_probs_bound_is_not_widened_by_the_head_propagated_term():
    """fp16 with huge head rows (a linear probe on random towers): the probs bound stays inside [0, 1]."""
    ref, bbs, norms = _outputs(np.random.default_rng(2), head_scale=1e4)
    got = _copy(ref)
    got[iospec.FEATURES] += 1e-3                         # features move: the logits' term becomes large
    r = _run(ref, got, bbs, norms, precision="fp16")
    rows = {o["output"]: o for o in r["outputs"]}
    assert rows["logits"]["tolerance"] > 10              # the logits may move that much ...
    assert rows["probs"]["tolerance"] < 0.02             # ... the probabilities may not
    got[iospec.PROBS][:, 0] = 1.0 - got[iospec.PROBS][:, 0]
    r = _run(ref, got, bbs, norms, precision="fp16")
    assert not r["ok"] and any(f.startswith("probs:") for f in r["failures"])


def test_probs_bound_stays_a_check_when_the_logits_really_move():
    """fp16_validation's engine (a linear probe on random RN50) moved its logits by 3.19 in fp16: half of
    that gave probs a tolerance of 1.6, for values in [0, 1]. The shift the logits may add is capped."""
    ref, bbs, norms = _outputs(np.random.default_rng(4), head_scale=1e4)
    got = _copy(ref)
    got[iospec.FEATURES] += 1e-3                         # the heads carry this into large logit moves
    got[iospec.LOGITS] += 3.0                            # and the logits do move (within their bound)
    got[iospec.PROBS][:, 0] = np.clip(got[iospec.PROBS][:, 0] + 0.5, 0, 1)   # half the probability mass moves
    for precision in ("fp32", "fp16", "int8"):
        r = _run(ref, got, bbs, norms, precision=precision)
        rows = {o["output"]: o for o in r["outputs"]}
        cap = iospec.tolerance(precision)["max_probs_shift"]
        assert rows["probs"]["tolerance"] <= 1e-2 + 5e-2 + cap < 0.2, (precision, rows["probs"])
        assert not r["ok"] and any(f.startswith("probs:") for f in r["failures"]), precision
    assert "at most 0.05" in agreement.describe_bounds(iospec.tolerance("fp16"))


def test_logits_bound_fails():
    ref, bbs, norms = _outputs(np.random.default_rng(3))
    got = _copy(ref)
    got[iospec.LOGITS] *= 1.01             # a 1% error the features do not explain
    r = _run(ref, got, bbs, norms)
    assert not r["ok"] and any(f.startswith("logits: max |err|") for f in r["failures"])


def test_backbone_logit_bound_with_exact_heads_fails():
    ref, bbs, norms = _outputs(np.random.default_rng(4))
    got = _copy(ref)
    got[iospec.BACKBONE_LOGITS][:, 1] *= 1.01
    assert _run(ref, got, bbs, norms, precision="fp16")["ok"]      # within fp16's 1e-2 relative ...
    r = _run(ref, got, bbs, norms, precision="fp16", heads_exact=True)
    assert not r["ok"] and any(f.startswith("b1:x: logit error") for f in r["failures"])   # ... not with fp32 heads


def test_cosine_bound_fails():
    rng = np.random.default_rng(5)
    ref, bbs, norms = _outputs(rng)
    got = _copy(ref)
    got[iospec.FEATURES][:, :8] += rng.normal(size=(32, 8)) * 0.15
    r = _run(ref, got, bbs, norms, precision="fp16")
    assert not r["ok"] and any("b0:x: embedding cosine min" in f and "bound 0.999" in f for f in r["failures"])


def _flip(out, rows):
    """Swap the top-2 classes of the fused logits on `rows` (a changed answer)."""
    got = _copy(out)
    for i in rows:
        top = np.argsort(got[iospec.LOGITS][i])[-2:]
        got[iospec.LOGITS][i, top] = got[iospec.LOGITS][i, top[::-1]]
    return got


def test_top1_bound_fails():
    """fp16 allows 5% changed answers: 1 of 32 passes the share bound, 2 of 32 (6.2%) fail it."""
    ref, bbs, norms = _outputs(np.random.default_rng(6))
    tol = dict(iospec.tolerance("fp16"), rtol=10.0)     # isolate the top-1 bounds from the error bounds
    # near ties: 1e-3 margins, flipped by logit errors far inside the error bounds
    near = _copy(ref)
    srt = np.sort(near[iospec.LOGITS], axis=1)
    for i in range(32):
        near[iospec.LOGITS][i, np.argmax(near[iospec.LOGITS][i])] = srt[i, -2] + 1e-3
    one = _flip(near, [0])
    r = agreement.compare_outputs(near, one, bbs, tol, norms)
    assert r["fused"]["top1_changed"] == 1 and r["ok"], r["failures"]
    two = _flip(one, [1])
    r = agreement.compare_outputs(near, two, bbs, tol, norms)
    assert not r["ok"] and r["failures"] == ["fused top-1 changed on 2/32 images (6.2%) > bound 5%"]
    # fp32 allows none
    r = agreement.compare_outputs(near, one, bbs, dict(iospec.tolerance("fp32"), rtol=10.0), norms)
    assert r["failures"] == ["fused top-1 changed on 1/32 images (3.1%) > bound 0%"]


def test_backbone_top1_bound_fails():
    ref, bbs, norms = _outputs(np.random.default_rng(7))
    got = _copy(ref)
    z = got[iospec.BACKBONE_LOGITS]
    z[0, 1] = z[0, 1][::-1].copy()
    r = agreement.compare_outputs(ref, got, bbs, dict(iospec.tolerance("fp32"), rtol=100.0), norms)
    assert not r["ok"] and any(f.startswith("b1:x: top-1 changed on 1/32") for f in r["failures"])


def test_zero_norm_embedding_and_non_finite_outputs():
    ref, bbs, norms = _outputs(np.random.default_rng(8))
    got = _copy(ref)
    got[iospec.FEATURES][:, :8] = 0.0                   # a dead tower: cosine 0, not NaN
    r = _run(ref, got, bbs, norms)
    assert r["backbones"][0]["cosine_min"] == 0.0 and not r["ok"]
    got = _copy(ref)
    got[iospec.BACKBONE_LOGITS][:, 1] = np.nan
    r = _run(ref, got, bbs, norms)
    assert not r["ok"] and r["failures"] == ["non-finite outputs/weights in backbone b1:x (compared run)"]


def test_worst_offender_comes_first():
    rng = np.random.default_rng(9)
    ref, bbs, norms = _outputs(rng)
    got = _copy(ref)
    got[iospec.TEMPERATURES] *= 1.001                   # slightly out
    got[iospec.PROBS][0] += 0.5                         # far out
    r = _run(ref, got, bbs, norms)
    assert r["worst"].startswith("probs") and r["failures"][0] == r["worst"] and len(r["failures"]) >= 2


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tolerance_rows_carry_every_bound(precision):
    row = iospec.tolerance(precision)
    assert set(row) == {"rtol", "atol", "min_cosine", "max_top1_changed", "max_probs_shift", "max_error_to_spread"}
    assert 0 <= row["max_top1_changed"] < 0.062        # 2 of 32 changed (6.2%) must fail
    assert 0 < row["max_probs_shift"] <= 0.05           # a probs bound stays well inside [0, 1]


# ----------------------------------------------------------------------------- error relative to the spread
def _with_features(out, f):
    """`out` with its features replaced by `f`, the other outputs as they were."""
    got = _copy(out)
    got[iospec.FEATURES] = f
    return got


def _collapsed(rng, n=32, dims=(8, 6), signal=0.01):
    """Unit embeddings that share one direction and differ by `signal`: random RN towers embed two
    different digits at cosine 0.99996 (benchmarks/results/feature_spread.md)."""
    parts = []
    for d in dims:
        c = rng.normal(size=d)
        x = c / np.linalg.norm(c) + signal * rng.normal(size=(n, d)) / np.sqrt(d)
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(parts, 1)


def _noisy(f, rng, size):
    return f + size * rng.normal(size=f.shape) / np.sqrt(f.shape[1])


def test_error_to_spread_fails_on_collapsed_features_while_cosine_passes():
    """The int8 failure it was made for: cosine 0.9999 with fp32 (far inside 0.99), error as large as the
    difference between two images."""
    rng = np.random.default_rng(10)
    ref, bbs, norms = _outputs(rng)
    ref = _with_features(ref, _collapsed(rng))
    got = _with_features(ref, _noisy(ref[iospec.FEATURES], rng, 0.01))
    r = _run(ref, got, bbs, norms, precision="int8")
    for b in r["backbones"]:
        assert b["cosine_min"] > 0.999 and b["error_to_spread_bound"] == 0.25
        assert 0.008 < b["feature_spread_median"] < 0.02 and b["error_to_spread"] > 0.5
    assert not r["ok"] and not any("cosine" in f for f in r["failures"])
    lines = [f for f in r["failures"] if "median distance between two images" in f]
    assert len(lines) == 2 and lines[0].startswith(("b0:x: feature error ", "b1:x: feature error "))
    assert "> bound 0.25: these features carry too little between-image signal for this precision" in lines[0]


def test_error_to_spread_passes_on_well_spread_features_with_the_same_noise():
    rng = np.random.default_rng(11)
    ref, bbs, norms = _outputs(rng)                       # random unit embeddings: pairs ~1.4 apart
    got = _with_features(ref, _noisy(ref[iospec.FEATURES], rng, 0.01))
    r = _run(ref, got, bbs, norms, precision="int8")
    for b in r["backbones"]:
        assert b["feature_spread_median"] > 1.0 and b["error_to_spread"] < 0.02
    assert not any("median distance" in f for f in r["failures"])


def test_error_to_spread_fails_in_fp32_at_a_hundredth_of_the_spread():
    rng = np.random.default_rng(12)
    ref, bbs, norms = _outputs(rng)
    f = ref[iospec.FEATURES]
    ok = _run(ref, _with_features(ref, _noisy(f, rng, 1e-4)), bbs, norms, precision="fp32")
    assert all(b["error_to_spread"] < 1e-3 for b in ok["backbones"])
    assert not any("median distance" in x for x in ok["failures"])
    bad = _run(ref, _with_features(ref, _noisy(f, rng, 0.05)), bbs, norms, precision="fp32")
    assert any("median distance" in x and "> bound 0.01:" in x for x in bad["failures"])


def test_error_to_spread_is_not_measured_on_one_image():
    rng = np.random.default_rng(13)
    ref, bbs, norms = _outputs(rng, n=1)
    ref = _with_features(ref, _collapsed(rng, n=1))
    got = _with_features(ref, _noisy(ref[iospec.FEATURES], rng, 0.01))
    r = _run(ref, got, bbs, norms, precision="int8")
    for b in r["backbones"]:
        assert b["error_to_spread"] is None and b["feature_spread_median"] is None
        assert b["feature_error_max"] > 0 and "no pair" in b["error_to_spread_reason"]
    assert not any("median distance" in x for x in r["failures"])
    assert any("error/spread not measured (1 image(s): no pair" in x and "bound <= 0.25" in x
               for x in agreement.format_lines(r))


def test_error_to_spread_with_no_spread_and_with_duplicates():
    """Copies of one image: nothing to compare an error with (not measured; the cosine bound still
    applies). Duplicates among distinct images do not pull the median to 0: only distinct pairs count."""
    rng = np.random.default_rng(14)
    ref, bbs, norms = _outputs(rng)
    f = np.repeat(ref[iospec.FEATURES][:1], 32, axis=0)
    same = _with_features(ref, f)
    r = _run(same, _with_features(same, _noisy(f, rng, 0.5)), bbs, norms, precision="int8")
    for b in r["backbones"]:
        assert b["error_to_spread"] is None and b["feature_spread_median"] == 0.0
        assert "every image embeds the same" in b["error_to_spread_reason"]
    assert not any("median distance" in x for x in r["failures"])
    assert any("embedding cosine min" in x for x in r["failures"])      # the large error is still refused
    # 24 copies of one image and 8 others: most pairs are copies, the median is over the distinct ones
    f = ref[iospec.FEATURES].copy()
    f[8:] = f[0]
    dup = _with_features(ref, f)
    r = _run(dup, _copy(dup), bbs, norms, precision="int8")
    assert all(b["feature_spread_median"] > 1.0 and b["error_to_spread"] == 0.0 for b in r["backbones"])


def test_error_to_spread_zero_norm_embedding_and_sampled_pairs():
    rng = np.random.default_rng(15)
    ref = rng.normal(size=(600, 8))
    got = ref.copy()
    got[3] = 0.0                                           # a dead output: distance 1 from its unit reference
    s = agreement.error_to_spread(ref, got)
    assert s["feature_error_max"] == pytest.approx(1.0)
    u = ref / np.linalg.norm(ref, axis=1, keepdims=True)   # 600 images: a seeded sample of pairs ...
    exact = np.median([np.linalg.norm(u[i] - u[j]) for i in range(600) for j in range(i + 1, 600)])
    assert s["feature_spread_median"] == pytest.approx(exact, rel=0.02)          # ... close to every pair's
    assert agreement.error_to_spread(ref, got) == s                              # and the same every time


def test_error_to_spread_bound_is_printed():
    rng = np.random.default_rng(16)
    ref, bbs, norms = _outputs(rng)
    r = _run(ref, _copy(ref), bbs, norms, precision="fp16")
    text = "\n".join(agreement.format_lines(r))
    assert text.count("(bound <= 0.25)") == 2 and "/ median distance between images" in text
    assert "feature error / median distance between two images <= 0.25 per backbone" in \
        agreement.describe_bounds(r["bounds"])
    # reports recorded before the check existed still print
    old = {k: v for k, v in iospec.tolerance("fp16").items() if k != "max_error_to_spread"}
    assert "<= (not checked)" in agreement.describe_bounds(old)
    for b in r["backbones"]:
        for k in ("feature_error_max", "feature_spread_median", "error_to_spread", "error_to_spread_bound"):
            b.pop(k)
    assert "report predates the check" in "\n".join(agreement.format_lines(r))


def test_fp32_probs_follow_a_probe_logit_rounding_move():
    """precision-default's RN50 single: fp32 rounding behind a probe with rows of norm ~1e4 moved the logits
    by 0.0065 and a probability by 0.0033; fp32's old 0.001 cap refused that correct export. The cap is a
    point now: the same move passes, a broken softmax (5 points) still fails."""
    ref, bbs, norms = _outputs(np.random.default_rng(7), head_scale=1e4)
    got = _copy(ref)
    got[iospec.FEATURES] += 1e-6                        # rounding-level feature moves, which the heads carry
    got[iospec.LOGITS][:, 0] += 0.0065
    got[iospec.PROBS][:, 0] += 0.0033
    r = _run(ref, got, bbs, norms, precision="fp32")
    probs = {o["output"]: o for o in r["outputs"]}["probs"]
    assert probs["max_abs"] <= probs["tolerance"] and not any(f.startswith("probs:") for f in r["failures"]), r["failures"]
    got[iospec.PROBS][:, 0] += 0.05
    r = _run(ref, got, bbs, norms, precision="fp32")
    assert any(f.startswith("probs:") for f in r["failures"])
