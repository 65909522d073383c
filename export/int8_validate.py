"""Is the int8 graph still the fp32 engine? Figures against fp32 on ONNX Runtime CPU, and a refusal.

Both graphs run on the same images (by default the 32 photo variants that the
fp16 validation uses: runtime.compare.photo_variants) through the runtime's
host preprocessing, and are compared by the one comparator
(runtime/comparator.py, through export/precision_validate.py, exactly as fp16
is) with the "int8" row of clipfuse.iospec.TOLERANCES and `heads_exact`:

    per backbone   embedding cosine, the minimum over images        >= min_cosine (0.99)
                   logit error against the bound the fp32 heads imply:
                   max_c ||W_k[c]|| * max ||df_k|| (1 + 1%) + 1e-4 (the heads are
                   float, so a logit moves only as far as the head carries the
                   feature error; more means something after the features changed)
                   share of changed top-1 of the backbone's own logits <= max_top1_changed (1%)
                   feature error over the median distance between two images (unit-norm
                   embeddings; max_i ||v_i - u_i|| / median_{i<j} ||u_i - u_j||) <= max_error_to_spread
                   (0.25): the cosine bound is absolute, and random RN towers embed two images
                   at cosine 0.99996, so an int8 graph at cosine 0.9997 changed 57 of 64 answers;
                   not measured (and not failed) on one image or when every image embeds the same
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

from clipfuse import iospec
from clipfuse.errors import ClipfuseError
from clipfuse.log import log
from clipfuse.runtime import comparator


def check_agreement(ref: dict, got: dict, embed_dims: list[int], names: list[str], head_norms: list[float],
                    tol: dict | None = None) -> dict:
    """int8 outputs (got) against fp32 (ref), both {output name: array} on the same images: the one
    comparator with heads_exact and the int8 tolerance row (or `tol`). Returns its report."""
    tol = iospec.tolerance("int8") if tol is None else tol
    return comparator.compare_outputs(ref, got, list(zip(names, embed_dims)), tol, head_norms, heads_exact=True)


def format_checks(report: dict) -> list[str]:
    """One line per figure with its bound (the comparator's lines, and the accuracy line when measured)."""
    lines = [comparator.describe_bounds(report["bounds"])] + comparator.format_lines(report)
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


def validate_int8(manifest, int8_path: Path, images=None, batch: int = 8, quiet: bool = True, data=None,
                  classes=None) -> dict:
    """Run fp32 (manifest.onnx_path) and int8 graphs on ORT CPU on the same images; figures + verdict
    (printed through the logger; no raise: see `require_valid`). data: a labelled folder for accuracy."""
    from clipfuse.export.precision_validate import validate_precision

    if images is None and data is not None:
        images = data_images(data)
    report = validate_precision(manifest, Path(int8_path), "int8", images=images, batch=batch)
    report["images_from"] = str(data) if data is not None else "the shipped photographs (32 variants)"
    if data is not None:
        report["accuracy"] = paired_accuracy(manifest, Path(int8_path), data, classes=classes)
        if report["accuracy"]["paired"]["difference"] < -report["accuracy"]["max_drop"]:
            report["failures"].append(accuracy_line(report["accuracy"]).strip())
            report["ok"] = False
    for line in format_checks(report):
        log(line, quiet, tag="int8")
    return report


AGREEMENT_IMAGES = 64


def data_images(data, count: int = AGREEMENT_IMAGES) -> list:
    """Up to `count` images of the user's labelled folder, evenly spaced over it (every class), as RGB PIL
    images: with --data, agreement is checked on the task's own images. The shipped photographs are out
    of distribution for heads fitted on the user's data (linear probes on digits have tiny margins on a
    photo of a rocket), so a top-1 bound there measures the heads' indifference, not the quantization."""
    from PIL import Image

    from clipfuse.export.data import scan_labelled_folder

    paths = scan_labelled_folder(data)[0]
    pick = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]
    out = []
    for p in dict.fromkeys(pick):
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError:
            continue            # unreadable: paired_accuracy names it
    if not out:
        raise ClipfuseError(f"--data {data}: no readable image to check agreement on")
    return out


def paired_accuracy(manifest, int8_path: Path, data, classes=None, batch: int = 32) -> dict:
    """Fused top-1 accuracy of fp32 and int8 on a labelled folder (DATA/<class>/<images>), the same images
    through the same host preprocessing, and int8 - fp32 as a paired difference with its interval."""
    from clipfuse.export.data import scan_labelled_folder
    from clipfuse.export.paired import paired_difference
    from clipfuse.export.precision_validate import run_batches
    from clipfuse.runtime.images import iter_batches
    from clipfuse.runtime.sessions import open_session

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
    y = np.array([label_of[p] for p in kept])
    pred = {}
    for key, p in (("fp32", manifest.onnx_path), ("int8", int8_path)):
        pred[key] = run_batches(open_session(p), feeds)[iospec.LOGITS].argmax(-1)
    d = paired_difference(pred["int8"], pred["fp32"], y)
    return {"data": str(data), "images": int(len(y)), "fp32": float((pred["fp32"] == y).mean() * 100),
            "int8": float((pred["int8"] == y).mean() * 100), "paired": d.to_dict(),
            "max_drop": iospec.tolerance("int8")["max_accuracy_drop"]}


def require_valid(report: dict, what: str = "int8 graph") -> None:
    """ClipfuseError (one line, every failing figure with its bound) when the report failed."""
    if not report["ok"]:
        raise ClipfuseError(f"{what} refused against fp32: " + "; ".join(report["failures"])
                            + " (nothing written; calibrate on more, and more varied, images of your task, "
                            "or use --precision fp16)")
