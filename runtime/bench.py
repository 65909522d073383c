"""Benchmark machinery: what fusing K backbones costs, side by side, and what it buys.

    from clipfuse.runtime.bench import run_bench
    result = run_bench("engines/NAME", batches=(1, 8), runs=5, out="engines/NAME/bench")

Configurations, interleaved (every round runs each configuration once per batch size,
A B C A B C ...) so that drift and a busy neighbour hit all alike:

    fused        the engine's model.onnx on ONNX Runtime CPU (OnnxRuntimeBackend, measured defaults)
    single k     backbone k alone, exported the same way (same classes, its head from the engine's
                 heads.safetensors, constant controller) into <engine>/singles/<k>-<arch>/, cached
    sum          per round, the sum of the singles' latencies (what running them one by one costs)
    naive        the K single sessions run one after another + the controller and combination in numpy
    torch        PyTorch eager on the same ensemble (TorchBackend, threads = cores)

Figures: latency p50/p90/p99 and min-max per batch size, throughput, GFLOPs (from the manifest)
and achieved GFLOP/s against this machine's measured fp32 matmul peak, peak host memory per
configuration in a separate process each, device memory through NVML where a GPU exists, the
share of the fused time spent in the controller + combination (ONNX Runtime profiler), accuracy
per method when labelled data is given, and the CPU time other processes took meanwhile.
Writes bench.json, bench.md and (with data) bench.png: accuracy against latency, Pareto front marked.
No timing is asserted anywhere: the numbers are reported, never tested.

Each configuration group (fused; the singles and the naive ensemble; PyTorch eager) lives in its own
worker process, and the parent waits `settle` seconds (default 50 ms) before each timed call. Both
because an idle runtime does not leave the cores alone: ONNX Runtime's intra-op threads and
PyTorch's OpenMP threads spin after a run. Timed back to back in one process, on 2 cores, the
configuration that ran next paid for it: single RN50 took 95.6 ms instead of 57.6 ms, PyTorch eager
208 ms instead of 166 ms, which made fusing look 1.6x cheaper than running the singles and eager
look 1.8x slower than fused. With worker processes and the pause, each configuration measures what
it measures alone (fused 108.9 vs 108.5 ms, singles 58.2/51.9 vs 57.6/51.0 ms, eager 170 vs 166 ms).
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipfuse import iospec
from clipfuse.errors import ClipfuseError
from clipfuse.runtime.manifest import Manifest, read_manifest

SINGLES = "singles"
STATIC_METHODS = ("LOG-AVG", "PROB-AVG", "VOTE", "C-LOG-AVG")


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine load

class LoadProbe:
    """CPU time other processes took while we measured (psutil): a figure taken beside a busy
    neighbour must say so. Our own children (the memory probes) count as ours (os.times)."""

    def __init__(self, pids=()):
        import psutil

        self._psutil = psutil
        self._procs = [psutil.Process(p) for p in pids]   # live workers: theirs is our time too
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._own()

    def _busy(self) -> float:
        c = self._psutil.cpu_times()
        return sum(c) - c.idle - getattr(c, "iowait", 0.0)

    def _own(self) -> float:
        t = os.times()
        workers = 0.0
        for p in self._procs:
            try:
                c = p.cpu_times()
                workers += c.user + c.system
            except self._psutil.Error:
                pass
        return t.user + t.system + t.children_user + t.children_system + workers

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t
        others = max(0.0, (self._busy() - self.busy) - (self._own() - self.own))
        return {"wall_s": round(wall, 1), "own_cpu_s": round(self._own() - self.own, 1),
                "other_processes_cpu_s": round(others, 1), "other_processes_cores": round(others / wall, 3)}


def matmul_peak_gflops(n: int = 2048, tries: int = 5) -> dict:
    """This machine's fp32 matrix-multiply rate, all cores, best of a few, through numpy's BLAS and
    (when installed) torch's: the ceiling the achieved GFLOP/s are compared with is the faster one."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    fns = {"numpy": lambda: a @ b}
    if "torch" in sys.modules or _has("torch"):
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: ta @ tb
    rates = {}
    for name, fn in fns.items():
        fn()
        rates[name] = 2.0 * n ** 3 / min(_timed(fn) for _ in range(tries)) / 1e9
    return {"gflops_per_s": max(rates.values()), "by_library": rates, "n": n, "tries": tries}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gpu_memory() -> dict | None:
    """Device memory in use per GPU through NVML, or None where no NVIDIA GPU / pynvml is present."""
    from clipfuse.runtime.backends import nvidia_gpu_visible

    if not nvidia_gpu_visible():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        return {i: pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                for i in range(pynvml.nvmlDeviceGetCount())}
    finally:
        pynvml.nvmlShutdown()


