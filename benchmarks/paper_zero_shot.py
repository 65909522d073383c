"""The paper's zero-shot protocol, for users who can download weights and datasets.

    python benchmarks/paper_zero_shot.py --data /datasets/eurosat/train --eval /datasets/eurosat/test \
        --classes eurosat_classes.tsv --out benchmarks/results/eurosat_zero_shot

Zero-shot heads for every backbone (default: the nine OpenAI CLIP backbones,
`ARCH:openai`, downloaded by open_clip), NLC and C-LOG-AVG fitted on k shots
per class (k in {1, 2, 4, 8, 16}, several seeds), and every baseline (each
single backbone, LOG-AVG, PROB-AVG, VOTE, ORACLE) on the same eval split.
Writes <out>.md / <out>.json and the engine with the shipped controller.
Features are cached (~/.cache/clipfuse or $CLIPFUSE_CACHE): reruns with other
shots or seeds compute nothing again.

Folders: <data>/<class folder>/<images>; --classes maps folder names to
class names ("folder<TAB>class name" per line), which zero-shot prompts need
to be meaningful (e.g. "n01440764<TAB>tench").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

NINE = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", default=None, help="ARCH[:WEIGHTS]; default: the nine, openai weights")
    ap.add_argument("--data", required=True, help="labelled folder the shots are drawn from")
    ap.add_argument("--eval", default=None, help="labelled eval folder (default: 30%% stratified split of --data)")
    ap.add_argument("--classes", default=None, help="folder -> class name map file")
    ap.add_argument("--templates", default=None, help="prompt templates file (default: open_clip's 80)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True, help="results path without suffix")
    ap.add_argument("--engine", default=None, help="engine folder (default: engines/<out name>)")
    ap.add_argument("--cache", default=None, help="feature cache folder")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)

    from clipfuse.export.fit.pipeline import fit_engine
    from clipfuse.export.fit.report import render_report

    t0 = time.perf_counter()
    backbones = args.backbone or [f"{a}:openai" for a in NINE]
    out = Path(args.out)
    engine = Path(args.engine) if args.engine else Path("engines") / out.name
    _, report = fit_engine(backbones, args.data, engine, classes=args.classes, eval_data=args.eval,
                           templates=args.templates, shots=max(args.shots), seed=args.seeds[0],
                           study_shots=tuple(args.shots), study_seeds=tuple(args.seeds), cache_dir=args.cache,
                           batch_size=args.batch, force=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render_report(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(render_report(report))
    return report


if __name__ == "__main__":
    main()
