"""The one comparator (clipfuse.runtime.comparator): every bound that decides pass/fail can fail, and
is printed. Synthetic outputs with known heads: no engine, no backend."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse import iospec
from clipfuse.runtime import comparator


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
    return comparator.compare_outputs(ref, got, backbones, iospec.tolerance(precision), norms, **kw)


def test_identical_outputs_pass_and_every_bound_is_reported():
    ref, bbs, norms = _outputs(np.random.default_rng(0))
    r = _run(ref, _copy(ref), bbs, norms)
    assert r["ok"] and r["worst"] is None and r["failures"] == []
    assert {o["output"] for o in r["outputs"]} == set(iospec.OUTPUT_NAMES)
    assert all(b["cosine_bound"] == 0.99999 and b["top1_changed_bound"] == 0.0 for b in r["backbones"])
    assert r["fused"]["top1_changed_bound"] == 0.0 and r["fused"]["top1_agreement"] == 1.0
    text = "\n".join(comparator.format_lines(r)) + comparator.describe_bounds(r["bounds"])
    for bound in ("tolerance", "bound >= 0.99999", "changed <= 0%", "top-1 changed <= 0%", "rtol 0.0001"):
        assert bound in text, bound


def test_probs_bound_fails():
    ref, bbs, norms = _outputs(np.random.default_rng(1))
    got = _copy(ref)
    got[iospec.PROBS][0] += 0.01          # probabilities wrong while the logits are right
    r = _run(ref, got, bbs, norms)
    assert not r["ok"] and r["worst"].startswith("probs: max |err|")


def test_probs_bound_is_not_widened_by_the_head_propagated_term():
    """fp16 with huge head rows (a linear probe on random towers) once printed 74.4 on probs in [0, 1]."""
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
    assert "at most 0.05" in comparator.describe_bounds(iospec.tolerance("fp16"))


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
    r = comparator.compare_outputs(near, one, bbs, tol, norms)
    assert r["fused"]["top1_changed"] == 1 and r["ok"], r["failures"]
    two = _flip(one, [1])
    r = comparator.compare_outputs(near, two, bbs, tol, norms)
    assert not r["ok"] and r["failures"] == ["fused top-1 changed on 2/32 images (6.2%) > bound 5%"]
    # fp32 allows none
    r = comparator.compare_outputs(near, one, bbs, dict(iospec.tolerance("fp32"), rtol=10.0), norms)
    assert r["failures"] == ["fused top-1 changed on 1/32 images (3.1%) > bound 0%"]


def test_backbone_top1_bound_fails():
    ref, bbs, norms = _outputs(np.random.default_rng(7))
    got = _copy(ref)
    z = got[iospec.BACKBONE_LOGITS]
    z[0, 1] = z[0, 1][::-1].copy()
    r = comparator.compare_outputs(ref, got, bbs, dict(iospec.tolerance("fp32"), rtol=100.0), norms)
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
    assert set(row) == {"rtol", "atol", "min_cosine", "max_top1_changed", "max_probs_shift"}
    assert 0 <= row["max_top1_changed"] < 0.062        # the 6.2% that once passed must fail
    assert 0 < row["max_probs_shift"] <= 0.05           # a probs bound stays well inside [0, 1]
