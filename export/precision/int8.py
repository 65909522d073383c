"""INT8 written into the graph: model.onnx (fp32) -> a QDQ graph calibrated on the user's images.

Static post-training quantization with `onnxruntime.quantization.quantize_static` (ships with
onnxruntime: no new dependency), in QDQ form: QuantizeLinear -> DequantizeLinear pairs around the
quantized ops' inputs, so ONNX Runtime fuses them into int8 kernels on CPU (VNNI) and TensorRT builds
an explicitly quantized engine from the same file (the only INT8 path TensorRT 10.1+ keeps).

    format        QDQ, weights S8 per-channel symmetric; no reduce_range (that is for pre-VNNI CPUs)
    activations   S8 symmetric by default (zero point 0, what TensorRT requires); `activations="u8"`
                  (asymmetric) for ONNX Runtime CPU, whose S8->U8 rewrite leaves some Convs float
    ops           only the towers' weighted ops: Conv, Gemm, and MatMul with a constant second input;
                  the attention products Q.K^T and A.V stay float
    float         LayerNorm, Softmax, GELU/Erf, residual Adds and every other op, and, by node, the
                  islands export/precision/fp16.py's `fp32_node_names` finds (feature L2 norm, heads,
                  controller, combination)
    calibration   MinMax by default, Entropy and Percentile as options; tower by tower, once per
                  export (export/precision/calibrate.py)

No `quant_pre_process` (ORT's recommended pre-pass): its optimiser fuses and renames nodes, and the
islands are named by node. Validation against fp32: export/precision/int8_validate.py. Why U8 for the
CPU, and why not NVIDIA Model Optimizer, with the measurements: docs/decisions.md, "int8".
"""
from __future__ import annotations

import collections
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import step

from ..graph.engine_folder import fsync_file
from .calibrate import (
    METHODS,
    QUANT_OPS,
    calibrate_ranges,
    feeds_images,
    feeds_sha256,
    muted_root_logger,
    save_ranges,
    tower_nodes,
)
from .fp16 import backbone_towers, fp32_node_names

ACTIVATIONS = {"s8": "QInt8", "u8": "QUInt8"}      # onnxruntime.quantization.QuantType names
EXTERNAL_DATA_BYTES = 1_800_000_000


def _weighted(node, constants: set) -> bool:
    """Conv/Gemm always carry a weight; a MatMul only when its second input is a constant."""
    if node.op_type in ("Conv", "Gemm"):
        return True
    return node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants


