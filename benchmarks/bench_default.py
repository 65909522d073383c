"""The committed side-by-side bench of the default two-backbone ensemble (RN50 + ViT-B-32).

    python benchmarks/bench_default.py                 # ~8 min on 2 cores

The same flow as `make demo` (seeded random towers, linear probes + NLC fitted on 30 scikit-learn
digits per class, 10 held-out per class for accuracy), into engines/bench-default, then the bench
at batch 1, 8 and 32 with more rounds. Writes benchmarks/results/bench_default.{md,json,png}.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="engines/bench-default")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/bench_default.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])

    from clipfuse.cli.present import format_demo
    from clipfuse.demo import run_demo

    print(format_demo(run_demo(args.engine, batches=[int(b) for b in args.batch.split(",")], runs=args.runs,
                               results=args.out, stem="bench_default", command=command)))


if __name__ == "__main__":
    main()
