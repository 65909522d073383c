"""Do the backends agree? Identical inputs through each, every output compared with the first backend.

    clipfuse compare engines/NAME --backends onnxruntime,torch[,tensorrt] [--images ...] [--precision fp16]

Backend names are the runtime's (onnxruntime, torch, tensorrt, onnxruntime-cuda, ...)
with an optional precision suffix, e.g. `onnxruntime-fp16` runs model.fp16.onnx and
`onnxruntime-int8` / `openvino-int8` model.int8.onnx. `--precision fp16|int8` applies the
suffix to every backend that has that form (ONNX Runtime and OpenVINO: the graph of
runtime/precisions.py; TensorRT: the plan); torch always runs fp32 (it rebuilds the network
from open_clip, not from a graph). The first backend stays the reference whatever its precision:
`--backends torch,onnxruntime --precision fp16` compares the fp16 graph against fp32 torch.

The comparison itself is runtime/agreement.py's (the one comparator, also used by export
validation and fp16 validation), with the precision's row of clipfuse.core.iospec.TOLERANCES:
per output max |got - ref| <= atol + rtol * max|ref| (+ the head-propagated term on logits
and backbone_logits; probs at most half the measured logit error more), embedding cosine
per backbone, and the share of changed top-1 answers, fused and per backbone. Every bound
is printed next to its figure.

Polygraphy's comparator was considered: its per-element atol/rtol check
(CompareFunc.simple) is the easy part; what this needs on top (output-scale
tolerances, head-propagated logit bounds, per-backbone cosine on slices of the
features output, top-1 agreement bounds) would be custom code around it anyway, and
it would add a dependency (and its TensorRT-oriented runners) to every install
for ~40 lines of comparison. Not added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import clipfuse
from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError

from . import agreement
from .backends.registry import make_backend
from .cascade import compare_cascade, int8_stages, is_cascade
from .images import collect_images, not_a_regular_file
from .manifest import read_manifest
from .precisions import with_precision
from .preprocess import preprocess_image


def tolerance(precision: str) -> dict:
    """The precision's row of the one tolerance table (clipfuse.core.iospec.TOLERANCES)."""
    return iospec.tolerance(precision)


def photo_variants() -> list:
    """The photographs shipped in clipfuse/assets, each whole and at three crops (centre 60%, top-left
    70%, bottom-right 70%), each also mirrored: 4 x 8 = 32 images from real photographs."""
    from PIL import Image, ImageOps
    files = sorted((Path(clipfuse.__file__).parent / "assets").glob("*.jpg"))
    if not files:
        raise ClipfuseError("the photographs in clipfuse/assets are missing: reinstall clipfuse")
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
        w, h = im.size
        crops = [im, im.crop((int(w * .2), int(h * .2), int(w * .8), int(h * .8))),
                 im.crop((0, 0, int(w * .7), int(h * .7))), im.crop((int(w * .3), int(h * .3), w, h))]
        out += crops + [ImageOps.mirror(c) for c in crops]
    return out


def head_row_norms(folder, num_backbones: int) -> list[float]:
    """max_c ||W_k[c]|| per head, from heads.safetensors (export/graph/heads.py's naming): how far a logit
    moves per unit of feature error."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(folder) / "heads.safetensors"))
    return [float(np.linalg.norm(tensors[f"head.{k}.weight"].astype(np.float64), axis=1).max())
            for k in range(num_backbones)]
PRECISION_SUFFIXES = ("-fp16", "-fp32", "-int8")


@dataclass
class BackendResult:
    name: str                   # as asked, e.g. "onnxruntime-fp16"
    describe: str               # what ran, e.g. "onnxruntime (CPUExecutionProvider; ...)"
    precision: str
    outputs: dict = field(repr=False, default_factory=dict)


def parse_backends(spec, precision: str | None) -> list[tuple[str, str]]:
    """'onnxruntime,torch-fp16' -> [(runtime backend name, precision)]."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(names) < 2:
        raise ClipfuseError(f"--backends needs at least two backends to compare, got {names}")
    if precision not in (None, "fp32", "fp16", "int8"):
        raise ClipfuseError(f"unknown precision {precision!r}; valid: fp32, fp16, int8")
    out = []
    for n in names:
        prec = None
        for suf in PRECISION_SUFFIXES:
            if n.endswith(suf):
                n, prec = n[: -len(suf)], suf[1:]
        if prec is None:
            fp32_only = n.startswith("torch") and not (n == "torch-cuda" and precision == "fp16")
            prec = "fp32" if fp32_only else (precision or "fp32")
        if n == "torch-cuda" and prec == "int8":
            raise ClipfuseError("backend torch-cuda-int8: torch-cuda runs fp32 or fp16; compare onnxruntime-int8 "
                                "or tensorrt-int8 against it")
        if n.startswith("torch") and n != "torch-cuda" and prec != "fp32":
            raise ClipfuseError(f"backend {n}-{prec}: torch runs the fp32 reference only; compare "
                                f"onnxruntime-{prec}, tensorrt-{prec} or torch-cuda-fp16 against it")
        out.append((n, prec))
    if len(set(out)) != len(out):
        raise ClipfuseError(f"--backends names the same backend twice: {names}")
    return out


