"""Reduced precision written into the graph: model.onnx (fp32, validated) -> model.fp16.onnx.

TensorRT 11 builds strongly typed networks only (no FP16 builder flag, no
per-layer precision constraints), so the precision of every tensor must be in
the ONNX graph itself. This module converts the exported, validated fp32 graph
(never a re-export) with ONNX Runtime's float16 converter
(`onnxruntime.transformers.float16.convert_float_to_float16`, the same code as
onnxconverter-common, already installed with onnxruntime: no new dependency),
keeping these in fp32 by explicit Cast islands:

    LayerNormalization   after attention it overflows in fp16 (TensorRT's own warning)
    Softmax              attention and the final probabilities: exp() overflows at 11.1
    ReduceMean           the RN attention pool's token mean (a reduction over 50 tokens)
    ReduceL2 and downstream
                         the feature L2 normalisation, the heads, the controller MLP and
                         the combination: everything from the raw embeddings to the outputs

The heads stay fp32: a zero-shot head's logits are ~100 x cosine, and fp16 keeps
11 bits, so an fp16 head alone would add ~0.05 absolute error to logits whose
top-2 margins on real data are often below that; the heads are (C x D) GEMMs,
nothing next to the towers, so fp32 costs nothing measurable.

Nodes are found by op type and by position (the exporter names nodes after
the aten op, e.g. node_linalg_vector_norm_1, but names are not a contract):
the feature normalisation is the K ReduceL2 nodes, the towers are the ancestors
of their inputs (the raw embeddings), and every node outside the towers is kept
fp32. Graph inputs stay uint8 and outputs
float32 (keep_io_types).

`export_fp16(engine_dir)` converts, validates against the fp32 graph on ONNX
Runtime CPU (per-backbone embedding cosine, logit error, top-1 agreement), and
adds model.fp16.onnx to the folder atomically: temp file, fsync, os.replace;
the manifest last, with the new file's sha256 and a "precisions" entry.

ONNX Runtime CPU has fp16 kernels for only some ops; for the others its
InsertCastTransformer wraps the node in Casts and computes it in fp32. So the
CPU validation measures the fp16 weights and the fp16 storage of activations
between ops, but not every op's fp16 arithmetic: `cpu_fp32_fallback_ops`
says which ops ran in fp32 on CPU (read from the session's optimised graph).
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from clipfuse import iospec
from clipfuse.errors import ClipfuseError

from clipfuse.runtime.compare import MODEL_FP16, precision_onnx_path  # noqa: F401  (re-exported)

# Ops kept in fp32 wherever they occur in the towers.
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean")
# The feature normalisation: F.normalize exports as ReduceL2 -> Clip -> Expand -> Div.
FEATURE_NORM_OP = "ReduceL2"
EXTERNAL_DATA_BYTES = 1_800_000_000

# Acceptance bound (the issue's): per-backbone embedding cosine against fp32.
MIN_COSINE = 0.999
# Logit bound. Everything from the raw embeddings on is fp32, so a logit can only move by what the
# features moved, through the head: |dz_k| <= max_c ||W_k[c]|| * ||df_k|| (Cauchy-Schwarz), and the
# fused logits by sum_k t_k |dz_k|. The bound is that, from the measured feature error, plus a 1%
# + 1e-4 margin for fp32 rounding. It fails when the fp32 island downstream of the features is not
# fp32 after all (a head in fp16 adds ~1e-3 relative on top), or when a cast is misplaced.
LOGIT_MARGIN_REL, LOGIT_MARGIN_ABS = 0.01, 1e-4


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
    producer = {o: n for n in graph.node for o in n.output}
    tower, todo = set(), [t for n in norms for t in n.input[:1]]
    while todo:
        p = producer.get(todo.pop())
        if p is None or p.name in tower:
            continue
        tower.add(p.name)
        todo.extend(p.input)
    for n in graph.node:
        if n.name not in tower:
            if n.name not in keep:
                islands["feature_norm_and_downstream"][n.op_type] += 1
            keep.add(n.name)
    return keep, {k: dict(sorted(v.items())) for k, v in islands.items()}


def convert_fp16(src: Path, dst: Path) -> dict:
    """model.onnx -> fp16 graph at dst (external data beside it past 2 GB). Returns facts for the manifest."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))                       # loads external data too
    keep, islands = fp32_node_names(model)
    model16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(keep),
                                       op_block_list=list(FP32_OPS), disable_shape_infer=False)
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
    size = sum(t.ByteSize() for t in model16.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    data_name = dst.name + ".data"
    if external:
        onnx.save_model(model16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model16, str(dst))
    fp32_nodes = len(keep)
    return {
        "file": dst.name,
        "external_data": data_name if external else None,
        "converter": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)",
        "fp32_islands": islands,
        "fp32_nodes": fp32_nodes,
        "casts": counts.get("Cast", 0),
        "nodes": sum(counts.values()),
    }


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


