"""The bench of a cascade engine on labelled images: what the cascade costs over the real exits, and what it loses.

    bench_cascade(manifest, data, batches=(1, 8), threads=None) -> result["cascade"]

Measured, in this process, interleaved image by image (batch by batch) with the full graph so a busy
neighbour hits both alike:
- latency per call of the routed cascade (runtime/cascade.py) and of the full graph (model.onnx),
  over every labelled image, at each batch size: mean, p50, p99 per call and per image; the
  cascade's cost thus follows the real distribution of exits, not an estimate;
- accuracy of both with Wilson 95% intervals, the cascade's paired difference against the full
  ensemble (bootstrap interval, agreement, McNemar; export/paired.py);
- overhead: images that leave at stage 1 at batch 1, against tower_1 + combine_1 run alone on them;
- a curve over thresholds: every image through every stage once (the stage logits), then for a
  family of thresholds (each stage's at the same quantile of its confidence over these images)
  accuracy and latency, the latency from per-stage batch-1 times measured here x that threshold's
  exit distribution (said as such in the report; the fitted thresholds' point is measured directly).
No timing is asserted anywhere.
"""
from __future__ import annotations

import time

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import detail, log
from clipfuse.export.data import scan_labelled_folder
from clipfuse.export.paired import accuracy_interval, paired_difference
from clipfuse.runtime.backends.registry import make_backend
from clipfuse.runtime.cascade import CascadeBackend, run_stage_graphs
from clipfuse.runtime.cpu_load import LoadProbe
from clipfuse.runtime.fit_images import FitImages, leave_out_fit_images
from clipfuse.runtime.images import iter_batches
from clipfuse.runtime.precisions import with_precision
from clipfuse.runtime.routing import cascade_predict, confidence

CURVE_QUANTILES = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.95, 1.01)    # 1.01: never leave early


def _summary(ms, images: int) -> dict:
    v = np.asarray(ms, np.float64)
    return {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
            "calls": int(v.size), "per_image_mean_ms": float(v.sum() / max(images, 1))}


def load_labelled(m, data, classes=None, batch: int = 32,
                  include_fit_images: bool = False) -> tuple[dict, np.ndarray, FitImages]:
    """Every readable labelled image of `data` but those the engine was fitted on (all with include_fit_images),
    preprocessed once: ({input: uint8 (N, 3, R, R)}, labels (N,), what runtime/fit_images.py found).
    The warning about fit images is a detail here (the bench's eval said it already)."""

    paths, labels, names = scan_labelled_folder(data, classes)
    if list(names) != list(m.classes):
        raise ClipfuseError(f"classes of --data {data} do not match the engine's ({len(names)} vs {len(m.classes)})")
    label_of = dict(zip(paths, labels))
    with detail():
        paths, seen = leave_out_fit_images(m, paths, include_fit_images, where=f"--data {data}", tag="bench")
    arrays, ys = {n: [] for n in m.preprocess_specs()}, []
    for b in iter_batches(paths, m.preprocess_specs(), batch_size=batch):
        if b.paths:
            for n in arrays:
                arrays[n].append(b.inputs[n])
            ys += [label_of[p] for p in b.paths]
    if not ys:
        raise ClipfuseError(f"no readable image in {data}")
    return {n: np.concatenate(v) for n, v in arrays.items()}, np.asarray(ys), seen


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, 1e3 * (time.perf_counter() - t0)


