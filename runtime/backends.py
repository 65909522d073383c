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
    torch / torch-cuda     the PyTorch reference, rebuilt from the manifest (registered: clipfuse.export.torch_backend)
    tensorrt               native TensorRT on a plan from `clipfuse build` (registered: clipfuse.runtime.trt);
                           never executed
    openvino               OpenVINO's CPU plugin on the same ONNX graphs (registered:
                           clipfuse.runtime.openvino_backend; pip install 'clipfuse[openvino]')

The registry. The ONNX Runtime backends are defined here and built in: they
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

ONNX Runtime silently falls back to the CPU when a GPU execution provider
cannot start (CUDA/cuDNN version mismatch is the classic case); a backend here
never does: after creating the session it checks which provider actually runs
and raises ClipfuseError if it is not the one asked for.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np

from clipfuse import iospec
from clipfuse.errors import ClipfuseError
from clipfuse.log import log
from clipfuse.runtime.manifest import Manifest, check_onnxruntime_can_run, read_manifest, rebuild_hint
from clipfuse.runtime.sessions import import_onnxruntime, open_session, session_options

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
# openvino is not tried: side by side here (RN50 + ViT-B-32 at random weights, `clipfuse bench --precisions
# fp32,int8 --openvino`, 7 interleaved rounds, medians of per-round ratios to ONNX Runtime fp32, on a busy
# 2-core machine whose other processes took 1.5 cores meanwhile) OpenVINO fp32 ran 1.08x / 0.98x ONNX
# Runtime fp32's latency at batch 1 / 8, and OpenVINO int8 0.41 / 0.42 against ONNX Runtime int8's 0.44 /
# 0.48: within 1.3x of ONNX Runtime, and measured on a busy machine, so auto stays with ONNX Runtime.
AUTO_ORDER = ("torch-cuda", "onnxruntime", "torch")

INSTALL_ORT_GPU = "pip install onnxruntime-gpu (in place of onnxruntime; it needs the CUDA and cuDNN versions its release notes name)"
INSTALL_TENSORRT = "pip install 'clipfuse[tensorrt]' (TensorRT, onnxruntime-gpu) on a machine with an NVIDIA GPU"


def nvidia_gpu_visible() -> bool:
    """True when the NVIDIA driver shows at least one GPU; cheap, imports nothing (no torch)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


# ----------------------------------------------------------------------------- the interface

class Backend:
    """open() -> infer(feed) -> close(); also a context manager.

    feed:    {input_name: uint8 (N, 3, R, R)} with exactly the engine's inputs (iospec names)
    returns: {output_name: array} with all five outputs in iospec order
    """

    name = "backend"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.is_open = False

    # what the user sees in logs and benchmark tables
    @property
    def providers(self) -> list[str]:
        return []

    @property
    def device(self) -> str:
        return "cpu"

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.providers) or self.device})"

    def open(self) -> "Backend":
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        self.is_open = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_open:
            raise ClipfuseError(f"backend {self.name} is not open: call open() or use it in a `with` block")
        return self._infer(check_feed(self.manifest, feed))

    def __enter__(self) -> "Backend":
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_feed(manifest: Manifest, feed: dict) -> dict:
    """The feed must hold exactly the engine's inputs, uint8 (N, 3, R, R), one N for all."""
    expected = [i["name"] for i in manifest.inputs]
    if sorted(feed) != sorted(expected):
        raise ClipfuseError(f"feed has inputs {sorted(feed)}, engine {manifest.folder.name!r} expects {expected}")
    n, first = None, None
    for spec in manifest.inputs:
        a = feed[spec["name"]]
        R = spec["shape"][2]
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (3, R, R):
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ClipfuseError(f"input {spec['name']!r} must be uint8 (N, 3, {R}, {R}), got {got}")
        if n is not None and a.shape[0] != n:
            raise ClipfuseError(f"inputs disagree on the batch size: {first!r} has {n} images, {spec['name']!r} has "
                                f"{a.shape[0]}; every input holds the same images, resized for each resolution")
        n, first = a.shape[0], first or spec["name"]
    if not n:
        raise ClipfuseError("empty feed: the batch holds no images")
    return {name: np.ascontiguousarray(feed[name]) for name in expected}


# ----------------------------------------------------------------------------- ONNX Runtime