# ----------------------------------------------------------------------------- validation

def validation_images() -> list:
    """32 images from the shipped photographs (whole, 3 crops, mirrored): runtime.compare.photo_variants."""
    from clipfuse.runtime.compare import photo_variants

    return photo_variants()


def _session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cpu_fp32_fallback_ops(fp16_path: Path) -> dict:
    """{op type: count} of nodes ONNX Runtime CPU runs in fp32 inside the fp16 graph (it casts around
    nodes that lack an fp16 CPU kernel), read from the session's optimised graph at basic level."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        ort.InferenceSession(str(fp16_path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    orig = onnx.load(str(fp16_path), load_external_data=False)
    orig_fp32 = _fp32_compute_nodes(orig)
    now_fp32 = _fp32_compute_nodes(opt)
    extra = collections.Counter(now_fp32) - collections.Counter(orig_fp32)
    return dict(sorted(extra.items()))


def _fp32_compute_nodes(model) -> list:
    """Op types of the non-Cast nodes whose first float input is float32 (by value_info after inference)."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
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
    return ops


def compare_precisions(ref: dict, got: dict, manifest_data: dict, head_row_norms: list, batch_top1=True) -> dict:
    """fp16 (got) against fp32 (ref) outputs on the same images: the figures and the pass/fail verdict."""
    f_ref = np.asarray(ref[iospec.FEATURES], np.float64)
    f_got = np.asarray(got[iospec.FEATURES], np.float64)
    z_ref = np.asarray(ref[iospec.BACKBONE_LOGITS], np.float64)
    z_got = np.asarray(got[iospec.BACKBONE_LOGITS], np.float64)
    t_ref = np.asarray(ref[iospec.TEMPERATURES], np.float64)
    backbones, lo, dz_bound = [], 0, []
    for k, b in enumerate(manifest_data["backbones"]):
        hi = lo + b["embed_dim"]
        a, g = f_ref[:, lo:hi], f_got[:, lo:hi]
        cos = (a * g).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(g, axis=1))
        df = float(np.linalg.norm(a - g, axis=1).max())
        bound = head_row_norms[k] * df * (1 + LOGIT_MARGIN_REL) + LOGIT_MARGIN_ABS
        dz = float(np.abs(z_ref[:, k] - z_got[:, k]).max())
        backbones.append({
            "backbone": f"{b['arch']}:{b['weights']}",
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "logits_max_abs": dz, "logits_max_rel": dz / float(np.abs(z_ref[:, k]).max()),
            "logits_bound": bound,
            "top1_agreement": float((z_ref[:, k].argmax(-1) == z_got[:, k].argmax(-1)).mean()),
        })
        dz_bound.append(bound)
        lo = hi
    fused_bound = float((t_ref.max(0) * np.array(dz_bound)).sum()) + LOGIT_MARGIN_ABS
    l_ref = np.asarray(ref[iospec.LOGITS], np.float64)
    l_got = np.asarray(got[iospec.LOGITS], np.float64)
    dl = float(np.abs(l_ref - l_got).max())
    srt = np.sort(l_ref, axis=-1)
    margin = srt[:, -1] - srt[:, -2] if l_ref.shape[1] > 1 else np.full(len(l_ref), np.inf)
    agree = l_ref.argmax(-1) == l_got.argmax(-1)
    # A flip is explained when the fp32 top-2 margin is within twice the measured logit error.
    unexplained = int((~agree & (margin > 2 * dl)).sum())
    fails = [f"{b['backbone']}: embedding cosine min {b['cosine_min']:.5f} < {MIN_COSINE}"
             for b in backbones if b["cosine_min"] < MIN_COSINE]
    fails += [f"{b['backbone']}: logit error {b['logits_max_abs']:.3g} > bound {b['logits_bound']:.3g}"
              for b in backbones if b["logits_max_abs"] > b["logits_bound"]]
    if dl > fused_bound:
        fails.append(f"fused logits: error {dl:.3g} > bound {fused_bound:.3g}")
    if unexplained:
        fails.append(f"{unexplained} fused top-1 flips where the fp32 margin exceeds twice the logit error")
    return {
        "images": int(len(l_ref)),
        "backbones": backbones,
        "fused": {"logits_max_abs": dl, "logits_max_rel": dl / float(np.abs(l_ref).max()),
                  "logits_bound": fused_bound, "top1_agreement": float(agree.mean()),
                  "top1_flips": int((~agree).sum()), "top1_flips_unexplained": unexplained,
                  "fp32_top2_margin_median": float(np.median(margin)),
                  "probs_max_abs": float(np.abs(np.asarray(ref[iospec.PROBS]) - np.asarray(got[iospec.PROBS])).max())},
        "bounds": {"min_cosine": MIN_COSINE,
                   "logits": f"max_c ||W_k[c]|| * max ||df_k|| * (1 + {LOGIT_MARGIN_REL}) + {LOGIT_MARGIN_ABS}"},
        "ok": not fails,
        "failures": fails,
    }


