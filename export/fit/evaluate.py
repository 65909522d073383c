"""`clipfuse eval`: what an engine answers on a labelled folder, beside every baseline.

The exported graph (ONNX Runtime, the runtime's own backend: not the PyTorch module) runs on the
images -> the accuracy of every method from the graph's own outputs (singles, LOG-AVG, C-LOG-AVG and
the fitted NLC from the files fit left beside the graph), the shipped row marked, and the diversity
figures (export/fit/diversity.py). The report's text: export/fit/report.py format_eval.

- Images the engine was fitted on (runtime/fit_images.py) are left out, with a warning that says how
  many, unless include_fit_images: scored on them, the figures would be the fit's own, biased upwards.
- A cascade engine (`fit --cascade`) answers through its stages, as predict does by default: the
  cascade is then the shipped row (with its exit rates), and the full graph (model.onnx) is the row
  of the controller it holds, marked as such.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import progress_shown
from clipfuse.runtime.backends.registry import open_backend
from clipfuse.runtime.cascade import CascadeBackend, is_cascade
from clipfuse.runtime.fit_images import leave_out_fit_images
from clipfuse.runtime.images import iter_batches
from clipfuse.runtime.manifest import read_manifest

from ..data import check_same_classes, scan_labelled_folder
from ..graph.fused import load_controller
from . import baselines, diversity as dv, nlc
from .pipeline import NLC_FILE, STATIC
from .report import write_eval_report

CASCADE_ROW = "cascade"
OUTPUTS = (iospec.BACKBONE_LOGITS, iospec.LOGITS, iospec.TEMPERATURES, iospec.FEATURES)


def eval_engine(engine, data, classes=None, batch_size: int = 32, report_dir=None,
                include_fit_images: bool = False) -> dict:
    """Accuracy of every method from the exported graph's own outputs on a labelled folder, the row the
    engine ships marked, and the diversity figures; report_dir: also write eval.md, eval.json, diversity.png.
    include_fit_images: also score the images the engine was fitted on (left out by default, with a warning)."""

    m = read_manifest(engine)
    paths, labels, names = scan_labelled_folder(data, classes)
    check_same_classes(names, m.classes, f"--data {data}", f"engine {engine}")
    label_of = dict(zip(paths, labels))
    paths, fit_seen = leave_out_fit_images(m, paths, include_fit_images, where=f"--data {data}")
    # The runtime's own ONNX Runtime backend (its measured session options): eval scores what predict serves.
    backend = open_backend(m, "onnxruntime")
    routed = CascadeBackend(m).open() if is_cascade(m) else None       # predict's default on a cascade engine
    outs = {k: [] for k in OUTPUTS}
    cas_logits, cas_stage = [], []
    kept, failures = [], []
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="eval", unit="img", disable=not progress_shown(), file=sys.stderr)
    try:
        for batch in iter_batches(paths, m.preprocess_specs(), batch_size=batch_size):
            failures += batch.failures
            if batch.paths:
                res = backend.infer(batch.inputs)
                for k in outs:
                    outs[k].append(res[k])
                if routed is not None:
                    res = routed.infer(batch.inputs)
                    cas_logits.append(res[iospec.LOGITS])
                    cas_stage.append(res[iospec.STAGE].reshape(-1))
                kept += batch.paths
            bar.update(len(batch.paths) + len(batch.failures))
    finally:
        bar.close()
        backend.close()
        if routed is not None:
            routed.close()
    if not kept:
        raise ClipfuseError(f"no readable image in {data}" + (" besides the fit's own" if fit_seen.left_out else ""))
    y = np.array([label_of[p] for p in kept])
    Z, X = np.concatenate(outs[iospec.BACKBONE_LOGITS]), np.concatenate(outs[iospec.FEATURES])
    fused = np.concatenate(outs[iospec.LOGITS])
    T = np.concatenate(outs[iospec.TEMPERATURES])
    side = {f: load_controller(m.folder / f) if (m.folder / f).is_file() else None for f in (STATIC, NLC_FILE)}
    acc = baselines.evaluate(X, Z, y, m.backbone_names, static=side[STATIC], nlc=side[NLC_FILE])
    kind = m.data.get("controller", {}).get("kind", "constant")
    full_row = m.data.get("fit", {}).get("shipped", {}).get("row") or ("NLC" if kind == "nlc" else f"ENGINE ({kind})")
    engine_acc = float(100.0 * np.mean(fused.argmax(-1) == y))
    cascade = None
    if routed is not None:
        pred, stage = np.concatenate(cas_logits).argmax(-1), np.concatenate(cas_stage)
        S = len(m.backbones)
        cascade = {"row": CASCADE_ROW, "accuracy": float(100.0 * np.mean(pred == y)),
                   "order": m.backbone_names, "thresholds": routed.thresholds, "score": routed.score,
                   "exit_rates": (np.bincount(stage - 1, minlength=S) / len(stage)).tolist(),
                   "stages": stage.tolist(), "agreement_with_full": float(100.0 * np.mean(pred == fused.argmax(-1)))}
    ordered = {}
    for name, v in acc.items():
        if name == "ORACLE":
            if full_row not in acc:
                ordered[full_row] = engine_acc
            if cascade is not None:
                ordered[CASCADE_ROW] = cascade["accuracy"]
        ordered[name] = engine_acc if name == full_row else v     # the full graph's row: the graph's own number
    # Collapse is a property of an NLC: the graph's temperatures if it ships one, else the saved one's.
    temps = T if kind == "nlc" else (nlc.controller_temperatures(side[NLC_FILE], X) if side[NLC_FILE] is not None else None)
    if fit_seen.seen and not fit_seen.left_out:
        words = f"these images ({fit_seen.seen} of them images the engine was fitted on)"
    else:   # "held-out" only where true: known when fit recorded its images
        words = "images the engine was not fitted on" if m.data.get("fit", {}).get("images_file") else "these images"
    div = dv.diversity_report(Z, y, m.backbone_names, m.classes, temperatures=temps, accuracy=ordered, images=words)
    result = {"engine": str(m.folder), "data": str(data), "num_images": int(len(y)), "accuracy": ordered,
              "shipped": CASCADE_ROW if cascade else full_row, "full_graph": full_row,
              "engine_accuracy": cascade["accuracy"] if cascade else engine_acc, "full_graph_accuracy": engine_acc,
              "fit_images": fit_seen.to_dict(), "fit_images_line": fit_seen.line(), "cascade": cascade,
              "diversity": div, "unreadable_images": [{"path": str(f.path), "reason": f.reason} for f in failures],
              # what the engine answers (predict's default: the cascade on a cascade engine), then the full graph's
              "predictions": (pred if cascade else fused.argmax(-1)).tolist(),
              "full_graph_predictions": fused.argmax(-1).tolist(),
              "paths": [str(p) for p in kept], "temperatures": T.tolist()}
    if report_dir is not None:
        result["report"] = write_eval_report(result, Path(report_dir))
    return result
