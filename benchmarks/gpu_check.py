"""GPU check: the fused module and each single backbone on CUDA, fp32 and fp16, plus TensorRT where installed.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check] [--batches 1,8,32]
    python benchmarks/gpu_check.py --backbones nine --rounds 3 --iters 5 --out benchmarks/results/gpu_check_nine
    python benchmarks/gpu_check.py --dry-run       # CPU, tiny towers, 2 iterations: checks the script runs

A benchmark, not a test. On a machine with CUDA and PyTorch (no TensorRT, no
onnxruntime-gpu needed) it builds the default ensemble (RN50:random:0 +
ViT-B-32:random:1, zero-shot heads for 10 classes, the constant controller;
seeded random weights: latency and memory do not depend on weight values) and:

1. times, side by side in one run, the fused module and each backbone alone (a
   one-backbone FusedEnsemble: its tower, normalisation and head), in fp32
   (TF32 off, as the torch backend runs it) and fp16, at batch 1, 8 and 32.
   fp16 is torch.autocast(float16): convolutions and matmuls in fp16, while
   layer_norm, softmax and the norms stay fp32 (autocast's fp32 list), the
   same islands as model.fp16.onnx. Each configuration is captured in a CUDA
   graph (the fused module is ~200 small kernels at batch 1: launch overhead
   dominates eager), and eager is timed beside it for the fused module.
   Timing: warm-up, then CUDA events around each call; configurations
   interleaved round by round; medians with min-max.
2. device memory: NVML's used memory of the GPU after loading, and
   torch.cuda.max_memory_allocated per configuration (the allocator's peak).
   cudnn.benchmark tries algorithms with large scratch buffers the first
   time it meets a shape; every configuration runs once before the peaks are
   taken, so they show what a configuration needs, not those trials (the
   first committed run had ~4.6 GB fp32 "peaks" at batch 1 and 8 from them).
3. fp16 accuracy with real fp16 arithmetic (which ONNX Runtime CPU cannot
   show, see benchmarks/results/fp16_validation.md): per-backbone embedding
   cosine and logit error of autocast fp16 against fp32 on 32 images made
   from the shipped photographs.
4. where `tensorrt` imports: exports the fused graph, builds plans with 0 and
   4 auxiliary streams (export/precision/trt_plan.py) and times them through the native
   backend; otherwise says why it skipped.

Writes OUT.json and OUT.md with the command at the top.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import gpu_levers
from clipfuse.bench.gpu import format_md as format_levers, measure_set, summary
from gpu_env import Nvml, environment
from gpu_trt import tensorrt_part

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("RN50:random:0", "ViT-B-32:random:1")
NINE = ("RN50:random:0", "RN101:random:1", "RN50x4:random:2", "RN50x16:random:3", "RN50x64:random:4",
        "ViT-B-32:random:5", "ViT-B-16:random:6", "ViT-L-14:random:7", "ViT-L-14-336:random:8")
TINY = ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1")
CLASSES = "astronaut,cat,cup of coffee,rocket,dog,car,bird,airplane,flower,building".split(",")
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def build_models(specs, torch, device):
    """(fused, {name: single}, backbones) on `device`, eval mode."""
    from clipfuse.export.graph.backbones import load_backbone
    from clipfuse.export.graph.fused import ConstantController, FusedEnsemble
    from clipfuse.export.graph.heads import zero_shot_head

    built, heads = [], []
    for s in specs:
        t = time.perf_counter()
        b = load_backbone(s)
        heads.append(zero_shot_head(b.model, b.spec.arch, CLASSES, TEMPLATES))
        b.model = b.model.visual
        built.append(b)
        say(f"built {s} in {time.perf_counter() - t:.1f} s")

    def fused_of(idx):
        return FusedEnsemble([built[i].model for i in idx], [heads[i] for i in idx], [built[i].image_size for i in idx],
                             [built[i].preprocess["mean"] for i in idx], [built[i].preprocess["std"] for i in idx],
                             ConstantController(len(idx))).eval().to(device)

    fused = fused_of(range(len(built)))
    singles = {str(built[i].spec): fused_of([i]) for i in range(len(built))}   # towers shared, not copied
    return fused, singles, built, heads


def make_inputs(module, batch, torch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, 3, r, r), dtype=torch.uint8, generator=g).to(device) for r in module.resolutions]


class Runner:
    """One configuration: module x precision x batch, eager or CUDA graph; call() runs it once."""

    def __init__(self, module, inputs, precision, torch, device, graph: bool):
        self.module, self.inputs, self.precision, self.torch, self.device = module, inputs, precision, torch, device
        self.graph = None
        if graph and device.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):                # warm-up on a side stream before capture (PyTorch's advice)
                    self._eager()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._eager()

    def _eager(self):
        torch = self.torch
        # cache_enabled=False: autocast's cache of fp16 weight copies must not outlive a CUDA graph
        # capture (PyTorch's CUDA graphs notes); the casts are captured into the graph instead.
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16,
                                                     enabled=self.precision == "fp16", cache_enabled=False):
            return self.module(*self.inputs)

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._eager()


def time_configs(runners: dict, torch, device, rounds: int, iters: int, warmup: int) -> dict:
    """{key: [ms per call]}: configurations interleaved round by round, CUDA events around each call."""
    times = {k: [] for k in runners}
    for r in runners.values():
        for _ in range(warmup):
            r()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for _ in range(rounds):
        for k, r in runners.items():
            for _ in range(iters):
                if device.type == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    r()
                    b.record()
                    b.synchronize()
                    times[k].append(a.elapsed_time(b))
                else:
                    t = time.perf_counter()
                    r()
                    times[k].append((time.perf_counter() - t) * 1e3)
    return times


def fp16_accuracy(fused, built, torch, device) -> dict:
    """Autocast fp16 against fp32 on the same 32 images: real fp16 arithmetic on this device."""
    import numpy as np

    from clipfuse.core import iospec
    from clipfuse.runtime.compare import photo_variants
    from clipfuse.runtime.preprocess import PreprocessSpec, preprocess_image

    images = photo_variants()
    specs = {}
    for b in built:
        specs[b.image_size] = PreprocessSpec(b.image_size, b.preprocess.get("interpolation", "bicubic"),
                                             b.preprocess.get("resize_mode", "shortest"))
    inputs = [torch.from_numpy(np.stack([preprocess_image(im, specs[r]) for im in images])).to(device)
              for r in fused.resolutions]
    outs = {}
    for prec in ("fp32", "fp16"):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=prec == "fp16"):
            o = fused(*inputs)
        outs[prec] = {n: t.float().cpu().numpy().astype(np.float64) for n, t in zip(iospec.OUTPUT_NAMES, o)}
    a, g = outs["fp32"], outs["fp16"]
    rows, lo = [], 0
    for k, b in enumerate(built):
        hi = lo + b.embed_dim
        fa, fg = a[iospec.FEATURES][:, lo:hi], g[iospec.FEATURES][:, lo:hi]
        cos = (fa * fg).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fg, axis=1))
        za, zg = a[iospec.BACKBONE_LOGITS][:, k], g[iospec.BACKBONE_LOGITS][:, k]
        rows.append({"backbone": str(b.spec), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                     "logits_max_abs": float(np.abs(za - zg).max()),
                     "top1_agreement": float((za.argmax(-1) == zg.argmax(-1)).mean())})
        lo = hi
    la, lg = a[iospec.LOGITS], g[iospec.LOGITS]
    return {"images": len(images), "backbones": rows,
            "fused": {"logits_max_abs": float(np.abs(la - lg).max()),
                      "top1_agreement": float((la.argmax(-1) == lg.argmax(-1)).mean())}}


def levers_part(args, device: str, batches, precisions, compile_backend) -> dict:
    """The GPU levers for each ensemble in --sets (benchmarks/gpu_levers.py), then agreement with ONNX Runtime."""
    table = gpu_levers.TINY_SETS if args.dry_run else gpu_levers.SETS
    names = [n.strip() for n in args.sets.split(",") if n.strip() in table]
    compiled = {n.strip() for n in args.compile_sets.split(",") if n.strip()}
    out = {"precisions": precisions, "batches": batches, "sets": {}, "dry_run": args.dry_run}
    for name in names:
        t = time.perf_counter()
        model = gpu_levers.build(table[name], device)
        say(f"levers: built {name} ({len(table[name])} towers) on {device} in {time.perf_counter() - t:.1f} s")
        rows, facts = measure_set(name, model, list(table[name]), device, batches, precisions,
                                  compile_backend if name in compiled else None, args.rounds, args.iters,
                                  args.warmup, say)
        out["sets"][name] = {"specs": list(table[name]), "rows": rows, **facts}
        del model
    out["agreement"] = gpu_levers.agreement(table["pair"], device, precisions, say)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per configuration per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backbones", default=",".join(BACKBONES),
                    help="comma-separated ARCH:WEIGHTS[:SEED] specs, or 'nine' for all nine OpenAI architectures")
    ap.add_argument("--sets", default="pair,five,nine",
                    help="levers section: ensembles (pair, five, nine; gpu_levers.SETS) timed serial/concurrent/single")
    ap.add_argument("--compile-sets", default="pair",
                    help="levers section: ensembles also timed through torch.compile, fp16 (about 1 min each for the "
                         "pair, 3 for the nine: FIELD-NOTES.md); '' for none")
    ap.add_argument("--levers-batches", default="1,8", help="levers section: batch sizes (each its own CUDA graph)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny towers, 1 round: checks that the script runs")
    args = ap.parse_args(argv)
    command = "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    t_start = time.perf_counter()
    if args.dry_run:
        # the tests' tiny towers, added the documented way (CLIPFUSE_MODEL_CONFIGS)
        towers = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "helpers", "towers")
        os.environ["CLIPFUSE_MODEL_CONFIGS"] = os.pathsep.join(
            filter(None, [os.environ.get("CLIPFUSE_MODEL_CONFIGS"), os.path.normpath(towers)]))
        specs, device = TINY, torch.device("cpu")
        args.rounds, args.iters, args.warmup, batches = 1, 2, 1, [1, 2]
        lever_batches, precisions, compile_backend = [1, 2], ["fp32"], "eager"   # dynamo only: no C++ build on CPU
    else:
        if not torch.cuda.is_available():
            say("no CUDA device: torch.cuda.is_available() is False (use --dry-run to check the script on CPU)")
            return 2
        specs = NINE if args.backbones == "nine" else tuple(b.strip() for b in args.backbones.split(",") if b.strip())
        device = torch.device("cuda")
        # fp32 means fp32: TF32 convolutions/matmuls (~1e-3 relative) would blur the fp16 comparison.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        lever_batches, precisions, compile_backend = [int(b) for b in args.levers_batches.split(",")], ["fp32", "fp16"], \
            "inductor"
    nvml = Nvml()
    result = {"command": command, "environment": environment(torch, device),
              "nvml": {"driver": getattr(nvml, "driver", None), "error": getattr(nvml, "error", None),
                       "used_mib_before": nvml.used_mib()}}
    say(f"environment: {json.dumps(result['environment'])}")
    from clipfuse.core.errors import ClipfuseError

    try:
        fused, singles, built, heads = build_models(specs, torch, device)
    except ClipfuseError as e:
        say(f"error: {e}")
        return 2
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["nvml"]["used_mib_after_load"] = nvml.used_mib()
    result["weights_mib"] = round(sum(p.numel() * p.element_size() for p in fused.parameters()) / 2**20
                                  + sum(b.numel() * b.element_size() for b in fused.buffers()) / 2**20, 1)

    say("fp16 accuracy (autocast) against fp32 on 32 images")
    result["fp16_accuracy"] = fp16_accuracy(fused, built, torch, device)

    models = {"fused": fused, **singles}
    rows = []
    for bs in batches:
        runners, peaks = {}, {}
        if device.type == "cuda":
            # cudnn.benchmark tries algorithms, with large scratch buffers, the first time it meets a
            # shape: do that for every configuration first, so the peaks below are what each one needs.
            for prec in ("fp32", "fp16"):
                for module in models.values():
                    Runner(module, make_inputs(module, bs, torch, device), prec, torch, device, graph=False)()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        for prec in ("fp32", "fp16"):
            for name, module in models.items():
                inputs = make_inputs(module, bs, torch, device)
                modes = ("graph", "eager") if name == "fused" else ("graph",)
                for mode in modes:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    runners[(name, prec, mode)] = Runner(module, inputs, prec, torch, device, graph=mode == "graph")
                    runners[(name, prec, mode)]()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        peaks[(name, prec, mode)] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        say(f"batch {bs}: timing {len(runners)} configurations, {args.rounds} rounds x {args.iters} calls")
        times = time_configs(runners, torch, device, args.rounds, args.iters, args.warmup)
        for (name, prec, mode), ts in times.items():
            rows.append({"model": name, "precision": prec, "mode": mode, "batch": bs, "latency_ms": summary(ts),
                         "images_per_s": bs / statistics.median(ts) * 1e3,
                         "activation_peak_mib": peaks.get((name, prec, mode))})
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["timings"] = rows
    result["nvml"]["used_mib_end"] = nvml.used_mib()
    if device.type == "cuda":
        result["torch_max_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    result["levers"] = levers_part(args, device.type, lever_batches, precisions, compile_backend)
    say("TensorRT part")
    try:
        result["tensorrt"] = tensorrt_part(built, heads, CLASSES, TEMPLATES, torch, device, batches, args.rounds,
                                           args.iters, args.warmup)
    except Exception as e:     # the PyTorch figures above stand on their own; record why TensorRT failed
        result["tensorrt"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)

    md = format_md(result, models) + "\n".join(format_levers(result["levers"])) + "\n"
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(str(out) + ".md").write_text(md)
    say(f"wrote {out}.json and {out}.md in {result['wall_s']} s")
    return 0


def format_md(r: dict, models: dict) -> str:
    e = r["environment"]
    lines = ["# GPU check: PyTorch fp32 / fp16 on CUDA, TensorRT where installed", "",
             f"Command: `{r['command']}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in e.items()) + f"; NVML driver {r['nvml']['driver']}", "",
             f"Ensemble: {' + '.join(k for k in models if k != 'fused')} (seeded random weights), 10 classes, "
             f"constant controller; weights {r['weights_mib']} MiB fp32. Wall time {r['wall_s']} s.", "",
             "fp32 = TF32 off; fp16 = torch.autocast(float16) (LayerNorm, softmax, norms stay fp32). graph = CUDA graph "
             "replay, eager = plain module call. Latency from CUDA events around each call, inputs already on the "
             "device; median (min-max) over rounds x calls, configurations interleaved. activation peak = "
             "torch.cuda.max_memory_allocated above the weights while capturing/running that configuration.", "",
             "| model | precision | mode | batch | latency ms | images/s | activation peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(r["timings"], key=lambda x: (x["batch"], x["model"] != "fused", x["model"], x["precision"], x["mode"])):
        s = row["latency_ms"]
        lines.append(f"| {row['model']} | {row['precision']} | {row['mode']} | {row['batch']} | {s['median']:.3f} "
                     f"({s['min']:.3f}-{s['max']:.3f}) | {row['images_per_s']:.0f} | {row['activation_peak_mib']} |")
    # ratios first-class: fused vs the sum of the singles, per precision and batch (graph mode)
    lines += ["", "| batch | precision | fused ms | sum of singles ms | fused / sum | fp16 speed-up (fused) |", "|---|---|---|---|---|---|"]
    by = {(x["model"], x["precision"], x["mode"], x["batch"]): x["latency_ms"]["median"] for x in r["timings"]}
    for bs in sorted({x["batch"] for x in r["timings"]}):
        for prec in ("fp32", "fp16"):
            f = by.get(("fused", prec, "graph", bs))
            singles = [by.get((m, prec, "graph", bs)) for m in models if m != "fused"]
            if f is None or None in singles:
                continue
            sp = by[("fused", "fp32", "graph", bs)] / by[("fused", "fp16", "graph", bs)]
            lines.append(f"| {bs} | {prec} | {f:.3f} | {sum(singles):.3f} | {f / sum(singles):.2f} | "
                         f"{sp:.2f}x |" if prec == "fp16" else f"| {bs} | {prec} | {f:.3f} | {sum(singles):.3f} | "
                         f"{f / sum(singles):.2f} | |")
    n = r["nvml"]
    lines += ["", f"Device memory (NVML, whole GPU): before {n['used_mib_before']} MiB, after loading "
              f"{n['used_mib_after_load']} MiB, at the end {n['used_mib_end']} MiB"
              + (f"; torch reserved at most {r.get('torch_max_memory_reserved_mib')} MiB" if "torch_max_memory_reserved_mib" in r else "")
              + (f" (NVML: {n['error']})" if n.get("error") else "") + ".", ""]
    a = r["fp16_accuracy"]
    lines += [f"fp16 (autocast) against fp32 on this device, {a['images']} images from the shipped photographs:", "",
              "| backbone | cosine mean | cosine min | max abs logit err | top-1 agreement |", "|---|---|---|---|---|"]
    for b in a["backbones"]:
        lines.append(f"| {b['backbone']} | {b['cosine_mean']:.7f} | {b['cosine_min']:.7f} | {b['logits_max_abs']:.3g} | "
                     f"{b['top1_agreement'] * 100:.1f}% |")
    lines.append(f"| fused | | | {a['fused']['logits_max_abs']:.3g} | {a['fused']['top1_agreement'] * 100:.1f}% |")
    t = r["tensorrt"]
    lines += ["", "TensorRT: " + (t.get("skipped") or t.get("error") or f"{t['tensorrt']}"), ""]
    for p in t.get("plans", []):
        s = p["latency_ms_with_copies"]
        lines.append(f"- aux streams {p['aux_streams']}, batch {p['batch']}: {s['median']:.3f} ms "
                     f"({s['min']:.3f}-{s['max']:.3f}) with host copies; build {p['build_s']} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
