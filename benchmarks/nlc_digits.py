"""NLC against every baseline on a real dataset shipped by a package: scikit-learn's digits.

    python benchmarks/nlc_digits.py            # ~10 min on 2 cores the first time; refits reuse the feature cache

1797 real 8x8 handwritten digits (10 classes), written as PNG files into a
labelled folder, go through `clipfuse fit` with seeded random towers
(RN50:random:0 + ViT-B-32:random:1: no weights can be downloaded here) as
frozen feature extractors and linear-probe heads on standardised features.
Split: 30% eval (stratified, seed 0); of the rest, probes on 80% and the
controller's k shots from the disjoint 20% (the paper uses 90/10; 80/20
leaves every class >= 16 images so k = 16 fits). k in {1, 2, 4, 8, 16},
seeds 0, 1, 2. Writes benchmarks/results/nlc_digits.{md,json}.

Expect little: random towers' features barely vary in the directions that
tell which backbone to trust, so NLC may only match C-LOG-AVG here; the
synthetic tests (tests/export/fit/test_nlc.py) are where the mechanism proves itself.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent


def write_digits(folder: Path) -> int:
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        cls = folder / f"digit_{label}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L").save(cls / f"{i:04d}.png")
    return len(d.target)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", default=None, help="default: RN50:random:0 ViT-B-32:random:1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "results" / "nlc_digits"))
    ap.add_argument("--engine", default="engines/digits-nlc")
    args = ap.parse_args()
    backbones = args.backbone or ["RN50:random:0", "ViT-B-32:random:1"]

    from clipfuse.export.fit.pipeline import fit_engine

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-digits-"))
    try:
        n = write_digits(tmp / "digits")
        print(f"wrote {n} digit images to {tmp / 'digits'}", file=sys.stderr)
        _, report = fit_engine(backbones, tmp / "digits", args.engine, head="linear-probe", eval_fraction=0.3,
                               probe_fraction=0.8, shots=16, seed=0, study_shots=(1, 2, 4, 8, 16),
                               study_seeds=tuple(args.seeds), force=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from clipfuse.export.fit.report import render_report

    command = "python benchmarks/nlc_digits.py" + "".join(f" --backbone {b}" for b in (args.backbone or [])) \
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
    report["command"] = command
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = (f"<!-- made by: {command} ({report['seconds']:.0f} s on this machine) -->\n\n"
          "Dataset: scikit-learn digits (1797 real 8x8 images, 10 classes). Seeded random towers, "
          "linear-probe heads on standardised features.\n\n" + render_report(report))
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
