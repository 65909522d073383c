"""The bench's child processes: timing workers that hold configurations open and time one call at a
time on request, and memory probes that load one configuration and report its peak RSS.

Why processes: an idle runtime does not leave the cores alone (ONNX Runtime's intra-op threads and
PyTorch's OpenMP threads spin after a run), so each configuration group is timed in its own worker,
and each memory figure comes from a fresh address space.

Children are started by `child_command`, which imports the INSTALLED clipfuse whatever the working
folder (`python -c` puts the current folder first on sys.path, so a folder holding the
clone shadowed the package). Run as `python -m clipfuse.bench.worker timing|memory SPEC_JSON`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import clipfuse
from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import set_level
from clipfuse.runtime.manifest import read_manifest

from .configs import feed_for, make_feed, open_config
from .probes import timed, vm_hwm

# What `python -P` does (Python >= 3.11; the project supports 3.10): drop the entry `-c` puts first on
# sys.path (the current folder), then run the module. Not `-I`: it would also drop PYTHONPATH and the
# user's site-packages, where a clipfuse installed with `pip install --user` or reached through
# PYTHONPATH lives. Any folder the user put on PYTHONPATH on purpose stays.
_BOOT = ("import sys; sys.path[:] = sys.path[1:] if sys.path[:1] == [''] else sys.path; "
         "import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def child_command(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args...` in this interpreter, importing the installed package
    even when the working folder holds a folder of the same name."""
    return [sys.executable, "-c", _BOOT.format(module=module), *args]


def worker_groups(K: int, torch: bool) -> list[list[str]]:
    """Configurations that share a worker process. The singles and the naive ensemble share one
    (naive is built from the same K sessions: one copy of the weights, not two)."""
    return [["fused"], [*(f"single:{k}" for k in range(K)), "naive"]] + ([["torch"]] if torch else [])


# ----------------------------------------------------------------------------- timing

class TimingWorker:
    """A child process holding some configurations open; the parent asks it to time one call at a time.

    Protocol: one JSON object per line on the child's stdin/stdout. Requests {"op": "time"|"logits",
    "config": c, "batch": b} are answered {"s": seconds} or {"logits": [[...]]}; {"op": "exit"} ends it.
    The child's stderr goes to a file, quoted when the child fails."""

    def __init__(self, engine: Path, configs: list[str], batches: list[int], threads: int | None = None,
                 arena: bool = True, singles: list | None = None):
        self.configs = list(configs)
        self._err = tempfile.TemporaryFile(mode="w+")
        spec = {"engine": str(engine), "configs": self.configs, "batches": batches, "threads": threads, "arena": arena,
                "singles": None if singles is None else [str(f) for f in singles]}
        self.proc = subprocess.Popen(child_command(__name__, "timing", json.dumps(spec)), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1)
        self.pid = self.proc.pid
        try:
            self.ready = self._read()
        except ClipfuseError:
            self.close()
            raise

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
        if not self._err.closed:
            self._err.close()


def _timing_child(spec: dict) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                  # anything a library prints goes to stderr, not into the protocol
    try:
        m = read_manifest(spec["engine"], verify=False)
        # the singles of this group are the naive ensemble's own sessions: one copy of the weights
        naive = open_config(m, "naive", spec["threads"], singles=spec.get("singles")) if "naive" in spec["configs"] else None

        def opened_config(c: str):
            if c == "naive":
                return naive
            if naive is not None and c.startswith("single:"):
                return naive.singles[int(c.split(":")[1])]
            return open_config(m, c, spec["threads"], arena=spec.get("arena", True), singles=spec.get("singles"))

        opened = {c: opened_config(c) for c in spec["configs"]}
        feeds = {bs: make_feed(m, bs) for bs in spec["batches"]}
        cfeeds = {(c, bs): feed_for(b, feeds[bs]) for c, b in opened.items() for bs in spec["batches"]}
    except ClipfuseError as e:
        out.write(json.dumps({"error": str(e)}) + "\n")
        return
    out.write(json.dumps({"ready": True, "pid": os.getpid(), "clipfuse": _package_dir()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        b, feed = opened[req["config"]], cfeeds[(req["config"], req["batch"])]
        if req["op"] == "logits":
            out.write(json.dumps({"logits": b.infer(feed)[iospec.LOGITS].tolist()}) + "\n")
            continue
        out.write(json.dumps({"s": timed(lambda: b.infer(feed))}) + "\n")


def _package_dir() -> str:
    """Where the child's clipfuse came from (tests check it is the installed one)."""
    return str(Path(clipfuse.__file__).resolve().parent)


# ----------------------------------------------------------------------------- memory

def memory_probe(engine: str, config: str, batch: int, threads: int | None = None, infers: int = 2,
                 singles: list | None = None) -> dict:
    """Run in a child process (see measure_memory): load one configuration, run a few inferences,
    report peak RSS. `net` = peak minus the RSS after imports, i.e. what the session itself adds."""
    import onnxruntime  # noqa: F401  (imported before the baseline: it is there in every configuration)
    import psutil

    if config == "torch":
        import open_clip  # noqa: F401
        import torch  # noqa: F401
    m = read_manifest(engine, verify=False)
    base = psutil.Process().memory_info().rss
    backend = open_config(m, config, threads, singles=singles)
    feed = feed_for(backend, make_feed(m, batch))
    for _ in range(infers):          # the first run allocates the arenas; a second shows any growth
        backend.infer(feed)
    peak = vm_hwm()
    return {"config": config, "batch": batch, "peak_rss_bytes": int(peak), "baseline_rss_bytes": int(base),
            "net_peak_bytes": int(peak - base)}


def measure_memory(engine: Path, config: str, batch: int, threads: int | None = None, infers: int = 2,
                   timeout: float = 3600, singles: list | None = None) -> dict:
    """memory_probe in a fresh process (its own address space, so its peak is its own)."""
    spec = {"engine": str(engine), "config": config, "batch": batch, "threads": threads, "infers": infers,
            "singles": None if singles is None else [str(f) for f in singles]}
    p = subprocess.run(child_command(__name__, "memory", json.dumps(spec)), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise ClipfuseError(f"memory probe for {config} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("timing", "memory"):
        sys.exit("usage: python -m clipfuse.bench.worker timing|memory SPEC_JSON")
    spec = json.loads(argv[1])
    set_level(logging.WARNING)     # a child measures; its parent does the talking
    if argv[0] == "timing":
        _timing_child(spec)
    else:
        print(json.dumps(memory_probe(**spec)))


if __name__ == "__main__":
    main()
