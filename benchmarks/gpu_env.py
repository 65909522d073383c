"""The machine as benchmarks/gpu_check.py records it: versions, the GPU's properties, NVML's device memory."""
from __future__ import annotations

import os
import platform


def environment(torch, device) -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "cpus": os.cpu_count()}
    for dist in ("open_clip_torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "nvidia-ml-py"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    return env


class Nvml:
    """Device memory through NVML (nvidia-ml-py); None figures where NVML is absent."""

    def __init__(self):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
            self.driver = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:        # no NVML library, no GPU, or a container without it
            self.error = f"{type(e).__name__}: {e}"

    def used_mib(self):
        if self.handle is None:
            return None
        return round(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20, 1)
