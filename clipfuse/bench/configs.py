"""What the bench runs: each backbone alone (exported the same way as the engine, cached), the
engine's controller in numpy, the naive ensemble (K sessions + numpy), and each configuration opened.

Configurations, by name:

    fused        the engine's model.onnx on ONNX Runtime CPU (the onnxruntime backend, measured defaults)
    single:k     backbone k alone, in <engine>/singles/<k>-<arch>/ (<out>/singles/ with `bench --out`; same classes, its head from the
                 engine's heads.safetensors, constant controller)
    naive        the K single sessions run one after another + the controller and combination in numpy
    torch        PyTorch eager on the same ensemble (the torch backend, threads = cores)
    fused-fp16   the engine's model.fp16.onnx / model.int8.onnx on ONNX Runtime CPU
    fused-int8   (`clipfuse bench --precisions fp32,fp16,int8`; made by `clipfuse export --precision`)
    openvino     model.onnx / model.fp16.onnx / model.int8.onnx on OpenVINO's CPU plugin (`--openvino`):
    openvino-fp16, openvino-int8   one configuration per backend x precision
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import detail, log
from clipfuse.export.graph.engine_folder import check_writable_folder
from clipfuse.runtime.backends.registry import make_backend
from clipfuse.runtime.manifest import Manifest, read_manifest
from clipfuse.runtime.precisions import with_precision

SINGLES = "singles"


# ----------------------------------------------------------------------------- single-backbone engines

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def single_folder(manifest: Manifest, k: int, root: Path | None = None) -> Path:
    """Where backbone k alone lives: under `root` (the bench's singles folder), default <engine>/singles."""
    root = Path(root) if root is not None else manifest.folder / SINGLES
    return root / f"{k}-{_safe(manifest.backbones[k]['arch'])}"


def _single_matches(single: Manifest, manifest: Manifest, k: int) -> bool:
    b, s = manifest.backbones[k], single.backbones
    return (len(s) == 1 and s[0]["weights_sha256"] == b["weights_sha256"] and s[0]["arch"] == b["arch"]
            and single.classes == manifest.classes and single.data.get("head_kind") == manifest.data.get("head_kind"))


def ensure_singles(manifest: Manifest, root: Path | None = None) -> tuple[list[Manifest], list[bool]]:
    """Each backbone alone, exported the same way as the engine, cached in `root` (default <engine>/singles/).

    A cached single (in `root`, or read-only in <engine>/singles/) is reused when its manifest names the
    same weights (sha256), classes and head kind; otherwise it is rebuilt into `root` from the engine's
    `ARCH:WEIGHTS` (which must hash to the recorded weights, as in reexport_engine) with its head taken
    from the engine's heads.safetensors; `root` must be writable then, which is checked before the first
    export. Returns the single manifests (their .folder is where each lives) and, per backbone, whether
    the cache was reused."""
    cached = {}
    for k, b in enumerate(manifest.backbones):
        for folder in dict.fromkeys([single_folder(manifest, k, root), single_folder(manifest, k)]):
            try:
                m = read_manifest(folder, verify=False)
            except ClipfuseError:
                continue
            if _single_matches(m, manifest, k):
                cached[k] = m
                log(f"single {k} {b['arch']}: reusing {folder}", tag="bench")
                break
    if len(cached) < len(manifest.backbones):
        check_writable_folder(single_folder(manifest, 0, root).parent,
                              "the bench's singles folder (pass --out to write it elsewhere)")
    singles = [cached[k] if k in cached else _export_single(manifest, k, single_folder(manifest, k, root))
               for k in range(len(manifest.backbones))]
    return singles, [k in cached for k in range(len(manifest.backbones))]


def _export_single(manifest: Manifest, k: int, folder: Path) -> Manifest:
    # export/ (torch, open_clip) is imported here, not at the top: the worker processes import this
    # module, and the memory probes' baseline must not hold torch for configurations that never use it.

    from clipfuse.export.graph.rebuild import export_single

    b = manifest.backbones[k]
    spec = f"{b['arch']}:{b['weights']}"
    t0 = time.perf_counter()
    log(f"single {k} {spec}: exporting alone into {folder} (once; cached)", tag="bench")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with detail():          # the bench's two lines say it; the export's own steps show with -v
        export_single(manifest, k, folder)
    log(f"single {k} {spec}: exported in {time.perf_counter() - t0:.0f} s", tag="bench")
    return read_manifest(folder, verify=False)


# ----------------------------------------------------------------------------- the controller in numpy

class NumpyController:
    """The engine's controller + combination in numpy, for the naive ensemble (no torch)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            self.w = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
        self.kind = meta.get("kind", "constant")
        self.eps = float(json.loads(meta.get("config", "{}")).get("eps", 1e-3))

    def temperatures(self, features: np.ndarray) -> np.ndarray:          # (N, sum D) -> (N, K)
        if self.kind != "nlc":
            return np.broadcast_to(self.w["value"], (features.shape[0], self.w["value"].shape[1]))
        w = self.w
        h = np.maximum(((features - w["in_mean"]) / w["in_std"]) @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
        return np.logaddexp(0.0, h @ w["fc2.weight"].T + w["fc2.bias"]) + self.eps   # softplus

    def combine(self, feats: list[np.ndarray], zs: list[np.ndarray]) -> dict[str, np.ndarray]:
        features = np.concatenate(feats, axis=1)                               # (N, sum D)
        Z = np.stack(zs, axis=1)                                               # (N, K, C)
        t = self.temperatures(features)                                        # (N, K)
        logits = (t[:, :, None] * Z).sum(axis=1)                               # (N, C)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {iospec.LOGITS: logits, iospec.PROBS: e / e.sum(axis=1, keepdims=True),
                iospec.TEMPERATURES: t, iospec.BACKBONE_LOGITS: Z, iospec.FEATURES: features}


class NaiveEnsemble:
    """K separate single-backbone sessions run one after another, then the combination in numpy."""

    def __init__(self, singles: list, controller: NumpyController):
        self.singles, self.controller = singles, controller

    def infer(self, feed: dict) -> dict:
        feats, zs = [], []
        for s in self.singles:
            out = s.infer({i["name"]: feed[i["name"]] for i in s.manifest.inputs})
            feats.append(out[iospec.FEATURES])
            zs.append(out[iospec.BACKBONE_LOGITS][:, 0])
        return self.controller.combine(feats, zs)


def controller_path(manifest: Manifest) -> Path:
    return manifest.folder / manifest.data.get("controller", {}).get("file", "controller.safetensors")


# ----------------------------------------------------------------------------- feeds and opening

def make_feed(manifest: Manifest, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 images at every input resolution (latency does not depend on pixel values)."""
    rng = np.random.default_rng(seed)
    return {i["name"]: rng.integers(0, 256, (batch, 3, i["shape"][2], i["shape"][3]), dtype=np.uint8)
            for i in manifest.inputs}


def feed_for(backend, feed: dict) -> dict:
    """The inputs a configuration takes (a single needs only its own resolution)."""
    if isinstance(backend, NaiveEnsemble):
        return feed
    return {i["name"]: feed[i["name"]] for i in backend.manifest.inputs}


FUSED = re.compile(r"(fused|openvino)(?:-(fp16|int8))?")


def precision_configs(precisions, openvino=False) -> list[str]:
    """The fused-graph configurations for `precisions` (fp32 first), ONNX Runtime then OpenVINO; "fused"
    (ONNX Runtime fp32) is always run and not listed. openvino: True (every precision) or the precisions
    to run on OpenVINO too (a subset: every configuration's worker is alive at once, and the nine's cannot
    all be on 24 GB)."""
    precisions = [p for p in ("fp32", "fp16", "int8") if p in precisions]
    out = [f"fused-{p}" for p in precisions if p != "fp32"]
    if openvino:
        on = precisions if openvino is True else [p for p in precisions if p in openvino]
        out += ["openvino" if p == "fp32" else f"openvino-{p}" for p in on]
    return out


def config_label(config: str) -> str:
    """"fused-int8" -> "fused int8 (ONNX Runtime)"."""
    mt = FUSED.fullmatch(config)
    return f"fused {mt.group(2) or 'fp32'} ({'ONNX Runtime' if mt.group(1) == 'fused' else 'OpenVINO'})"


def open_config(m: Manifest, config: str, threads: int | None = None, arena: bool = True, singles: list | None = None):
    """config: "fused", "single:K", "naive", "torch", or a precision's fused configuration
    ("fused-int8", "openvino", "openvino-fp16", ...) of engine m, opened. arena: False turns ONNX Runtime's
    CPU memory arena off in the fused graphs' sessions (runtime/backends/sessions.py); singles: each
    backbone's single-backbone engine folder (ensure_singles; default <engine>/singles/<k>-<arch>)."""

    def single(k: int) -> Path:
        return Path(singles[k]) if singles else single_folder(m, k)

    def ort(manifest):
        return make_backend(manifest, "onnxruntime", threads=threads, arena=arena).open()

    if config == "fused":
        return ort(m)
    mt = FUSED.fullmatch(config)
    if mt:
        graph = with_precision(m, mt.group(2) or "fp32")        # ClipfuseError naming the export command
        if mt.group(1) == "fused":
            return ort(graph)
        return make_backend(graph, "openvino", threads=threads).open()
    if config.startswith("single:"):
        return ort(read_manifest(single(int(config.split(":")[1])), verify=False))
    if config == "naive":
        singles = [ort(read_manifest(single(k), verify=False)) for k in range(len(m.backbones))]
        return NaiveEnsemble(singles, NumpyController(controller_path(m)))
    if config == "torch":
        return make_backend(m, "torch", threads=threads or os.cpu_count()).open()
    raise ClipfuseError(f"unknown bench configuration {config!r}")