def _constants(graph) -> set:
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def quantize_int8(src_onnx: Path, dst_onnx: Path, calibration_feeds: list[dict[str, np.ndarray]],
                  method: str = "minmax", per_channel: bool = True, activations: str = "s8",
                  activation_symmetric: bool = True, percentile: float = 99.999,
                  ranges=None, float_towers=()) -> dict:
    """Quantize the fp32 graph at src_onnx into a QDQ graph at dst_onnx (atomically); returns the
    manifest record: quantizer, version and settings, calibration count and sha256, nodes quantized
    per op type, and what stayed float.

    method: minmax | entropy | percentile (percentile: its percentile); activations: "s8" (TensorRT,
    the default) or "u8" (ONNX Runtime CPU, with activation_symmetric=False; see the module docstring).
    float_towers: backbone indices whose towers stay fp32 (export --int8-keep-fp32).
    ranges: activation ranges from export/int8_calibrate.calibrate_ranges on the same feeds and method
    (the second graph of an export reuses the first's); calibrated here, tower by tower, when None."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ClipfuseError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    if activations not in ACTIVATIONS:
        raise ClipfuseError(f"unknown int8 activation type {activations!r}; valid: {', '.join(ACTIVATIONS)}")
    if not calibration_feeds:
        raise ClipfuseError("no calibration images were given; give a folder of your own images")
    src_onnx, dst_onnx = Path(src_onnx), Path(dst_onnx)
    model = onnx.load(str(src_onnx), load_external_data=False)        # the structure; weights stay on disk
    unnamed = any(not n.name for n in model.graph.node)
    island, islands, to_quantize, left_float = quantization_plan(model, float_towers)
    data_files = _data_files(model, src_onnx.parent)
    large = src_onnx.stat().st_size + sum(p.stat().st_size for p in data_files) > EXTERNAL_DATA_BYTES
    extra = {"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": activation_symmetric}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    settings = {"quant_format": "QDQ", "activation_type": ACTIVATIONS[activations], "weight_type": "QInt8",
                "per_channel": per_channel, "reduce_range": False, "calibrate_method": method,
                "calibration": "tower by tower, ranges shared by both int8 graphs",
                "op_types_to_quantize": list(QUANT_OPS), "extra_options": extra}
    tmpdir = Path(tempfile.mkdtemp(prefix=".int8.tmp-", dir=dst_onnx.parent))
    try:
        n_images = feeds_images(calibration_feeds)
        if ranges is None:
            ranges = calibrate_ranges(src_onnx, calibration_feeds, method, percentile, workdir=tmpdir)
        if ranges.calibration_method != cal_method:
            raise ValueError(f"ranges calibrated with {ranges.calibration_method}, asked {method}")
        cache = save_ranges(ranges, tmpdir / "ranges.json")
        # quantize_static shape-infers a copy written beside its input: the input is a copy of the engine's
        # graph inside tmpdir, so nothing is written into the engine folder.
        src = _source_copy(src_onnx, data_files, model if unnamed else None, tmpdir / "src")
        del model
        outdir = tmpdir / "out"
        outdir.mkdir()
        out = outdir / dst_onnx.name
        with muted_root_logger(), step(f"quantizing {src_onnx.name} to int8 ({len(to_quantize)} tower "
                                       f"Conv/MatMul/Gemm, {method} ranges from {n_images} images)"):
            quantize_static(
                str(src), str(out), None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANT_OPS), per_channel=per_channel, reduce_range=False,
                activation_type=getattr(QuantType, ACTIVATIONS[activations]), weight_type=QuantType.QInt8,
                nodes_to_quantize=to_quantize, nodes_to_exclude=sorted(island),
                use_external_data_format=large, calibrate_method=cal_method,
                calibration_cache_path=str(cache), extra_options=extra)
        q = onnx.load(str(out))
        rewired = float_island_inputs(q.graph, island)
        if rewired:
            _save(q, out, large)
        quantized, missing = qdq_wrapped(q, to_quantize)
        if missing:          # a silent skip would ship a graph slower than promised
            raise RuntimeError(f"quantize_static left {len(missing)} tower nodes unquantized, e.g. {missing[:3]}")
        counts = collections.Counter(n.op_type for n in q.graph.node)
        del q
        names = [out.name] + sorted(p.name for p in outdir.iterdir() if p.name != out.name)
        # Data files first, the graph last: a reader never sees a graph whose data is not in place.
        for name in reversed(names):
            fsync_file(outdir / name)
            os.chmod(outdir / name, 0o644)
            os.replace(outdir / name, dst_onnx.parent / (dst_onnx.name if name == out.name else name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {
        "file": dst_onnx.name,
        "external_data": [n for n in names if n != out.name] or None,
        "quantizer": "onnxruntime.quantization.quantize_static",
        "quantizer_version": onnxruntime.__version__,
        "settings": settings,
        "calibration": {"images": n_images, "batches": len(calibration_feeds),
                        "sha256": feeds_sha256(calibration_feeds)},
        "quantized": dict(sorted(quantized.items())),
        "float": {"islands": islands, "weighted_ops_left_float": dict(sorted(left_float.items())),
                  "note": "every op other than Conv, Gemm and constant-weight MatMul runs in float "
                          "(LayerNorm, Softmax, GELU/Erf, residual Adds, ...)"},
        "island_inputs_kept_float": rewired,
        "quantize_linear": counts.get("QuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
        "nodes": sum(counts.values()),
    }


def quantization_plan(model, float_towers=()) -> tuple[set, dict, list, collections.Counter]:
    """(node names kept float, islands summary, the tower nodes to quantize, {op type: count} of the weighted
    ops left float) for the fused graph `model` (its structure is enough). Names unnamed nodes.
    float_towers: backbone indices (manifest order) whose whole tower stays fp32."""

    island, islands = fp32_node_names(model)          # also names unnamed nodes, which exclusion needs
    if float_towers:
        outs = backbone_towers(model.graph)
        bad = [k for k in float_towers if not 0 <= k < len(outs)]
        if bad:
            raise ClipfuseError(f"backbone index {bad[0]} out of range: the engine has {len(outs)} backbones")
        kept = {n.name for k in float_towers for n in tower_nodes(model.graph, outs[k])}
        islands = {**islands, "float_towers": {"backbones": sorted(float_towers),
                                               "nodes": len(kept - island)}}
        island = island | kept
    consts = _constants(model.graph)
    towers = [n for n in model.graph.node if n.op_type in QUANT_OPS and n.name not in island]
    to_quantize = [n.name for n in towers if _weighted(n, consts)]
    left_float = collections.Counter(n.op_type + (" (activation x activation)" if not _weighted(n, consts) else "")
                                     for n in model.graph.node if n.op_type in QUANT_OPS and n.name not in to_quantize)
    return island, islands, to_quantize, left_float


def _data_files(model, folder: Path) -> list[Path]:
    """The external data files the graph's initializers name (relative to its folder)."""
    from onnx import external_data_helper

    locs = set()
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            locs.add(next(e.value for e in t.external_data if e.key == "location"))
    return [folder / loc for loc in sorted(locs)]


