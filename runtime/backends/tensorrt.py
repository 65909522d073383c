"""The native TensorRT backend: a plan built by `clipfuse build`, run through the runtime's Backend interface.

    with open_backend("engines/pets", "tensorrt", precision="fp16") as b:
        outputs = b.infer({"image_224": uint8 (N, 3, 224, 224)})

open() deserialises model.<precision>.plan with trt.Runtime after checking that it
was built by this TensorRT version on this GPU (name and compute capability, as
the manifest's "plans" entry records them): a plan is neither portable across
TensorRT versions nor across GPU architectures, and a mismatch is refused with
the command that rebuilds it. I/O is by tensor name (TensorRT 10+):
set_input_shape per input, set_tensor_address per tensor, execute_async_v3 on an
explicit CUDA stream; auxiliary streams are handed over with set_aux_streams when
the engine was built with them.

Memory and streams come from torch (a dependency already; cuda-python would be
one more): device buffers and pinned host buffers are allocated once, at the
profile's max batch, and reused; a call copies the inputs host -> pinned ->
device on the stream, runs, copies the outputs back and synchronises once.

Status: never executed. Written against the TensorRT 10/11 Python API
documentation; no machine that ran it is recorded anywhere (tests/runtime/test_trt.py
skips where TensorRT is absent, which so far is everywhere it ran). For that
reason backend="auto" tries it only on an engine whose manifest records a plan
that `clipfuse build` made.

Registered as backend `tensorrt` through the entry points of group
`clipfuse.backends` (pyproject.toml), like every optional backend.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from clipfuse.core.errors import ClipfuseError

from ..manifest import Manifest
from . import registry
from .base import Backend
from .onnxruntime import INSTALL_TENSORRT

INSTALL = "TensorRT is not installed: pip install 'clipfuse[tensorrt]' (needs an NVIDIA GPU and driver)"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ClipfuseError(INSTALL) from None
    return tensorrt


def gpu_identity(device: int = 0) -> dict:
    """The running GPU's name and compute capability (through torch, a dependency; CUDA needed)."""
    import torch

    if not torch.cuda.is_available():
        raise ClipfuseError("TensorRT needs an NVIDIA GPU: torch sees none (torch.cuda.is_available() is False)")
    p = torch.cuda.get_device_properties(device)
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def rebuild_command(manifest: Manifest, precision: str) -> str:
    return f"`clipfuse build {manifest.folder} --precision {precision}`"


def check_plan_matches(entry: dict, trt_version: str, gpu: dict, manifest: Manifest, precision: str) -> None:
    """Refuse a plan built by another TensorRT version or on another GPU (name or compute capability)."""
    where = f"{manifest.folder / entry.get('file', '?')}"
    if entry.get("tensorrt") != trt_version:
        raise ClipfuseError(f"{where} was built by TensorRT {entry.get('tensorrt')}, this is TensorRT {trt_version}: "
                            f"plans do not carry across versions; rebuild it with {rebuild_command(manifest, precision)}")
    for key in ("gpu", "compute_capability"):
        if entry.get(key) != gpu.get(key):
            raise ClipfuseError(f"{where} was built on {entry.get('gpu')} (compute capability "
                                f"{entry.get('compute_capability')}), this is {gpu.get('gpu')} "
                                f"({gpu.get('compute_capability')}): rebuild it here with "
                                f"{rebuild_command(manifest, precision)}")


