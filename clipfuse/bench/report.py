"""The bench's outputs: the Markdown tables (latency, targets with verdicts, memory, overhead,
accuracy), the accuracy-against-latency plot with its Pareto front, and bench.json / .md / .png."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .cascade_exits import format_cascade
from .profile import describe_nodes

STATIC_METHODS = ("LOG-AVG", "PROB-AVG", "VOTE", "C-LOG-AVG")


def overhead_in_words(ov: dict) -> str:
    """The profiled controller + combination as what they are, e.g. "controller + combination:
    7 nodes (MatMul x2, Add, Relu, Softplus, ...)" rather than ORT's node names (node_linear_54, n10)."""
    ops = ov.get("downstream_ops")
    if ops is None:          # results written before op types were recorded: count the names only
        return f"controller + combination: {len(ov.get('downstream_nodes', []))} nodes"
    return f"controller + combination: {describe_nodes(ops)}"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def _r(s: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def plot_points(result: dict) -> list[dict]:
    """Accuracy against batch-1 (first batch) latency: singles, static ensembles, the engine's controller."""
    if not result.get("accuracy"):
        return []
    bs = str(result["settings"]["batches"][0])
    acc = result["accuracy"]["methods"]
    lat = result["latency"]
    pts = []
    for k, name in enumerate(result["backbones"]):
        if name in acc and f"single:{k}" in lat:
            pts.append({"method": name, "kind": "single", "latency_ms": lat[f"single:{k}"][bs]["latency_ms"]["p50"],
                        "accuracy": acc[name]})
    fused = lat["fused"][bs]["latency_ms"]["p50"]
    for name in STATIC_METHODS:      # a static controller costs what the fused graph costs
        if name in acc:
            pts.append({"method": name, "kind": "static ensemble", "latency_ms": fused, "accuracy": acc[name]})
    for name, a in acc.items():
        if name == "NLC" or name.startswith("ENGINE"):
            pts.append({"method": name, "kind": "engine", "latency_ms": fused, "accuracy": a})
    cas = result.get("cascade")
    if cas and "1" in cas["latency"]:    # measured means over the real exits (batch 1), and the curve
        pts.append({"method": "full ensemble (mean)", "kind": "engine", "latency_ms": cas["latency"]["1"]["full"]["mean_ms"],
                    "accuracy": cas["accuracy_full"]["value"]})
        pts.append({"method": "cascade (mean)", "kind": "cascade", "latency_ms": cas["latency"]["1"]["cascade"]["mean_ms"],
                    "accuracy": cas["accuracy_cascade"]["value"]})
        pts += [{"method": f"q={c['quantile']:g}", "kind": "cascade curve", "latency_ms": c["latency_ms"],
                 "accuracy": c["accuracy"]} for c in cas["curve"]]
    best = -1.0
    for p in sorted(pts, key=lambda p: (p["latency_ms"], -p["accuracy"])):
        p["pareto"] = p["accuracy"] > best
        best = max(best, p["accuracy"])
    return pts


def write_plot(result: dict, path: Path) -> bool:
    pts = plot_points(result)
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    style = {"single": ("o", "tab:blue"), "static ensemble": ("s", "tab:gray"), "engine": ("*", "tab:red"),
             "cascade": ("D", "tab:purple"), "cascade curve": (".", "tab:purple")}
    curve = sorted((p for p in pts if p["kind"] == "cascade curve"), key=lambda p: p["latency_ms"])
    if curve:
        ax.plot([p["latency_ms"] for p in curve], [p["accuracy"] for p in curve], c="tab:purple", lw=1, alpha=0.6)
    for kind, (marker, color) in style.items():
        sel = [p for p in pts if p["kind"] == kind]
        if sel:
            ax.scatter([p["latency_ms"] for p in sel], [p["accuracy"] for p in sel], marker=marker, c=color,
                       s=120 if marker == "*" else 50, label=kind, zorder=3)
    labels: dict[tuple, list[str]] = {}          # methods that tie share one label, not overprinted ones
    for p in pts:
        if p["kind"] != "cascade curve":         # the curve's points are many: its line says enough
            labels.setdefault((p["latency_ms"], p["accuracy"]), []).append(p["method"])
    for (x, y), names in labels.items():
        ax.annotate(" / ".join(names), (x, y), textcoords="offset points", xytext=(-5, 6), ha="right", fontsize=8)
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["latency_ms"])
    ax.scatter([p["latency_ms"] for p in front], [p["accuracy"] for p in front], s=220, facecolors="none",
               edgecolors="tab:green", lw=1.5, zorder=4)
    ax.step([p["latency_ms"] for p in front], [p["accuracy"] for p in front], where="post", c="tab:green",
            lw=1.5, ls="--", label="Pareto front", zorder=2)
    ax.set_xlabel(f"latency p50, batch {result['settings']['batches'][0]} (ms, ONNX Runtime CPU)")
    ax.set_ylabel(f"accuracy % ({result['accuracy']['num_images']} images)")
    ax.set_title(" + ".join(result["backbones"]), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    plt.close(fig)
    return True


def verdict(s: dict, limit: float, at_least: bool = False) -> str:
    """A target on per-round ratios, said as measured: every round, the median only, or none.
    A ratio at parity flips from round to round; a bare yes/NO would hide that."""
    ok = (lambda x: x >= limit) if at_least else (lambda x: x <= limit)
    worst, best = (s["min"], s["max"]) if at_least else (s["max"], s["min"])
    if ok(worst):
        return "yes"
    if ok(s["median"]):
        return f"yes at the median (worst round {worst:.3g})"
    if ok(best):
        return f"NO at the median, within the spread (best round {best:.3g})"
    return "NO"


def precision_rows(result: dict) -> list[str]:
    """Target rows of the precision configurations: int8 on ONNX Runtime at most 0.5x fp32's
    latency at batch 1 and 8, PyTorch eager at least 3x int8's at batch 1; the rest reported."""
    t, labels, L = result["targets"], result["labels"], []
    for c in (result.get("precisions") or {}).get("configs", []):
        for bs, s in t.get(f"{c}_over_fused", {}).items():
            if c == "fused-int8" and bs in ("1", "8"):
                L.append(f"| {labels[c]} / fused fp32 <= 0.50 | {bs} | {_r(s)} | {verdict(s, 0.5)} |")
            else:
                L.append(f"| (info) {labels[c]} / fused fp32 (ONNX Runtime) | {bs} | {_r(s)} | |")
        for bs, s in t.get(f"torch_over_{c}", {}).items():
            if c == "fused-int8" and bs == "1":
                L.append(f"| PyTorch eager / {labels[c]} >= 3 | {bs} | {_r(s, '{:.2f}')} | {verdict(s, 3.0, True)} |")
    if any("int8" in c for c in (result.get("precisions") or {}).get("configs", [])):
        L.append("| (info) % of peak is against the fp32 sgemm peak; int8 rows run int8 (VNNI) kernels, so they can "
                 "pass 100% | - | - | |")
    files = (result.get("precisions") or {}).get("file_bytes") or {}
    if len(files) > 1:
        base = files["fused"]
        L.append("| (info) graph file / model.onnx | - | " + ", ".join(
            f"{labels[c] if c != 'fused' else 'fp32'} {b / base:.3f}x" for c, b in files.items() if c != "fused") + " | |")
    return L


def format_table(result: dict) -> str:
    L = []
    if result.get("command"):
        L += [f"Command: `{result['command']}`", ""]
    mc, st = result["machine"], result["settings"]
    L += [f"Engine: {result['engine']}: {' + '.join(result['backbones'])}, {result['classes']} classes, "
          f"controller {result['controller']}", "",
          f"Machine: {mc['cpus']} CPUs ({mc['processor']}), onnxruntime {mc['onnxruntime']}, python {mc['python']}; "
          f"measured fp32 matmul peak {mc['matmul_peak_gflops']:.1f} GFLOP/s (best of numpy/torch 2048^3 sgemm, "
          f"best of 5: " + ", ".join(f"{k} {v:.1f}" for k, v in mc["matmul_peak"]["by_library"].items()) + ")", "",
          f"Runs: {st['runs']} timed rounds after {st['warmup']} warm-up, interleaved (each configuration once per "
          f"batch per round)" + (f"; one worker process per group ({'; '.join(', '.join(g) for g in st['processes'])}), "
                                 f"{1e3 * st['settle_s']:.0f} ms rest before each timed call" if "processes" in st else "")
          + f"; ORT CPU {st['ort_execution_mode']}"
          + ("" if st.get("ort_cpu_arena", True) else ", CPU memory arena off (each worker gives a run's activations back)")
          + f", intra-op threads {st['ort_threads']} "
          f"(benchmarks/results/runtime_thin.md); torch threads {st['torch_threads']}."]
    for what, ld in result["load"].items():
        L.append(f"Load during {what}: other processes took {ld['other_processes_cores']:.2f} cores on average "
                 f"({ld['other_processes_cpu_s']} CPU-s over {ld['wall_s']} s).")
    L += ["", "## Latency", "", "| config | batch | p50 ms | p90 ms | p99 ms | min-max ms | images/s | GFLOPs | GFLOP/s | % of peak |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bs in map(str, st["batches"]):
        for c in result["order"]:
            x = result["latency"][c][bs]
            s = x["latency_ms"]
            L.append(f"| {result['labels'][c]} | {bs} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | "
                     f"{s['min']:.1f}-{s['max']:.1f} | {x['images_per_s']:.2f} | {x['gflops']:.1f} | "
                     f"{x['achieved_gflops_per_s']:.1f} | {x['pct_of_matmul_peak']:.0f}% |")
    t = result["targets"]
    L += ["", "## Targets (per-round ratios: median (min-max))", "", "| target | batch | measured | met |", "|---|---:|---|---|"]
    for bs, s in t.get("fused_over_sum", {}).items():
        L.append(f"| fused / sum of singles <= 1.00 | {bs} | {_r(s)} | {verdict(s, 1.0)} |")
    if "torch_over_fused" in t:
        for bs, s in t["torch_over_fused"].items():
            ceiling = t.get("torch_over_fused_ceiling", {}).get(bs)
            L.append(f"| PyTorch eager / fused >= 2 | {bs} | {_r(s, '{:.2f}')}"
                     + (f"; ceiling {ceiling:.2f} (fused at 100% of the matmul peak)" if ceiling else "") + " | "
                     f"{verdict(s, 2.0, at_least=True)}{'' if bs == '1' else ' (target at batch 1)'} |")
    ov = result.get("overhead")
    if ov:
        L.append(f"| controller + combination < 1% of fused | {ov['batch']} | {ov['pct_of_fused_p50']:.3f}% "
                 f"({ov['controller_combination_ms']:.3f} ms of {ov['fused_p50_ms']:.1f} ms; "
                 f"{ov['controller_combination_pct_of_nodes']:.3f}% of node time) | "
                 f"{'yes' if ov['pct_of_fused_p50'] < 1.0 else 'NO'} |")
    if "fused_memory_over_sum" in t:
        fm = t["fused_memory_over_sum"]
        L.append(f"| fused peak memory <= sum of singles' | {result['memory']['fused']['batch']} | "
                 f"net {fm['net_peak_bytes']:.2f}x, gross {fm['peak_rss_bytes']:.2f}x | "
                 f"{'yes' if fm['net_peak_bytes'] <= 1.0 else 'NO'} (net) |")
    for bs, s in t.get("naive_over_fused", {}).items():
        L.append(f"| (info) naive / fused | {bs} | {_r(s, '{:.2f}')} | |")
    L += precision_rows(result)
    if result.get("memory"):
        L += ["", "## Peak host memory (each configuration in its own process)", "",
              "| config | peak RSS | after imports | net (session) |", "|---|---:|---:|---:|"]
        for c, x in result["memory"].items():
            base = _mb(x["baseline_rss_bytes"]) if "baseline_rss_bytes" in x else "-"
            L.append(f"| {result['labels'].get(c, c)} | {_mb(x['peak_rss_bytes'])} | {base} | {_mb(x['net_peak_bytes'])} |")
    if result.get("device_memory"):
        L += ["", f"Device memory (NVML, bytes used per GPU): {result['device_memory']}"]
    if ov:
        L += ["", f"Overhead profile (ORT profiler, batch {ov['batch']}, {ov['runs']} runs): {overhead_in_words(ov)} "
              f"(found in {ov.get('node_names_from')}); "
              f"profiled nodes matching no graph node (counted as backbone work): {ov['renamed_nodes']}, "
              f"{ov['renamed_nodes_ms']:.2f} ms/run."]
    if result.get("accuracy"):
        a = result["accuracy"]
        L += ["", f"## Accuracy on {a['data']} ({a['num_images']} images)", ""]
        if a.get("fit_images_line"):
            L += [a["fit_images_line"] + ".", ""]
        L += ["| method | accuracy % |", "|---|---:|"]
        L += [f"| {k} | {v:.1f} |" for k, v in a["methods"].items()]
    for key in ("cascade", "cascade_int8"):
        if result.get(key):

            L += format_cascade(result[key])
            if key == "cascade":
                L += two_full_graph_timings(result)
    L += ["", f"Bench wall time {result['wall_s']:.0f} s."]
    return "\n".join(L) + "\n"


def two_full_graph_timings(result: dict) -> list[str]:
    """The full graph is timed twice in one bench.md, differently: say how, and that each ratio compares
    figures of one measurement only (739.5 ms p50 in Latency vs 222.55 ms mean under Cascade)."""
    fused = (result.get("latency", {}).get("fused") or {}).get("1")
    full = (result["cascade"].get("latency") or {}).get("1")
    if not fused or not full:
        return []
    p50, mean = fused["latency_ms"]["p50"], full["full"]["mean_ms"]
    load = result["cascade"].get("load") or {}
    return ["", f"Two timings of the full graph at batch 1: {p50:.1f} ms (Latency, p50) and {mean:.2f} ms "
                f"(Cascade, mean), {max(p50, mean) / min(p50, mean):.2f}x apart. They are two measurements: the "
                "Latency table's in the configurations' rounds (the fused graph, its backbones, the naive ensemble "
                "and eager interleaved, the rest before each call and the load stated above), the Cascade table's in "
                "the bench's own process, call by call interleaved with the cascade over every labelled image"
                + (f" (other processes took {load['other_processes_cores']:.2f} cores meanwhile)"
                   if "other_processes_cores" in load else "")
                + ". A busy machine moves them apart. Compare within a table: the fused graph with its backbones "
                "in Latency, the cascade with the full graph in Cascade (cascade / full)."]


def write_outputs(result: dict, out: Path, stem: str = "bench") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    result["plot_points"] = plot_points(result)
    if write_plot(result, out / f"{stem}.png"):
        paths["png"] = out / f"{stem}.png"
        result["plot"] = str(paths["png"])
    _write_atomic(paths["json"], json.dumps(result, indent=2) + "\n")
    _write_atomic(paths["md"], f"# Benchmark: fused ensemble vs single backbones\n\n{format_table(result)}")
    return paths


def _write_atomic(path: Path, text: str) -> None:
    """Write beside, then rename: an interrupted bench leaves the previous file whole, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
