"""The export validation figures an engine's manifest records, as a results table.

    python benchmarks/validation_report.py ENGINE [--out benchmarks/results/validation_default]

Every `clipfuse export` compares ONNX Runtime CPU with the PyTorch module at
batch 1 and 4 on the shipped photographs (export/onnx_export.validate_onnx) and
records the figures in manifest.json's `validation` block; this writes them out,
each beside its bound, with the headroom (bound / measured error). Nothing is
recomputed: the figures are the export's own.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def report(engine: Path) -> str:
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(engine)
    v = m.data["validation"]
    lines = [f"# Export validation: {' + '.join(m.backbone_names)}", "",
             f"Command: `python benchmarks/validation_report.py {shlex.quote(str(engine))}` (figures recorded by "
             f"`clipfuse export` on {m.data.get('created')}, onnxruntime {m.data['versions'].get('onnxruntime')}, "
             f"torch {m.data['versions'].get('torch')})", "",
             f"ONNX Runtime CPU vs PyTorch, fp32. Bound per output: {v['atol']:g} + {v['rtol']:g} * max|torch| "
             f"(+ the heads' propagated feature error on logits); embedding cosine >= {v['min_cosine']}; top-1 "
             f"changed <= {v['max_top1_changed']:g}. {v['checker']}.", "",
             "| batch | output | max abs error | max rel error | bound | headroom (bound / error) | ok |",
             "|---|---|---|---|---|---|---|"]
    for bs, b in v["batches"].items():
        for name, o in b["outputs"].items():
            head = f"{o['tolerance'] / o['max_abs']:.0f}x" if o["max_abs"] > 0 else "(error 0)"
            lines.append(f"| {bs} | {name} | {o['max_abs']:.3g} | {o['max_rel']:.2e} | {o['tolerance']:.3g} | "
                         f"{head} | {o['ok']} |")
    lines += ["", "| batch | backbone | cosine min | top-1 changed |", "|---|---|---|---|"]
    for bs, b in v["batches"].items():
        for x in b["backbones"]:
            cos = x.get("cosine_min", x.get("cosine"))
            lines.append(f"| {bs} | {x.get('backbone', x.get('name'))} | {cos} | {x.get('top1_changed')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    from clipfuse.core.errors import ClipfuseError

    try:
        text = report(args.engine)
    except ClipfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        from clipfuse.runtime.manifest import read_manifest

        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps(read_manifest(args.engine).data["validation"], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