# ----------------------------------------------------------------------------- single-backbone engines

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def single_folder(manifest: Manifest, k: int) -> Path:
    return manifest.folder / SINGLES / f"{k}-{_safe(manifest.backbones[k]['arch'])}"


def _single_matches(single: Manifest, manifest: Manifest, k: int) -> bool:
    b, s = manifest.backbones[k], single.backbones
    return (len(s) == 1 and s[0]["weights_sha256"] == b["weights_sha256"] and s[0]["arch"] == b["arch"]
            and single.classes == manifest.classes and single.data.get("head_kind") == manifest.data.get("head_kind"))


def ensure_singles(manifest: Manifest, quiet: bool = False) -> tuple[list[Manifest], list[bool]]:
    """Each backbone alone, exported the same way as the engine, cached in <engine>/singles/.

    A cached single is reused when its manifest names the same weights (sha256), classes and head
    kind; otherwise it is rebuilt from the engine's `ARCH:WEIGHTS` (which must hash to the recorded
    weights, as in reexport_engine) with its head taken from the engine's heads.safetensors.
    Returns the single manifests and, per backbone, whether the cache was reused."""
    singles, reused = [], []
    for k, b in enumerate(manifest.backbones):
        folder = single_folder(manifest, k)
        try:
            m = read_manifest(folder, verify=False)
            if _single_matches(m, manifest, k):
                singles.append(m)
                reused.append(True)
                log(f"single {k} {b['arch']}: reusing {folder}", quiet)
                continue
        except ClipfuseError:
            pass
        singles.append(_export_single(manifest, k, folder, quiet))
        reused.append(False)
    return singles, reused


def _export_single(manifest: Manifest, k: int, folder: Path, quiet: bool) -> Manifest:
    from clipfuse.export.backbones import load_backbone
    from clipfuse.export.engine import export_engine
    from clipfuse.export.heads import load_heads

    b = manifest.backbones[k]
    spec = f"{b['arch']}:{b['weights']}"
    t0 = time.perf_counter()
    log(f"single {k} {spec}: exporting alone into {folder} (once; cached)", quiet)
    built = load_backbone(spec)
    if built.weights_sha256 != b["weights_sha256"]:
        raise ClipfuseError(f"backbone {spec} rebuilt here does not have the weights engine {str(manifest.folder)!r} "
                            "was exported with (weights sha256 differs): the single-backbone comparison would not "
                            "measure the same network; re-export the engine with this open_clip")
    heads = load_heads(manifest.folder / manifest.data.get("heads_file", "heads.safetensors"),
                       num_backbones=len(manifest.backbones))
    folder.parent.mkdir(parents=True, exist_ok=True)
    export_engine([built], manifest.classes, folder, templates=manifest.data.get("templates"), force=True,
                  heads=[heads[k]], quiet=True, opset=manifest.data["onnx"].get("opset"))
    del built
    log(f"single {k} {spec}: exported in {time.perf_counter() - t0:.0f} s", quiet)
    return read_manifest(folder, verify=False)


# ----------------------------------------------------------------------------- the controller in numpy

