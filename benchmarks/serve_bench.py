"""What does serving through Triton cost? Throughput and latency at concurrency 1, 4, 16: in-process vs served.

    python benchmarks/serve_bench.py [--engine engines/bench-rn50-vitb32] [--requests 40] [--rounds 3]

A benchmark, not a test. Needs the `serve` extra (nvidia-pytriton, tritonclient, numpy<2).
On the default two-backbone engine (RN50:random:0 + ViT-B-32:random:1; reused read-only,
exported by benchmarks/runtime_thin.py when absent) it measures, side by side in one run:

    in-process   C threads call one opened Predictor's predict_arrays (one ONNX Runtime
                 CPU session, as `clipfuse.load` gives), one image per call
    served       C threads each with its own HTTP client send one image per request to
                 `clipfuse serve` on 127.0.0.1 (Triton 2.51 via pytriton, dynamic batching:
                 max batch 8, queue delay 2 ms, one instance = one ONNX Runtime session)

Both get the same real photographs, already preprocessed to uint8 (decoding is the
client's either way; runtime_thin measures it). Each configuration sends the same
number of requests; rounds run interleaved (every level and mode once per round, the
order of the two modes alternating) after a warm-up, so drift hits all alike. Per
request latency: p50 and p99 of the round; throughput: images / wall time. Figures are
medians (min-max) over rounds. The CPU time other processes took during the run is
recorded (the served mode's own Triton processes are ours and are not counted as
others); a noisy run should be rerun. Weights are seeded random: latency does not
depend on weight values.

Results: benchmarks/results/serve_bench.{json,md}, with the command at the top.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_thin import ensure_engine  # noqa: E402

HOST = "127.0.0.1"


def say(msg: str) -> None:
    print(f"[serve_bench] {msg}", file=sys.stderr, flush=True)


class CpuProbe:
    """CPU taken by other processes (not us, not our children: the Triton server and its stub)."""

    def __init__(self):
        self.me = psutil.Process()
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        c = psutil.cpu_times()
        return sum(c) - c.idle - getattr(c, "iowait", 0.0) - getattr(c, "guest", 0.0) - getattr(c, "guest_nice", 0.0)

    def _own(self) -> float:
        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t
        own = self._own() - self.own
        others = max(0.0, (self._busy() - self.busy) - own)
        return {"wall_s": round(wall, 1), "own_cpu_s": round(own, 1), "other_processes_cpu_s": round(others, 1),
                "other_processes_cores": round(others / wall, 2)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def feeds_from_photos(specs) -> list[dict]:
    from clipfuse.runtime.preprocess import preprocess_for_inputs

    photos = sorted((ROOT / "clipfuse" / "assets").glob("*.jpg"))
    return [{k: v[None] for k, v in preprocess_for_inputs(Image.open(p), specs).items()} for p in photos]


def run_level(pool, call, feeds: list[dict], concurrency: int, requests: int) -> dict:
    """`requests` single-image calls spread over `concurrency` threads -> latencies and throughput."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def worker(i: int) -> None:
        mine = []
        for j in range(per_thread[i]):
            t0 = time.perf_counter()
            call(i, feeds[(i + j) % len(feeds)])
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    for f in [pool.submit(worker, i) for i in range(concurrency)]:
        f.result()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"images_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default=str(ROOT / "engines" / "bench-rn50-vitb32"))
    ap.add_argument("--requests", type=int, default=40, help="requests per concurrency level, per mode, per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    command = " ".join(["python benchmarks/serve_bench.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    levels = [int(c) for c in args.concurrency.split(",")]

    import onnxruntime
    import tritonclient.http as httpclient

    import clipfuse
    from clipfuse.runtime.serving.server import free_port

    manifest = ensure_engine(Path(args.engine))
    local = clipfuse.load(manifest.folder, backend="onnxruntime", verify=False)
    feeds = feeds_from_photos(local.specs)
    server = clipfuse.serve(manifest.folder, host=HOST, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), max_batch=args.max_batch, queue_delay_us=args.queue_delay_us,
                            verify=False, exit_timeout_s=3)
    # tritonclient's HTTP client is gevent-based and belongs to the thread that made it: one per
    # worker thread, made on first use; the pool's threads live for the whole run.
    pool = ThreadPoolExecutor(max(levels), thread_name_prefix="serve-bench")
    tls, clients = threading.local(), []

    def client():
        if not hasattr(tls, "client"):
            tls.client = httpclient.InferenceServerClient(f"{HOST}:{server.http_port}", network_timeout=600,
                                                          connection_timeout=60)
            clients.append(tls.client)
        return tls.client

    def served(i: int, feed: dict) -> None:
        inputs = []
        for name, arr in feed.items():
            x = httpclient.InferInput(name, list(arr.shape), "UINT8")
            x.set_data_from_numpy(arr, binary_data=True)
            inputs.append(x)
        res = client().infer(server.model_name, inputs, outputs=[httpclient.InferRequestedOutput("probs")])
        if res.as_numpy("probs").shape[0] != 1:
            raise RuntimeError("served answer has the wrong batch size")

    def in_process(i: int, feed: dict) -> None:
        local.predict_arrays(feed)

    modes = {"in-process": in_process, "served": served}
    results = {(m, c): [] for m in modes for c in levels}
    try:
        say("warm-up")
        for call in modes.values():
            run_level(pool, call, feeds, max(levels), max(levels))
        batches_before = _batch_counts(server)
        probe = CpuProbe()
        for r in range(args.rounds):
            for c in levels:
                order = list(modes) if r % 2 == 0 else list(reversed(modes))
                for m in order:
                    time.sleep(0.5)        # let the other session's intra-op threads stop spinning
                    res = run_level(pool, modes[m], feeds, c, args.requests)
                    results[(m, c)].append(res)
                    say(f"round {r + 1}/{args.rounds} concurrency {c:>2} {m:<10} {res['images_per_s']:.2f} img/s "
                        f"p50 {res['p50_ms']:.0f} ms p99 {res['p99_ms']:.0f} ms")
        load = probe.stop()
        batches = {k: v - batches_before.get(k, 0) for k, v in _batch_counts(server).items()}
    finally:
        pool.shutdown(wait=True)    # the clients' connections close with the process (gevent: not from here)
        server.stop()
        local.close()

    rows = []
    for c in levels:
        for m in modes:
            rs = results[(m, c)]
            rows.append({"concurrency": c, "mode": m,
                         **{k: summary([x[k] for x in rs]) for k in ("images_per_s", "p50_ms", "p99_ms")}})
    info = {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "engine": " + ".join(manifest.backbone_names), "classes": len(manifest.classes),
            "requests_per_level": args.requests, "rounds": args.rounds, "max_batch": args.max_batch,
            "queue_delay_us": args.queue_delay_us, "load": load, "served_batch_sizes": batches}
    write_results(Path(args.out), command, info, rows)
    print((Path(args.out) / "serve_bench.md").read_text())


