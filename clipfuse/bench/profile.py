"""The fusion overhead: the share of the fused graph's time spent in the controller + combination,
from ONNX Runtime's profiler, and those nodes said in words (what they compute, not ORT's names)."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from clipfuse.core import iospec
from clipfuse.runtime.backends.sessions import open_session, session_options
from clipfuse.runtime.manifest import Manifest

from .configs import make_feed


def downstream_nodes(onnx_path: Path) -> tuple[dict[str, str], set[str]]:
    """The graph's nodes that compute the controller + combination (everything downstream of
    `features` and `backbone_logits`) as {name: op type}, and the names of all nodes. Reads the
    graph without its weights."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    tainted = {iospec.FEATURES, iospec.BACKBONE_LOGITS}
    down = {}
    for node in g.node:                      # ONNX nodes are topologically sorted
        if any(i in tainted for i in node.input):
            down[node.name] = node.op_type
            tainted.update(node.output)
    return down, {n.name for n in g.node}


def describe_nodes(ops) -> str:
    """Operator types in words, most frequent first: "7 nodes (MatMul x2, Softplus, ...)"."""
    ops = list(ops)
    if not ops:
        return "no nodes (folded away)"
    counts = Counter(ops).most_common()
    parts = [f"{op} x{n}" if n > 1 else op for op, n in sorted(counts, key=lambda c: (-c[1], c[0]))]
    return f"{len(ops)} node{'s' if len(ops) != 1 else ''} ({', '.join(parts)})"


def profile_overhead(manifest: Manifest, batch: int, runs: int, threads: int | None = None) -> dict:
    """Share of the fused graph's node time spent in the controller + combination (ORT profiler).

    ORT renames nodes it fuses; a profiled node counts as downstream when its name is, or starts
    with, a downstream node's name. Nodes matching no original name are reported separately."""
    with tempfile.TemporaryDirectory() as tmp:
        # The profile names the nodes of ORT's optimised graph (fusions rename nodes): save that graph
        # and find the controller + combination in it; its weights go to a side file (may pass 2 GB).
        so = session_options(threads=threads, profile_prefix=Path(tmp) / "ort",
                             optimized_path=Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        sess = open_session(manifest.onnx_path, options=so)
        try:
            down, every = downstream_nodes(Path(tmp) / "optimized.onnx")
            names_from = "ORT's optimised graph"
        except Exception:       # noqa: BLE001  an ORT that cannot save it: the exported graph's names, said below
            down, every = downstream_nodes(manifest.onnx_path)
            names_from = "the exported graph (ORT's optimised graph could not be saved)"
        feed = make_feed(manifest, batch)
        sess.run(None, feed)                     # warm-up, excluded below by run index
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, float] = {}
    op_of: dict[str, str] = {}
    run_total = 0.0
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= warm_end:
            node = e["name"][: -len("_kernel_time")]
            per_node[node] = per_node.get(node, 0.0) + e["dur"]
            if e.get("args", {}).get("op_name"):
                op_of[node] = e["args"]["op_name"]
    for e in model_runs[1:]:
        run_total += e["dur"]

    def origin(name):
        """The downstream graph node a profiled name stands for, or None."""
        if name in down:
            return name
        return next((d for d in down if d and name.startswith(d + "_")), None)

    down_names = sorted(n for n in per_node if origin(n) is not None)
    down_us = sum(per_node[n] for n in down_names)
    unknown = {n: t for n, t in per_node.items() if n not in every and origin(n) is None}
    node_us = sum(per_node.values())
    ops = [op_of.get(n) or down[origin(n)] for n in down_names]
    return {"batch": batch, "runs": runs, "node_time_ms": node_us / 1e3 / runs, "run_time_ms": run_total / 1e3 / runs,
            "controller_combination_ms": down_us / 1e3 / runs,
            "controller_combination_pct_of_nodes": 100.0 * down_us / node_us if node_us else float("nan"),
            "controller_combination_pct_of_run": 100.0 * down_us / run_total if run_total else float("nan"),
            "downstream_nodes": down_names, "downstream_ops": ops,
            "renamed_nodes_ms": sum(unknown.values()) / 1e3 / runs, "renamed_nodes": len(unknown),
            "node_names_from": names_from}