class NumpyController:
    """The engine's controller + combination in numpy, for the naive ensemble (no torch)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            self.w = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
        self.kind = meta.get("kind", "constant")
        self.eps = float(json.loads(meta.get("config", "{}")).get("eps", 1e-3))

    def temperatures(self, features: np.ndarray) -> np.ndarray:          # (N, sum D) -> (N, K)
        if self.kind != "nlc":
            return np.broadcast_to(self.w["value"], (features.shape[0], self.w["value"].shape[1]))
        w = self.w
        h = np.maximum(((features - w["in_mean"]) / w["in_std"]) @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
        return np.logaddexp(0.0, h @ w["fc2.weight"].T + w["fc2.bias"]) + self.eps   # softplus

    def combine(self, feats: list[np.ndarray], zs: list[np.ndarray]) -> dict[str, np.ndarray]:
        features = np.concatenate(feats, axis=1)                               # (N, sum D)
        Z = np.stack(zs, axis=1)                                               # (N, K, C)
        t = self.temperatures(features)                                        # (N, K)
        logits = (t[:, :, None] * Z).sum(axis=1)                               # (N, C)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {iospec.LOGITS: logits, iospec.PROBS: e / e.sum(axis=1, keepdims=True),
                iospec.TEMPERATURES: t, iospec.BACKBONE_LOGITS: Z, iospec.FEATURES: features}


class NaiveEnsemble:
    """K separate single-backbone sessions run one after another, then the combination in numpy."""

    def __init__(self, singles: list, controller: NumpyController):
        self.singles, self.controller = singles, controller

    def infer(self, feed: dict) -> dict:
        feats, zs = [], []
        for s in self.singles:
            out = s.infer({i["name"]: feed[i["name"]] for i in s.manifest.inputs})
            feats.append(out[iospec.FEATURES])
            zs.append(out[iospec.BACKBONE_LOGITS][:, 0])
        return self.controller.combine(feats, zs)


def _subset(backend, feed: dict) -> dict:
    if isinstance(backend, NaiveEnsemble):
        return feed
    return {i["name"]: feed[i["name"]] for i in backend.manifest.inputs}


def controller_path(manifest: Manifest) -> Path:
    return manifest.folder / manifest.data.get("controller", {}).get("file", "controller.safetensors")


# ----------------------------------------------------------------------------- feeds and statistics

def make_feed(manifest: Manifest, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 images at every input resolution (latency does not depend on pixel values)."""
    rng = np.random.default_rng(seed)
    return {i["name"]: rng.integers(0, 256, (batch, 3, i["shape"][2], i["shape"][3]), dtype=np.uint8)
            for i in manifest.inputs}


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def ratio_stats(a, b) -> dict:
    """Per-round ratios a_r / b_r (both measured in the same round): median and min-max."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": float(statistics.median(r)), "min": float(min(r)), "max": float(max(r)), "n": len(r)}


# ----------------------------------------------------------------------------- memory, in a separate process

def memory_probe(engine: str, config: str, batch: int, threads: int | None = None, infers: int = 2) -> dict:
    """Run in a child process (see measure_memory): load one configuration, run a few inferences,
    report peak RSS. `net` = peak minus the RSS after imports, i.e. what the session itself adds."""
    import psutil

    import onnxruntime  # noqa: F401  (imported before the baseline: it is there in every configuration)

    if config == "torch":
        import open_clip  # noqa: F401
        import torch  # noqa: F401
    m = read_manifest(engine, verify=False)
    base = psutil.Process().memory_info().rss
    backend = _open_config(m, config, threads)
    feed = _subset(backend, make_feed(m, batch))
    for _ in range(infers):          # the first run allocates the arenas; a second shows any growth
        backend.infer(feed)
    peak = _vm_hwm()
    return {"config": config, "batch": batch, "peak_rss_bytes": int(peak), "baseline_rss_bytes": int(base),
            "net_peak_bytes": int(peak - base)}


def _vm_hwm() -> int:
    """Peak RSS of this process. Not ru_maxrss: Linux keeps that across execve, so a child of a big
    parent would report the parent's peak; VmHWM belongs to the new address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # elsewhere: the best there is


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): with the nine-backbone sessions
    closed, the bench process still held ~12 GB while the memory processes needed room beside it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _memory_probe_child() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(memory_probe(**spec)))