def bench_cascade(m, data, batches=(1, 8), threads: int | None = None, classes=None,
                  arrays=None, labels=None, settle: float = 0.05, precision: str = "fp32",
                  include_fit_images: bool = False, single: str | None = None) -> dict:
    """single: a backbone of the cascade, timed alone (its fp32 stage tower: the tower and its head, what that
    backbone costs as a single model) call by call interleaved with the cascade and the full graph, so the
    cascade's cost reads against the single it should beat. precision: fp32, or int8 (the int8 stages and
    thresholds against model.int8.onnx; refused in one line when the int8 export did not write them). settle: seconds of rest before each timed call. The cascade's and the full graph's sessions live in
    this one process, and an idle ONNX Runtime pool spins after a run: timed back to back, whichever runs
    next pays for the other's spinning (measured on the pair: the full graph took 93 ms per image here
    against 59 ms in its own worker; the bench's main table rests 50 ms before each call for the same reason)."""

    seen = None
    if arrays is None:
        arrays, labels, seen = load_labelled(m, data, classes, include_fit_images=include_fit_images)
    N = len(labels)
    S = len(m.backbones)
    opts = {"threads": threads} if threads else {}
    cas = CascadeBackend(m, precision=precision, **opts).open()
    full = make_backend(with_precision(m, precision), "onnxruntime", **opts).open()
    solo = None
    if single is not None:
        names = [st["backbone"] for st in cas.block["stages"]]
        if single not in names:
            cas.close()
            full.close()
            raise ClipfuseError(f"single {single!r} is not a backbone of this cascade ({', '.join(names)})")
        s1 = names.index(single) + 1
        fp32 = cas if precision == "fp32" else CascadeBackend(m, **opts).open()
        solo = (fp32, f"tower_{s1}", cas.block["stages"][s1 - 1]["input"])
    try:
        warm = {n: a[:1] for n, a in arrays.items()}
        for _ in range(2):
            cas.infer(warm)
            full.infer(warm)
        probe = LoadProbe()
        latency, preds = {}, {}
        for bs in sorted(set(batches)):
            log(f"cascade vs full graph ({precision}): {N} images at batch {bs}", tag="bench")
            t_cas, t_full, t_one, p_cas, p_full, stage = [], [], [], [], [], []
            for lo in range(0, N, bs):
                feed = {n: a[lo:lo + bs] for n, a in arrays.items()}
                time.sleep(settle)
                o, dt = _timed(lambda: cas.infer(feed))
                t_cas.append(dt)
                p_cas.append(o[iospec.LOGITS].argmax(1))
                stage.append(o[iospec.STAGE])
                time.sleep(settle)
                o, dt = _timed(lambda: full.infer(feed))
                t_full.append(dt)
                p_full.append(o[iospec.LOGITS].argmax(1))
                if solo is not None:
                    time.sleep(settle)
                    t_one.append(_timed(lambda: solo[0].sessions[solo[1]].run(None, {solo[2]: feed[solo[2]]}))[1])
            stage = np.concatenate(stage)
            x = latency[str(bs)] = {"cascade": _summary(t_cas, N), "full": _summary(t_full, N),
                                    "exit_rates": (np.bincount(stage - 1, minlength=S) / N).tolist()}
            x["cascade_over_full_mean"] = x["cascade"]["mean_ms"] / x["full"]["mean_ms"]
            if solo is not None:
                x["single"] = {"backbone": single, "precision": "fp32", **_summary(t_one, N)}
                x["cascade_over_single_mean"] = x["cascade"]["mean_ms"] / x["single"]["mean_ms"]
            if bs == min(batches):
                preds = {"cascade": np.concatenate(p_cas), "full": np.concatenate(p_full), "stage": stage,
                         "t_cas": np.asarray(t_cas) if bs == 1 else None}
        # overhead at batch 1: the images leaving at stage 1, against tower_1 + combine_1 alone
        overhead = None
        if preds["t_cas"] is not None and (preds["stage"] == 1).any():
            rows = np.flatnonzero(preds["stage"] == 1)[:64]
            alone, routed = [], []
            st = cas.block["stages"][0]
            for r in rows:               # back to back, image by image: the same moment of the machine
                img = arrays[st["input"]][r:r + 1]

                def stage1():
                    f, z = cas.sessions["tower_1"].run(None, {st["input"]: img})
                    cas.sessions["combine_1"].run(None, {iospec.FEATURES: f, iospec.BACKBONE_LOGITS: z[:, None]})
                time.sleep(settle)
                alone.append(_timed(stage1)[1])
                time.sleep(settle)
                routed.append(_timed(lambda: cas.infer({n: a[r:r + 1] for n, a in arrays.items()}))[1])
            routed = float(np.mean(routed))
            overhead = {"images": int(rows.size), "routed_mean_ms": routed, "stage1_alone_mean_ms": float(np.mean(alone)),
                        "ratio": routed / float(np.mean(alone)), "target": 1.05}
        # per-stage batch-1 times and every stage's logits, for the curve over thresholds
        stage_ms = np.zeros(S)
        sample = min(N, 16)
        inputs = [s["input"] for s in cas.block["stages"]]
        for r in range(sample):
            feed = {n: a[r:r + 1] for n, a in arrays.items()}
            feats = []
            for s in range(1, S + 1):
                (f, z), dt1 = _timed(lambda: cas.sessions[f"tower_{s}"].run(None, {inputs[s - 1]: feed[inputs[s - 1]]}))
                feats.append((f, z))
                X = np.concatenate([a for a, _ in feats], 1)
                Z = np.stack([b for _, b in feats], 1)
                _, dt2 = _timed(lambda: cas.sessions[f"combine_{s}"].run(None, {iospec.FEATURES: X, iospec.BACKBONE_LOGITS: Z}))
                stage_ms[s - 1] += (dt1 + dt2) / sample
        stage_logits = [[] for _ in range(S)]
        for lo in range(0, N, 32):
            outs = run_stage_graphs(cas.sessions, {n: a[lo:lo + 32] for n, a in arrays.items()}, inputs, S)
            for s in range(S):
                stage_logits[s].append(outs[s][iospec.LOGITS])
        Zs = np.stack([np.concatenate(z) for z in stage_logits])                 # (S, N, C)
        load = probe.stop()
    finally:
        cas.close()
        full.close()
        if solo is not None and solo[0] is not cas:
            solo[0].close()
    cum = np.cumsum(stage_ms)
    conf = [confidence(Zs[s], cas.score) for s in range(S - 1)]
    curve = []
    for q in CURVE_QUANTILES:
        t = [float(np.quantile(c, min(q, 1.0))) if q <= 1 else None for c in conf]
        p, st = cascade_predict(Zs, t, cas.score)
        curve.append({"quantile": q, "thresholds": t, "accuracy": 100.0 * float((p == labels).mean()),
                      "latency_ms": float(cum[st].mean()), "exit_rates": (np.bincount(st, minlength=S) / N).tolist()})
    diff = paired_difference(preds["cascade"], preds["full"], labels)
    return {"images": int(N), "precision": precision, "score": cas.score, "thresholds": cas.thresholds,
            "order": m.backbone_names,
            "latency": latency, "stage_ms_batch1": stage_ms.tolist(), "cum_stage_ms_batch1": cum.tolist(),
            "accuracy_cascade": accuracy_interval(preds["cascade"], labels).to_dict(),
            "accuracy_full": accuracy_interval(preds["full"], labels).to_dict(),
            "paired_difference": diff.to_dict(), "overhead": overhead, "curve": curve,
            "curve_note": "curve latency = per-stage batch-1 times measured here x each threshold's exit distribution "
                          "(estimated from measured parts); the fitted thresholds' latency above is measured directly",
            "load": load, "process": "cascade and full graph in the bench's own process, call by call interleaved",
            "fit_images": seen.to_dict() if seen else None, "fit_images_line": seen.line() if seen else ""}


