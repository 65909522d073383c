"""Which ONNX file runs a precision, for every consumer (load, predict, compare, bench, triton, serve, build).

    path = precision_onnx_path(manifest, "int8")                 # model.int8.onnx, checked
    m8 = with_precision(manifest, "int8")                        # the same engine, pointed at it

An engine folder holds model.onnx (fp32) and, when exported with `--precision`, one graph per
reduced precision, recorded in the manifest's `precisions` entry:

    fp16                model.fp16.onnx       fp16 towers, fp32 islands (export/precision/fp16.py)
    int8, target cpu    model.int8.onnx       QDQ, U8 asymmetric activations, S8 per-channel weights:
                                              what ONNX Runtime CPU and OpenVINO fuse into int8 kernels
    int8, target        model.int8-trt.onnx   QDQ, S8 symmetric activations (zero point 0), S8 per-channel
      tensorrt                                weights: what TensorRT's explicit quantization requires

A graph made from an earlier model.onnx (a re-export carried it over) is refused: its entry's
source_sha256 must be the sha256 of the model.onnx the manifest lists now.

Precisions are independent: a precision (or TensorRT plan) whose file does not match its record (a
writer killed mid-commit, a half-copied file) is named, set aside for this run (`set_aside`), and
refused only where it is asked for; fp32 and the other precisions keep working, and exporting that
precision again rebuilds it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.iospec import PRECISIONS
from clipfuse.core.log import log

MODEL_FP16 = "model.fp16.onnx"
MODEL_INT8 = "model.int8.onnx"
MODEL_INT8_TRT = "model.int8-trt.onnx"
TARGETS = ("cpu", "tensorrt")
# (precision, target) -> the file; fp16 has one graph for every target
FILES = {("fp16", "cpu"): MODEL_FP16, ("fp16", "tensorrt"): MODEL_FP16,
         ("int8", "cpu"): MODEL_INT8, ("int8", "tensorrt"): MODEL_INT8_TRT}


def export_command(manifest, precision: str, target: str = "cpu") -> str:
    extra = " --calibration DIR" if precision == "int8" else ""
    if precision == "int8" and target == "tensorrt":     # the default target writes it only where TensorRT is
        extra += " --int8-target both"
    return f"`clipfuse export {manifest.folder} --precision {precision}{extra}`"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ClipfuseError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def _entry(manifest, precision: str, target: str) -> dict | None:
    entry = (manifest.data.get("precisions") or {}).get(precision)
    if precision == "int8" and target == "tensorrt" and isinstance(entry, dict):
        return entry.get("tensorrt")       # the TensorRT graph's own record, nested in the int8 entry
    return entry


def precision_onnx_path(manifest, precision: str, target: str = "cpu") -> Path:
    """The ONNX file for a precision (and, for int8, a target: cpu or tensorrt), or ClipfuseError naming
    the command that makes it."""
    check_precision(precision)
    if precision == "fp32":
        return manifest.onnx_path
    if precision in getattr(manifest, "broken", {}):
        raise ClipfuseError(f"{manifest.broken[precision]}; make it again with {export_command(manifest, precision)}")
    if target not in TARGETS:
        raise ClipfuseError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    name = FILES[(precision, target)]
    entry = _entry(manifest, precision, target)
    path = manifest.folder / name
    if not isinstance(entry, dict) or not path.is_file():
        refused = (_entry(manifest, precision, "cpu") or {}).get("tensorrt_refused") if target == "tensorrt" else None
        if refused:     # the last int8 export wrote the CPU graph and refused this one: the same command would too
            raise ClipfuseError(f"engine {str(manifest.folder)!r} has no {name}: its int8 export refused it ({refused})")
        raise ClipfuseError(f"engine {str(manifest.folder)!r} has no {name}: make it with "
                            f"{export_command(manifest, precision, target)}")
    source = manifest.data["artefacts"].get(manifest.data["onnx"]["file"], {}).get("sha256")
    if entry.get("source_sha256") not in (None, source):
        # a re-export (e.g. after `clipfuse fit`) replaced model.onnx and carried the old graph over
        raise ClipfuseError(f"{name} in {str(manifest.folder)!r} was made from an earlier model.onnx; "
                            f"make it again: {export_command(manifest, precision, target)}")
    return path


def with_precision(manifest, precision: str, target: str = "cpu"):
    """The same engine (a Manifest) pointed at the precision's graph: what every ONNX backend opens."""

    path = precision_onnx_path(manifest, precision, target)
    if precision == "fp32":
        return manifest
    extra = _entry(manifest, precision, target).get("external_data")     # its own data file, or None
    data = dict(manifest.data, onnx=dict(manifest.data["onnx"], file=path.name, external_data=extra))
    return dataclasses.replace(manifest, data=data)


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def precision_files(data: dict) -> dict[tuple[str, str], set[str]]:
    """{(group, key): the files only it needs}: ("precisions", "fp16"|"int8") and ("plans", precision)."""
    out = {}
    for group, keys in (("precisions", ("file", "external_data")), ("plans", ("file", "layers"))):
        entries = data.get(group)
        for key, e in (entries.items() if isinstance(entries, dict) else ()):
            if not isinstance(e, dict):
                continue
            parts = [e, e.get("tensorrt")] if key == "int8" and isinstance(e.get("tensorrt"), dict) else [e]
            names = {n for part in parts for k in keys for n in _names(part.get(k))}
            cascade = e.get("cascade") if key == "int8" else None
            names |= set(_names(cascade.get("towers"))) if isinstance(cascade, dict) else set()
            out[(group, key)] = names
    return out


def set_aside(manifest, bad: dict[str, str]) -> None:
    """Artefacts that failed verification ({name: why}): those of a precision or plan set that one
    aside (its entry and files dropped from manifest.data, the reason kept in manifest.broken and
    logged); any other raises its reason, as before: fp32's own files are not optional."""
    groups = precision_files(manifest.data)
    core = [n for n in bad if not any(n in files for files in groups.values())]
    if core:
        raise ClipfuseError(bad[core[0]])
    for (group, key), files in groups.items():
        hit = sorted(files & set(bad))
        if not hit:
            continue
        what = key if group == "precisions" else f"the {key} TensorRT plan"
        manifest.broken[key if group == "precisions" else f"plan:{key}"] = (
            f"engine {str(manifest.folder)!r}: {what} is set aside, {bad[hit[0]].split('; re-run')[0]}")
        manifest.data[group] = {k: v for k, v in manifest.data[group].items() if k != key}
        others = set().union(*(f for g, f in groups.items() if g != (group, key)))
        manifest.data["artefacts"] = {n: v for n, v in manifest.data["artefacts"].items() if n not in files - others}
        log(f"engine {manifest.folder}: {what} ignored ({hit[0]} does not match its record); fp32 and the other "
            f"precisions are unaffected; make it again with "
            + (export_command(manifest, key) if group == "precisions" else f"`clipfuse build {manifest.folder} "
               f"--precision {key}`"))
