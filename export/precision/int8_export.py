"""`clipfuse export ENGINE --precision int8 --calibration DIR`: add the int8 graphs to an engine folder.

    info = export_int8("engines/pets", "my_photos/", count=256, method="minmax")

Two files, one per target, because no single QDQ graph is fast on both (docs/decisions.md, "int8: U8
activations for the CPU, S8 for TensorRT"):

    model.int8.onnx       U8 asymmetric activations, S8 per-channel weights: ONNX Runtime CPU and
                          OpenVINO's CPU plugin
    model.int8-trt.onnx   S8 symmetric activations (zero point 0, what TensorRT's explicit
                          quantization requires), S8 per-channel weights: `clipfuse build
                          --precision int8` and onnxruntime-tensorrt

Both are calibrated once, tower by tower, on the same images (export/precision/calibrate.py), both
validated against fp32 by the one comparator with the int8 tolerance row
(export/precision/int8_validate.py), both recorded in the manifest's precisions["int8"] (the TensorRT
graph's record nested under "tensorrt"). `targets=("cpu",)` writes only the CPU graph. On a cascade
engine the export also cuts int8 stage towers and certifies their exit thresholds again
(export/precision/int8_stages.py); when too few images certify them the int8 graph ships without them
and the record says why.
`targets=None` (the default) writes the TensorRT graph only where TensorRT is installed
(default_targets). A TensorRT graph that fails its validation never costs the CPU graph that passed: the
CPU graph ships and the record says why the other did not (info["tensorrt_refused"]).

Refused, one line each and nothing written: an engine without model.onnx, a calibration folder that is
missing, unreadable, empty or has too few images, and a graph whose validation fails.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
from pathlib import Path

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import detail, log, step
from clipfuse.runtime.cascade import is_cascade
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.precisions import MODEL_INT8, MODEL_INT8_TRT, TARGETS

from ..graph.engine_folder import update_engine_folder
from .calibrate import DEFAULT_COUNT, calibrate_ranges, calibration_feeds
from .int8 import quantize_int8
from .int8_stages import CERTIFY_MAX, format_record, int8_stages
from .int8_validate import format_checks, require_valid, validate_int8

# target -> (file, activations, activation_symmetric)
TARGET_GRAPHS = {"cpu": (MODEL_INT8, "u8", False), "tensorrt": (MODEL_INT8_TRT, "s8", True)}


def _read_engine(engine_dir):
    m = read_manifest(engine_dir)
    if not m.onnx_path.is_file():
        raise ClipfuseError(f"engine {str(m.folder)!r} has no {m.onnx_path.name}: int8 is quantized from the fp32 "
                            f"graph; export it first (`clipfuse export {m.folder}`)")
    return m


def default_targets() -> tuple[str, ...]:
    """The graphs this machine can use: both where TensorRT is installed, else the CPU graph only."""
    return TARGETS if importlib.util.find_spec("tensorrt") is not None else ("cpu",)


def export_int8(engine_dir, calibration, count: int = DEFAULT_COUNT, method: str = "minmax",
                targets=None, data=None, classes=None, strict: bool = True,
                keep_fp32=(), cascade_images=None) -> dict:
    """Quantize model.onnx for each target, validate each against fp32, write them atomically.

    calibration: a folder of the user's images (at least export/precision/int8.py MIN_IMAGES readable); count:
    images used at most; method: minmax | entropy | percentile; targets: "cpu" and/or "tensorrt" (None:
    default_targets());
    data: a labelled folder for accuracy (int8 - fp32, paired); strict: refuse (nothing written) when
    a validation fails; keep_fp32: backbone names whose towers stay fp32, or ["auto"]: those whose own
    checks (embedding cosine, error-to-spread, own top-1) fail in int8 are re-quantized fp32, once, and
    the graph validated again (refused when every tower would be fp32: int8 would gain nothing);
    cascade_images: on a cascade engine, the unlabelled folder the int8 stages' thresholds are certified
    on (default `calibration`; export/precision/int8_stages.py). Returns the manifest's precisions["int8"] entry."""

    if targets is None:
        targets = default_targets()
        if targets == ("cpu",):
            log("TensorRT is not installed here: writing the CPU graph only (--int8-target both or tensorrt "
                "also writes model.int8-trt.onnx)", tag="int8")
    targets = tuple(t for t in TARGET_GRAPHS if t in targets) + tuple(t for t in targets if t not in TARGET_GRAPHS)
    if not targets or any(t not in TARGET_GRAPHS for t in targets):
        raise ClipfuseError(f"int8 targets {list(targets)}: valid are {', '.join(TARGET_GRAPHS)}")
    m = _read_engine(engine_dir)
    auto, fixed = _keep_fp32(m, keep_fp32)
    if cascade_images is not None and not is_cascade(m):
        raise ClipfuseError(f"--cascade-images: engine {str(m.folder)!r} is not a cascade engine (no stages to certify)")
    with step(f"[1/3] reading calibration images from {calibration}"):
        feeds = calibration_feeds(m, calibration, count)
        if is_cascade(m):        # read now: a bad folder is refused before the slow steps
            certify_folder = calibration if cascade_images is None else cascade_images
            certify = calibration_feeds(m, certify_folder, CERTIFY_MAX, min_images=1, leave_out_fit=True,
                                        what="calibration folder" if cascade_images is None else "--cascade-images folder",
                                        with_info=True)
    records, tensorrt_refused = {}, None
    with update_engine_folder(m.folder, what=MODEL_INT8) as update:
        # one calibration (tower by tower) for every target: ranges do not depend on the activation type
        ranges = calibrate_ranges(m.onnx_path, feeds, method, workdir=update.stage)
        ref_cache = {}            # fp32's outputs on the validation images, computed once for both graphs
        for i, target in enumerate(targets):
            name, act, sym = TARGET_GRAPHS[target]
            dst = update.path(name)
            def attempt(float_towers):
                rec = quantize_int8(m.onnx_path, dst, feeds, method=method, activations=act,
                                    activation_symmetric=sym, ranges=ranges, float_towers=float_towers)
                with step(f"[2/3] validating {name} against fp32 on ONNX Runtime CPU"), detail():
                    rec["validation"] = validate_int8(m, dst, data=data, classes=classes,
                                                      ref_cache=ref_cache)
                return rec

            float_towers = fixed
            rec = attempt(float_towers)
            failing = failing_backbones(rec["validation"]) if auto else []
            keep = tuple(sorted(set(fixed) | set(failing)))
            if len(keep) == len(m.backbones) and strict:
                raise ClipfuseError(f"{name} of {str(m.folder)!r}: every backbone fails in int8 ("
                                    + "; ".join(_own_failure(rec["validation"], b) for b in m.backbone_names)
                                    + "); with all towers fp32, int8 would gain nothing (nothing written); "
                                    + _instead(m, "calibrate on more, and more varied, images of your task"))
            if failing and len(keep) < len(m.backbones):      # else (not strict) the first graph is measured
                log(f"{name}: keeping {', '.join(m.backbone_names[k] for k in failing)} fp32 (their own checks "
                    f"failed in int8) and validating again", tag="int8")
                float_towers = keep
                rec = attempt(float_towers)
            rec["float_backbones"] = [m.backbone_names[k] for k in float_towers]
            for line in format_checks(rec["validation"]):
                log(line, tag="int8")
            if strict and not rec["validation"]["ok"]:
                fixes = _fixes(m, rec["validation"], float_towers, auto, target, targets)
                if target == "tensorrt" and "cpu" in records:
                    # the CPU graph passed: it ships; this one is left out, and the record says why
                    reason = f"{name} refused against fp32: " + "; ".join(rec["validation"]["failures"])
                    log(f"{reason}; {name} not written (the CPU graph passed and is kept); {fixes}", tag="int8")
                    dst.unlink(missing_ok=True)      # the staged graph and its external data, if any
                    for extra in rec.get("external_data") or []:
                        update.path(extra).unlink(missing_ok=True)
                    update.remove(name)
                    tensorrt_refused = f"{reason} ({fixes})"
                    continue
                require_valid(rec["validation"], f"{name} of {str(m.folder)!r}", fixes=fixes)
            data_files = rec.get("external_data") or []       # one file (all_tensors_to_one_file) past 2 GB
            rec["external_data"] = data_files[0] if len(data_files) == 1 else (data_files or None)
            rec["target"] = target
            rec["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            rec["source"] = m.onnx_path.name
            rec["source_sha256"] = m.data["artefacts"][m.onnx_path.name]["sha256"]     # staleness check
            rec["calibration"]["folder"] = str(Path(calibration))
            records[target] = rec
        for target, (name, _, _) in TARGET_GRAPHS.items():
            if target not in records:      # not asked this time: an older file would belong to another calibration
                update.remove(name)
        info = dict(records.get("cpu") or {"file": None, "target": None})
        if "tensorrt" in records:
            info["tensorrt"] = records["tensorrt"]
        info["targets"] = list(records)
        if tensorrt_refused:
            info["tensorrt_refused"] = tensorrt_refused
        if is_cascade(m):
            info["cascade"] = _cascade_stages(m, update, records, certify, certify_folder, data, ref_cache)
        update.edit_manifest(lambda d: d.setdefault("precisions", {}).__setitem__("int8", info))
        log(f"[3/3] writing {', '.join(r['file'] for r in records.values())} and the manifest into {m.folder}")
    return info


def _cascade_stages(m, update, records: dict, certify: tuple, folder, data, ref_cache: dict) -> dict:
    """A cascade engine's int8 stage towers, cut out of the CPU graph, with thresholds certified again
    (export/precision/int8_stages.py), or the record of why not. Towers of an earlier int8 export are dropped either way."""

    S = len(m.backbones)
    files = [iospec.tower_file(s, "int8") for s in range(1, S + 1)]
    for f in files:
        update.remove(f)                      # replaced below when written
    if "cpu" not in records:
        rec = {"written": False, "reason": "the cascade's int8 stages are cut out of model.int8.onnx (target cpu), "
                                           "which this export did not write"}
    else:
        labelled = ref_cache.get(("data", str(data), "feeds")) if data is not None else None
        ref = ref_cache.get(("data", str(data))) if data is not None else None
        feeds, found = certify
        rec = int8_stages(m, update.path(MODEL_INT8), [update.path(f) for f in files], feeds, folder, found=found,
                          data_feeds=labelled[0] if labelled else None, labels=labelled[1] if labelled else None,
                          fp32_logits=ref["logits"] if ref is not None else None)
        if not rec["written"]:
            for f in files:
                update.path(f).unlink(missing_ok=True)
    for line in format_record(rec):
        log(line, tag="int8")
    return rec


def _keep_fp32(m, keep_fp32) -> tuple[bool, tuple]:
    """(auto, backbone indices named) from --int8-keep-fp32 values; unknown names refused, naming the valid ones."""
    names = [str(x) for x in (keep_fp32 or ())]
    auto = "auto" in names
    idx = []
    for x in names:
        if x == "auto":
            continue
        if x not in m.backbone_names:
            raise ClipfuseError(f"--int8-keep-fp32 {x!r} is not a backbone of {str(m.folder)!r}; its backbones: "
                                f"{', '.join(m.backbone_names)} (or auto)")
        idx.append(m.backbone_names.index(x))
    if len(set(idx)) == len(m.backbones):
        raise ClipfuseError(f"--int8-keep-fp32 names every backbone of {str(m.folder)!r}: int8 would gain nothing")
    return auto, tuple(sorted(set(idx)))


def _instead(m, first: str) -> str:
    """What to do instead of int8: `first`, or the engine's fp16 graph where it has one (made and validated
    already; `clipfuse export ENGINE --precision fp16` is not suggested blind: it may fail on this engine too)."""
    fp16 = "fp16" in (m.data.get("precisions") or {})
    return first + ("; or run the fp16 graph it already has (--precision fp16)" if fp16 else "; or stay with fp32")


def _fixes(m, report: dict, float_towers, auto: bool, target: str, targets) -> str:
    """The options that would let a refused int8 graph pass, most specific first: keep the towers whose own
    checks failed fp32 (named, or auto), write only the CPU graph where the TensorRT one failed, else
    calibrate on more images."""
    failing = [k for k in failing_backbones(report) if k not in float_towers]
    parts = []
    if failing and len(set(failing) | set(float_towers)) < len(m.backbones):
        named = " ".join(f"--int8-keep-fp32 {m.backbone_names[k]}" for k in failing)
        parts.append(f"keep the failing tower{'s' * (len(failing) > 1)} fp32: {named}"
                     + ("" if auto else " (or --int8-keep-fp32 auto)"))
    if target == "tensorrt":
        parts.append("write the CPU graph only: --int8-target cpu")
    return ("try " + "; or ".join(parts) + "; or " if parts else "") + _instead(
        m, "calibrate on more, and more varied, images of your task")


def _own_failure(report: dict, backbone: str) -> str:
    """The first failure line that names `backbone` (what its own checks said), or its name alone."""
    return next((f for f in report.get("failures", []) if f.startswith(f"{backbone}: ")), backbone)


def failing_backbones(report: dict) -> list[int]:
    """Indices of the backbones whose own checks failed: embedding cosine, error-to-spread, own top-1 changed."""
    bad = []
    for k, b in enumerate(report.get("backbones") or []):
        ratio = b.get("error_to_spread")
        if (b["cosine_min"] < b["cosine_bound"] or (ratio is not None and ratio > b["error_to_spread_bound"])
                or b["top1_changed"] > b["top1_changed_bound"] * report["images"]):
            bad.append(k)
    return bad
