"""Backends: one small interface over every runtime that can execute an engine folder.

Polygraphy's runner: a backend is opened, fed, and closed, so predict, benchmarks and the comparison
tests never care which one runs:

    with open_backend(manifest, "onnxruntime") as backend:
        outputs = backend.infer({"image_224": uint8 (N, 3, 224, 224)})   # {name: array}, all 5 outputs

    onnxruntime            ONNX Runtime CPU (built in; the default)
    onnxruntime-cuda       ONNX Runtime CUDA EP (built in; onnxruntime-gpu)          never executed
    onnxruntime-tensorrt   ONNX Runtime TensorRT EP (built in; clipfuse[tensorrt])   never executed
    torch / torch-cuda-eager  the fp32 PyTorch reference (entry point: clipfuse.export.graph.torch_backend)
    torch-cuda             CUDA graphs per batch bucket, towers on concurrent streams, fp32 or fp16
                           (entry point: clipfuse.export.gpu.backend)                  never run on a GPU yet
    tensorrt               native TensorRT on a `clipfuse build` plan (entry point)   never executed
    openvino               OpenVINO's CPU plugin on the same graphs (entry point; clipfuse[openvino])

The ONNX Runtime backends are built in: a serving machine runs them, so they must not depend on
installed metadata. Every other backend is found through the entry points of group
`clipfuse.backends` (pyproject.toml), never through an import: the runtime does not import
clipfuse.export (an import contract keeps it so), and another package can add a backend the same way.
An entry point names a Backend subclass, constructed as Class(manifest, **options); its optional
classmethod `unavailable_reason()` says cheaply (importing nothing heavy) why it cannot run here.

backend="auto" picks only what has run somewhere: the never-executed GPU backends are named explicitly
or not at all, except native TensorRT on an engine whose manifest records a plan `clipfuse build` made,
and torch-cuda on a machine with a CUDA GPU and torch (though the CUDA-graph backend has not yet run on a
GPU: README "The GPU path").
This module imports neither torch nor open_clip, and the ONNX Runtime path never does (tested).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path

from clipfuse.core.errors import ClipfuseError, EngineMismatch
from clipfuse.core.log import log

from ..manifest import Manifest, read_manifest
from ..precisions import check_precision, with_precision
from .base import Backend
from .onnxruntime import ORT_PROVIDERS, OnnxRuntimeBackend, missing_provider_message
from .sessions import import_onnxruntime

ENTRY_POINT_GROUP = "clipfuse.backends"
# Every documented backend, fastest first (the order error messages and available_backends() use).
BACKEND_NAMES = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "torch-cuda", "torch-cuda-eager", "onnxruntime",
                 "openvino", "torch")
# Options only the torch-cuda backend takes: max_batch is a hint every caller may give (the other backends take
# any batch), compile and concurrent are asked for and refused elsewhere.
TORCH_CUDA_OPTIONS = ("max_batch", "compile", "concurrent", "cascade")
BUILTIN = ("onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime")
# Written against documentation, never run on any machine (see the module docstring).
NEVER_EXECUTED = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")
# What "auto" tries when the engine has no TensorRT plan. torch-cuda (CUDA graphs, towers on
# concurrent streams) is the exception to "only what has run": its predecessor, the eager fp32 module (now
# torch-cuda-eager), ran on an H200, and the levers it adds were measured there outside the backend (DESIGN.md
# "The GPU"), but this backend itself has not yet run on a GPU (README "The GPU path"). It rebuilds the
# ensemble on the GPU; the CPU ONNX Runtime session beats
# PyTorch eager on the same graph and needs neither torch nor open_clip, so it comes before torch.
# openvino, when installed, comes before onnxruntime for int8 only: faster there on a quiet machine,
# within the spread for fp32 and fp16, which stay on ONNX Runtime (no extra package). The figures, and
# why a shared machine should pass `--backend onnxruntime`: docs/decisions.md, "OpenVINO".
AUTO_ORDER = ("torch-cuda", "onnxruntime", "torch")
AUTO_ORDER_INT8 = ("openvino", "onnxruntime")


def nvidia_gpu_visible() -> bool:
    """True when the NVIDIA driver shows at least one GPU; cheap, imports nothing (no torch)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


