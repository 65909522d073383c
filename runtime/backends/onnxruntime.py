"""The built-in ONNX Runtime backend: CPU, CUDA or TensorRT execution provider, and the check that
an engine's graph matches its manifest.

The CPU provider is what has run; onnxruntime-cuda and onnxruntime-tensorrt were never executed (no
run of them on a GPU is recorded anywhere). Found by name through runtime/backends/registry.py, which
re-exports OnnxRuntimeBackend.

ONNX Runtime silently falls back to the CPU when a GPU execution provider
cannot start (CUDA/cuDNN version mismatch is the classic case); this backend
never does: after creating the session it checks which provider actually runs
and raises ClipfuseError if it is not the one asked for.
"""
from __future__ import annotations

import os
from pathlib import Path

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError, EngineMismatch

from ..manifest import Manifest, rebuild_hint
from .base import Backend
from .sessions import check_onnxruntime_can_run, import_onnxruntime, open_session, session_options

INSTALL_ORT_GPU = "pip install onnxruntime-gpu (in place of onnxruntime; it needs the CUDA and cuDNN versions its release notes name)"
INSTALL_TENSORRT = "pip install 'clipfuse[tensorrt]' (TensorRT, onnxruntime-gpu) on a machine with an NVIDIA GPU"

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider.

    The session comes from runtime/backends/sessions.py, the one loader, with its measured
    CPU defaults. The CPU provider is what has run; the CUDA and TensorRT
    providers were never executed (no GPU run of them is recorded anywhere).
    """

    def __init__(self, manifest: Manifest, provider: str = "cpu", threads: int | None = None,
                 parallel: bool = False, spinning: bool | None = None, device_id: int = 0,
                 trt_cache: str | os.PathLike | None = None, trt_fp16: bool = False, max_batch: int = 64,
                 opt_batch: int = 8, arena: bool = True):
        super().__init__(manifest)
        if provider not in ORT_PROVIDERS:
            raise ClipfuseError(f"unknown ONNX Runtime provider {provider!r}; valid: {', '.join(ORT_PROVIDERS)}")
        if threads is not None and threads < 1:
            raise ClipfuseError(f"threads must be at least 1, got {threads}")
        self.provider = provider
        self.name = "onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}"
        self.threads, self.parallel, self.spinning, self.device_id = threads, parallel, spinning, device_id
        self.arena = arena               # False: ORT's CPU arena off (runtime/backends/sessions.py session_options)
        # TensorRT builds engines per shape profile; cache them beside the engine so the
        # minutes-long build happens once per machine, not once per process.
        self.trt_cache = Path(trt_cache) if trt_cache else manifest.folder / "trt_cache"
        self.trt_fp16, self.max_batch, self.opt_batch = trt_fp16, max_batch, opt_batch
        self.session = None

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else [ORT_PROVIDERS[self.provider]]

    @property
    def device(self) -> str:
        if self.provider != "cpu":
            return f"cuda:{self.device_id}"
        threads = self.threads or "default"
        return f"cpu, intra-op threads {threads}, {'parallel' if self.parallel else 'sequential'}"

    def describe(self) -> str:
        return f"{self.name} ({self.providers[0]}; {self.device})"

    def session_options(self):
        return session_options(threads=self.threads, parallel=self.parallel, spinning=self.spinning, arena=self.arena)

    def _provider_list(self) -> list:
        ep = ORT_PROVIDERS[self.provider]
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
        ep = ORT_PROVIDERS[self.provider]
        if ep not in ort.get_available_providers():
            raise ClipfuseError(missing_provider_message(self.name, ort))
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


def missing_provider_message(name: str, ort) -> str:
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
            raise EngineMismatch(f"{where}: manifest {kind}s {[s['name'] for s in specs]} differ from the graph's "
                                f"{list(graph)}; the folder mixes two exports: {rebuild_hint(manifest)}")
        for s in specs:
            for axis, (want, got) in enumerate(zip(s["shape"], graph[s["name"]])):
                if isinstance(want, int) and isinstance(got, int) and want != got:
                    raise EngineMismatch(
                        f"{where}: {kind} {s['name']!r} has {got} along axis {axis} in model.onnx but the manifest "
                        f"says {want}{_shape_hint(manifest, s['name'], axis)}; the folder mixes two exports: "
                        f"{rebuild_hint(manifest)}")
    # The class and backbone lists are what predictions are labelled with: they must match the graph too.
    for name, axis, count, what in ((iospec.LOGITS, 1, len(manifest.classes), "classes"),
                                    (iospec.TEMPERATURES, 1, len(manifest.backbones), "backbones")):
        got = graph_out.get(name, [None, None])[axis]
        if isinstance(got, int) and got != count:
            raise EngineMismatch(f"{where}: model.onnx has {got} {what} ({name!r} is (N, {got})) but the manifest "
                                f"lists {count}; the manifest was edited or comes from another export: "
                                f"{rebuild_hint(manifest)}")


def _shape_hint(manifest: Manifest, name: str, axis: int) -> str:
    if name in (iospec.LOGITS, iospec.PROBS) and axis == 1 or name == iospec.BACKBONE_LOGITS and axis == 2:
        return f" ({len(manifest.classes)} classes listed)"
    return ""
