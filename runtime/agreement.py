"""The one comparator: do two runs of the same ensemble agree within a precision's tolerance?

Used by export validation (ONNX Runtime against PyTorch, export/graph/onnx_export.py), fp16 and int8
validation (export/precision/validate.py) and `clipfuse compare` (runtime/compare.py). Pure numpy: it
sees outputs, never a backend.

    report = compare_outputs(ref, got, backbones=[("RN50:openai", 1024), ...],
                             tol=iospec.tolerance("fp16"), head_norms=head_row_norms(folder, K))

Bounds (every one printed with the figure it bounds, every one able to fail):

    per output      max |got - ref| <= atol + rtol * max |ref|, plus
                      backbone_logits: the head-propagated term, max_k ||W_k|| * max ||df_k||
                      logits:          sum_k max t_k * ||W_k|| * ||df_k|| + |dt_k| * max |z_k|
                      probs:           half the measured logit error, at most half the logits' term
                                       and at most max_probs_shift (softmax moves no probability
                                       further than half the largest logit move; the cap keeps the
                                       bound a check on values in [0, 1])
    per backbone    embedding cosine >= min_cosine; share of changed top-1 <= max_top1_changed;
                    error-to-spread <= max_error_to_spread
    fused top-1     share of changed top-1 <= max_top1_changed

Error-to-spread sees what an absolute cosine bound cannot: an error larger than the signal that
tells two images apart. With u_i, v_i the reference and compared embeddings scaled to unit norm,
error = max_i ||v_i - u_i||, spread = the median over pairs i < j of distinct reference embeddings
of ||u_i - u_j|| (all pairs up to 512 images, beyond that a seeded sample of 130,816 pairs).
With fewer than two images, or when every image embeds the same, it is recorded as not measured
(None, with the reason), not failed; the other bounds still apply.

||W_k|| is the largest head row norm, max_c ||W_k[c]||: z_k = f_k @ W_k.T + b_k, so a logit moves at
most that times the feature error (Cauchy-Schwarz). Linear probes on random towers can have rows of
1e3-1e4, where fp32 feature differences legitimately move logits by 1e-4 relative. Why these bounds,
with the figures that showed each was needed: docs/decisions.md, "The comparator's bounds".
"""
from __future__ import annotations

import numpy as np

from clipfuse.core import iospec


def _arr(outputs: dict, name: str) -> np.ndarray:
    return np.asarray(outputs[name], np.float64)


def _non_finite_line(outputs: dict, backbones, which: str) -> str | None:
    """One line naming the first backbone (or else output) whose values are NaN or inf, or None."""
    bad = [n for n in iospec.OUTPUT_NAMES if n in outputs and not np.isfinite(_arr(outputs, n)).all()]
    if not bad:
        return None
    z, f, lo = _arr(outputs, iospec.BACKBONE_LOGITS), _arr(outputs, iospec.FEATURES), 0
    for k, (name, dim) in enumerate(backbones):
        if not (np.isfinite(z[:, k]).all() and np.isfinite(f[:, lo:lo + dim]).all()):
            return f"non-finite outputs/weights in backbone {name} ({which})"
        lo += dim
    return f"non-finite outputs (NaN or inf) in {', '.join(bad)} ({which})"


_SPREAD_ALL_PAIRS = 512                   # images up to which every pair is measured
_SPREAD_SAMPLE = _SPREAD_ALL_PAIRS * (_SPREAD_ALL_PAIRS - 1) // 2
_SPREAD_SEED = 0


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero row stays zero (the zero-norm guard)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def _pair_distances(u: np.ndarray) -> np.ndarray:
    """||u_i - u_j|| over pairs i < j: all of them up to _SPREAD_ALL_PAIRS rows, else a seeded sample."""
    n = len(u)
    if n <= _SPREAD_ALL_PAIRS:
        return np.concatenate([np.linalg.norm(u[i + 1:] - u[i], axis=1) for i in range(n - 1)])
    rng = np.random.default_rng(_SPREAD_SEED)
    i = rng.integers(0, n, _SPREAD_SAMPLE)
    j = (i + rng.integers(1, n, _SPREAD_SAMPLE)) % n      # j != i, uniform over the others
    return np.concatenate([np.linalg.norm(u[i[s:s + 4096]] - u[j[s:s + 4096]], axis=1)
                           for s in range(0, _SPREAD_SAMPLE, 4096)])