def format_cascade(c: dict) -> list[str]:
    """Markdown lines of the cascade section of bench.md."""
    a, f, d = c["accuracy_cascade"], c["accuracy_full"], c["paired_difference"]
    prec = c.get("precision", "fp32")
    what = "Cascade" if prec == "fp32" else f"Cascade, {prec} stages against {prec}'s full graph"
    L = ["", f"## {what} ({c['images']} labelled images; order {' -> '.join(c['order'])}; score {c['score']}, "
             f"thresholds {c['thresholds']})", "",
         "| batch | cascade mean ms/call | p99 | per image | full mean ms/call | p99 | per image | cascade / full (mean) | exit rates |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    if c.get("fit_images_line"):
        L[2:2] = [c["fit_images_line"] + ".", ""]
    for bs, x in c["latency"].items():
        cs, fs = x["cascade"], x["full"]
        L.append(f"| {bs} | {cs['mean_ms']:.2f} | {cs['p99_ms']:.2f} | {cs['per_image_mean_ms']:.2f} | {fs['mean_ms']:.2f} | "
                 f"{fs['p99_ms']:.2f} | {fs['per_image_mean_ms']:.2f} | {x['cascade_over_full_mean']:.3f} | "
                 + ", ".join(f"{100 * r:.1f}%" for r in x["exit_rates"]) + " |")
    singles = [(bs, x) for bs, x in c["latency"].items() if "single" in x]
    if singles:
        L += ["", "| batch | single alone (fp32, interleaved) | mean ms/call | p99 | cascade / single (mean) |",
              "|---:|---|---:|---:|---:|"]
        L += [f"| {bs} | {x['single']['backbone']} | {x['single']['mean_ms']:.2f} | {x['single']['p99_ms']:.2f} | "
              f"{x['cascade_over_single_mean']:.3f} |" for bs, x in singles]
    L += ["", f"Accuracy: cascade {a['value']:.1f}% [{a['lo']:.1f}, {a['hi']:.1f}], full ensemble {f['value']:.1f}% "
              f"[{f['lo']:.1f}, {f['hi']:.1f}] (Wilson 95%); paired difference {d['difference']:+.2f} points "
              f"[{d['lo']:+.2f}, {d['hi']:+.2f}], agreement {d['agreement']['value']:.1f}%, {d['a_only']} vs {d['b_only']} "
              f"discordant (McNemar p = {d['p_value']:.3g})."]
    ov = c.get("overhead")
    if ov:
        L.append(f"Overhead: {ov['images']} images leaving at stage 1 took {ov['routed_mean_ms']:.2f} ms routed vs "
                 f"{ov['stage1_alone_mean_ms']:.2f} ms for tower_1 + combine_1 alone: {ov['ratio']:.3f}x "
                 f"(target <= {ov['target']}).")
    L += ["", f"Curve over thresholds ({c['curve_note']}):", "", "| quantile | accuracy % | latency ms (batch 1) |",
          "|---:|---:|---:|"]
    L += [f"| {p['quantile']:g} | {p['accuracy']:.1f} | {p['latency_ms']:.2f} |" for p in c["curve"]]
    return L
