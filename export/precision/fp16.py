"""Reduced precision written into the graph: model.onnx (fp32, validated) -> model.fp16.onnx.

TensorRT 11 builds strongly typed networks only (no FP16 builder flag, no per-layer precision
constraints), so the precision of every tensor must be in the ONNX graph itself. This module
converts the exported, validated fp32 graph (never a re-export) with ONNX Runtime's float16
converter (`onnxruntime.transformers.float16.convert_float_to_float16`: no new dependency),
keeping these in fp32 by explicit Cast islands:

    LayerNormalization   overflows in fp16 after attention
    Softmax              attention and the final probabilities: exp() overflows
    ReduceMean           the RN attention pool's token mean
    ReduceL2 and downstream
                         feature L2 norm, heads, controller MLP and combination

Nodes are found by op type and position, not by name (names are not a contract): the towers
are the ancestors of the K ReduceL2 inputs, and every node outside them stays fp32. Graph
inputs stay uint8, outputs float32 (keep_io_types). A graph with external weights is converted
as structure only and its weights streamed tensor by tensor, so memory stays flat.

`export_fp16(engine_dir)` converts, validates against fp32 on ONNX Runtime CPU
(export/precision/validate.py, the fp16 tolerance row) and adds model.fp16.onnx through the one
engine-folder writer. ORT CPU computes some fp16 ops in fp32 between Casts, so that validation
covers fp16 weights and storage, not all fp16 arithmetic (`cpu_fp32_fallback_ops` lists them).
Why these islands and the figures: docs/decisions.md, "fp16".
"""
from __future__ import annotations

import collections
import contextlib
import tempfile
import unittest.mock
from pathlib import Path

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log, step
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.precisions import MODEL_FP16

from ..graph.engine_folder import update_engine_folder
from ..graph.islands import FEATURE_NORM_OP, FP32_OPS
from .validate import cpu_fp32_fallback_ops, validate_precision

# The ops kept in fp32 wherever they occur in the towers (FP32_OPS, keys: ONNX op types) and the feature
# normalisation (FEATURE_NORM_OP) are defined once, in export/graph/islands.py, shared with the torch-cuda fp16 path.
EXTERNAL_DATA_BYTES = 1_800_000_000

# The bounds are the fp16 row of clipfuse.core.iospec.TOLERANCES (embedding cosine, per-output error,
# share of changed top-1) and, since everything from the raw embeddings on is fp32, the
# head-propagated logit bound of clipfuse.runtime.agreement (heads_exact).


def ancestor_nodes(graph, tensors) -> set:
    """Names of the nodes the given tensors depend on (walking producers back to inputs and constants)."""
    producer = {o: n for n in graph.node for o in n.output}
    seen, todo = set(), list(tensors)
    while todo:
        p = producer.get(todo.pop())
        if p is None or p.name in seen:
            continue
        seen.add(p.name)
        todo.extend(p.input)
    return seen


def tower_outputs(graph) -> list[str]:
    """The raw embeddings, one per backbone in graph order: the inputs of the feature norms (ReduceL2)."""

    outs = [n.input[0] for n in graph.node if n.op_type == FEATURE_NORM_OP]
    if not outs:
        raise ClipfuseError("the fused graph has no ReduceL2 (feature normalisation) node: it was not made by "
                            "this clipfuse's exporter; re-export it (`clipfuse export ENGINE`)")
    return outs


def backbone_towers(graph) -> list[str]:
    """The raw embeddings in backbone order (the order of the features output's slices): for each input of
    the Concat that makes `features`, the one raw embedding it depends on. One backbone: its one tower."""
    outs = tower_outputs(graph)
    if len(outs) == 1:
        return outs
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(iospec.FEATURES)
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Concat" or len(node.input) != len(outs):
        raise ClipfuseError("the fused graph's features output is not a Concat of one slice per backbone: it was "
                            "not made by this clipfuse's exporter; re-export it (`clipfuse export ENGINE`)")
    order, targets = [], set(outs)
    for t in node.input:
        seen, todo, hit = set(), [t], set()
        while todo:
            x = todo.pop()
            if x in targets:
                hit.add(x)
                continue
            p = producer.get(x)
            if p is not None and p.name not in seen:
                seen.add(p.name)
                todo.extend(p.input)
        if len(hit) != 1:
            raise ClipfuseError(f"features slice {len(order)} depends on {len(hit)} towers, not one: re-export the engine")
        order.append(hit.pop())
    return order