class TensorRTBackend(Backend):
    """A deserialised TensorRT plan on one CUDA device (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, manifest: Manifest, precision: str = "fp32", aux_streams: bool = True, device_id: int = 0,
                 threads: int | None = None):
        super().__init__(manifest)
        if precision not in ("fp32", "fp16", "int8"):
            raise ClipfuseError(f"unknown precision {precision!r}; valid: fp32, fp16, int8")
        self.precision, self.use_aux_streams, self.device_id = precision, aux_streams, device_id
        self.engine = self.context = None
        # threads: accepted for the common backend options (predict passes it); TensorRT has no intra-op threads

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why TensorRT cannot run here, or None; cheap: imports nothing (the registry's check)."""
        if importlib.util.find_spec("tensorrt") is None or not registry.nvidia_gpu_visible():
            missing = "no tensorrt package" if importlib.util.find_spec("tensorrt") is None else "no GPU visible"
            return (f"the native TensorRT backend needs the tensorrt package and an NVIDIA GPU (here: {missing}): "
                    f"{INSTALL_TENSORRT}")
        return None

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT {self.precision}"]

    @property
    def device(self) -> str:
        return f"cuda:{self.device_id}"

    def open(self) -> "TensorRTBackend":
        entry = self.manifest.data.get("plans", {}).get(self.precision)
        if entry is None or not (self.manifest.folder / entry["file"]).is_file():
            raise ClipfuseError(f"engine {str(self.manifest.folder)!r} has no {self.precision} TensorRT plan: build it "
                                f"with {rebuild_command(self.manifest, self.precision)}")
        trt = import_tensorrt()
        import torch

        gpu = gpu_identity(self.device_id)
        check_plan_matches(entry, trt.__version__, gpu, self.manifest, self.precision)
        onnx_now = self.manifest.data["artefacts"].get(entry.get("onnx", ""), {}).get("sha256")
        if entry.get("onnx_sha256") not in (None, onnx_now):
            raise ClipfuseError(f"{entry['file']} was built from an earlier {entry.get('onnx')}: rebuild it with "
                                f"{rebuild_command(self.manifest, self.precision)}")
        self._torch = torch
        self._dev = torch.device("cuda", self.device_id)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.manifest.folder / entry["file"]).read_bytes())
        if self.engine is None:
            raise ClipfuseError(f"TensorRT could not deserialise {entry['file']}: rebuild it with "
                                f"{rebuild_command(self.manifest, self.precision)}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self._dev)
        self.aux = []
        n_aux = int(getattr(self.engine, "num_aux_streams", 0))
        if self.use_aux_streams and n_aux > 0:
            # Without this TensorRT creates its own aux streams; ours make the sync points explicit.
            self.aux = [torch.cuda.Stream(device=self._dev) for _ in range(n_aux)]
            self.context.set_aux_streams([s.cuda_stream for s in self.aux])
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        expected = [i["name"] for i in self.manifest.inputs]
        if sorted(self.inputs) != sorted(expected):
            raise ClipfuseError(f"plan {entry['file']} has inputs {self.inputs}, the manifest {expected}: rebuild it "
                                f"with {rebuild_command(self.manifest, self.precision)}")
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        # One buffer pair per tensor, at the profile's max batch: allocated once, sliced per call.
        self.dev, self.host = {}, {}
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
            self._alloc(trt, name, shape)
            self.context.set_input_shape(name, shape)
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))     # at max batch, inputs set just above
            self._alloc(trt, name, shape)
        for name, t in self.dev.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self.output_names = [o["name"] for o in self.manifest.outputs]
        self.is_open = True
        return self

    def _alloc(self, trt, name: str, shape) -> None:
        torch = self._torch
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
        self.dev[name] = torch.empty(shape, dtype=dtype, device=self._dev)
        self.host[name] = torch.empty(shape, dtype=dtype, pin_memory=True)

    def _infer(self, feed):
        torch = self._torch
        n = next(iter(feed.values())).shape[0]
        if n > self.max_batch:
            raise ClipfuseError(f"batch of {n} is over the plan's profile max {self.max_batch}: use a smaller batch "
                                f"or rebuild with `clipfuse build {self.manifest.folder} --batch 1,8,{n}`")
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                a = feed[name]
                self.host[name][:n].copy_(torch.from_numpy(a))
                self.dev[name][:n].copy_(self.host[name][:n], non_blocking=True)
                self.context.set_input_shape(name, a.shape)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
            shapes = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                shapes[name] = shape
                self.host[name][:n].copy_(self.dev[name][:n], non_blocking=True)
        self.stream.synchronize()
        return {name: self.host[name][:shapes[name][0]].numpy().astype(np.float32, copy=True)
                for name in self.output_names}

    def close(self) -> None:
        self.context = self.engine = None
        self.dev, self.host = {}, {}
        super().close()
