"""The PyTorch reference backend: the FusedEnsemble rebuilt from an engine folder's manifest.

It lives with what builds the PyTorch module (backbones, heads, fused) and
reaches the runtime through the backend registry, not an import: pyproject's
entry points (group `clipfuse.backends`) name `torch` and `torch-cuda-eager`, and
`clipfuse.runtime.backends.registry.make_backend(manifest, "torch")` loads this module
only when that backend is asked for (or checked by `available_backends()`).

Loading this module is cheap: torch and open_clip are imported in open() (with export/graph/rebuild.py,
which rebuilds the module), so checking whether the backend can run here never imports them.
"""
from __future__ import annotations

import importlib.util

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.backends import registry
from clipfuse.runtime.backends.base import Backend
from clipfuse.runtime.backends.sessions import check_threads
from clipfuse.runtime.manifest import Manifest


def missing_torch_modules() -> list[str]:
    return [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]


class TorchBackend(Backend):
    """The PyTorch reference: the FusedEnsemble rebuilt from the manifest, heads and controller.

    Backbones are rebuilt with export.graph.backbones.load_backbone, which is exact for
    random:SEED and checkpoint-file weights (a pretrained tag needs open_clip's
    download or cache). The rebuilt image tower must hash to the manifest's
    weights_sha256, otherwise this is not the network the graph was made from.
    """

    name = "torch"
    default_device = "cpu"

    def __init__(self, manifest: Manifest, device: str | None = None, threads: int | None = None):
        super().__init__(manifest)
        device = device or self.default_device
        if device not in ("cpu", "cuda"):
            raise ClipfuseError(f"unknown torch device {device!r}; valid: cpu, cuda")
        self._device, self.threads = device, check_threads(threads, "threads")
        self.name = "torch" if device == "cpu" else "torch-cuda-eager"
        self.model = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None; the registry's cheap check (imports nothing)."""
        missing = missing_torch_modules()
        name = "torch" if cls.default_device == "cpu" else "torch-cuda-eager"
        if missing:
            return f"backend {name} needs {' and '.join(missing)}: pip install torch open_clip_torch"
        if cls.default_device == "cuda" and not registry.nvidia_gpu_visible():
            return f"backend {name} needs an NVIDIA GPU and none is visible (no /proc/driver/nvidia/gpus)"
        return None

    @property
    def providers(self) -> list[str]:
        return [f"torch {self._device}"]

    @property
    def device(self) -> str:
        return self._device

    def open(self) -> "TorchBackend":
        missing = missing_torch_modules()
        if missing:
            raise ClipfuseError(f"backend {self.name} needs {' and '.join(missing)}: pip install torch open_clip_torch "
                                "(or use --backend onnxruntime, which needs neither)")
        import torch

        if self._device == "cuda" and not torch.cuda.is_available():
            raise ClipfuseError(f"backend {self.name}: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                                "install a CUDA build of torch on a machine with an NVIDIA GPU, or use --backend torch")
        if self.threads:
            torch.set_num_threads(self.threads)
        from .rebuild import rebuild_fused

        self.model = rebuild_fused(self.manifest).eval().to(self._device)
        if self._device == "cuda":
            # A reference computes in fp32: cuDNN convolutions default to TF32 on Ampere and later
            # (10-bit mantissa, ~1e-3 relative error), which the comparison with ORT would see.
            # Process-wide flags, so they are put back on close().
            self._tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        self._torch = torch
        self.output_names = [o["name"] for o in self.manifest.outputs]
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


class TorchCudaEagerBackend(TorchBackend):
    """`torch-cuda-eager`: the same fp32 reference, eager, on the first CUDA device (TF32 off): what `compare`
    holds the CUDA-graph backend `torch-cuda` (export/gpu/backend.py) against."""

    name = "torch-cuda-eager"
    default_device = "cuda"
