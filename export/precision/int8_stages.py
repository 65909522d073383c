"""int8 stages for a cascade engine: towers cut out of model.int8.onnx, thresholds certified again on int8.

    record = int8_stages(manifest, int8_path, tower_paths, certify_feeds, ...)   # export_int8 calls it

On a cascade engine (`clipfuse fit --cascade`), `clipfuse export ENGINE --precision int8` also writes,
when it can certify them,

    stages/tower_k.int8.onnx   backbone k's path cut out of model.int8.onnx: its image input, its
                               quantized tower, the fp32 feature norm and head, nothing else

and records the files and NEW thresholds in the manifest's precisions["int8"]["cascade"]. The combine
graphs stay the fp32 ones (the controller is an fp32 island in model.int8.onnx too).

Cut, not quantized again: the cut towers are model.int8.onnx's own nodes and ranges, so the int8
cascade's last stage computes what the validated int8 graph computes (checked here on the first
certification batch), and towers kept fp32 (--int8-keep-fp32) stay fp32.

New thresholds: int8 moves every stage's confidence, so fp32's bound no longer describes the int8
stages. They are certified again (export/thresholds.py certify_thresholds, the fit's order and score
kept) against the int8 full ensemble, on `--cascade-images DIR` or the calibration folder (up to
CERTIFY_MAX, evenly spaced). They must not be images the heads or controller were fitted on: a probe
answers its own training images over-confidently (measured: docs/decisions.md, "int8 cascade stages");
those the fit recorded (runtime/fit_images.py) are left out with a warning.
The int8 cascade's loss against fp32 is at most the int8 graph's plus the cascade's. With `--data`, its
accuracy is reported beside both full ensembles as paired differences.

Too few images to certify max_drop: model.int8.onnx is still written, the int8 stages are not, the
record says why, and the runtime refuses int8 with the cascade in one line (--no-cascade serves it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import step
from clipfuse.runtime.agreement import compare_outputs
from clipfuse.runtime.backends.sessions import open_session
from clipfuse.runtime.cascade import cascade_block, run_stage_graphs
from clipfuse.runtime.compare import head_row_norms

from ..paired import accuracy_interval, paired_difference
from ..thresholds import CascadeConfig, certify_thresholds, measure
from .calibrate import feeds_images, feeds_sha256, subgraph_model
from .fp16 import ancestor_nodes

CERTIFY_MAX = 1024          # images of the calibration folder the thresholds are certified on, at most
PASS_THROUGH = ("Identity", "Cast", "Unsqueeze", "Reshape", "Squeeze")


# ----------------------------------------------------------------------------- towers cut out of the graph

def stage_tensors(graph) -> list[tuple[str, str]]:
    """(unit-norm features, class logits) tensor names of each backbone in the fused graph, in backbone order:
    the inputs of the Concat that makes `features`, and those of the Concat that makes `backbone_logits`
    (through their Unsqueeze). Each logits tensor is checked to depend on its features tensor."""

    producer = {o: n for n in graph.node for o in n.output}

    def concat_inputs(output: str) -> list[str]:
        node = producer.get(output)
        while node is not None and node.op_type in ("Identity", "Cast"):
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Concat":
            raise ClipfuseError(f"the fused graph's {output} output is not a Concat of one slice per backbone: it "
                                "was not made by this clipfuse's exporter; re-export it (`clipfuse export ENGINE`)")
        return list(node.input)

    def through(t: str) -> str:
        node = producer.get(t)
        while node is not None and node.op_type in PASS_THROUGH:
            t = node.input[0]
            node = producer.get(t)
        return t

    feats = concat_inputs(iospec.FEATURES)
    logits = [through(t) for t in concat_inputs(iospec.BACKBONE_LOGITS)]
    if len(feats) != len(logits):
        raise ClipfuseError(f"the fused graph has {len(feats)} feature slices and {len(logits)} logit slices; "
                            "re-export it (`clipfuse export ENGINE`)")
    for k, (f, z) in enumerate(zip(feats, logits)):
        ancestors = ancestor_nodes(graph, [z])
        if producer[f].name not in ancestors:
            raise ClipfuseError(f"backbone {k + 1}'s logits do not come from its features slice in the fused graph; "
                                "re-export it (`clipfuse export ENGINE`)")
    return list(zip(feats, logits))


def stage_tower_model(model, k: int, base_dir: Path, image_input: str, tensors=None):
    """Backbone k (0-based) of a fused graph as a stage tower graph: image_input -> features_<k+1>,
    logits_<k+1> (iospec), its nodes and weights only (weights loaded into memory).

    The exporter takes the batch size of every tower from one input (a Shape of image_32 feeding the
    class-token Expand of a 48 px tower): such a Shape, of another image input and of its batch
    dimension only (start 0, end 1), is pointed at the tower's own input, which has the same batch by
    contract. Any other read of another input is refused: the tower would not stand alone.
    tensors: stage_tensors(model.graph), when the caller has it already."""

    f, z = (tensors or stage_tensors(model.graph))[k]
    sub = subgraph_model(model, {f: iospec.tower_features(k + 1), z: iospec.tower_logits(k + 1)}, base_dir)
    others = {i.name for i in sub.graph.input} - {image_input}
    for node in sub.graph.node:
        for j, t in enumerate(node.input):
            if t not in others:
                continue
            attrs = {a.name: a.i for a in node.attribute}
            if node.op_type != "Shape" or attrs.get("start") != 0 or attrs.get("end") != 1:
                raise ClipfuseError(f"backbone {k + 1}'s tower reads input {t!r} ({node.op_type} {node.name}), not only "
                                    f"its own {image_input!r}: it cannot run as a stage alone; re-export the engine")
            node.input[j] = image_input
    keep = [i for i in sub.graph.input if i.name not in others]
    if [i.name for i in keep] != [image_input]:
        raise ClipfuseError(f"backbone {k + 1}'s tower does not read {image_input!r}, the input the manifest names "
                            f"for it; re-export the engine")
    del sub.graph.input[:]
    sub.graph.input.extend(keep)
    return sub


def write_towers(graph_path: Path, dsts: list[Path], image_inputs: list[str]) -> None:
    """Cut every backbone's stage tower out of the graph at graph_path into dsts (one per backbone, in order;
    image_inputs: each one's input, the manifest's cascade.stages[k].input)."""
    import onnx

    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    tensors = stage_tensors(model.graph)
    if len(dsts) != len(tensors):
        raise ClipfuseError(f"{graph_path.name} has {len(tensors)} backbones, {len(dsts)} stage files asked")
    for k, dst in enumerate(dsts):
        sub = stage_tower_model(model, k, graph_path.parent, image_inputs[k], tensors)
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        large = sub.ByteSize() > 1_800_000_000
        onnx.save_model(sub, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=Path(dst).name + ".data" if large else None)
        del sub


# ----------------------------------------------------------------------------- running the stages

def stage_sessions(manifest, tower_paths: list[Path]) -> dict:
    """ONNX Runtime sessions: the given towers, and the engine's fp32 combine graphs."""

    sessions = {}
    for s, path in enumerate(tower_paths, 1):
        sessions[f"tower_{s}"] = open_session(Path(path))
        sessions[f"combine_{s}"] = open_session(manifest.folder / iospec.combine_file(s))
    return sessions


