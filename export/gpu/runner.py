"""What torch-cuda runs: the engine's FusedEnsemble rebuilt on the device, captured as CUDA graphs per batch
bucket (export/gpu/graphs.py), or a cascade engine's stages (export/gpu/cascade.py).

Heavy (torch, open_clip): export/gpu/backend.py imports it in open(), so the registry's check stays light.
Never yet run on a GPU: see README "The GPU path".
"""
from __future__ import annotations

from clipfuse.runtime.manifest import Manifest

from ..graph.rebuild import rebuild_fused
from .cascade import GraphedCascade
from .graphs import GraphedEnsemble


def open_runner(manifest: Manifest, cascade: bool = False, threads: int | None = None, device: str = "cuda",
                **options) -> GraphedEnsemble | GraphedCascade:
    """The runner of engine `manifest` on `device`: GraphedEnsemble(model, **options) (precision, max_batch,
    concurrent, compile), or with cascade a GraphedCascade over the same towers (its combine graphs on ONNX
    Runtime CPU with `threads`)."""
    model = rebuild_fused(manifest).to(device)
    if cascade:
        return GraphedCascade(manifest, model, threads=threads, device=device, **options)
    return GraphedEnsemble(model, device=device, **options)