# ----------------------------------------------------------------------------- the registry

@functools.lru_cache(maxsize=None)
def registered_backends() -> dict:
    """{name: entry point} of group `clipfuse.backends` (read once per process)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every backend name this installation knows: the documented ones, then any other registered."""
    return list(BACKEND_NAMES) + sorted(set(registered_backends()) - set(BACKEND_NAMES))


def backend_class(name: str) -> type:
    """The Backend subclass registered under `name`, or ClipfuseError saying why it cannot be had."""
    ep = registered_backends().get(name)
    if ep is None:
        raise ClipfuseError(f"backend {name} is not registered (no entry point {name!r} in group {ENTRY_POINT_GROUP!r}): "
                            "reinstall clipfuse (pip install -e . in a checkout) so its entry points are written")
    try:
        cls = ep.load()
    except ImportError as e:
        raise ClipfuseError(f"backend {name} is registered as {ep.value} but cannot be imported "
                            f"({type(e).__name__}: {e}); reinstall the package that provides it") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ClipfuseError(f"backend {name} is registered as {ep.value}, which is not a clipfuse Backend subclass")
    return cls


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run here (what to install), or None when it can be tried.

    Cheap: imports onnxruntime at most, never torch (registered backends judge themselves
    without importing their heavy libraries)."""
    if name not in backend_names():
        raise ClipfuseError(f"unknown backend {name!r}; valid: auto, {', '.join(backend_names())}")
    if name in BUILTIN:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed: pip install onnxruntime"
        if name != "onnxruntime":
            ort = import_onnxruntime()
            ep = ORT_PROVIDERS[name.split("-", 1)[1]]
            if ep not in ort.get_available_providers():
                return missing_provider_message(name, ort)
            if not nvidia_gpu_visible():
                return f"backend {name} needs an NVIDIA GPU and none is visible (no /proc/driver/nvidia/gpus)"
        return None
    try:
        cls = backend_class(name)
    except ClipfuseError as e:
        return str(e)
    check = getattr(cls, "unavailable_reason", None)
    return check() if check is not None else None


def available_backends() -> list[str]:
    """Backends that can be tried here, fastest first. backend="auto" tries only some of them
    (see auto_candidates)."""
    return [name for name in backend_names() if unavailable_reason(name) is None]


def built_plans(manifest: Manifest) -> dict:
    """{precision: plan entry} for the TensorRT plans `clipfuse build` recorded and that are on disk."""
    plans = manifest.data.get("plans") or {}
    return {p: e for p, e in plans.items() if isinstance(e, dict) and (manifest.folder / e.get("file", "")).is_file()}


def auto_candidates(manifest: Manifest, precision: str | None = None) -> list[str]:
    """What backend="auto" tries, in order: native TensorRT first only when the engine holds a plan
    built by `clipfuse build`; never the never-executed ONNX Runtime GPU providers; for int8 on the CPU,
    OpenVINO before ONNX Runtime (see AUTO_ORDER_INT8)."""
    order = list(AUTO_ORDER)
    if precision == "int8":
        order = ["torch-cuda"] + list(AUTO_ORDER_INT8) + ["torch"]
    return (["tensorrt"] if built_plans(manifest) else []) + order


def weights_files(manifest: Manifest) -> list[str]:
    """The backbones' weights that name a file (a path, a checkpoint suffix, or an existing name), not a
    pretrained tag or random:SEED: the torch backends rebuild the network from them, so backend="auto"
    never picks those backends for such an engine (a manifest is not trusted to make clipfuse read files)."""
    out = []
    for b in manifest.backbones:
        w = str(b.get("weights", ""))
        if (b.get("weights_kind") == "file" or "/" in w or "\\" in w or os.sep in w
                or w.lower().endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or os.path.lexists(w)):
            out.append(w)
    return out


def make_backend(manifest: Manifest, name: str, **options) -> Backend:
    """The backend object for `name`, not yet opened. Options go to its constructor (threads, ...)."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise ClipfuseError(reason)
    if name in BUILTIN:
        provider = name.split("-", 1)[1] if "-" in name else "cpu"
        return OnnxRuntimeBackend(manifest, provider=provider, **options)
    return backend_class(name)(manifest, **options)