def stage_outputs(sessions: dict, feeds: list[dict], inputs: list[str]) -> list[dict]:
    """Every image of every feed through every stage: S dicts of the five outputs, concatenated over feeds."""

    S = len(inputs)
    runs = [run_stage_graphs(sessions, feed, inputs, S) for feed in feeds]
    return [{k: np.concatenate([r[s][k] for r in runs]) for k in runs[0][s]} for s in range(S)]


def check_last_stage(manifest, sessions: dict, int8_path: Path, feed: dict, inputs: list[str]) -> dict:
    """The int8 stages with every backbone against model.int8.onnx on one batch: the fp32 tolerance row
    (the same nodes; only the fp32 combine graph differs from the fused graph's controller). Raises on a
    failure: a cut that does not reproduce the graph it came from is a bug, not a precision trade."""

    S = len(inputs)
    got = run_stage_graphs(sessions, feed, inputs, S)[-1]
    full = open_session(Path(int8_path))
    ref = dict(zip(iospec.OUTPUT_NAMES, full.run(list(iospec.OUTPUT_NAMES), feed)))
    dims = [(n, int(b["embed_dim"])) for n, b in zip(manifest.backbone_names, manifest.backbones)]
    c = compare_outputs(ref, got, dims, iospec.tolerance("fp32"), head_row_norms(manifest.folder, S))
    if not c["ok"]:
        raise ClipfuseError(f"the int8 stage towers cut out of {Path(int8_path).name} do not reproduce it (fp32 "
                            f"tolerance): " + "; ".join(c["failures"][:3]))
    return {o["output"]: o["max_rel"] for o in c["outputs"]}


# ----------------------------------------------------------------------------- certification

def stage_costs(block: dict) -> list[float]:
    """What each stage adds, from the fit's cumulative costs (manifest cascade.cum_costs)."""
    cum = np.asarray(block.get("cum_costs") or [], dtype=np.float64)
    if cum.ndim != 1 or cum.size != len(block["stages"]) or not np.isfinite(cum).all():
        raise ClipfuseError("the cascade block has no usable 'cum_costs' (the fit's stage costs); re-fit the cascade")
    return np.diff(cum, prepend=0.0).tolist()