def open_one(manifest, name: str, precision: str, **options):
    """An opened runtime backend for (name, precision); torch-cuda computes fp16 itself (autocast, the fp16
    graph's islands) on the fp32 engine."""

    if name == "torch-cuda":
        return make_backend(manifest, name, **dict(options, precision=precision)).open()
    if precision != "fp32" and name != "tensorrt":
        # the same backend, pointed at the precision's graph (ClipfuseError naming the command if absent);
        # onnxruntime-tensorrt reads the TensorRT form of int8 (S8 symmetric activations)
        manifest = with_precision(manifest, precision, "tensorrt" if name == "onnxruntime-tensorrt" else "cpu")
    if name == "tensorrt":
        options = dict(options, precision=precision)
    return make_backend(manifest, name, **options).open()


def default_images() -> list:
    """The shipped photographs, whole and centre-cropped: 8 real images."""
    v = photo_variants()
    return v[::8] + v[1::8]


def load_images(paths) -> list:
    from PIL import Image

    files = collect_images(paths)
    if not files:
        raise ClipfuseError(f"no images found in {list(paths)}")
    out = []
    for f in files:
        kind = not_a_regular_file(f)
        if kind is not None:        # a FIFO would block Image.open
            raise ClipfuseError(f"cannot read image {str(f)!r}: it is {kind}, not a regular file")
        try:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise ClipfuseError(f"cannot read image {str(f)!r}: {e}") from None
    return out


def compare_outputs(ref: dict, got: dict, manifest, tol: dict, norms: list[float]) -> dict:
    """Figures and failures for one backend against the reference outputs (runtime/agreement.py)."""
    return agreement.compare_outputs(ref, got, backbone_slices(manifest.backbones), tol, norms)


def backbone_slices(backbones) -> list[tuple[str, int]]:
    """[(ARCH:WEIGHTS, embed_dim)] from a manifest's backbone records: the comparator's view of them."""
    return [(f"{b['arch']}:{b['weights']}", int(b["embed_dim"])) for b in backbones]


def compare_backends(engine_dir, backends="onnxruntime,torch", images=None, precision: str | None = None,
                     batch: int = 8, verify: bool = True, cascade: bool = True) -> dict:
    """Run the same images through every backend; compare each with the first. Returns the report
    (report["ok"] False when any backend is out of tolerance). On a cascade engine (unless cascade=False)
    also the routed stage graphs against model.onnx: report["cascade"] (runtime/cascade.compare_cascade)."""

    m = read_manifest(engine_dir, verify=verify)
    pairs = parse_backends(backends, precision)
    pil = default_images() if not images else load_images(images)
    specs = m.preprocess_specs()
    arrays = {name: np.stack([preprocess_image(im, s) for im in pil]) for name, s in specs.items()}
    feeds = [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, len(pil), batch)]
    results = []
    for name, prec in pairs:
        backend = open_one(m, name, prec, **({"max_batch": batch} if name == "torch-cuda" else {}))
        try:
            outs = [backend.infer(f) for f in feeds]
            desc = backend.describe()
        finally:
            backend.close()
        merged = {k: np.concatenate([o[k] for o in outs]) for k in iospec.OUTPUT_NAMES}
        results.append(BackendResult(f"{name}-{prec}" if prec != "fp32" else name, desc, prec, merged))
    ref = results[0]
    norms = head_row_norms(m.folder, len(m.backbones))
    report = {"engine": str(m.folder), "images": len(pil), "reference": ref.name, "comparisons": []}
    for r in results[1:]:
        # the looser of the two precisions' tolerances (int8 > fp16 > fp32)
        prec = max((r.precision, ref.precision), key=("fp32", "fp16", "int8").index)
        tol = tolerance(prec)
        c = compare_outputs(ref.outputs, r.outputs, m, tol, norms)
        c.update(backend=r.name, describe=r.describe, tolerance_set=prec, rtol=tol["rtol"], atol=tol["atol"],
                 min_cosine=tol["min_cosine"], max_top1_changed=tol["max_top1_changed"])
        report["comparisons"].append(c)
    report["backends"] = [{"name": r.name, "describe": r.describe, "precision": r.precision} for r in results]
    report["ok"] = all(c["ok"] for c in report["comparisons"])

    if is_cascade(m) and cascade:       # the routed stage graphs against model.onnx on the same batches

        stages = "fp32"
        if precision == "int8":            # the int8 stages against model.int8.onnx, when the export wrote them
            try:
                int8_stages(m)
                stages = "int8"
            except ClipfuseError:
                pass
        report["cascade"] = compare_cascade(m, feeds, norms, precision=stages)
        report["ok"] = report["ok"] and report["cascade"]["ok"]
    return report