def run_batches(session, feeds: list[dict]) -> dict:
    outs = collections.defaultdict(list)
    for feed in feeds:
        for name, v in zip(iospec.OUTPUT_NAMES, session.run(list(iospec.OUTPUT_NAMES), feed)):
            outs[name].append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def make_feeds(manifest, images, batch: int = 8) -> list[dict]:
    from clipfuse.runtime.preprocess import preprocess_image

    specs = manifest.preprocess_specs()
    feeds = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        feeds.append({name: np.stack([preprocess_image(im, s) for im in chunk]) for name, s in specs.items()})
    return feeds


def validate_fp16(manifest, fp16_path: Path, images=None, batch: int = 8) -> dict:
    """Run the fp32 and the fp16 graphs on ORT CPU on the same images; figures + verdict (no raise)."""
    import time

    images = validation_images() if images is None else images
    feeds = make_feeds(manifest, images, batch)
    timing = {}
    s32 = _session(manifest.onnx_path)
    ref = run_batches(s32, feeds[:1])                 # warm-up
    t = time.perf_counter()
    ref = run_batches(s32, feeds)
    timing["fp32_s"] = time.perf_counter() - t
    del s32
    s16 = _session(fp16_path)
    got = run_batches(s16, feeds[:1])
    t = time.perf_counter()
    got = run_batches(s16, feeds)
    timing["fp16_s"] = time.perf_counter() - t
    del s16
    from clipfuse.runtime.compare import head_row_norms

    report = compare_precisions(ref, got, manifest.data, head_row_norms(manifest.folder, len(manifest.backbones)))
    report["ort_cpu_seconds"] = {k: round(v, 3) for k, v in timing.items()}
    report["ort_cpu_seconds"]["batch"] = batch
    report["onnxruntime"] = __import__("onnxruntime").__version__
    return report


# ----------------------------------------------------------------------------- the engine folder