def error_to_spread(ref_f: np.ndarray, got_f: np.ndarray) -> dict:
    """One backbone's feature error relative to the median distance between two images (module docstring).

    ref_f, got_f: (N, D) embeddings of the same images. Returns feature_error_max, feature_spread_median
    (None when not measurable), error_to_spread (None when not measurable) and, then, the reason."""
    u, v = _unit(ref_f), _unit(got_f)
    err = float(np.linalg.norm(v - u, axis=1).max()) if len(u) else 0.0
    out = {"feature_error_max": err, "feature_spread_median": None, "error_to_spread": None}
    if len(u) < 2:
        return {**out, "error_to_spread_reason": f"{len(u)} image(s): no pair to measure a spread on"}
    d = _pair_distances(u)
    d = d[d > 0]
    if not d.size:
        return {**out, "feature_spread_median": 0.0,
                "error_to_spread_reason": "every image embeds the same in the reference run: no spread to measure"}
    spread = float(np.median(d))
    return {**out, "feature_spread_median": spread, "error_to_spread": err / spread}


def _top1_margin(logits: np.ndarray) -> np.ndarray:
    if logits.shape[-1] < 2:
        return np.full(logits.shape[:-1], np.inf)
    srt = np.sort(logits, axis=-1)
    return srt[..., -1] - srt[..., -2]


# With heads_exact (both runs computed everything after the raw embeddings in fp32, as
# model.fp16.onnx does), a backbone's logits may move only by what its head carries from the
# features, plus a 1% + 1e-4 margin for fp32 rounding: an fp16 head or a misplaced cast adds ~1e-3
# relative on top and fails.
EXACT_MARGIN_REL, EXACT_MARGIN_ABS = 0.01, 1e-4


