"""Is the predict pipeline thin? And which ONNX Runtime CPU session options are fastest here?

    python benchmarks/runtime_thin.py [--engine engines/bench-rn50-vitb32] [--images 64] [--rounds 3]

A benchmark, not a test. On the default two-backbone engine (RN50:random:0 +
ViT-B-32:random:1, 10 classes, 2 templates; exported on first use, reused
after) it measures, side by side in one process:

1. ONNX Runtime CPU session options: ORT_SEQUENTIAL vs ORT_PARALLEL, intra-op
   threads 1 vs 2, at batch 1 and 8, on real photographs already preprocessed.
   The configurations run interleaved (A B C D A B C D ...) after a warm-up,
   so drift in the machine's speed hits them all alike.
2. The pipeline: images/s of `Predictor.predict` on a folder of JPEGs (decode,
   resize, crop, engine, top-k) against images/s of the same backend on
   ready-made uint8 tensors of the same images at the same batch size,
   interleaved A B A B after a warm-up. Target: (a) >= 90% of (b). The
   default runs next to intra-op threads 1 (a core left to decoding);
   `--variants` adds decode workers 1 and ORT thread spinning off.

The JPEGs are made from the four photographs shipped in clipfuse/assets,
random crops resized to 500-1000 px on the long side (what phone photos look
like after a typical downscale), JPEG quality 90, seeded. Weights are seeded
random: latency does not depend on weight values.

Results: benchmarks/results/runtime_thin.{json,md}, with the command at the top.
Figures are medians with the spread (min-max) over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("RN50:random:0", "ViT-B-32:random:1")
CLASSES = "astronaut,cat,cup of coffee,rocket,dog,car,bird,airplane,flower,building"
TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.")


def say(msg: str) -> None:
    print(f"[runtime_thin] {msg}", file=sys.stderr, flush=True)


def ensure_engine(folder: Path):
    """Reuse the engine when it is complete and is the one this benchmark wants; else export it
    in a subprocess (the exporter imports torch; this process stays as lean as a server)."""
    from clipfuse.core.errors import ClipfuseError
    from clipfuse.runtime.manifest import read_manifest

    try:
        m = read_manifest(folder, verify=False)
        if tuple(m.backbone_names) == BACKBONES and ",".join(m.classes) == CLASSES:
            say(f"reusing {folder}")
            return read_manifest(folder, verify=True)
    except ClipfuseError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        templates = Path(tmp) / "templates.txt"
        templates.write_text("\n".join(TEMPLATES) + "\n")
        from clipfuse.bench.worker import child_command  # the installed clipfuse, whatever the folder

        args = ["export", *[a for b in BACKBONES for a in ("-b", b)],
                "-c", CLASSES, "--templates", str(templates), "--out", str(folder), "--force", "-q"]
        cmd = child_command("clipfuse.cli.main", *args)
        say("exporting clipfuse " + " ".join(args))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return read_manifest(folder, verify=True)


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = sorted((ROOT / "clipfuse" / "assets").glob("*.jpg"))
    out = []
    for i in range(n):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            f = rng.uniform(0.6, 1.0)                                   # crop keeps 60-100% of each side
            cw, ch = int(w * f), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = im.crop((x, y, x + cw, y + ch))
            long_side = int(rng.integers(500, 1001))
            s = long_side / max(cw, ch)
            crop = crop.resize((max(8, round(cw * s)), max(8, round(ch * s))), Image.Resampling.LANCZOS)
            p = folder / f"photo_{i:03d}.jpg"
            crop.save(p, quality=90)
            out.append(p)
    return out


class CpuProbe:
    """How much CPU other processes took while we measured (from /proc/stat): a shared machine's
    neighbours slow the engine, and a figure taken next to a busy neighbour must say so."""

    def __init__(self):
        self.t, self.busy, self.own = time.perf_counter(), self._busy_s(), self._own_s()

    @staticmethod
    def _busy_s() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t
        others = (self._busy_s() - self.busy) - (self._own_s() - self.own)
        return {"wall_s": round(wall, 1), "own_cpu_s": round(self._own_s() - self.own, 1),
                "other_processes_cpu_s": round(max(0.0, others), 1),
                "other_processes_cores": round(max(0.0, others) / wall, 2)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_rate(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


# ----------------------------------------------------------------------------- 1. session options

def bench_session_options(manifest, feeds: dict[int, dict], rounds: int) -> list[dict]:
    from clipfuse.runtime.backends.onnxruntime import OnnxRuntimeBackend

    configs = [("sequential", 1), ("sequential", 2), ("parallel", 1), ("parallel", 2)]
    backends = {c: OnnxRuntimeBackend(manifest, threads=c[1], parallel=c[0] == "parallel").open() for c in configs}
    times = {(c, bs): [] for c in configs for bs in feeds}
    for c, b in backends.items():                   # warm-up: first runs allocate arenas and pick kernels
        for feed in feeds.values():
            b.infer(feed)
    for r in range(rounds):
        for bs, feed in feeds.items():
            reps = 3 if bs == 1 else 1              # batch 1 is short: a few runs per round steady it
            for c, b in backends.items():
                for _ in range(reps):
                    t0 = time.perf_counter()
                    b.infer(feed)
                    times[(c, bs)].append(time.perf_counter() - t0)
        say(f"session options: round {r + 1}/{rounds} done")
    for b in backends.values():
        b.close()
    rows = []
    for (c, bs), ts in times.items():
        rows.append({"execution_mode": c[0], "intra_op_threads": c[1], "batch": bs,
                     "latency_ms": summary([t * 1e3 for t in ts]),
                     "images_per_s": summary([bs / t for t in ts])})
    return rows


# ----------------------------------------------------------------------------- 2. pipeline

def bench_pipeline(manifest, paths: list[Path], batch: int, rounds: int, variants: list[dict]) -> dict:
    from clipfuse.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from clipfuse.runtime.images import preprocess_paths
    from clipfuse.runtime.predict import Predictor

    ok, arrays, failures = preprocess_paths(paths, manifest.preprocess_specs(), batch)
    assert not failures and len(ok) == len(paths), failures
    feeds = [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, len(paths), batch)]

    predictors = {}
    for v in variants:
        backend = OnnxRuntimeBackend(manifest, threads=v.get("threads"), spinning=v.get("spinning")).open()
        predictors[v["name"]] = Predictor(manifest, backend, batch_size=batch, workers=v.get("workers"))
    for p in paths:                         # page cache: every round reads the JPEGs from memory
        p.read_bytes()
    for predictor in predictors.values():   # warm-up: arenas, kernel choice, thread pools
        predictor.predict(paths[:batch])
        predictor.predict_arrays(feeds[0])
    a = {name: [] for name in predictors}
    b = {name: [] for name in predictors}
    busy = {name: [] for name in predictors}
    for r in range(rounds):                 # interleaved: variant 1 (a, b), variant 2 (a, b), ... per round
        for name, predictor in predictors.items():
            predictor.stats.infer_s = 0.0
            t0 = time.perf_counter()
            preds = predictor.predict(paths)
            wall = time.perf_counter() - t0
            assert len(preds) == len(paths) and all(p.ok for p in preds)
            a[name].append(len(paths) / wall)
            busy[name].append(predictor.stats.infer_s / wall)
            t0 = time.perf_counter()
            for feed in feeds:
                predictor.predict_arrays(feed)
            b[name].append(len(paths) / (time.perf_counter() - t0))
            say(f"pipeline {name}: round {r + 1}/{rounds}: predict {a[name][-1]:.2f} img/s, "
                f"tensors {b[name][-1]:.2f} img/s")
    results = {}
    for v in variants:
        name = v["name"]
        predictors[name].close()
        ratios = [x / y for x, y in zip(a[name], b[name])]
        results[name] = {"config": v, "predict_images_per_s": summary(a[name]),
                         "tensors_images_per_s": summary(b[name]), "ratio": summary(ratios),
                         "engine_busy_fraction": summary(busy[name])}
    return results


def write_results(out: Path, command: str, info: dict, options: list[dict], pipeline: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_thin.json").write_text(json.dumps(
        {"command": command, "machine": info, "session_options": options, "pipeline": pipeline}, indent=2) + "\n")
    md = ["# Runtime: session options and pipeline thinness", "", f"Command: `{command}`", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if not k.startswith("load_")), "",
          *[f"CPU taken by other processes {k[len('load_'):].replace('_', ' ')}: "
            f"{v['other_processes_cores']} cores on average ({v['other_processes_cpu_s']} CPU-s over {v['wall_s']} s)"
            for k, v in info.items() if k.startswith("load_")], "",
          "Figures: median (min-max) over rounds, interleaved after a warm-up.", "",
          "## ONNX Runtime CPU session options", "",
          "| execution mode | intra-op threads | batch | latency ms | images/s |", "|---|---|---|---|---|"]
    for r in sorted(options, key=lambda r: (r["batch"], r["execution_mode"], r["intra_op_threads"])):
        md.append(f"| {r['execution_mode']} | {r['intra_op_threads']} | {r['batch']} | "
                  f"{fmt_rate(r['latency_ms'])} | {fmt_rate(r['images_per_s'])} |")
    md += ["", "## Pipeline: predict on JPEG files vs the same backend on ready-made uint8 tensors", "",
           "| variant | predict (a) images/s | tensors (b) images/s | (a)/(b) | engine busy during (a) |",
           "|---|---|---|---|---|"]
    for name, r in pipeline.items():
        ratio = r["ratio"]
        md.append(f"| {name} | {fmt_rate(r['predict_images_per_s'])} | {fmt_rate(r['tensors_images_per_s'])} | "
                  f"{ratio['median']:.1%} ({ratio['min']:.1%}-{ratio['max']:.1%}) | "
                  f"{r['engine_busy_fraction']['median']:.1%} |")
    md.append("")
    (out / "runtime_thin.md").write_text("\n".join(md))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default=str(ROOT / "engines" / "bench-rn50-vitb32"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", action="store_true", help="also time decode workers 1/2 and ORT spinning off")
    ap.add_argument("--skip-options", action="store_true", help="only the pipeline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/runtime_thin.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    t_start = time.perf_counter()

    import onnxruntime

    manifest = ensure_engine(Path(args.engine))
    info = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "engine": f"{' + '.join(BACKBONES)}, {len(manifest.classes)} classes"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        sizes = [Image.open(p).size for p in paths]
        info["jpegs"] = (f"{len(paths)}, long side {min(max(s) for s in sizes)}-{max(max(s) for s in sizes)} px, "
                         f"{sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KB avg")
        options = []
        if not args.skip_options:
            from clipfuse.runtime.images import preprocess_paths

            _, arrays, _ = preprocess_paths(paths[:8], manifest.preprocess_specs())
            feeds = {1: {k: v[:1] for k, v in arrays.items()}, 8: {k: v[:8] for k, v in arrays.items()}}
            probe = CpuProbe()
            options = bench_session_options(manifest, feeds, args.rounds)
            info["load_during_session_options"] = probe.stop()
        variants = [{"name": "default: ORT threads default, decode workers default"},
                    {"name": "ORT intra-op threads 1", "threads": 1}]
        if args.variants:
            variants += [{"name": "decode workers 1", "workers": 1},
                         {"name": "ORT spinning off", "spinning": False},
                         {"name": "ORT spinning off, decode workers 1", "spinning": False, "workers": 1}]
        probe = CpuProbe()
        pipeline = bench_pipeline(manifest, paths, args.batch, args.rounds, variants)
        info["load_during_pipeline"] = probe.stop()
    info["torch_imported"] = "torch" in sys.modules      # the runtime path must stay torch-free
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_results(Path(args.out), command, info, options, pipeline)
    print((Path(args.out) / "runtime_thin.md").read_text())


if __name__ == "__main__":
    main()
