"""Backends: one small interface over every runtime that can execute an engine folder.

The idea is Polygraphy's runner: a backend is opened, fed, and closed,

    with open_backend(manifest, "onnxruntime") as backend:
        outputs = backend.infer({"image_224": uint8 (N, 3, 224, 224)})   # {name: array}, all 5 outputs

and every backend has the same three calls, so predict, benchmarks and the
comparison tests never care which one runs. Backends here:

    onnxruntime            ONNX Runtime, CPU execution provider (the default on a machine without a GPU)
    onnxruntime-cuda       ONNX Runtime, CUDA execution provider        (pip install onnxruntime-gpu)
    onnxruntime-tensorrt   ONNX Runtime, TensorRT execution provider    (pip install 'clipfuse[tensorrt]')
    torch / torch-cuda     the PyTorch reference, rebuilt from the manifest (needs torch + open_clip)
    tensorrt               native TensorRT, provided by clipfuse.runtime.trt when that module exists
                           (its contract: a Backend subclass TensorRTBackend(manifest, **options))

Heavy libraries are imported lazily: this module imports neither torch nor
open_clip, and the ONNX Runtime path never does (a test checks it), so a
serving machine needs only onnxruntime, numpy and Pillow.

ONNX Runtime silently falls back to the CPU when a GPU execution provider
cannot start (CUDA/cuDNN version mismatch is the classic case); a backend here
never does: after creating the session it checks which provider actually runs
and raises ClipfuseError if it is not the one asked for.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from clipfuse import iospec
from clipfuse.errors import ClipfuseError
from clipfuse.runtime.manifest import Manifest, check_onnxruntime_can_run, read_manifest, rebuild_hint

# Preference order of "auto": fastest first. GPU backends are only tried where an
# NVIDIA GPU is visible; the CPU ONNX Runtime session beats PyTorch eager on the
# same graph and needs neither torch nor open_clip, so it comes before torch.
AUTO_ORDER = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime", "torch")
BACKEND_NAMES = AUTO_ORDER

INSTALL_ORT_GPU = "pip install onnxruntime-gpu (in place of onnxruntime; it needs the CUDA and cuDNN versions its release notes name)"
INSTALL_TENSORRT = "pip install 'clipfuse[tensorrt]' (TensorRT, onnxruntime-gpu) on a machine with an NVIDIA GPU"


def log(msg: str) -> None:
    print(f"[clipfuse] {msg}", file=sys.stderr, flush=True)


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


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ClipfuseError("onnxruntime is not installed: pip install onnxruntime "
                            "(or onnxruntime-gpu for the CUDA and TensorRT execution providers)") from None
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider.

    CPU defaults come from measurement (benchmarks/runtime_thin.py, results in
    benchmarks/results/runtime_thin.md; RN50 + ViT-B-32 on 2 cores, batch 8):
    sequential execution with ORT's own intra-op thread count (one per physical
    core, here 2): 816 ms; 1 thread: 1619 ms; ORT_PARALLEL: 1651-1767 ms, its
    inter-op pool competes with the intra-op one for the same cores. Graph
    optimisation level ALL. `spinning=False` stops idle intra-op threads from
    spinning; measured no gain for predict here, so it is left to ORT.
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
        ort = _onnxruntime()
        so = ort.SessionOptions()
        so.log_severity_level = 3           # ORT's warnings are about its internals; ours name the cause
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if self.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads:
            so.intra_op_num_threads = self.threads
        if self.spinning is not None:       # idle intra-op threads spin by default, taking cores from decoders
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return so

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
        ort = _onnxruntime()
        ep = _ORT_PROVIDERS[self.provider]
        if ep not in ort.get_available_providers():
            raise ClipfuseError(_missing_provider_message(self.name, ort))
        check_onnxruntime_can_run(self.manifest)
        try:
            with warnings.catch_warnings():   # ORT warns of a missing provider and falls back; we refuse below
                warnings.simplefilter("ignore")
                self.session = ort.InferenceSession(str(self.manifest.onnx_path), self.session_options(),
                                                    providers=self._provider_list())
        except Exception as e:      # ORT raises its own pybind exception types for a bad graph
            raise ClipfuseError(
                f"onnxruntime {ort.__version__} cannot load {str(self.manifest.onnx_path)!r} "
                f"(opset {self.manifest.data['onnx'].get('opset')}): {type(e).__name__}: {str(e)[:300]}. "
                f"Upgrade onnxruntime, or rebuild the engine: {rebuild_hint(self.manifest)}") from None
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


# ----------------------------------------------------------------------------- PyTorch

class TorchBackend(Backend):
    """The PyTorch reference: the FusedEnsemble rebuilt from the manifest, heads and controller.

    Backbones are rebuilt with export.backbones.load_backbone, which is exact for
    random:SEED and checkpoint-file weights (a pretrained tag needs open_clip's
    download or cache). The rebuilt image tower must hash to the manifest's
    weights_sha256, otherwise this is not the network the graph was made from.
    """

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None):
        super().__init__(manifest)
        if device not in ("cpu", "cuda"):
            raise ClipfuseError(f"unknown torch device {device!r}; valid: cpu, cuda")
        self._device, self.threads = device, threads
        self.name = "torch" if device == "cpu" else "torch-cuda"
        self.model = None

    @property
    def providers(self) -> list[str]:
        return [f"torch {self._device}"]

    @property
    def device(self) -> str:
        return self._device

    def open(self) -> "TorchBackend":
        for module in ("torch", "open_clip"):
            if importlib.util.find_spec(module) is None:
                raise ClipfuseError(f"backend {self.name} needs {module}: pip install torch open_clip_torch "
                                    "(or use --backend onnxruntime, which needs neither)")
        import torch

        from clipfuse.export.backbones import load_backbone
        from clipfuse.export.fused import FusedEnsemble, load_controller
        from clipfuse.export.heads import load_heads

        if self._device == "cuda" and not torch.cuda.is_available():
            raise ClipfuseError("backend torch-cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                                "install a CUDA build of torch on a machine with an NVIDIA GPU, or use --backend torch")
        if self.threads:
            torch.set_num_threads(self.threads)
        m = self.manifest
        visuals = []
        for i, b in enumerate(m.backbones):
            spec = f"{b['arch']}:{b['weights']}"
            built = load_backbone(spec)
            if built.weights_sha256 != b["weights_sha256"]:
                raise ClipfuseError(
                    f"engine {str(m.folder)!r}: backbone {i} ({spec}) rebuilt here has image-tower weights "
                    f"{built.weights_sha256[:12]}..., the manifest records {b['weights_sha256'][:12]}...: these are not the "
                    "weights the graph was exported from (another open_clip version, or a changed checkpoint file), "
                    f"so the torch backend cannot reproduce it. Use --backend onnxruntime, or rebuild: {rebuild_hint(m)}")
            if built.image_size != b["image_size"] or built.embed_dim != b["embed_dim"]:
                raise ClipfuseError(f"engine {str(m.folder)!r}: backbone {i} ({spec}) rebuilds at {built.image_size} px, "
                                    f"D={built.embed_dim}; the manifest says {b['image_size']} px, D={b['embed_dim']}")
            visuals.append(built.model.visual)
            del built
        heads = load_heads(m.folder / m.data.get("heads_file", "heads.safetensors"), num_backbones=len(visuals))
        for i, (h, b) in enumerate(zip(heads, m.backbones)):
            if tuple(h.weight.shape) != (len(m.classes), b["embed_dim"]):
                raise ClipfuseError(
                    f"engine {str(m.folder)!r}: head {i} in {m.data.get('heads_file', 'heads.safetensors')} has shape "
                    f"{tuple(h.weight.shape)}, the manifest needs ({len(m.classes)} classes, D={b['embed_dim']}): the "
                    f"heads file comes from another engine; {rebuild_hint(m)}")
        controller = load_controller(m.folder / m.data.get("controller", {}).get("file", "controller.safetensors"))
        self.model = FusedEnsemble(visuals, heads, [b["image_size"] for b in m.backbones],
                                   [b["mean"] for b in m.backbones], [b["std"] for b in m.backbones],
                                   controller).eval().to(self._device)
        if self._device == "cuda":
            # A reference computes in fp32: cuDNN convolutions default to TF32 on Ampere and later
            # (10-bit mantissa, ~1e-3 relative error), which the comparison with ORT would see.
            # Process-wide flags, so they are put back on close().
            self._tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self._torch = torch
        self.output_names = [o["name"] for o in m.outputs]
        self.is_open = True
        return self

    def _infer(self, feed):
        torch = self._torch
        images = [torch.from_numpy(feed[iospec.input_name(r)]).to(self._device) for r in self.model.resolutions]
        with torch.inference_mode():
            outs = self.model(*images)
        return {name: o.float().cpu().numpy() for name, o in zip(self.output_names, outs)}

    def close(self) -> None:
        if self.model is not None and self._device == "cuda":
            self._torch.backends.cudnn.allow_tf32, self._torch.backends.cuda.matmul.allow_tf32 = self._tf32
        self.model = None
        super().close()


# ----------------------------------------------------------------------------- choosing one

def _native_tensorrt():
    """clipfuse.runtime.trt (added by the TensorRT issue) and tensorrt itself, or the reason they are absent."""
    try:
        trt_module = importlib.import_module("clipfuse.runtime.trt")
        importlib.import_module("tensorrt")
    except ImportError as e:
        return None, ("the native TensorRT backend needs the tensorrt package and an NVIDIA GPU "
                      f"(and a clipfuse with clipfuse.runtime.trt; here: {e}): {INSTALL_TENSORRT}")
    return trt_module, None


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run here (what to install), or None when it can be tried.

    Cheap: imports onnxruntime at most, never torch (torch-cuda is judged from the
    driver's view of the GPU and whether torch is installed)."""
    if name not in BACKEND_NAMES:
        raise ClipfuseError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKEND_NAMES)}")
    if name == "tensorrt":
        return _native_tensorrt()[1]
    if name.startswith("onnxruntime"):
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed: pip install onnxruntime"
        if name != "onnxruntime":
            ort = _onnxruntime()
            ep = _ORT_PROVIDERS[name.split("-", 1)[1]]
            if ep not in ort.get_available_providers():
                return _missing_provider_message(name, ort)
            if not nvidia_gpu_visible():
                return f"backend {name} needs an NVIDIA GPU and none is visible (no /proc/driver/nvidia/gpus)"
        return None
    missing = [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
    if missing:
        return f"backend {name} needs {' and '.join(missing)}: pip install torch open_clip_torch"
    if name == "torch-cuda" and not nvidia_gpu_visible():
        return "backend torch-cuda needs an NVIDIA GPU and none is visible (no /proc/driver/nvidia/gpus)"
    return None


def available_backends() -> list[str]:
    """Backends that can be tried here, fastest first (the order "auto" tries them)."""
    return [name for name in AUTO_ORDER if unavailable_reason(name) is None]


def make_backend(manifest: Manifest, name: str, **options) -> Backend:
    """The backend object for `name`, not yet opened. Options go to its constructor (threads, ...)."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise ClipfuseError(reason)
    if name == "tensorrt":
        trt_module, _ = _native_tensorrt()
        return trt_module.TensorRTBackend(manifest, **options)
    if name.startswith("onnxruntime"):
        provider = name.split("-", 1)[1] if "-" in name else "cpu"
        return OnnxRuntimeBackend(manifest, provider=provider, **options)
    return TorchBackend(manifest, device="cuda" if name == "torch-cuda" else "cpu", **options)


def open_backend(manifest: Manifest | str | os.PathLike, name: str = "auto", quiet: bool = False,
                 **options) -> Backend:
    """An opened backend for the engine. name="auto" tries AUTO_ORDER and logs its pick on stderr;
    a named backend that cannot run raises ClipfuseError saying what to install."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    if name != "auto":
        return make_backend(manifest, name, **options).open()
    skipped = []
    for candidate in AUTO_ORDER:
        reason = unavailable_reason(candidate)
        if reason is None:
            try:
                backend = make_backend(manifest, candidate, **options).open()
            except ClipfuseError as e:      # e.g. a GPU provider that cannot start: say so, try the next
                reason = str(e)
                if not quiet:
                    log(f"backend auto: {candidate} cannot run: {reason}")
            else:
                if not quiet:
                    log(f"backend auto -> {backend.describe()}")
                return backend
        if candidate in ("onnxruntime", "torch") or nvidia_gpu_visible():
            skipped.append(f"{candidate}: {reason}")   # GPU backends on a machine without one: not news
    raise ClipfuseError("no backend can run this engine here: " + "; ".join(skipped))