def fp32_node_names(model) -> tuple[set, dict]:
    """Names of the nodes to keep in fp32, and {island kind: {op type: count}} for the manifest."""
    graph = model.graph
    for i, n in enumerate(graph.node):        # the converter blocks by name: every node needs one
        if not n.name:
            n.name = f"clipfuse_unnamed_{i}"
    keep: set = set()
    islands = {"ops": collections.Counter(), "feature_norm_and_downstream": collections.Counter()}
    for n in graph.node:
        if n.op_type in FP32_OPS:
            keep.add(n.name)
            islands["ops"][n.op_type] += 1
    norms = [n for n in graph.node if n.op_type == FEATURE_NORM_OP]
    if not norms:
        raise ClipfuseError("the fused graph has no ReduceL2 (feature normalisation) node: it was not made by "
                            "this clipfuse's exporter; re-export it (`clipfuse export ENGINE`)")
    # The towers are the ancestors of the raw embeddings (the ReduceL2 inputs); every other node is
    # the feature normalisation or downstream of it (heads, controller, combination, softmax), or
    # feeds only those, like the constant controller's temperatures, whose Expand takes its batch
    # size from an image input's shape and so is not downstream of the features at all.
    tower = ancestor_nodes(graph, [t for n in norms for t in n.input[:1]])
    for n in graph.node:
        if n.name not in tower:
            if n.name not in keep:
                islands["feature_norm_and_downstream"][n.op_type] += 1
            keep.add(n.name)
    return keep, {k: dict(sorted(v.items())) for k, v in islands.items()}


def convert_fp16(src: Path, dst: Path, float_towers=()) -> dict:
    """model.onnx -> fp16 graph at dst (external data beside it past 2 GB). Returns facts for the manifest.
    float_towers: backbone indices (manifest order) whose whole tower stays fp32 as well."""
    import onnx
    from onnx import external_data_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    probe = onnx.load(str(src), load_external_data=False)
    lean = any(external_data_helper.uses_external_data(t) for t in probe.graph.initializer)
    if lean:
        # Past 2 GB, converting in memory holds the weights several times over (docs/decisions.md,
        # "fp16"). Here only the graph is in memory: shapes inferred from the file, the converter run on
        # the structure (a tensor whose data is on disk only has its type flipped to fp16), and the weights
        # streamed tensor by tensor into the new data file by _stream_weights.
        del probe
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            inferred = Path(tmp) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
            model = onnx.load(str(inferred), load_external_data=False)
    else:
        model = probe                                 # no external data: the weights are in the file, loaded
    keep, islands = fp32_node_names(model)
    if float_towers:
        outs = backbone_towers(model.graph)
        kept = ancestor_nodes(model.graph, [outs[k] for k in float_towers])
        islands["float_towers"] = {"backbones": sorted(float_towers), "nodes": len(kept - keep)}
        keep |= kept
    with contextlib.ExitStack() as stack:
        if lean:     # the converter reads each converted tensor's data just for its shape; its dims say the same
            from onnx import helper
            from onnxruntime.transformers import float16

            stack.enter_context(unittest.mock.patch.object(
                float16, "make_value_info_from_tensor",
                lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))))
        model16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(keep),
                                           op_block_list=list(FP32_OPS), disable_shape_infer=lean)
    del model
    dedupe_nodes(model16.graph)
    drop_round_trips(model16.graph)
    topological_sort(model16.graph)      # the converter appends its Casts at the end; TensorRT's parser
    # and onnx.checker need producers before consumers.
    # The converter writes value_info for initializers too, typed fp16 even where the initializer
    # stays fp32 because only kept nodes use it (the heads, LayerNorm weights); onnx.checker's full
    # check refuses the mismatch. Drop the initializers' entries. (Dropping every value_info entry
    # instead made ONNX Runtime 1.32 crash while loading the graph: seen here, a segfault.)
    inits = {t.name for t in model16.graph.initializer}
    kept_vi = [v for v in model16.graph.value_info if v.name not in inits]
    del model16.graph.value_info[:]
    model16.graph.value_info.extend(kept_vi)
    # Outputs must stay float32 and inputs uint8: the runtime's contract does not change with precision.
    elem = {i.name: i.type.tensor_type.elem_type for i in list(model16.graph.input) + list(model16.graph.output)}
    for name in iospec.OUTPUT_NAMES:
        if elem.get(name) != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"fp16 conversion changed output {name!r} to elem type {elem.get(name)}")
    counts = collections.Counter(n.op_type for n in model16.graph.node)
    data_name = dst.name + ".data"
    if lean:
        _stream_weights(model16, src.parent, dst.parent / data_name)
        onnx.save_model(model16, str(dst))            # the graph; its tensors name the data file written above
        return _facts(dst, data_name, islands, keep, counts)
    size = sum(t.ByteSize() for t in model16.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(model16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model16, str(dst))
    return _facts(dst, data_name if external else None, islands, keep, counts)


def _facts(dst: Path, data_name, islands: dict, keep: set, counts) -> dict:
    return {
        "file": dst.name,
        "external_data": data_name,
        "converter": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)",
        "fp32_islands": islands,
        "fp32_nodes": len(keep),
        "casts": counts.get("Cast", 0),
        "nodes": sum(counts.values()),
    }