def for_precision(manifest: Manifest, name: str, precision: str | None, options: dict) -> tuple[Manifest, dict]:
    """(manifest, options) that make backend `name` run `precision`: an ONNX backend (ONNX Runtime,
    OpenVINO) opens the precision's graph (runtime/precisions.py; onnxruntime-tensorrt the int8 graph
    made for TensorRT), native TensorRT its plan; torch-cuda fp32 or fp16 (autocast with the fp16 graph's
    islands); the other torch backends are the fp32 reference only."""

    if name != "torch-cuda":
        asked = [k for k in ("compile", "concurrent") if options.get(k) not in (None, False)]
        if asked:
            raise ClipfuseError(f"--{asked[0]} is an option of --backend torch-cuda, not of {name}")
        options = {k: v for k, v in options.items() if k not in TORCH_CUDA_OPTIONS}
    else:
        options = {k: v for k, v in options.items() if v is not None}
    if name == "torch-cuda":
        if precision is not None:
            check_precision(precision)
            options = dict(options, precision=precision)
        return manifest, options
    if precision is None:
        return manifest, options
    check_precision(precision)
    if name == "tensorrt":
        return manifest, dict(options, precision=precision)
    if precision == "fp32":
        return manifest, options
    if name.startswith("torch"):
        raise ClipfuseError(f"backend {name} runs the fp32 reference only (it rebuilds the network from open_clip); "
                            f"for {precision} use onnxruntime, openvino or tensorrt")
    return with_precision(manifest, precision, "tensorrt" if name == "onnxruntime-tensorrt" else "cpu"), options


def open_backend(manifest: Manifest | str | os.PathLike, name: str = "auto",
                 precision: str | None = None, **options) -> Backend:
    """An opened backend for the engine. name="auto" tries auto_candidates() and logs its pick on
    stderr; a named backend that cannot run raises ClipfuseError saying what to install.
    precision: fp32, fp16 or int8 (None: fp32, or for auto the TensorRT plan that was built)."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    if name != "auto":
        m, kw = for_precision(manifest, name, precision, options)
        backend = make_backend(m, name, **kw).open()
        log(f"backend {name} -> {backend.describe()}", level=logging.DEBUG)     # asked for: a detail (-v)
        return backend
    skipped = []
    plans = built_plans(manifest)
    for candidate in auto_candidates(manifest, precision):
        if precision not in (None, "fp32") and (candidate in ("torch", "torch-cuda-eager")
                                                or candidate == "torch-cuda" and precision != "fp16"
                                                or candidate == "tensorrt" and precision not in plans):
            continue                        # the fp32 reference, or no plan of this precision
        reason = unavailable_reason(candidate)
        if reason is None and candidate.startswith("torch") and weights_files(manifest):
            reason = (f"it would read the weights files the manifest names ({', '.join(weights_files(manifest))}); "
                      f"they are read only when asked: --backend {candidate}")
        if reason is None:
            kw = dict(options)
            if candidate == "tensorrt":     # the plan that was built: fp32 if there is one
                kw.setdefault("precision", precision or ("fp32" if "fp32" in plans else next(iter(plans))))
            try:
                m, kw = for_precision(manifest, candidate, precision, kw)
                backend = make_backend(m, candidate, **kw).open()
            except EngineMismatch:          # the folder itself is wrong: no other backend may answer for it
                raise
            except ClipfuseError as e:      # e.g. a plan built on another GPU: say so, try the next
                reason = str(e)
                log(f"backend auto: {candidate} cannot run: {reason}")
            else:
                log(f"backend auto -> {backend.describe()}")
                return backend
        if candidate in ("onnxruntime", "torch") or nvidia_gpu_visible():
            skipped.append(f"{candidate}: {reason}")   # GPU backends on a machine without one: not news
    raise ClipfuseError("no backend can run this engine here: " + "; ".join(skipped))
