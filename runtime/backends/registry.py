"""Backends: one small interface over every runtime that can execute an engine folder.

The idea is Polygraphy's runner: a backend is opened, fed, and closed,

    with open_backend(manifest, "onnxruntime") as backend:
        outputs = backend.infer({"image_224": uint8 (N, 3, 224, 224)})   # {name: array}, all 5 outputs

and every backend has the same three calls, so predict, benchmarks and the
comparison tests never care which one runs. Backends:

    onnxruntime            ONNX Runtime, CPU execution provider (built in; the default)
    onnxruntime-cuda       ONNX Runtime, CUDA execution provider        (built in; pip install onnxruntime-gpu)
                           never executed: no run of it on a GPU is recorded anywhere
    onnxruntime-tensorrt   ONNX Runtime, TensorRT execution provider    (built in; pip install 'clipfuse[tensorrt]')
                           never executed, as onnxruntime-cuda
    torch / torch-cuda     the PyTorch reference, rebuilt from the manifest (registered: clipfuse.export.graph.torch_backend)
    tensorrt               native TensorRT on a plan from `clipfuse build` (registered: clipfuse.runtime.backends.tensorrt);
                           never executed
    openvino               OpenVINO's CPU plugin on the same ONNX graphs (registered:
                           clipfuse.runtime.backends.openvino; pip install 'clipfuse[openvino]')

The registry. The ONNX Runtime backends (runtime/backends/onnxruntime.py) are built in: they
are what a serving machine runs, so they must not depend on the package's
installed metadata. Every other backend is found through Python entry points,
group `clipfuse.backends` (pyproject.toml), never through an import: the
runtime does not import clipfuse.export (an import contract in the tests keeps
it so), and another package can add a backend the same way. An entry point
names a Backend subclass, constructed as Class(manifest, **options); its
classmethod `unavailable_reason()` says cheaply (importing nothing heavy) why
it cannot run here, or None.

backend="auto" picks only what has run somewhere: the never-executed GPU
backends are named explicitly or not at all, except native TensorRT on an
engine whose manifest records a plan built by `clipfuse build` (the user ran
TensorRT on this engine, so it is theirs to trust).

Heavy libraries are imported lazily: this module imports neither torch nor
open_clip, and the ONNX Runtime path never does (a test checks it), so a
serving machine needs only onnxruntime, numpy and Pillow.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
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
BACKEND_NAMES = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime", "openvino",
                 "torch")
BUILTIN = ("onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime")
# Written against documentation, never run on any machine (see the module docstring).
NEVER_EXECUTED = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")
# What "auto" tries when the engine has no TensorRT plan: backends that have run. torch-cuda
# (it ran on an H200) rebuilds the ensemble on the GPU; the CPU ONNX Runtime session beats
# PyTorch eager on the same graph and needs neither torch nor open_clip, so it comes before torch.
# openvino, when installed, comes before onnxruntime for int8 only. In the committed side-by-side run
# on a quiet machine (benchmarks/results/precision_default.md, RN50 + ViT-B-32, other processes 0.01
# cores; medians of per-round ratios to ONNX Runtime fp32) OpenVINO int8 took 0.389 / 0.367 / 0.319
# at batch 1 / 8 / 32 where ONNX Runtime int8 took 0.397 / 0.424 / 0.433: 0.98x / 0.87x / 0.74x its
# latency. fp32 and fp16 were within the rounds' spread of ONNX Runtime (0.90-0.99x), so they stay on
# ONNX Runtime, which needs no extra package. The run before (other processes took 0.45 cores)
# had OpenVINO slower everywhere (fp32 3.4x at batch 1, int8 0.98x vs ONNX Runtime int8's 0.44x):
# its advantage needs the CPU to itself; `--backend onnxruntime` on a shared machine.
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
    made for TensorRT), native TensorRT its plan; the torch backends are the fp32 reference only."""

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


def open_backend(manifest: Manifest | str | os.PathLike, name: str = "auto", quiet: bool = False,
                 precision: str | None = None, **options) -> Backend:
    """An opened backend for the engine. name="auto" tries auto_candidates() and logs its pick on
    stderr; a named backend that cannot run raises ClipfuseError saying what to install.
    precision: fp32, fp16 or int8 (None: fp32, or for auto the TensorRT plan that was built)."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    if name != "auto":
        m, kw = for_precision(manifest, name, precision, options)
        return make_backend(m, name, **kw).open()
    skipped = []
    plans = built_plans(manifest)
    for candidate in auto_candidates(manifest, precision):
        if precision not in (None, "fp32") and (candidate.startswith("torch")
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
                log(f"backend auto: {candidate} cannot run: {reason}", quiet)
            else:
                log(f"backend auto -> {backend.describe()}", quiet)
                return backend
        if candidate in ("onnxruntime", "torch") or nvidia_gpu_visible():
            skipped.append(f"{candidate}: {reason}")   # GPU backends on a machine without one: not news
    raise ClipfuseError("no backend can run this engine here: " + "; ".join(skipped))