def compare_outputs(ref: dict, got: dict, backbones, tol: dict, head_norms, heads_exact: bool = False) -> dict:
    """Compare `got` with `ref` (dicts of iospec outputs, same images in the same order).

    backbones: [(name, embed_dim)] in graph order (the slices of the features output).
    tol: a row of iospec.TOLERANCES. head_norms: max_c ||W_k[c]|| per backbone.
    heads_exact: per-backbone and fused logits held to the head-propagated term alone (see above).
    Returns a JSON-able report: "outputs", "backbones", "fused", "bounds", "worst", "ok", "failures".
    """
    backbones = [(str(n), int(d)) for n, d in backbones]
    fails: list[tuple[float, str]] = []      # (how far past its bound, line): the worst comes first
    lines = [_non_finite_line(out, backbones, which) for out, which in ((ref, "reference run"), (got, "compared run"))]
    lines = [x for x in lines if x]
    if lines:
        return {"images": len(np.asarray(ref[iospec.LOGITS])), "outputs": [], "backbones": [], "fused": {},
                "bounds": dict(tol), "worst": lines[0], "ok": False, "failures": lines}

    f_ref, f_got = _arr(ref, iospec.FEATURES), _arr(got, iospec.FEATURES)
    z_ref, z_got = _arr(ref, iospec.BACKBONE_LOGITS), _arr(got, iospec.BACKBONE_LOGITS)
    t_ref, t_got = _arr(ref, iospec.TEMPERATURES), _arr(got, iospec.TEMPERATURES)
    max_changed = tol.get("max_top1_changed", 0.0)
    n = len(f_ref)

    rows_b, dz, lo = [], [], 0
    for k, (name, dim) in enumerate(backbones):
        hi = lo + dim
        a, g = f_ref[:, lo:hi], f_got[:, lo:hi]
        # the zero-norm guard: an all-zero embedding has cosine 0 with anything, not NaN
        cos = (a * g).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(g, axis=1), 1e-30)
        df = float(np.linalg.norm(a - g, axis=1).max()) if n else 0.0
        dz.append(float(head_norms[k]) * df)
        same = z_ref[:, k].argmax(-1) == z_got[:, k].argmax(-1) if n else np.ones(0, bool)
        err = float(np.abs(z_ref[:, k] - z_got[:, k]).max()) if n else 0.0
        scale = float(np.abs(z_ref[:, k]).max()) if n else 0.0
        row = {"backbone": name, "cosine_mean": float(cos.mean()) if n else 1.0,
               "cosine_min": float(cos.min()) if n else 1.0, "cosine_bound": tol["min_cosine"],
               "logits_max_abs": err, "logits_max_rel": err / scale if scale else err,
               "top1_agreement": float(same.mean()) if n else 1.0,
               "top1_changed": int((~same).sum()), "top1_changed_bound": max_changed}
        row.update(error_to_spread(a, g), error_to_spread_bound=tol["max_error_to_spread"])
        rows_b.append(row)
        if row["cosine_min"] < tol["min_cosine"]:
            fails.append((tol["min_cosine"] - row["cosine_min"],
                          f"{name}: embedding cosine min {row['cosine_min']:.6f} < bound {tol['min_cosine']}"))
        ratio, r_bound = row["error_to_spread"], row["error_to_spread_bound"]
        if ratio is not None and ratio > r_bound:
            fails.append(((ratio - r_bound) / r_bound,
                          f"{name}: feature error {row['feature_error_max']:.3g} is {ratio:.3g}x the median distance "
                          f"between two images ({row['feature_spread_median']:.3g}) > bound {r_bound:g}: these "
                          "features carry too little between-image signal for this precision"))
        if 1 - row["top1_agreement"] > max_changed:
            fails.append((1 - row["top1_agreement"] - max_changed,
                          f"{name}: top-1 changed on {row['top1_changed']}/{n} images "
                          f"({(1 - row['top1_agreement']) * 100:.1f}%) > bound {max_changed * 100:g}%"))
        lo = hi

    dz_arr = np.array(dz) if dz else np.zeros(0)
    dt = np.abs(t_ref - t_got).max(0) if n else np.zeros(len(dz))
    z_max = np.abs(z_ref).max(axis=(0, 2)) if n else np.zeros(len(dz))
    d_logits = float((t_ref.max(0) * dz_arr + dt * z_max).sum()) if n else 0.0
    l_ref, l_got = _arr(ref, iospec.LOGITS), _arr(got, iospec.LOGITS)
    logit_err = float(np.abs(l_ref - l_got).max()) if l_ref.size and l_ref.shape == l_got.shape else 0.0
    extra = {iospec.BACKBONE_LOGITS: float(dz_arr.max()) if dz else 0.0, iospec.LOGITS: d_logits,
             iospec.PROBS: min(0.5 * min(logit_err, d_logits), tol.get("max_probs_shift", 0.05))}
    for k, row in enumerate(rows_b):
        if heads_exact:
            row["logits_bound"] = dz[k] * (1 + EXACT_MARGIN_REL) + EXACT_MARGIN_ABS
        else:
            row["logits_bound"] = tol["atol"] + tol["rtol"] * float(np.abs(z_ref[:, k]).max() if n else 0.0) + dz[k]
        if row["logits_max_abs"] > row["logits_bound"]:
            fails.append(((row["logits_max_abs"] - row["logits_bound"]) / row["logits_bound"],
                          f"{row['backbone']}: logit error {row['logits_max_abs']:.3g} > bound {row['logits_bound']:.3g}"))

    rows_o = []
    for name in iospec.OUTPUT_NAMES:
        a, g = _arr(ref, name), _arr(got, name)
        if a.shape != g.shape:
            rows_o.append({"output": name, "max_abs": float("inf"), "max_rel": float("inf"), "tolerance": 0.0,
                           "ok": False})
            fails.append((float("inf"), f"{name}: shape {g.shape} != reference {a.shape}"))
            continue
        scale = float(np.abs(a).max()) if a.size else 0.0
        err = float(np.abs(a - g).max()) if a.size else 0.0
        bound = tol["atol"] + tol["rtol"] * scale + extra.get(name, 0.0)
        ok = err <= bound
        rows_o.append({"output": name, "max_abs": err, "max_rel": err / scale if scale else err,
                       "tolerance": bound, "propagated": extra.get(name, 0.0), "ok": bool(ok)})
        if not ok:
            fails.append(((err - bound) / bound if bound else float("inf"),
                          f"{name}: max |err| {err:.3g} > tolerance {bound:.3g}"))

    fused = {"logits_max_abs": logit_err, "top1_agreement": 1.0, "top1_changed": 0, "top1_changed_bound": max_changed}
    if l_ref.shape == l_got.shape and n:
        same = l_ref.argmax(-1) == l_got.argmax(-1)
        margin = _top1_margin(l_ref)
        scale = float(np.abs(l_ref).max())
        if heads_exact:
            fused_bound = float((t_ref.max(0) * np.array([r["logits_bound"] for r in rows_b])).sum()) + EXACT_MARGIN_ABS
            if logit_err > fused_bound:
                fails.append(((logit_err - fused_bound) / fused_bound,
                              f"fused logits: error {logit_err:.3g} > bound {fused_bound:.3g}"))
        else:
            fused_bound = tol["atol"] + tol["rtol"] * scale + d_logits
        fused.update(logits_max_rel=logit_err / scale if scale else logit_err, logits_bound=fused_bound,
                     top1_agreement=float(same.mean()), top1_changed=int((~same).sum()),
                     ref_top2_margin_median=float(np.median(margin)),
                     probs_max_abs=float(np.abs(_arr(ref, iospec.PROBS) - _arr(got, iospec.PROBS)).max()))
        if 1 - same.mean() > max_changed:
            fails.append((1 - float(same.mean()) - max_changed,
                          f"fused top-1 changed on {fused['top1_changed']}/{n} images "
                          f"({(1 - same.mean()) * 100:.1f}%) > bound {max_changed * 100:g}%"))
    fails.sort(key=lambda f: -f[0])
    return {"images": int(n), "outputs": rows_o, "backbones": rows_b, "fused": fused,
            "top1_agreement": fused["top1_agreement"],
            "bounds": {**tol, "heads_exact": heads_exact,
                       "logits": (f"max_c ||W_k[c]|| * max ||df_k|| * (1 + {EXACT_MARGIN_REL}) + {EXACT_MARGIN_ABS}"
                                  if heads_exact else "atol + rtol x max|ref| + head-propagated term"),
                       "probs": "atol + rtol x max|ref| + half the measured logit error "
                                      f"(at most half the logits' head-propagated term, at most "
                                      f"{tol.get('max_probs_shift', 0.05):g})"},
            "worst": fails[0][1] if fails else None, "ok": not fails, "failures": [f for _, f in fails]}


