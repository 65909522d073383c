"""The committed bench of all nine OpenAI CLIP backbones in one fused graph (random weights).

    python benchmarks/bench_nine.py --engine /tmp/engines/nine      # ~25 min on 2 cores (+ the singles' exports once)

The engine is made once (6 min on a quiet machine, 16.6 GB peak RSS, 6.2 GB of weights) with

    clipfuse export -b RN50:random:0 -b RN101:random:1 -b RN50x4:random:2 -b RN50x16:random:3 \\
        -b RN50x64:random:4 -b ViT-B-32:random:5 -b ViT-B-16:random:6 -b ViT-L-14:random:7 \\
        -b ViT-L-14-336:random:8 -c "astronaut,cat,cup of coffee,rocket,dog,car,bird,airplane,flower,building" \\
        --templates FILE --out /tmp/engines/nine        # FILE: "a photo of a {}." and "a bad photo of the {}."

The graph runs at seconds per image on 2 cores, so rounds are few (2 after 1 warm-up; memory processes at batch 1, one inference) and PyTorch
eager is left out by default: with the fused and the nine single sessions resident (~12.5 GB, in their
worker processes), a third copy of 1.3 G parameters would leave this 24 GB machine no room. No accuracy:
random weights.
Writes benchmarks/results/NAME.{md,json} (--name, default bench_nine). The committed batch-1 rerun with
more rounds: python benchmarks/bench_nine.py --batch 1 --runs 9 --name bench_nine_batch1 (~5 min) and
python benchmarks/bench_nine.py --batch 8 --runs 5 --name bench_nine_batch8 (~30 min).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="/tmp/engines/nine")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--memory-batch", type=int, default=1, help="batch of the memory processes (one inference each)")
    ap.add_argument("--torch", action="store_true", help="also PyTorch eager (needs ~20 GB free)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="bench_nine", help="file stem of the results")
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/bench_nine.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])

    from clipfuse.bench import format_table, run_bench
    from clipfuse.core.errors import ClipfuseError

    try:
        result = run_bench(args.engine, batches=[int(b) for b in args.batch.split(",")], runs=args.runs,
                           out=args.out, stem=args.name, torch=args.torch, command=command,
                           memory_batch=args.memory_batch, memory_infers=1)
    except ClipfuseError as e:
        sys.exit(f"error: {e}\n(the engine is made once by the export command in this script's docstring)")
    print(format_table(result))


if __name__ == "__main__":
    main()