def _stream_weights(model, src_dir: Path, data_path: Path) -> int:
    """Write every external tensor of `model` (converted by convert_float_to_float16 without its data) into
    data_path, one tensor in memory at a time: a tensor the converter made fp16 is read as the fp32 it still
    is on disk and converted as the converter converts (convert_np_to_float16: clamped to fp16's range);
    any other is copied. Its external_data then points into data_path. Returns the bytes written."""
    import numpy as np
    import onnx
    from onnx import external_data_helper, helper
    from onnxruntime.transformers.float16 import convert_np_to_float16  # the converter's own rounding

    written = 0
    with open(data_path, "wb") as out:
        for t in model.graph.initializer:
            if not external_data_helper.uses_external_data(t):
                continue
            info = {e.key: e.value for e in t.external_data}
            path = Path(src_dir) / info["location"]
            offset, length = int(info.get("offset", 0)), int(info["length"])
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
            numel = int(np.prod(t.dims)) if len(t.dims) else 1
            if t.data_type == onnx.TensorProto.FLOAT16 and length == 4 * numel:       # still fp32 on disk
                raw = convert_np_to_float16(np.frombuffer(raw, dtype=np.float32)).astype(np.float16).tobytes()
            elif length != numel * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize:
                raise RuntimeError(f"tensor {t.name}: {length} bytes on disk for {numel} x {t.data_type}")
            pad = (-written) % 4096                   # page-aligned, as onnx writes it
            out.write(b"\0" * pad)
            written += pad
            out.write(raw)
            del t.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(written)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
            written += len(raw)
            del raw
    return written


