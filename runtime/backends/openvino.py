"""The OpenVINO backend: the engine's ONNX graphs (fp32, fp16, int8) on OpenVINO's CPU plugin.

    with open_backend("engines/pets", "openvino", precision="int8") as b:
        outputs = b.infer({"image_224": uint8 (N, 3, 224, 224)})

The CPU peer a user would pick instead of ONNX Runtime (`pip install 'clipfuse[openvino]'`, no other
dependency but numpy). OpenVINO reads ONNX directly (no IR files beside the engine); its low-precision
transformations turn a QDQ graph (model.int8.onnx) into int8 kernels.

Facts that shape the code:
- INFERENCE_PRECISION_HINT is set to f32: otherwise the plugin picks the fastest precision the CPU
  offers (bf16 on AVX-512 BF16 machines) and the "fp32" graph would silently run in bf16. The
  precision is the graph's, never the plugin's (docs/decisions.md, "OpenVINO").
- PERFORMANCE_HINT LATENCY (one stream, the cores on one request), as ONNX Runtime's session;
  threads= sets INFERENCE_NUM_THREADS.
- An infer request's results live in buffers the next call reuses: they are copied out.
- The checks made of an ONNX Runtime session are made here too: inputs by name, outputs in iospec
  order, every fixed dimension against the manifest.

Registered as backend `openvino` through the entry points of group `clipfuse.backends`
(pyproject.toml). openvino is imported only in open().
"""
from __future__ import annotations

import importlib.util

import numpy as np

from clipfuse.core.errors import ClipfuseError, EngineMismatch

from ..manifest import Manifest, rebuild_hint
from .base import Backend
from .sessions import check_threads

INSTALL_OPENVINO = "pip install 'clipfuse[openvino]' (or pip install openvino)"


class OpenVINOBackend(Backend):
    """The engine's ONNX graph compiled for OpenVINO's CPU plugin, fp32 arithmetic unless the graph says otherwise."""

    name = "openvino"

    def __init__(self, manifest: Manifest, threads: int | None = None, device: str = "CPU"):
        super().__init__(manifest)
        check_threads(threads, "threads")
        self.threads, self.ov_device = threads, device
        self.compiled = self.request = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why OpenVINO cannot run here, or None; cheap: imports nothing (the registry's check)."""
        if importlib.util.find_spec("openvino") is None:
            return f"backend openvino needs the openvino package: {INSTALL_OPENVINO}"
        return None

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO {self.ov_device}"]

    @property
    def device(self) -> str:
        return f"cpu, threads {self.threads or 'default'}, fp32 inference precision"

    def describe(self) -> str:
        version = getattr(self, "_version", "")
        return f"openvino {version} ({self.ov_device}; {self.device}; {self.manifest.onnx_path.name})".replace("  ", " ")

    def open(self) -> "OpenVINOBackend":
        try:
            import openvino as ov
        except ImportError as e:
            raise ClipfuseError(f"backend openvino cannot import openvino ({e}): {INSTALL_OPENVINO}") from None
        self._version = ov.__version__.split("-")[0]
        core = ov.Core()
        path = self.manifest.onnx_path
        if not path.is_file():
            raise ClipfuseError(f"engine {str(self.manifest.folder)!r} is missing {path.name}; {rebuild_hint(self.manifest)}")
        try:
            model = core.read_model(str(path))
        except RuntimeError as e:          # OpenVINO reports a graph it cannot read as RuntimeError
            raise ClipfuseError(f"openvino {self._version} cannot read {path}: {str(e).splitlines()[0][:200]}") from None
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        check_model_matches_manifest(self.manifest, model)
        self.compiled = core.compile_model(model, self.ov_device, config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o["name"] for o in self.manifest.outputs]
        # a port may carry several tensor names (the fp16 converter's Casts alias the outputs): match by set
        self._ports = {n: next(o for o in self.compiled.outputs if n in o.get_names()) for n in self.output_names}
        self.is_open = True
        return self

    def _infer(self, feed):
        res = self.request.infer(feed)
        # copies: the request's buffers are overwritten by the next call
        return {n: np.array(res[self._ports[n]], copy=True) for n in self.output_names}

    def close(self) -> None:
        self.request = self.compiled = None
        super().close()


def check_model_matches_manifest(manifest: Manifest, model) -> None:
    """Inputs by name (uint8), outputs by name in iospec order, every fixed dimension as the manifest says."""
    where = f"engine {str(manifest.folder)!r} ({manifest.onnx_path.name})"
    for kind, specs, ports in (("input", manifest.inputs, model.inputs), ("output", manifest.outputs, model.outputs)):
        want = [s["name"] for s in specs]
        names = [s if s in p.get_names() else p.get_any_name() for s, p in zip(want, ports)] + \
            [p.get_any_name() for p in list(ports)[len(want):]]
        if names != want:
            raise EngineMismatch(f"{where}: manifest {kind}s {want} differ from the graph's {names}; the folder "
                                f"mixes two exports: {rebuild_hint(manifest)}")
        for s, p in zip(specs, ports):
            shape = p.get_partial_shape()
            if shape.rank.is_static and shape.rank.get_length() != len(s["shape"]):
                raise EngineMismatch(f"{where}: {kind} {s['name']!r} has rank {shape.rank.get_length()}, the manifest "
                                    f"says {len(s['shape'])}: {rebuild_hint(manifest)}")
            for axis, (w, d) in enumerate(zip(s["shape"], shape)):
                if isinstance(w, int) and d.is_static and d.get_length() != w:
                    raise EngineMismatch(f"{where}: {kind} {s['name']!r} has {d.get_length()} along axis {axis} but "
                                        f"the manifest says {w}; the folder mixes two exports: {rebuild_hint(manifest)}")