def export_fp16(engine_dir, quiet: bool = False, strict: bool = True) -> dict:
    """Add model.fp16.onnx to an engine folder: convert, validate against fp32 on ORT CPU, write atomically.

    strict: raise ClipfuseError (and leave the folder as it was) when the validation fails.
    Returns the manifest's precisions["fp16"] entry.
    """
    import datetime as _dt

    from clipfuse.export.engine import fsync_file, step, write_manifest_atomic
    from clipfuse.runtime.manifest import read_manifest, sha256_file

    m = read_manifest(engine_dir)
    folder = m.folder
    tmpdir = Path(tempfile.mkdtemp(prefix=".fp16.tmp-", dir=folder))
    try:
        with step(f"converting {m.onnx_path.name} to fp16 (LayerNorm, softmax, feature norm, heads, "
                  "controller, combination kept fp32)", quiet):
            info = convert_fp16(m.onnx_path, tmpdir / MODEL_FP16)
        with step("validating fp16 against fp32 on ONNX Runtime CPU (32 images from the shipped photographs)", quiet):
            info["validation"] = validate_fp16(m, tmpdir / MODEL_FP16)
            info["ort_cpu_fp32_fallback_ops"] = cpu_fp32_fallback_ops(tmpdir / MODEL_FP16)
        if strict and not info["validation"]["ok"]:
            raise ClipfuseError(f"fp16 graph of {str(folder)!r} fails validation: "
                                + "; ".join(info["validation"]["failures"]) + " (nothing written)")
        info["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        info["source"] = m.onnx_path.name
        info["source_sha256"] = m.data["artefacts"][m.onnx_path.name]["sha256"]   # staleness check
        names = [MODEL_FP16] + ([info["external_data"]] if info["external_data"] else [])
        artefacts = {}
        for name in names:
            fsync_file(tmpdir / name)
            artefacts[name] = {"sha256": sha256_file(tmpdir / name), "bytes": (tmpdir / name).stat().st_size}
        # The data file first, the graph second, the manifest last: until the manifest names them,
        # read_manifest ignores the new files, and a stale manifest still verifies the old ones.
        for name in reversed(names):
            os.chmod(tmpdir / name, 0o644)
            os.replace(tmpdir / name, folder / name)
        data = json.loads((folder / "manifest.json").read_text())
        data["artefacts"].update(artefacts)
        if not info["external_data"]:
            data["artefacts"].pop(MODEL_FP16 + ".data", None)
            (folder / (MODEL_FP16 + ".data")).unlink(missing_ok=True)
        data.setdefault("precisions", {})["fp16"] = info
        write_manifest_atomic(folder, data)
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    return info


# ----------------------------------------------------------------------------- the committed report

def time_precisions(manifest, fp16_path: Path, rounds: int = 5, batch: int = 8) -> dict:
    """ORT CPU latency of the fp32 and fp16 graphs at one batch, interleaved A B A B after a warm-up,
    with the CPU time other processes took meanwhile (a busy neighbour slows both)."""
    import statistics
    import time

    import psutil

    feed = make_feeds(manifest, validation_images()[:batch], batch)[0]
    sessions = {"fp32": _session(manifest.onnx_path), "fp16": _session(fp16_path)}
    for s in sessions.values():
        s.run(None, feed)
    own = psutil.Process()
    cpu0, own0, t0 = psutil.cpu_times(), own.cpu_times(), time.perf_counter()
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    cpu1, own1, wall = psutil.cpu_times(), own.cpu_times(), time.perf_counter() - t0
    busy = lambda c: c.user + c.system + getattr(c, "nice", 0) + getattr(c, "irq", 0) + getattr(c, "softirq", 0)
    others = max(0.0, (busy(cpu1) - busy(cpu0)) - ((own1.user + own1.system) - (own0.user + own0.system)))
    out = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)} for k, v in times.items()}
    out["batch"], out["rounds"] = batch, rounds
    out["fp16_over_fp32"] = out["fp16"]["median_ms"] / out["fp32"]["median_ms"]
    out["other_processes_cores"] = round(others / wall, 2)
    out["wall_s"] = round(wall, 1)
    return out