def int8_stages(manifest, int8_path: Path, tower_paths: list[Path], certify_feeds: list[dict], folder,
                data_feeds=None, labels=None, fp32_logits=None, found=None) -> dict:
    """Cut the int8 stage towers into tower_paths, certify thresholds on certify_feeds, and return the
    record for precisions["int8"]["cascade"] ({"written": False, "reason"} when too few images certify).

    data_feeds, labels, fp32_logits: the labelled --data images, their labels and model.onnx's fused logits
    on them (the int8 validation computed them): the int8 cascade's accuracy is reported beside fp32's.
    found: export/unlabelled.UnlabelledImages of the certification folder (images of each kind found and used)."""

    block = cascade_block(manifest)
    S = len(block["stages"])
    inputs = [st["input"] for st in block["stages"]]
    names = [str(p.name) for p in tower_paths]
    try:                  # a cascade written without the fit's costs (exported by hand) cannot be certified
        costs = stage_costs(block)
    except ClipfuseError as e:
        return {"written": False, "towers": None, "reason": str(e), "files": names}
    fields = {k: v for k, v in (block.get("config") or {}).items() if k in CascadeConfig.__dataclass_fields__}
    fields.setdefault("max_drop", block.get("max_drop", CascadeConfig.max_drop))
    fields.setdefault("constraint", block.get("constraint", CascadeConfig.constraint))
    config = CascadeConfig(**fields)
    with step(f"cascade: cutting {S} int8 stage towers out of {Path(int8_path).name}", tag="int8"):
        write_towers(int8_path, tower_paths, inputs)
    sessions = stage_sessions(manifest, tower_paths)
    check = check_last_stage(manifest, sessions, int8_path, certify_feeds[0], inputs)
    n = feeds_images(certify_feeds)
    with step(f"cascade: certifying int8 thresholds on {n} images (max-drop {config.max_drop}, "
              f"{block['score']})", tag="int8"):
        outs = stage_outputs(sessions, certify_feeds, inputs)
    Z = np.stack([o[iospec.LOGITS] for o in outs])
    record = {"towers": [iospec.tower_file(s, "int8") for s in range(1, S + 1)],
              "combine": "the fp32 stages' combine graphs (the controller and sum stay fp32, as in model.int8.onnx)",
              "score": block["score"], "max_drop": config.max_drop, "constraint": config.constraint,
              "confidence": config.confidence, "fp32_thresholds": block["thresholds"],
              "reference": "the int8 full ensemble (model.int8.onnx's answers, held to fp32 by the int8 validation)",
              "last_stage_vs_model_int8": check,
              "certified_on": {"folder": str(folder), "images": int(n), "sha256": feeds_sha256(certify_feeds),
                               **({"found": found.to_dict()} if found is not None else {})}}
    try:
        t, calibration = certify_thresholds(Z, costs, config, block["score"])
    except ClipfuseError as e:
        return dict(record, written=False, towers=None,
                    reason=f"{e} (the calibration folder {str(folder)!r} gave {n}; at most {CERTIFY_MAX} are used)",
                    files=names)
    record.update(written=True, thresholds=[None if np.isinf(v) else float(v) for v in t], calibration=calibration)
    if data_feeds is not None:
        outs = stage_outputs(sessions, data_feeds, inputs)
        Zt = np.stack([o[iospec.LOGITS] for o in outs])
        y = np.asarray(labels)
        pred, stage, cost = measure(Zt, t, block["score"], costs)
        fp32_full, int8_full = np.asarray(fp32_logits).argmax(1), Zt[-1].argmax(1)
        vs_fp32, vs_int8 = paired_difference(pred, fp32_full, y), paired_difference(pred, int8_full, y)
        record["test"] = {"n": int(y.size), "exit_rates": (np.bincount(stage, minlength=S) / y.size).tolist(),
                          "expected_cost": cost, "cost_fraction": cost / float(np.sum(costs)),
                          "accuracy_cascade_int8": accuracy_interval(pred, y).to_dict(),
                          "accuracy_full_int8": accuracy_interval(int8_full, y).to_dict(),
                          "accuracy_full_fp32": accuracy_interval(fp32_full, y).to_dict(),
                          "vs_full_fp32": vs_fp32.to_dict(), "vs_full_int8": vs_int8.to_dict()}
    return record


def format_record(rec: dict) -> list[str]:
    """What the export prints about the int8 cascade."""
    if not rec.get("written"):
        return [f"cascade: int8 stage graphs not written: {rec['reason']}; with --precision int8 this engine runs "
                "its full int8 graph (--no-cascade)"]
    c = rec["calibration"]
    lines = [f"cascade: int8 stages {', '.join(rec['towers'])}; thresholds {rec['thresholds']} ({rec['score']}; fp32's "
             f"{rec['fp32_thresholds']}), certified on {c['n']} images: {c['disagreements']} disagreements with the int8 "
             f"full ensemble, bound {c['disagreement_bound']:.2f}% (<= max-drop {rec['max_drop']:g}), exit rates "
             + ", ".join(f"{r:.1%}" for r in c["exit_rates"])]
    t = rec.get("test")
    if t:
        a, d = t["accuracy_cascade_int8"], t["vs_full_fp32"]
        lines.append(f"cascade: on {t['n']} labelled images int8 cascade {a['value']:.2f}% vs fp32 full "
                     f"{t['accuracy_full_fp32']['value']:.2f}%: {d['difference']:+.2f} points [{d['lo']:+.2f}, "
                     f"{d['hi']:+.2f}] paired; cost {t['cost_fraction']:.1%} of the full ensemble's")
    return lines