_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider.

    The session comes from runtime/sessions.py, the one loader, with its measured
    CPU defaults. The CPU provider is what has run; the CUDA and TensorRT
    providers were never executed (no GPU run of them is recorded anywhere).
    """

    def __init__(self, manifest: Manifest, provider: str = "cpu", threads: int | None = None,
                 parallel: bool = False, spinning: bool | None = None, device_id: int = 0,
                 trt_cache: str | os.PathLike | None = None, trt_fp16: bool = False, max_batch: int = 64,
                 opt_batch: int = 8):
        super().__init__(manifest)
        if provider not in _ORT_PROVIDERS:
            raise ClipfuseError(f"unknown ONNX Runtime provider {provider!r}; valid: {', '.join(_ORT_PROVIDERS)}")
        if threads is not None and threads < 1:
            raise ClipfuseError(f"threads must be at least 1, got {threads}")
        self.provider = provider
        self.name = "onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}"
        self.threads, self.parallel, self.spinning, self.device_id = threads, parallel, spinning, device_id
        # TensorRT builds engines per shape profile; cache them beside the engine so the
        # minutes-long build happens once per machine, not once per process.
        self.trt_cache = Path(trt_cache) if trt_cache else manifest.folder / "trt_cache"
        self.trt_fp16, self.max_batch, self.opt_batch = trt_fp16, max_batch, opt_batch
        self.session = None

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else [_ORT_PROVIDERS[self.provider]]

    @property
    def device(self) -> str:
        if self.provider != "cpu":
            return f"cuda:{self.device_id}"
        threads = self.threads or "default"
        return f"cpu, intra-op threads {threads}, {'parallel' if self.parallel else 'sequential'}"

    def describe(self) -> str:
        return f"{self.name} ({self.providers[0]}; {self.device})"

    def session_options(self):
        return session_options(threads=self.threads, parallel=self.parallel, spinning=self.spinning)

    def _provider_list(self) -> list:
        ep = _ORT_PROVIDERS[self.provider]
        if self.provider == "cpu":
            return [ep]
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id,
                                          # grow the arena by what is asked: less memory held for nothing
                                          "arena_extend_strategy": "kSameAsRequested"})
        if self.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        try:
            self.trt_cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClipfuseError(f"cannot create the TensorRT cache folder {str(self.trt_cache)!r} ({e.strerror}); "
                                "pass trt_cache= a writable folder") from None

        def shapes(n):
            return ",".join(f"{i['name']}:{n}x3x{i['shape'][2]}x{i['shape'][3]}" for i in self.manifest.inputs)

        trt = {"device_id": self.device_id,
               "trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.trt_cache),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(self.trt_cache),
               "trt_fp16_enable": self.trt_fp16,
               # one profile covering every batch size up to max_batch: no rebuild per new shape
               "trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(self.opt_batch),
               "trt_profile_max_shapes": shapes(self.max_batch)}
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]

    def open(self) -> "OnnxRuntimeBackend":
        ort = import_onnxruntime()
        ep = _ORT_PROVIDERS[self.provider]
        if ep not in ort.get_available_providers():
            raise ClipfuseError(_missing_provider_message(self.name, ort))
        check_onnxruntime_can_run(self.manifest)
        opset = self.manifest.data["onnx"].get("opset")
        self.session = open_session(self.manifest.onnx_path, self.session_options(), providers=self._provider_list(),
                                    hint=f"The graph is opset {opset}: upgrade onnxruntime, or rebuild the engine: "
                                         f"{rebuild_hint(self.manifest)}")
        active = self.session.get_providers()
        if active[0] != ep:
            self.session = None
            raise ClipfuseError(
                f"onnxruntime could not start {ep} and would have run on {active[0]} instead (refused: no silent "
                f"fallback). Check that the GPU is visible (nvidia-smi) and that the CUDA, cuDNN"
                f"{' and TensorRT' if self.provider == 'tensorrt' else ''} libraries match onnxruntime-gpu "
                f"{ort.__version__}; or pick another backend (--backend onnxruntime for the CPU)")
        check_graph_matches_manifest(self.manifest, self.session)
        self.output_names = [o["name"] for o in self.manifest.outputs]
        self.is_open = True
        return self

    def _infer(self, feed):
        if self.provider == "tensorrt":
            n = next(iter(feed.values())).shape[0]
            if n > self.max_batch:
                raise ClipfuseError(f"batch of {n} is over the TensorRT profile's max_batch {self.max_batch}; "
                                    "use a smaller batch or open the backend with a larger max_batch")
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def close(self) -> None:
        self.session = None
        super().close()


def _missing_provider_message(name: str, ort) -> str:
    have = ", ".join(ort.get_available_providers())
    what = INSTALL_TENSORRT if name == "onnxruntime-tensorrt" else INSTALL_ORT_GPU
    return (f"backend {name} is not available: this onnxruntime {ort.__version__} has only {have}. "
            f"Install the GPU build: {what}")


def check_graph_matches_manifest(manifest: Manifest, session) -> None:
    """The manifest is not hashed, so a hand edit (or a manifest from another export) is caught here:
    input and output names and every fixed dimension must match the graph."""
    where = f"engine {str(manifest.folder)!r}"
    graph_in = {i.name: i.shape for i in session.get_inputs()}
    graph_out = {o.name: o.shape for o in session.get_outputs()}
    for kind, specs, graph in (("input", manifest.inputs, graph_in), ("output", manifest.outputs, graph_out)):
        if [s["name"] for s in specs] != list(graph):
            raise ClipfuseError(f"{where}: manifest {kind}s {[s['name'] for s in specs]} differ from the graph's "
                                f"{list(graph)}; the folder mixes two exports: {rebuild_hint(manifest)}")
        for s in specs:
            for axis, (want, got) in enumerate(zip(s["shape"], graph[s["name"]])):
                if isinstance(want, int) and isinstance(got, int) and want != got:
                    raise ClipfuseError(
                        f"{where}: {kind} {s['name']!r} has {got} along axis {axis} in model.onnx but the manifest "
                        f"says {want}{_shape_hint(manifest, s['name'], axis)}; the folder mixes two exports: "
                        f"{rebuild_hint(manifest)}")
    # The class and backbone lists are what predictions are labelled with: they must match the graph too.
    for name, axis, count, what in ((iospec.LOGITS, 1, len(manifest.classes), "classes"),
                                    (iospec.TEMPERATURES, 1, len(manifest.backbones), "backbones")):
        got = graph_out.get(name, [None, None])[axis]
        if isinstance(got, int) and got != count:
            raise ClipfuseError(f"{where}: model.onnx has {got} {what} ({name!r} is (N, {got})) but the manifest "
                                f"lists {count}; the manifest was edited or comes from another export: "
                                f"{rebuild_hint(manifest)}")


def _shape_hint(manifest: Manifest, name: str, axis: int) -> str:
    if name in (iospec.LOGITS, iospec.PROBS) and axis == 1 or name == iospec.BACKBONE_LOGITS and axis == 2:
        return f" ({len(manifest.classes)} classes listed)"
    return ""


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
            ep = _ORT_PROVIDERS[name.split("-", 1)[1]]
            if ep not in ort.get_available_providers():
                return _missing_provider_message(name, ort)
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


def auto_candidates(manifest: Manifest) -> list[str]:
    """What backend="auto" tries, in order: native TensorRT first only when the engine holds a plan
    built by `clipfuse build`; never the never-executed ONNX Runtime GPU providers."""
    return (["tensorrt"] if built_plans(manifest) else []) + list(AUTO_ORDER)


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
    from clipfuse.runtime.precisions import check_precision, with_precision

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
    for candidate in auto_candidates(manifest):
        if precision not in (None, "fp32") and (candidate.startswith("torch")
                                                or candidate == "tensorrt" and precision not in plans):
            continue                        # the fp32 reference, or no plan of this precision
        reason = unavailable_reason(candidate)
        if reason is None:
            kw = dict(options)
            if candidate == "tensorrt":     # the plan that was built: fp32 if there is one
                kw.setdefault("precision", precision or ("fp32" if "fp32" in plans else next(iter(plans))))
            try:
                m, kw = for_precision(manifest, candidate, precision, kw)
                backend = make_backend(m, candidate, **kw).open()
            except ClipfuseError as e:      # e.g. a plan built on another GPU: say so, try the next
                reason = str(e)
                log(f"backend auto: {candidate} cannot run: {reason}", quiet)
            else:
                log(f"backend auto -> {backend.describe()}", quiet)
                return backend
        if candidate in ("onnxruntime", "torch") or nvidia_gpu_visible():
            skipped.append(f"{candidate}: {reason}")   # GPU backends on a machine without one: not news
    raise ClipfuseError("no backend can run this engine here: " + "; ".join(skipped))
