"""Is the int8 graph still the fp32 engine? Figures against fp32 on ONNX Runtime CPU, and a refusal.

Both graphs run on the same images through the runtime's host preprocessing:
with `--data`, every readable image of the user's labelled folder (agreement and
accuracy from one pass of each graph); otherwise the 32 photo variants that the
fp16 validation uses (runtime.compare.photo_variants). fp32's outputs are computed
once per export for both int8 graphs (`ref_cache`). They are compared by the one comparator
(runtime/agreement.py, through export/precision/validate.py, exactly as fp16
is) with the "int8" row of clipfuse.core.iospec.TOLERANCES and `heads_exact`:

    per backbone   embedding cosine, the minimum over images        >= min_cosine (0.99)
                   logit error against the bound the fp32 heads imply:
                   max_c ||W_k[c]|| * max ||df_k|| (1 + 1%) + 1e-4 (the heads are
                   float, so a logit moves only as far as the head carries the
                   feature error; more means something after the features changed)
                   share of changed top-1 of the backbone's own logits <= max_top1_changed (1%)
                   feature error over the median distance between two images (unit-norm
                   embeddings; max_i ||v_i - u_i|| / median_{i<j} ||u_i - u_j||) <= max_error_to_spread
                   (0.25; why: docs/decisions.md, "The comparator's bounds"); not measured (and
                   not failed) on one image or when every image embeds the same
    fused          share of changed top-1                            <= max_top1_changed (1%)
                   logit error <= sum_k max t_k * bound_k + 1e-4
    per output     max |err| <= atol + rtol * max|ref| (+ the head-propagated term)
    accuracy       with labelled data (`--data`): int8 minus fp32 accuracy on the same
                   images, a paired difference with its bootstrap interval
                   (export/paired.py); refused when it is below -max_accuracy_drop points

Random weights have no trained outlier channels, so these figures on random
towers are likely better than on trained CLIP weights; the bounds are what a
user with real weights must meet, and a graph below them is refused, not kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.runtime import agreement
from clipfuse.runtime.backends.sessions import open_session
from clipfuse.runtime.compare import photo_variants
from clipfuse.runtime.images import iter_batches

from ..data import scan_labelled_folder
from ..paired import paired_difference
from .validate import batched_feeds, run_batches, validate_feeds


def check_agreement(ref: dict, got: dict, embed_dims: list[int], names: list[str], head_norms: list[float],
                    tol: dict | None = None) -> dict:
    """int8 outputs (got) against fp32 (ref), both {output name: array} on the same images: the one
    comparator with heads_exact and the int8 tolerance row (or `tol`). Returns its report."""
    tol = iospec.tolerance("int8") if tol is None else tol
    return agreement.compare_outputs(ref, got, list(zip(names, embed_dims)), tol, head_norms, heads_exact=True)


def format_checks(report: dict) -> list[str]:
    """One line per figure with its bound (the comparator's lines, and the accuracy line when measured)."""
    lines = [agreement.describe_bounds(report["bounds"])] + agreement.format_lines(report)
    acc = report.get("accuracy")
    if acc:
        lines.append(accuracy_line(acc))
    return lines


def accuracy_line(acc: dict) -> str:
    d = acc["paired"]
    ok = d["difference"] >= -acc["max_drop"]
    return (f"  accuracy on {acc['images']} labelled images: fp32 {acc['fp32']:.2f}%, int8 {acc['int8']:.2f}%; "
            f"int8 - fp32 {d['difference']:+.2f} points [{d['lo']:+.2f}, {d['hi']:+.2f}] ({d['level']:.0%} paired "
            f"bootstrap; {d['a_only']} vs {d['b_only']} discordant) (bound >= -{acc['max_drop']:g}) "
            f"{'PASS' if ok else 'FAIL'}")


def validate_int8(manifest, int8_path: Path, images=None, batch: int = 8, data=None,
                  classes=None, ref_cache: dict | None = None) -> dict:
    """Run fp32 (manifest.onnx_path) and int8 graphs on ORT CPU on the same images; figures + verdict
    (printed through the logger; no raise: see `require_valid`).

    data: a labelled folder: agreement AND accuracy are measured on its images, one pass of each graph
    (the accuracy is the fused top-1 of the same outputs the comparator reads). Without it, the 32 photo
    variants (or `images`). ref_cache: a dict kept across calls (export_int8 passes one per export): fp32's
    outputs on the same images are computed once for every int8 graph validated against them."""

    ref_cache = {} if ref_cache is None else ref_cache
    y, key = None, None
    if data is not None:
        key = ("data", str(data))
        if key + ("feeds",) not in ref_cache:
            ref_cache[key + ("feeds",)] = labelled_feeds(manifest, data, classes, batch)
        feeds, y = ref_cache[key + ("feeds",)]
    else:
        if images is None:            # the shipped photographs: the same for every graph of an export
            key = ("photos",)
        feeds = batched_feeds(manifest, photo_variants() if images is None else images, batch)
    report, ref, got = validate_feeds(manifest, Path(int8_path), "int8", feeds, batch,
                                      ref=ref_cache.get(key) if key else None, warmup=False)
    if key:
        ref_cache[key] = ref
    report["images_from"] = str(data) if data is not None else "the shipped photographs (32 variants)"
    if y is not None:
        report["accuracy"] = _accuracy(ref[iospec.LOGITS], got[iospec.LOGITS], y, data, "int8")
        if report["accuracy"]["paired"]["difference"] < -report["accuracy"]["max_drop"]:
            report["failures"].append(accuracy_line(report["accuracy"]).strip())
            report["ok"] = False
    for line in format_checks(report):
        log(line, tag="int8")
    return report


def labelled_feeds(manifest, data, classes=None, batch: int = 32) -> tuple[list[dict], np.ndarray]:
    """(feeds, labels) of every readable image of a labelled folder (DATA/<class>/<images>) through the
    engine's host preprocessing; refuses a folder whose classes are not the engine's."""

    paths, labels, names = scan_labelled_folder(data, classes)
    if list(names) != manifest.classes:
        raise ClipfuseError(f"--data {data}: its classes {list(names)[:5]}... are not the engine's "
                            f"{manifest.classes[:5]}... (same names, same order); give the engine's labelled folder")
    label_of = dict(zip(paths, labels))
    feeds, kept = [], []
    for b in iter_batches(paths, manifest.preprocess_specs(), batch_size=batch):
        if b.paths:
            feeds.append(b.inputs)
            kept += b.paths
    if not kept:
        raise ClipfuseError(f"--data {data}: no readable image")
    return feeds, np.array([label_of[p] for p in kept])


def paired_accuracy(manifest, graph_path: Path, data, classes=None, batch: int = 32, key: str = "int8") -> dict:
    """Fused top-1 accuracy of fp32 and another graph of the engine (int8, fp16) on a labelled folder, the
    same images through the same host preprocessing, and its difference from fp32, paired, with its interval.
    The result names the other graph `key` (the int8 validation's record reads "int8")."""

    feeds, y = labelled_feeds(manifest, data, classes, batch)
    fp32, other = (run_batches(open_session(p), feeds)[iospec.LOGITS] for p in (manifest.onnx_path, graph_path))
    return _accuracy(fp32, other, y, data, key)


def _accuracy(fp32_logits, logits, y, data, key: str) -> dict:
    """Fused top-1 accuracy of fp32 and the other graph (named `key`) on the same labelled images, and the
    other minus fp32 as a paired difference with its interval."""

    a, b = fp32_logits.argmax(-1), logits.argmax(-1)
    d = paired_difference(b, a, y)
    return {"data": str(data), "images": int(len(y)), "fp32": float((a == y).mean() * 100),
            key: float((b == y).mean() * 100), "paired": d.to_dict(),
            "max_drop": iospec.tolerance("int8")["max_accuracy_drop"]}


def require_valid(report: dict, what: str = "int8 graph",
                  fixes: str = "calibrate on more, and more varied, images of your task") -> None:
    """ClipfuseError (one line, every failing figure with its bound, then `fixes`: what would pass) when the
    report failed."""
    if not report["ok"]:
        raise ClipfuseError(f"{what} refused against fp32: " + "; ".join(report["failures"])
                            + f" (nothing written; {fixes})")