def format_report(info: dict, manifest, command: str, note: str | None = None) -> str:
    v = info["validation"]
    lines = ["# fp16 graph against fp32 on ONNX Runtime CPU", "", f"Command: `{command}`", "",
             f"Engine folder: {manifest.folder} (fp32 graph exported {manifest.data.get('created')} by "
             f"{manifest.data['onnx'].get('exporter')}; model.fp16.onnx converted {info.get('created')})"
             + (f". {note}" if note else "") + ".", "",
             f"Engine: {' + '.join(manifest.backbone_names)}, {len(manifest.classes)} classes "
             "(seeded random weights: the figures say how fp16 treats these networks, not trained ones). "
             f"onnxruntime {v['onnxruntime']}. Images: {v['images']} (the 4 shipped photographs, whole and at "
             "3 crops, each also mirrored).", "",
             "fp32 islands kept by explicit casts (op type: count):", "",
             "- anywhere: " + ", ".join(f"{k} {n}" for k, n in info["fp32_islands"]["ops"].items()),
             "- feature L2 norm, heads, controller, combination: "
             + ", ".join(f"{k} {n}" for k, n in info["fp32_islands"]["feature_norm_and_downstream"].items()),
             f"- {info['casts']} Cast nodes in {info['nodes']}", "",
             "| backbone | cosine mean | cosine min | bound | max abs logit err | max rel | logit bound | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for b in v["backbones"]:
        lines.append(f"| {b['backbone']} | {b['cosine_mean']:.7f} | {b['cosine_min']:.7f} | >= {v['bounds']['min_cosine']} | "
                     f"{b['logits_max_abs']:.3g} | {b['logits_max_rel']:.2e} | {b['logits_bound']:.3g} | "
                     f"{b['top1_agreement'] * 100:.1f}% |")
    f = v["fused"]
    lines.append(f"| fused | | | | {f['logits_max_abs']:.3g} | {f['logits_max_rel']:.2e} | {f['logits_bound']:.3g} | "
                 f"{f['top1_agreement'] * 100:.1f}% ({f['top1_flips']} flips, {f['top1_flips_unexplained']} "
                 "beyond the margin rule) |")
    lines += ["", f"Logit bound: {v['bounds']['logits']} (everything after the raw embeddings is fp32, so a logit "
              "moves only as far as the head carries the feature error). Median fp32 top-2 margin of the fused "
              f"logits: {f['fp32_top2_margin_median']:.3g}; max |probs error| {f['probs_max_abs']:.3g}. "
              f"Verdict: {'PASS' if v['ok'] else 'FAIL: ' + '; '.join(v['failures'])}.", ""]
    fb = info.get("ort_cpu_fp32_fallback_ops") or {}
    lines += ["ONNX Runtime CPU has no fp16 kernel for these ops and computes them in fp32 between inserted "
              "casts (op type: nodes): " + (", ".join(f"{k} {n}" for k, n in fb.items()) or "none")
              + (" (the Max nodes are the Relus: ORT inlines an fp16 Relu as Max(x, 0))" if "Max" in fb else "")
              + ". So this CPU "
              "check measures fp16 weights and fp16 activations between ops, not fp16 arithmetic inside those "
              "ops; benchmarks/gpu_check.py measures fp16 arithmetic on a GPU.", ""]
    t = info.get("timing")
    if t:
        lines += [f"ORT CPU latency, batch {t['batch']}, median (min-max) over {t['rounds']} interleaved rounds: "
                  f"fp32 {t['fp32']['median_ms']:.0f} ms ({t['fp32']['min_ms']:.0f}-{t['fp32']['max_ms']:.0f}), "
                  f"fp16 {t['fp16']['median_ms']:.0f} ms ({t['fp16']['min_ms']:.0f}-{t['fp16']['max_ms']:.0f}): "
                  f"fp16 / fp32 = {t['fp16_over_fp32']:.2f}. Other processes took {t['other_processes_cores']} "
                  f"cores on average meanwhile (of {os.cpu_count()}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m clipfuse.export.fp16 ENGINE [--out benchmarks/results/fp16_validation] [--rounds 5]"""
    import argparse
    import shlex
    import sys

    from clipfuse.runtime.manifest import read_manifest

    ap = argparse.ArgumentParser(description="Add model.fp16.onnx to ENGINE (if absent), validate, time, report.")
    ap.add_argument("engine")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--note", default=None, help="a line for the report, e.g. how the engine folder was made")
    args = ap.parse_args(argv)
    m = read_manifest(args.engine)
    if "fp16" not in m.data.get("precisions", {}):
        export_fp16(args.engine, strict=False)
        m = read_manifest(args.engine)
    info = dict(m.data["precisions"]["fp16"])
    info["timing"] = time_precisions(m, m.folder / MODEL_FP16, rounds=args.rounds)
    command = "python -m clipfuse.export.fp16 " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = format_report(info, m, command, note=args.note)
    print(report)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"command": command, "engine": m.backbone_names, **info},
                                                       indent=2) + "\n")
        Path(args.out + ".md").write_text(report)
    return 0 if info["validation"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