def _bound_text(tol: dict) -> str:
    # reports recorded before the bound existed (a manifest's stored "bounds") lack the key
    b = tol.get("max_error_to_spread")
    return "(not checked)" if b is None else f"{b:g}"


def _spread_text(b: dict) -> str:
    if "feature_error_max" not in b:
        return "error/spread not measured (report predates the check)"
    if b.get("error_to_spread") is None:
        return (f"error/spread not measured ({b.get('error_to_spread_reason', '')}; feature error "
                f"{b['feature_error_max']:.3g}; bound <= {b['error_to_spread_bound']:g})")
    return (f"feature error {b['feature_error_max']:.3g} / median distance between images "
            f"{b['feature_spread_median']:.3g} = {b['error_to_spread']:.3g} (bound <= {b['error_to_spread_bound']:g})")


def describe_bounds(tol: dict) -> str:
    """One line naming every bound that decides pass/fail, for reports."""
    return (f"per output max |err| <= atol {tol['atol']:g} + rtol {tol['rtol']:g} x max|ref| (+ head-propagated "
            f"term on logits and backbone_logits; probs: + half the measured logit error, at most "
            f"{tol.get('max_probs_shift', 0.05):g}); embedding cosine >= "
            f"{tol['min_cosine']:g} per backbone; feature error / median distance between two images <= "
            f"{_bound_text(tol)} per backbone; top-1 changed <= {tol.get('max_top1_changed', 0.0) * 100:g}% "
            "(fused and per backbone)")


def backbone_line(b: dict, detail: bool = False) -> str:
    """One backbone's figures, each next to its bound (detail: also the mean cosine and the relative logit
    error, as the fp16 report prints them): the one place a backbone row is written as text."""
    mean = f"mean {b['cosine_mean']:.7f} " if detail else ""
    rel = f" ({b['logits_max_rel']:.2e} rel)" if detail else ""
    return (f"{b['backbone']}: embedding cosine {mean}min {b['cosine_min']:.7f} (bound >= {b['cosine_bound']:g}), "
            f"{_spread_text(b)}, max logit err {b['logits_max_abs']:.3g}{rel} (bound {b['logits_bound']:.3g}), "
            f"top-1 agreement {b['top1_agreement'] * 100:.1f}% (bound: changed <= {b['top1_changed_bound'] * 100:g}%)")


def format_lines(report: dict) -> list[str]:
    """The report's figures as text lines, each next to its bound (used by compare and fp16 reports)."""
    lines = [f"  {'output':<16} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  ok"]
    for o in report["outputs"]:
        lines.append(f"  {o['output']:<16} {o['max_abs']:>10.3g} {o['max_rel']:>10.3g} {o['tolerance']:>10.3g}  "
                     f"{'yes' if o['ok'] else 'NO'}")
    lines += [f"  {backbone_line(b)}" for b in report["backbones"]]
    f = report["fused"]
    if f:
        lines.append(f"  fused top-1 agreement {f['top1_agreement'] * 100:.1f}% ({f['top1_changed']} changed, "
                     f"bound <= {f['top1_changed_bound'] * 100:g}%)")
    lines += [f"  FAIL: {x}" for x in report["failures"]]
    return lines