def measure_memory(engine: Path, config: str, batch: int, threads: int | None = None, infers: int = 2,
                   timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-c", "from clipfuse.runtime.bench import _memory_probe_child; _memory_probe_child()",
           json.dumps({"engine": str(engine), "config": config, "batch": batch, "threads": threads, "infers": infers})]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise ClipfuseError(f"memory probe for {config} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _open_config(m: Manifest, config: str, threads: int | None = None):
    """config: "fused", "single:K", "naive" or "torch" of engine m, opened."""
    from clipfuse.runtime.backends import OnnxRuntimeBackend, make_backend

    if config == "fused":
        return OnnxRuntimeBackend(m, threads=threads).open()
    if config.startswith("single:"):
        k = int(config.split(":")[1])
        return OnnxRuntimeBackend(read_manifest(single_folder(m, k), verify=False), threads=threads).open()
    if config == "naive":
        singles = [OnnxRuntimeBackend(read_manifest(single_folder(m, k), verify=False), threads=threads).open()
                   for k in range(len(m.backbones))]
        return NaiveEnsemble(singles, NumpyController(controller_path(m)))
    if config == "torch":
        return make_backend(m, "torch", threads=threads or os.cpu_count()).open()   # registered, not imported
    raise ClipfuseError(f"unknown bench configuration {config!r}")


# ----------------------------------------------------------------------------- timing, in worker processes

def worker_groups(K: int, torch: bool) -> list[list[str]]:
    """Configurations that share a worker process. The singles and the naive ensemble share one
    (naive is built from the same K sessions: one copy of the weights, not two)."""
    return [["fused"], [*(f"single:{k}" for k in range(K)), "naive"]] + ([["torch"]] if torch else [])


class TimingWorker:
    """A child process holding some configurations open; the parent asks it to time one call at a time.

    Protocol: one JSON object per line on the child's stdin/stdout. Requests {"op": "time"|"logits",
    "config": c, "batch": b} are answered {"s": seconds} or {"logits": [[...]]}; {"op": "exit"} ends it.
    The child's stderr goes to a file, quoted when the child fails."""

    def __init__(self, engine: Path, configs: list[str], batches: list[int], threads: int | None = None):
        self.configs = list(configs)
        self._err = tempfile.TemporaryFile(mode="w+")
        spec = {"engine": str(engine), "configs": self.configs, "batches": batches, "threads": threads}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from clipfuse.runtime.bench import _timing_worker_child; _timing_worker_child()",
             json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.seek(0)
            tail = self._err.read().strip()[-800:]
            raise ClipfuseError(f"bench worker for {', '.join(self.configs)} died (exit {self.proc.returncode}): {tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise ClipfuseError(f"bench worker for {', '.join(self.configs)}: {msg['error']}")
        return msg

    def ask(self, op: str, config: str | None = None, batch: int | None = None) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, "config": config, "batch": batch}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass                                   # _read reports why the child went away
        return self._read()

    def time(self, config: str, batch: int) -> float:
        return self.ask("time", config, batch)["s"]

    def logits(self, config: str, batch: int) -> np.ndarray:
        return np.asarray(self.ask("logits", config, batch)["logits"], dtype=np.float32)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def _timing_worker_child() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                  # anything a library prints goes to stderr, not into the protocol
    spec = json.loads(sys.argv[1])
    try:
        m = read_manifest(spec["engine"], verify=False)
        # the singles of this group are the naive ensemble's own sessions: one copy of the weights
        naive = _open_config(m, "naive", spec["threads"]) if "naive" in spec["configs"] else None

        def opened_config(c: str):
            if c == "naive":
                return naive
            if naive is not None and c.startswith("single:"):
                return naive.singles[int(c.split(":")[1])]
            return _open_config(m, c, spec["threads"])

        opened = {c: opened_config(c) for c in spec["configs"]}
        feeds = {bs: make_feed(m, bs) for bs in spec["batches"]}
        cfeeds = {(c, bs): _subset(b, feeds[bs]) for c, b in opened.items() for bs in spec["batches"]}
    except ClipfuseError as e:
        out.write(json.dumps({"error": str(e)}) + "\n")
        return
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        b, feed = opened[req["config"]], cfeeds[(req["config"], req["batch"])]
        if req["op"] == "logits":
            out.write(json.dumps({"logits": b.infer(feed)[iospec.LOGITS].tolist()}) + "\n")
            continue
        out.write(json.dumps({"s": _timed(lambda: b.infer(feed))}) + "\n")


# ----------------------------------------------------------------------------- the fusion overhead

def downstream_nodes(onnx_path: Path) -> tuple[set[str], set[str]]:
    """Names of the graph's nodes that compute the controller + combination (everything downstream of
    `features` and `backbone_logits`), and of all nodes. Reads the graph without its weights."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    tainted = {iospec.FEATURES, iospec.BACKBONE_LOGITS}
    down = set()
    for node in g.node:                      # ONNX nodes are topologically sorted
        if any(i in tainted for i in node.input):
            down.add(node.name)
            tainted.update(node.output)
    return down, {n.name for n in g.node}


def profile_overhead(manifest: Manifest, batch: int, runs: int, threads: int | None = None) -> dict:
    """Share of the fused graph's node time spent in the controller + combination (ORT profiler).

    ORT renames nodes it fuses; a profiled node counts as downstream when its name is, or starts
    with, a downstream node's name. Nodes matching no original name are reported separately."""
    from clipfuse.runtime.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(manifest, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        so = backend.session_options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        # The profile names the nodes of ORT's optimised graph (fusions rename nodes): save that graph
        # and find the controller + combination in it; its weights go to a side file (may pass 2 GB).
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        import onnxruntime as ort

        sess = ort.InferenceSession(str(manifest.onnx_path), so, providers=["CPUExecutionProvider"])
        try:
            down, every = downstream_nodes(Path(tmp) / "optimized.onnx")
            names_from = "ORT's optimised graph"
        except Exception:       # an ORT that cannot save it: fall back to the exported graph's names
            down, every = downstream_nodes(manifest.onnx_path)
            names_from = "the exported graph (ORT's optimised graph could not be saved)"
        feed = make_feed(manifest, batch)
        sess.run(None, feed)                     # warm-up, excluded below by run index
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, float] = {}
    run_total = 0.0
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= warm_end:
            node = e["name"][: -len("_kernel_time")]
            per_node[node] = per_node.get(node, 0.0) + e["dur"]
    for e in model_runs[1:]:
        run_total += e["dur"]

    def is_down(name):
        return name in down or any(name.startswith(d + "_") for d in down if d)

    down_us = sum(t for n, t in per_node.items() if is_down(n))
    unknown = {n: t for n, t in per_node.items() if n not in every and not is_down(n)}
    node_us = sum(per_node.values())
    return {"batch": batch, "runs": runs, "node_time_ms": node_us / 1e3 / runs, "run_time_ms": run_total / 1e3 / runs,
            "controller_combination_ms": down_us / 1e3 / runs,
            "controller_combination_pct_of_nodes": 100.0 * down_us / node_us if node_us else float("nan"),
            "controller_combination_pct_of_run": 100.0 * down_us / run_total if run_total else float("nan"),
            "downstream_nodes": sorted(n for n in per_node if is_down(n)),
            "renamed_nodes_ms": sum(unknown.values()) / 1e3 / runs, "renamed_nodes": len(unknown),
            "node_names_from": names_from}


# ----------------------------------------------------------------------------- the run

def run_bench(engine, data=None, batches=(1, 8), runs: int = 5, warmup: int = 1, out=None, backend: str = "onnxruntime",
              threads: int | None = None, torch: bool = True, memory: bool = True, profile: bool = True,
              classes=None, quiet: bool = False, command: str | None = None, stem: str = "bench",
              memory_batch: int | None = None, memory_infers: int = 2, settle: float = 0.05) -> dict:
    """Benchmark an engine folder against its single backbones, the naive ensemble and PyTorch eager.

    engine: engine folder; data: labelled folder (DATA/<class>/<images>) for accuracy per method;
    batches: batch sizes; runs: timed rounds (each configuration runs once per batch per round, after
    `warmup` untimed rounds); out: folder for bench.json / bench.md / bench.png (default <engine>/bench);
    backend: "onnxruntime" (CPU; the only one whose singles and naive ensemble are built here);
    torch / memory / profile: include PyTorch eager, the per-configuration memory processes, the
    controller-overhead profile; memory_batch / memory_infers: batch size (default the largest <= 8) and
    inferences of each memory process; settle: seconds of rest before each timed call (see the module
    docstring). Returns the result dict (also written as JSON)."""
    if backend != "onnxruntime":
        raise ClipfuseError(f"--backend {backend!r}: the side-by-side bench runs on ONNX Runtime CPU here "
                            "(backend onnxruntime); GPU backends are measured by their own issue's tools")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ClipfuseError(f"--batch needs positive batch sizes, got {batches}")
    if runs < 1:
        raise ClipfuseError(f"--runs must be at least 1, got {runs}")
    if not 0 <= settle <= 10:
        raise ClipfuseError(f"settle must be between 0 and 10 seconds, got {settle}")
    t_start = time.perf_counter()
    m = read_manifest(engine)
    out = Path(out) if out else m.folder / "bench"
    K = len(m.backbones)
    names = m.backbone_names
    _, reused = ensure_singles(m, quiet)

    import onnxruntime

    log("measuring this machine's fp32 matmul peak", quiet)
    peak_info = matmul_peak_gflops()
    peak = peak_info["gflops_per_s"]
    _malloc_trim()                       # exporting the singles may have left GBs in this process's heap
    gpu_before = gpu_memory()
    groups = worker_groups(K, torch)
    order_run = [c for g in groups for c in g]
    pool: list[TimingWorker] = []
    workers: dict[str, TimingWorker] = {}
    try:
        for group in groups:
            log(f"opening {', '.join(group)} in a worker process"
                + (" (PyTorch rebuilds the backbones)" if group == ["torch"] else ""), quiet)
            pool.append(TimingWorker(m.folder, group, batches, threads))
            workers.update({c: pool[-1] for c in group})

        # The naive ensemble must compute what the fused graph computes; a bench of a wrong thing is worthless.
        check = {c: workers[c].logits(c, batches[0]) for c in ("fused", "naive", "torch") if c in workers}
        ref = check["fused"]
        agreement = {c: float(np.abs(v - ref).max() / max(1e-12, np.abs(ref).max())) for c, v in check.items()}
        if agreement["naive"] > 1e-3:
            raise ClipfuseError(f"the naive ensemble's logits differ from the fused graph's by {agreement['naive']:.1e} "
                                f"(relative): the singles in {str(m.folder / SINGLES)!r} do not match; delete that folder")

        times = {(c, bs): [] for c in order_run for bs in batches}
        load = LoadProbe(pids=[w.pid for w in pool])
        for r in range(warmup + runs):
            t_round = time.perf_counter()
            for bs in batches:
                for c in order_run:
                    if settle:
                        time.sleep(settle)       # let the last runtime's spinning threads go idle
                    dt = workers[c].time(c, bs)
                    if r >= warmup:
                        times[(c, bs)].append(dt)
            what = "warm-up" if r < warmup else f"round {r - warmup + 1}/{runs}"
            log(f"{what} done in {time.perf_counter() - t_round:.1f} s", quiet)
        timing_load = load.stop()
        gpu_after = gpu_memory()
    finally:
        for w in pool:                   # free the sessions before the memory processes load theirs
            w.close()
    for bs in batches:
        n = len(times[("fused", bs)])
        times[("sum", bs)] = [sum(times[(f"single:{k}", bs)][i] for k in range(K)) for i in range(n)]

    labels = {"fused": "fused (ONNX Runtime)", "sum": "sum of singles", "naive": "naive (K sessions + numpy)",
              "torch": "PyTorch eager"}
    labels.update({f"single:{k}": f"single {names[k]}" for k in range(K)})
    order = ["fused", *[f"single:{k}" for k in range(K)], "sum", "naive"] + (["torch"] if torch else [])
    gflops = {c: sum(b["gflops"] for b in m.backbones) for c in ("fused", "sum", "naive", "torch")}
    gflops.update({f"single:{k}": m.backbones[k]["gflops"] for k in range(K)})
    latency = {}
    for c in order:
        latency[c] = {}
        for bs in batches:
            ts = times[(c, bs)]
            s = stats([t * 1e3 for t in ts])
            latency[c][str(bs)] = {"latency_ms": s, "images_per_s": bs / (s["p50"] / 1e3),
                                   "gflops": gflops[c] * bs, "achieved_gflops_per_s": gflops[c] * bs / (s["p50"] / 1e3),
                                   "pct_of_matmul_peak": 100.0 * gflops[c] * bs / (s["p50"] / 1e3) / peak}
    targets = {"fused_over_sum": {str(bs): ratio_stats(times[("fused", bs)], times[("sum", bs)]) for bs in batches},
               "naive_over_fused": {str(bs): ratio_stats(times[("naive", bs)], times[("fused", bs)]) for bs in batches}}
    if torch:
        targets["torch_over_fused"] = {str(bs): ratio_stats(times[("torch", bs)], times[("fused", bs)]) for bs in batches}
        # The most any graph could gain on eager here: the same FLOPs at 100% of the measured matmul peak.
        targets["torch_over_fused_ceiling"] = {bs: 100.0 / x["pct_of_matmul_peak"] for bs, x in latency["torch"].items()}

    overhead = None
    if profile:
        log("profiling the fused graph: controller + combination", quiet)
        overhead = profile_overhead(m, batches[0], max(3, min(runs, 10)), threads)
        overhead["fused_p50_ms"] = latency["fused"][str(batches[0])]["latency_ms"]["p50"]
        overhead["pct_of_fused_p50"] = 100.0 * overhead["controller_combination_ms"] / overhead["fused_p50_ms"]

    mem = {}
    if memory:
        mem_load = LoadProbe()
        bs = memory_batch or (max(b for b in batches if b <= 8) if any(b <= 8 for b in batches) else batches[0])
        for c in ["fused", *[f"single:{k}" for k in range(K)], "naive"] + (["torch"] if torch else []):
            log(f"peak memory: {labels[c]} in its own process (batch {bs})", quiet)
            mem[c] = measure_memory(m.folder, c, bs, threads, infers=memory_infers)
        for key in ("peak_rss_bytes", "net_peak_bytes"):
            mem.setdefault("sum", {"config": "sum", "batch": bs})[key] = sum(mem[f"single:{k}"][key] for k in range(K))
        targets["fused_memory_over_sum"] = {k: mem["fused"][k] / mem["sum"][k] for k in ("peak_rss_bytes", "net_peak_bytes")}
        mem_load = mem_load.stop()
    accuracy = None
    if data is not None:
        from clipfuse.export.fit import eval_engine

        log(f"accuracy on {data}", quiet)
        ev = eval_engine(m.folder, data, classes=classes, quiet=quiet)
        accuracy = {"data": str(data), "num_images": ev["num_images"], "methods": ev["accuracy"]}

    result = {
        "command": command, "engine": str(m.folder), "backbones": names, "classes": len(m.classes),
        "controller": m.data.get("controller", {}).get("kind"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "numpy": np.__version__, "matmul_peak_gflops": peak, "matmul_peak": peak_info},
        "settings": {"batches": batches, "runs": runs, "warmup": warmup, "ort_threads": threads or "default",
                     "ort_execution_mode": "sequential", "torch_threads": threads or os.cpu_count(),
                     "processes": groups, "settle_s": settle,
                     "note": "ORT CPU defaults as measured in benchmarks/results/runtime_thin.md"},
        "singles_cache_reused": reused, "agreement_with_fused_rel": agreement,
        "order": order, "labels": labels, "latency": latency, "targets": targets, "overhead": overhead,
        "memory": mem or None, "device_memory": {"before": gpu_before, "after": gpu_after} if gpu_before else None,
        "accuracy": accuracy,
        "load": {"timing": timing_load, **({"memory": mem_load} if memory else {})},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    paths = write_outputs(result, out, stem)
    log("wrote " + ", ".join(str(p) for p in paths.values()), quiet)
    return result


# ----------------------------------------------------------------------------- outputs

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
        if name in acc:
            pts.append({"method": name, "kind": "single", "latency_ms": lat[f"single:{k}"][bs]["latency_ms"]["p50"],
                        "accuracy": acc[name]})
    fused = lat["fused"][bs]["latency_ms"]["p50"]
    for name in STATIC_METHODS:      # a static controller costs what the fused graph costs
        if name in acc:
            pts.append({"method": name, "kind": "static ensemble", "latency_ms": fused, "accuracy": acc[name]})
    for name, a in acc.items():
        if name == "NLC" or name.startswith("ENGINE"):
            pts.append({"method": name, "kind": "engine", "latency_ms": fused, "accuracy": a})
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
    style = {"single": ("o", "tab:blue"), "static ensemble": ("s", "tab:gray"), "engine": ("*", "tab:red")}
    for kind, (marker, color) in style.items():
        sel = [p for p in pts if p["kind"] == kind]
        if sel:
            ax.scatter([p["latency_ms"] for p in sel], [p["accuracy"] for p in sel], marker=marker, c=color,
                       s=120 if marker == "*" else 50, label=kind, zorder=3)
    labels: dict[tuple, list[str]] = {}          # methods that tie share one label, not overprinted ones
    for p in pts:
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
    fig.savefig(path, format="png")
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
          + f"; ORT CPU {st['ort_execution_mode']}, intra-op threads {st['ort_threads']} "
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
    for bs, s in t["fused_over_sum"].items():
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
    for bs, s in t["naive_over_fused"].items():
        L.append(f"| (info) naive / fused | {bs} | {_r(s, '{:.2f}')} | |")
    if result.get("memory"):
        L += ["", "## Peak host memory (each configuration in its own process)", "",
              "| config | peak RSS | after imports | net (session) |", "|---|---:|---:|---:|"]
        for c, x in result["memory"].items():
            base = _mb(x["baseline_rss_bytes"]) if "baseline_rss_bytes" in x else "-"
            L.append(f"| {result['labels'].get(c, c)} | {_mb(x['peak_rss_bytes'])} | {base} | {_mb(x['net_peak_bytes'])} |")
    if result.get("device_memory"):
        L += ["", f"Device memory (NVML, bytes used per GPU): {result['device_memory']}"]
    if ov:
        L += ["", f"Overhead profile (ORT profiler, batch {ov['batch']}, {ov['runs']} runs): downstream nodes "
              f"{', '.join(ov['downstream_nodes']) or '(none: folded away)'} (node names from {ov.get('node_names_from')}); "
              f"profiled nodes matching no graph node (counted as backbone work): {ov['renamed_nodes']}, "
              f"{ov['renamed_nodes_ms']:.2f} ms/run."]
    if result.get("accuracy"):
        a = result["accuracy"]
        L += ["", f"## Accuracy on {a['data']} ({a['num_images']} images)", "", "| method | accuracy % |", "|---|---:|"]
        L += [f"| {k} | {v:.1f} |" for k, v in a["methods"].items()]
    L += ["", f"Bench wall time {result['wall_s']:.0f} s."]
    return "\n".join(L) + "\n"


def write_outputs(result: dict, out: Path, stem: str = "bench") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    result["plot_points"] = plot_points(result)
    if write_plot(result, out / f"{stem}.png"):
        paths["png"] = out / f"{stem}.png"
        result["plot"] = str(paths["png"])
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(f"# Benchmark: fused ensemble vs single backbones\n\n{format_table(result)}")
    return paths


# ----------------------------------------------------------------------------- the demo: the whole flow

DEMO_BACKBONES = ("RN50:random:0", "ViT-B-32:random:1")


def write_digits(folder: Path, per_class: int, skip: int = 0) -> int:
    """scikit-learn's digits (real 8x8 handwritten digits, shipped inside the package: offline) as a
    labelled folder: images skip .. skip+per_class-1 of each class, in the dataset's order, as PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    seen: dict[int, int] = {}
    n = 0
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        j = seen.get(int(label), 0)
        seen[int(label)] = j + 1
        if skip <= j < skip + per_class:
            cls = folder / f"digit_{label}"
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L").save(cls / f"{i:04d}.png")
            n += 1
    return n


def run_demo(out="engines/demo", backbones=DEMO_BACKBONES, train_per_class: int = 30, eval_per_class: int = 10,
             batches=(1, 8), runs: int = 5, results=None, stem: str = "bench", command: str | None = None,
             quiet: bool = False, echo=print) -> dict:
    """The whole flow, offline: fit (linear probes + NLC on a digits subset) -> export -> predict -> bench.

    Seeded random towers stand in for `ARCH:openai` weights (no download here): the accuracies show the
    machinery, not CLIP. Returns the bench result; `echo` receives what a user should read."""
    import shutil

    from clipfuse.export.fit import fit_engine
    from clipfuse.runtime.predict import format_predictions, load_predictor

    t0 = time.perf_counter()
    out = Path(out)
    data = out.parent / f".{out.name}-digits"
    shutil.rmtree(data, ignore_errors=True)
    n_train = write_digits(data / "train", train_per_class)
    n_eval = write_digits(data / "eval", eval_per_class, skip=train_per_class)   # disjoint from training
    log(f"demo 1/4 fit: {' + '.join(backbones)} (seeded random weights: offline), scikit-learn digits: "
        f"{n_train} training and {n_eval} held-out images", quiet)
    from threadpoolctl import threadpool_limits

    # One BLAS thread for the probes' solver: next to torch's OpenMP pool (and any busy neighbour) two
    # OpenBLAS threads spin against each other on 2 cores; measured 2x faster with one.
    with threadpool_limits(1, user_api="blas"):
        _, report = fit_engine(list(backbones), data / "train", out, eval_data=data / "eval", head="linear-probe",
                               probe_fraction=0.5, shots=8, seed=0, study_shots=(1, 2, 4, 8), study_seeds=(0, 1, 2),
                               force=True, quiet=quiet)
    echo("## Fit (held-out digits, shipped controller k = 8)\n\n" + "\n".join(
        f"- {m}: {a:.1f}%" for m, a in report["shipped"]["accuracy"].items()) + "\n")
    log("demo 2/4 export: done by fit (validated against PyTorch on real photographs)", quiet)
    log("demo 3/4 predict: four held-out digits", quiet)
    shown = sorted((data / "eval").glob("*/*.png"))[::max(1, n_eval // 4)][:4]
    with load_predictor(out, backend="onnxruntime", quiet=True) as predictor:
        preds = predictor.predict(shown, top_k=3)
        echo("## Predict\n\n" + format_predictions(preds, "table", 3, predictor.backbone_names, header=True))
    log("demo 4/4 bench: fused vs single backbones vs naive vs PyTorch eager", quiet)
    result = run_bench(out, data=data / "eval", batches=batches, runs=runs, out=results or out / "bench",
                       stem=stem, quiet=quiet, command=command)
    echo("## Bench\n\n" + format_table(result))
    echo(f"plot: {result.get('plot')}")
    echo(f"demo done in {time.perf_counter() - t0:.0f} s")
    return result
