"""How far apart do a tower's embeddings of different images lie? (Why int8 refuses random RN towers.)

    python benchmarks/feature_spread.py [--backbone RN50:random:0 --backbone ViT-B-32:random:1] [--images 400]

For each backbone, its unit-norm embeddings of the first N scikit-learn digits (written as
benchmarks/nlc_digits.py writes them, so the feature cache is reused), and the cosine between the
embeddings of every pair of different images: median, 1st percentile and minimum. When different
images lie at cosine 0.9999 of each other, an error of cosine 0.9997 (int8's, in
benchmarks/results/precision_default.md) is larger than the whole difference a head can read.
Writes benchmarks/results/feature_spread.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", default=None)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "feature_spread")
    args = ap.parse_args(argv)
    backbones = args.backbone or ["RN50:random:0", "ViT-B-32:random:1"]
    sys.path.insert(0, str(ROOT))
    from nlc_digits import write_digits

    from clipfuse.export.fit.features import compute_features
    from clipfuse.export.graph.backbones import load_backbone

    with tempfile.TemporaryDirectory() as tmp:
        write_digits(Path(tmp))
        paths = sorted(Path(tmp).rglob("*.png"), key=lambda p: p.name)[:args.images]
        rows = []
        for spec in backbones:
            f = compute_features([load_backbone(spec)], paths, progress=False).features[0]
            c = (f @ f.T)[np.triu_indices(len(f), 1)]
            rows.append(f"| {spec} | {len(f)} | {np.median(c):.5f} | {np.percentile(c, 1):.5f} | {c.min():.5f} |")
    cmd = "python benchmarks/feature_spread.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    text = "\n".join(["# Cosine between the embeddings of two different digits", "", f"Command: `{cmd}`", "",
                      "Seeded random towers (no trained weights here). 1.0 would mean every image gets the same "
                      "embedding.", "", "| backbone | images | median | 1st percentile | min |", "|---|---:|---:|---:|---:|",
                      *rows]) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