def _source_copy(src: Path, data_files: list[Path], renamed, dst_dir: Path) -> Path:
    """src (and its external data files) copied into dst_dir. `renamed`: the
    structure with names given to unnamed nodes (the exclusion lists name them): written in full instead."""
    import onnx

    dst_dir.mkdir()
    if renamed is not None:
        full = onnx.load(str(src))
        for a, b in zip(full.graph.node, renamed.graph.node):
            a.name = b.name
        _save(full, dst_dir / src.name, large=True)
        return dst_dir / src.name
    # A copy, not a hard link: onnx refuses external data with several links ("potential hardlink
    # attack", seen here on the nine's 6.2 GB data file), and a symlink is no better.
    for p in [src] + data_files:
        shutil.copyfile(p, dst_dir / p.name)
    return dst_dir / src.name


def _save(model, path: Path, large: bool) -> None:
    import onnx

    for p in path.parent.iterdir():                  # the quantizer's data file, rewritten below
        if p != path:
            p.unlink()
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def float_island_inputs(graph, island: set) -> int:
    """Feed island nodes the float tensor, not its Q/DQ copy; returns how many inputs were rewired.

    In QDQ form ORT also quantizes the *outputs* of Conv and MatMul (so that ORT CPU can fuse
    QLinearConv / QLinearMatMul), and hands the DequantizeLinear copy to every consumer, the
    islands included: the towers' last projection's output, the raw embedding, reached the
    feature L2 norm rounded to int8 (seen on the tiny towers: ReduceL2 and Div fed by a DQ). The
    islands take X instead of DQ(Q(X)); Q/DQ nodes left without consumers are dropped."""
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for n in graph.node:
        if n.name not in island:
            continue
        for j, t in enumerate(n.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue                               # a quantized weight: islands have none (excluded)
            n.input[j] = q.input[0]
            rewired += 1
    outputs = {o.name for o in graph.output}
    while True:                                        # drop DQ, then its Q, once nothing reads them
        used = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {t for n in graph.node for t in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewired


def qdq_wrapped(model, names) -> tuple[collections.Counter, list]:
    """({op type: count} of the named nodes whose every float input comes from a DequantizeLinear,
    [names that do not]). Bias inputs (Conv/Gemm input 2) are int32-quantized by ORT, also DQ'd."""
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    ok, missing = collections.Counter(), []
    for name in names:
        n = by_name.get(name)
        ins = [i for i in (n.input[:2] if n is not None else []) if i]
        if n is not None and ins and all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                         for i in ins):
            ok[n.op_type] += 1
        else:
            missing.append(name)
    return ok, missing