def dedupe_nodes(graph) -> int:
    """Remove repeated identical nodes and give every node a unique name; returns how many were removed.

    onnxruntime's converter before 1.32 adds one Cast per consumer when a tensor feeds several kept
    nodes, all with the same node name and the same output name: an invalid graph (seen with
    onnxruntime 1.30 on the GPU machine: "two nodes with same node name"). Identical copies (same
    op, inputs, outputs, attributes) are dropped; any other repeated name gets a suffix."""
    seen_outputs, names, kept, removed = {}, collections.Counter(), [], 0
    for n in graph.node:
        key = (n.op_type, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
        if n.output and n.output[0] in seen_outputs and seen_outputs[n.output[0]] == key:
            removed += 1
            continue
        for o in n.output:
            seen_outputs[o] = key
        names[n.name] += 1
        if names[n.name] > 1:
            n.name = f"{n.name}_{names[n.name] - 1}"
        kept.append(n)
    if removed or any(c > 1 for c in names.values()):
        del graph.node[:]
        graph.node.extend(kept)
    return removed


def drop_round_trips(graph) -> int:
    """Rewire Cast(to fp32) <- Cast(to fp16) <- x into Cast(to fp32) <- x; returns how many.

    With keep_io_types the converter assumes every graph output comes out of an fp16 node: it
    casts the (fp32, kept) producer's result to fp16 and then back to fp32 for the output, which
    rounds logits, probs, temperatures and features to fp16 for nothing (seen on the constant
    controller's temperatures: 1/3 came out as 0.33325). Skipping the fp16 leg is exact either way:
    if x was already fp16 the first Cast was an identity."""
    import onnx

    producer = {o: n for n in graph.node for o in n.output}
    uses = collections.Counter(t for n in graph.node for t in n.input)
    outputs = {o.name for o in graph.output}

    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n is not None and n.op_type == "Cast" else None

    dropped = 0
    for b in graph.node:
        a = producer.get(b.input[0]) if b.input else None
        if cast_to(b) == onnx.TensorProto.FLOAT and cast_to(a) == onnx.TensorProto.FLOAT16:
            uses[b.input[0]] -= 1
            b.input[0] = a.input[0]
            uses[a.input[0]] += 1
            dropped += 1
    dead = [n for n in graph.node if n.op_type == "Cast" and all(uses[o] == 0 and o not in outputs for o in n.output)]
    for n in dead:
        graph.node.remove(n)
    return dropped


def topological_sort(graph) -> None:
    """Reorder graph.node in place so every node comes after the producers of its inputs (stable)."""
    produced = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    nodes, ordered = list(graph.node), []
    pending = nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                ordered.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def validate_fp16(manifest, fp16_path: Path, images=None, batch: int = 8) -> dict:
    """model.fp16.onnx against model.onnx on ORT CPU (export/precision/validate.py): figures + verdict."""
    return validate_precision(manifest, fp16_path, "fp16", images=images, batch=batch)


def export_fp16(engine_dir, strict: bool = True) -> dict:
    """Add model.fp16.onnx to an engine folder: convert, validate against fp32 on ORT CPU, write atomically.

    strict: raise ClipfuseError (and leave the folder as it was) when the validation fails.
    Returns the manifest's precisions["fp16"] entry.
    """
    import datetime as _dt

    m = read_manifest(engine_dir)
    folder = m.folder
    with update_engine_folder(folder, what=MODEL_FP16) as update:
        dst = update.path(MODEL_FP16)
        float_towers: list[int] = []
        while True:
            kept = f", towers of {', '.join(m.backbone_names[k] for k in float_towers)}" if float_towers else ""
            with step(f"[1/3] converting {m.onnx_path.name} to fp16 (LayerNorm, softmax, feature norm, heads, "
                      f"controller, combination{kept} kept fp32)"):
                info = convert_fp16(m.onnx_path, dst, float_towers)
            with step("[2/3] validating fp16 against fp32 on ONNX Runtime CPU (32 images from the shipped "
                      "photographs)"):
                info["validation"] = validate_fp16(m, dst)
            if info["validation"]["ok"] or not strict:
                break
            worst = _worst_tower(info["validation"], float_towers)
            if worst is None or len(float_towers) + 1 == len(m.backbones):
                raise ClipfuseError(f"fp16 graph of {str(folder)!r} fails validation: "
                                    + "; ".join(info["validation"]["failures"]) + " (nothing written; keeping more "
                                    "towers fp32 would leave fp16 nothing to gain: run the fp32 graph)")
            # the heads and everything after the raw embeddings are fp32 already: what moves the outputs is a
            # tower's fp16 error, amplified by its head (a linear probe's rows can be long); keep that tower fp32
            log(f"fp16: {'; '.join(info['validation']['failures'])}; keeping {m.backbone_names[worst]}'s tower fp32 "
                "(its logits moved most) and validating again")
            float_towers.append(worst)
        info["float_backbones"] = [m.backbone_names[k] for k in float_towers]
        info["ort_cpu_fp32_fallback_ops"] = cpu_fp32_fallback_ops(dst)
        info["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        info["source"] = m.onnx_path.name
        info["source_sha256"] = m.data["artefacts"][m.onnx_path.name]["sha256"]   # staleness check
        if not info["external_data"]:
            update.remove(MODEL_FP16 + ".data")
        update.edit_manifest(lambda data: data.setdefault("precisions", {}).__setitem__("fp16", info))
        log(f"[3/3] writing {MODEL_FP16} and the manifest into {folder}")
    return info


def _worst_tower(report: dict, float_towers) -> int | None:
    """The fp16 tower (backbone index) whose logits moved most, relative to their bound; None when none is left."""
    rows = [(b.get("logits_max_abs", 0.0) / max(b.get("logits_bound") or 1e-12, 1e-12), k)
            for k, b in enumerate(report.get("backbones") or []) if k not in float_towers]
    return max(rows)[1] if rows else None
