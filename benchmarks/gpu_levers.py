"""The ensembles of benchmarks/gpu_check.py's levers section, and their agreement with ONNX Runtime.

The measurement itself (serial / concurrent / compiled / each single tower / through the backend, graph pools,
the GPU cascade's stage costs) is clipfuse/bench/gpu.py, which `clipfuse bench --backend torch-cuda` runs too;
here: the pair, five and nine built from seeded random towers (compile only for --compile-sets: about a minute
for the pair and three for the nine, FIELD-NOTES.md), and agreement of torch-cuda fp32/fp16 with ONNX
Runtime fp32 on the shipped photographs through the one comparator (runtime/compare.py, fp16 row).
On the CPU (--dry-run) the same code runs eagerly on tiny towers: it proves the script, not any figure.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipfuse.core import iospec
from clipfuse.export.graph.backbones import load_backbone
from clipfuse.export.graph.fused import ConstantController, FusedEnsemble

PAIR = ("RN50:random:0", "ViT-B-32:random:1")
FIVE = ("ViT-B-32:random:1", "RN50:random:0", "RN101:random:2", "ViT-B-16:random:3", "RN50x4:random:4")
NINE = ("RN50:random:0", "ViT-B-32:random:1", "RN101:random:2", "ViT-B-16:random:3", "RN50x4:random:4",
        "RN50x16:random:5", "RN50x64:random:6", "ViT-L-14:random:7", "ViT-L-14-336:random:8")
SETS = {"pair": PAIR, "five": FIVE, "nine": NINE}
TINY_SETS = {"pair": ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1"),
             "five": ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1", "clipfuse-test-vit48:random:2")}
NUM_CLASSES = 10


def build(specs, device) -> FusedEnsemble:
    """The towers of `specs` with random heads (latency does not depend on them) and the constant controller,
    one FusedEnsemble on `device`."""
    g = torch.Generator().manual_seed(0)
    visuals, heads, sizes, means, stds = [], [], [], [], []
    for s in specs:
        b = load_backbone(s)
        head = nn.Linear(b.embed_dim, NUM_CLASSES)
        with torch.no_grad():
            head.weight.copy_(torch.randn(NUM_CLASSES, b.embed_dim, generator=g) * 0.1)
        visuals.append(b.model.visual)
        heads.append(head)
        sizes.append(b.image_size)
        means.append(b.preprocess["mean"])
        stds.append(b.preprocess["std"])
        del b
    return FusedEnsemble(visuals, heads, sizes, means, stds, ConstantController(len(specs))).eval().to(device)


def agreement(specs, device, precisions, say) -> list:
    """torch-cuda (GraphedEnsemble through the backend's infer) against ONNX Runtime fp32 on the shipped
    photographs, through the one comparator, each precision with its tolerance row."""
    from clipfuse.export.graph.engine import export_engine
    from clipfuse.runtime.backends.registry import make_backend
    from clipfuse.runtime.compare import compare_outputs, head_row_norms, photo_variants, tolerance
    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.preprocess import preprocess_image

    from clipfuse.export.gpu.backend import TorchCudaBackend

    classes = ["astronaut", "cat", "cup of coffee", "rocket", "dog", "car", "bird", "airplane"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        m = read_manifest(export_engine(list(specs), classes, Path(tmp) / "agree").folder)
        say(f"agreement: exported {len(specs)} towers for ONNX Runtime in {time.perf_counter() - t:.1f} s")
        images = photo_variants()
        feed = {n: np.stack([preprocess_image(im, s) for im in images]) for n, s in m.preprocess_specs().items()}
        chunks = [{k: v[i:i + 8] for k, v in feed.items()} for i in range(0, len(images), 8)]
        with make_backend(m, "onnxruntime") as ort:
            ref = {k: np.concatenate([ort.infer(c)[k] for c in chunks]) for k in iospec.OUTPUT_NAMES}
        norms = head_row_norms(m.folder, len(m.backbones))
        for prec in precisions:
            with TorchCudaBackend(m, precision=prec, device=device, max_batch=8) as b:
                got = {k: np.concatenate([o[k] for o in [b.infer(c) for c in chunks]]) for k in iospec.OUTPUT_NAMES}
            tol = tolerance(prec)
            c = compare_outputs(ref, got, m, tol, norms)
            out.append({"precision": prec, "images": len(images), "ok": bool(c["ok"]), "tolerance": tol,
                        "report": c})
            say(f"agreement torch-cuda {prec} vs onnxruntime fp32: {'ok' if c['ok'] else 'FAIL'}")
    return out


