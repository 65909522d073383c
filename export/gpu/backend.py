"""`torch-cuda`: the serving backend on a CUDA GPU: CUDA graphs per batch bucket, towers on concurrent streams,
fp32 or fp16 (model.fp16.onnx's fp32 islands), optional torch.compile. The fp32 eager reference it is compared
with stays registered as `torch-cuda-eager` (export/graph/torch_backend.py).

Light at import, like every registered backend: the registry loads this class to ask unavailable_reason(),
so torch is imported only in open() (export/gpu/runner.py). Written from the H200 measurements in DESIGN.md
"The GPU" but never yet run on a GPU: see README "The GPU path".
"""
from __future__ import annotations

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.backends import registry
from clipfuse.runtime.backends.base import Backend
from clipfuse.runtime.manifest import Manifest

from ..graph.torch_backend import missing_torch_modules
from .plan import check_options

DEFAULT_MAX_BATCH = 8


class TorchCudaBackend(Backend):
    """Options: precision fp32|fp16, max_batch (the largest bucket), concurrent (one stream per tower),
    compile (inductor). device="cpu" runs the same forward eagerly, fp32 only (the dry run and CPU tests)."""

    name = "torch-cuda"

    def __init__(self, manifest: Manifest, precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                 concurrent: bool = True, compile: bool = False, device: str = "cuda", threads: int | None = None,
                 cascade: bool = False):
        super().__init__(manifest)
        check_options(device, precision, max_batch, compile, backend=self.name)
        self.precision, self.max_batch, self.concurrent, self.compile = precision, max_batch, concurrent, compile
        self.cascade = cascade          # a cascade engine's stages (export/gpu/cascade.py), outputs + "stage"
        self._device, self.threads, self.runner = device, threads, None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None (imports nothing)."""
        missing = missing_torch_modules()
        if missing:
            return f"backend torch-cuda needs {' and '.join(missing)}: pip install torch open_clip_torch"
        if not registry.nvidia_gpu_visible():
            return "backend torch-cuda needs an NVIDIA GPU and none is visible (no /proc/driver/nvidia/gpus)"
        return None

    @property
    def providers(self) -> list[str]:
        streams = "one stream per tower" if self.concurrent else "one stream"
        return [f"torch {self._device} {self.precision}, CUDA graphs up to batch {self.max_batch}, {streams}"
                + (", compiled" if self.compile else "") + (", cascade: stage 1 alone, then the rest" if self.cascade else "")]

    @property
    def device(self) -> str:
        return self._device

    def open(self) -> "TorchCudaBackend":
        import torch

        from .runner import open_runner

        if self._device == "cuda" and not torch.cuda.is_available():
            raise ClipfuseError("backend torch-cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                                "install a CUDA build of torch on a machine with an NVIDIA GPU, or use --backend torch")
        if self.threads:
            torch.set_num_threads(self.threads)
        if self._device == "cuda" and self.precision == "fp32":
            # fp32 means fp32 (TF32 ~1e-3 relative would blur compare); put back on close()
            self._tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self._torch = torch
        self.runner = open_runner(self.manifest, cascade=self.cascade, threads=self.threads, device=self._device,
                                  precision=self.precision, max_batch=self.max_batch, concurrent=self.concurrent,
                                  compile=self.compile)
        self.is_open = True
        return self

    def _infer(self, feed):
        if self.cascade:
            return self.runner.infer(feed)
        return self.runner.infer([feed[iospec.input_name(r)] for r in self.runner.model.resolutions])

    def close(self) -> None:
        if getattr(self, "_tf32", None) is not None:
            self._torch.backends.cudnn.allow_tf32, self._torch.backends.cuda.matmul.allow_tf32 = self._tf32
            self._tf32 = None
        self.runner = None
        super().close()