def _batch_counts(server) -> dict:
    """{batch size: executions} from Triton's statistics endpoint (token-protected: the server's token)."""
    import urllib.request

    req = urllib.request.Request(f"{server.http_url}/v2/models/{server.model_name}/stats", headers=server.headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def write_results(out: Path, command: str, info: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps({"command": command, "machine": info, "results": rows},
                                                     indent=2) + "\n")
    load = info["load"]
    md = ["# Serving through Triton vs in-process predict", "", f"Command: `{command}`", "",
          f"Machine: cpus {info['cpus']}, {info['processor']}, python {info['python']}, onnxruntime "
          f"{info['onnxruntime']}, numpy {info['numpy']}; engine {info['engine']}, {info['classes']} classes; "
          f"{info['requests_per_level']} single-image requests per level, mode and round; {info['rounds']} rounds; "
          f"server max batch {info['max_batch']}, queue delay {info['queue_delay_us']} us, 1 instance.", "",
          f"CPU taken by other processes during the run: {load['other_processes_cores']} cores on average "
          f"({load['other_processes_cpu_s']} CPU-s over {load['wall_s']} s; ours, server included: "
          f"{load['own_cpu_s']} CPU-s)."
          + (" NOISY: other work took a large share of the cores during this run; absolute figures are low "
             "and spreads wide, rerun on a quiet machine before quoting them." if load["other_processes_cores"] > 0.2
             else ""), "",
          "Batch sizes Triton's dynamic batcher formed (executions per size, all rounds): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(info["served_batch_sizes"].items()) if v), "",
          "Figures: median (min-max) over rounds, interleaved after a warm-up.", "",
          "| concurrency | mode | images/s | p50 ms | p99 ms | served / in-process images/s |",
          "|---:|---|---|---|---|---:|"]
    by = {(r["concurrency"], r["mode"]): r for r in rows}
    for r in rows:
        ratio = ""
        if r["mode"] == "served":
            ratio = f"{r['images_per_s']['median'] / by[(r['concurrency'], 'in-process')]['images_per_s']['median']:.2f}"
        md.append(f"| {r['concurrency']} | {r['mode']} | {fmt(r['images_per_s'], 2)} | {fmt(r['p50_ms'], 0)} | "
                  f"{fmt(r['p99_ms'], 0)} | {ratio} |")
    (out / "serve_bench.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
