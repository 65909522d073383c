"""Validate a reduced-precision graph against the engine's fp32 model.onnx on ONNX Runtime CPU.

    report = validate_precision(manifest, folder / "model.fp16.onnx", "fp16")

Runs both graphs on the same images (32 variants of the shipped photographs by default) and
compares them with the one comparator (clipfuse.runtime.agreement) and the precision's row of
clipfuse.core.iospec.TOLERANCES, with `heads_exact`: the converters here keep the feature norm, heads,
controller and combination in fp32, so a logit may move only as far as its head carries the
feature error. Per backbone the comparator also holds the feature error to a share of the median
distance between two images (max_error_to_spread), which an absolute cosine bound cannot see when a
tower embeds every image nearly alike. Nothing here is fp16-specific: an int8 (QDQ) graph with the
same fp32 islands is validated by the same call with its own tolerance row.

ONNX Runtime CPU lacks reduced-precision kernels for many ops and computes them in fp32 between
inserted casts; `cpu_fp32_fallback_ops` says which, so a report can say what the CPU check measured.
"""
from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import numpy as np

from clipfuse.core import iospec
from clipfuse.runtime import agreement
from clipfuse.runtime.backends.sessions import open_session, session_options
from clipfuse.runtime.compare import backbone_slices, head_row_norms, photo_variants
from clipfuse.runtime.preprocess import preprocess_image


def _session(path: Path):
    return open_session(path)


def run_batches(session, feeds: list[dict]) -> dict:
    outs = collections.defaultdict(list)
    for feed in feeds:
        for name, v in zip(iospec.OUTPUT_NAMES, session.run(list(iospec.OUTPUT_NAMES), feed)):
            outs[name].append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def batched_feeds(manifest, images, batch: int = 8) -> list[dict]:
    specs = manifest.preprocess_specs()
    feeds = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        feeds.append({name: np.stack([preprocess_image(im, s) for im in chunk]) for name, s in specs.items()})
    return feeds


def compare_precisions(ref: dict, got: dict, manifest_data: dict, head_row_norms: list, precision: str = "fp16") -> dict:
    """Reduced-precision (got) against fp32 (ref) outputs on the same images: figures and verdict."""

    r = agreement.compare_outputs(ref, got, backbone_slices(manifest_data["backbones"]), iospec.tolerance(precision),
                                   head_row_norms, heads_exact=True)
    f = r["fused"]
    if f:      # the names the committed reports use
        f["top1_flips"] = f.get("top1_changed", 0)
        f["fp32_top2_margin_median"] = f.get("ref_top2_margin_median")
    return r


def validate_precision(manifest, path: Path, precision: str, images=None, batch: int = 8) -> dict:
    """Run model.onnx and the graph at `path` on ORT CPU on the same images; figures + verdict (no raise)."""
    images = photo_variants() if images is None else images
    return validate_feeds(manifest, path, precision, batched_feeds(manifest, images, batch), batch)[0]


def validate_feeds(manifest, path: Path, precision: str, feeds: list[dict], batch: int, ref: dict | None = None,
                   warmup: bool = True) -> tuple[dict, dict, dict]:
    """(report, fp32 outputs, outputs of `path`) on the same feeds, each graph timed on ORT CPU after one
    warm-up batch (warmup=False: none, where a batch of a large ensemble costs more than the timing is worth).
    ref: fp32's outputs on these feeds, already computed (not run again, not timed)."""

    timing, outs = {}, {"fp32": ref}
    for key, p in (("fp32", manifest.onnx_path), (precision, path)):
        if outs.get(key) is not None:
            continue
        s = _session(p)
        if warmup:
            run_batches(s, feeds[:1])
        t = time.perf_counter()
        outs[key] = run_batches(s, feeds)
        timing[f"{key}_s"] = time.perf_counter() - t
        del s
    report = compare_precisions(outs["fp32"], outs[precision], manifest.data,
                                head_row_norms(manifest.folder, len(manifest.backbones)), precision)
    report["ort_cpu_seconds"] = {k: round(v, 3) for k, v in timing.items()}
    report["ort_cpu_seconds"]["batch"] = batch
    report["onnxruntime"] = __import__("onnxruntime").__version__
    return report, outs["fp32"], outs[precision]


def cpu_fp32_fallback_ops(path: Path) -> dict:
    """{op type: count} of nodes ONNX Runtime CPU runs in fp32 inside a reduced-precision graph (it
    casts around nodes that lack a kernel for the type), read from the session's optimised graph at
    basic level. A "shape_inference" key says when the count rests on partial type information."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimized_path=Path(tmp) / "opt.onnx", optimization="basic")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        open_session(path, options=so)
        opt = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    orig = onnx.load(str(path), load_external_data=False)
    orig_fp32, notes = _fp32_compute_nodes(orig)
    now_fp32, notes_opt = _fp32_compute_nodes(opt)
    extra = dict(sorted((collections.Counter(now_fp32) - collections.Counter(orig_fp32)).items()))
    if notes or notes_opt:
        extra["shape_inference"] = "; ".join(notes + notes_opt)
    return extra


def _fp32_compute_nodes(model) -> tuple[list, list]:
    """Op types of the non-Cast nodes whose first float input is float32, and notes on what could not be
    inferred. Types come from onnx shape inference; when it fails (ORT's optimised graph may use
    contrib ops onnx does not know), the graph's own value_info is used and the failure is noted."""
    import onnx

    notes = []
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:      # onnx raises its own InferenceError, or a C++ error as RuntimeError
        notes.append(f"onnx shape inference failed ({type(e).__name__}: {str(e)[:120]}); "
                     "counted from the graph's stored types only")
    types = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    ops = []
    for n in model.graph.node:
        if n.op_type == "Cast":
            continue
        dt = [types.get(i) for i in n.input if i and types.get(i) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        if dt and dt[0] == onnx.TensorProto.FLOAT:
            ops.append(n.op_type)
    return ops, notes
