"""Serve an engine folder with a real Triton Inference Server, through nvidia-pytriton.

    with start_server("engines/pets", http_port=8000) as server:     # returns once the model is ready
        print(server.http_url, server.grpc_url, server.metrics_url)
        ...                                                          # clients: runtime/serving/client.py
    # `clipfuse serve engines/pets` does the same and blocks until Ctrl-C

pytriton bundles Triton 2.51 (CPU-capable, with its Python backend) and binds a Python callable as a
Triton model: one OnnxRuntimeBackend per instance runs the fused graph on what Triton's dynamic batcher
gathered. So this is Triton's own HTTP/gRPC front end, health, per-model statistics and Prometheus
metrics, with clipfuse's runtime behind it. Triton checks each request's dtype and shape against the
model config before it reaches Python. For a fleet, `clipfuse triton` (runtime/serving/repository.py)
writes a repository for stock Triton images; both carry the same `clipfuse` model-config parameter, and
the server's id (`GET /v2`) is `clipfuse:<model name>`, so the client finds the model without a token.

Security: binds to 127.0.0.1 unless told otherwise; inference is unauthenticated (as in Triton). The
admin endpoints need pytriton's access token (`server.access_token`, header `triton-access-token`),
which clipfuse never prints; tritonserver takes it on its command line, readable by local users, so it
keeps network clients out, not local users (docs/serving.md).
On HTTP a request guard (runtime/serving/guard.py) checks each request's shapes against the model
before Triton allocates for them (an oversized JSON request used to kill it).

Shutting down (stop(), leaving the `with` block, Ctrl-C, SIGTERM): pytriton stops tritonserver, then
clipfuse waits for it and its Python-backend stubs, kills what is left after a grace period (a stub
ignores SIGTERM) and removes this server's shared-memory regions from /dev/shm.

pytriton 0.7.0's Python-backend stub embeds libpython (its folder goes on LD_LIBRARY_PATH for the
server's process) and is built against numpy 1.x: under numpy 2 every output reaches the client
empty, so the `serve` extra pins numpy<2 and start_server refuses numpy 2.
A server that dies on its own is shut down like a stopped one (runtime/serving/cleanup.py: children
waited for, shared memory and the /tmp model store removed) and `serve_forever` raises, so `clipfuse
serve` exits 1, never 0.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import get_logger, log

from ..backends.onnxruntime import OnnxRuntimeBackend
from ..backends.registry import make_backend
from ..cascade import CascadeBackend, cascade_block, check_cascade_precision, is_cascade
from ..manifest import Manifest, read_manifest
from ..precisions import with_precision
from .cleanup import (
    free_shared_memory,
    python_backend_shm_prefix,
    reap,
    remove_model_stores,
    server_processes,
    shm_entries,
    workspace_of,
)
from .guard import Limits, RequestGuard
from .repository import (
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE_DELAY_US,
    INSTALL_SERVE,
    METADATA_KEY,
    SERVER_ID_PREFIX,
    default_model_name,
    model_spec,
)
from .triton_log import route_triton_log

LOOPBACK = "127.0.0.1"
ACCESS_HEADER = "triton-access-token"
STOP_GRACE_S = 5.0                  # after pytriton's stop, how long children may take before SIGKILL
MONITOR_S = 1.0                     # serve_forever: how often it checks that the server is alive


def check_serving_environment() -> None:
    """Refuse, with what to do, an environment where pytriton would not serve correctly."""
    try:
        import pytriton  # noqa: F401
    except ImportError as e:
        raise ClipfuseError(f"`clipfuse serve` needs nvidia-pytriton ({e}): {INSTALL_SERVE} "
                            "(Linux x86-64 with glibc >= 2.35)") from None
    major = int(np.__version__.split(".", 1)[0])
    if major >= 2:
        raise ClipfuseError(f"pytriton 0.7.0's Python-backend stub is built against numpy 1.x; with numpy "
                            f"{np.__version__} it returns every output empty. Install numpy<2 in this environment "
                            f"({INSTALL_SERVE} pins it), or serve the repository of `clipfuse triton` with a Triton image")


def _libpython_on_path() -> None:
    """The stub Triton runs for Python models links libpython dynamically; with pyenv/venv Pythons its
    folder is not on the loader's path. The server process inherits our environment, so set it here."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        if libdir not in paths:
            os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def _pytriton_libs_on_path() -> None:
    """pytriton takes itself for an editable install when its site-packages is not this interpreter's (a venv
    reaching another venv's packages through a .pth file) and then points tritonserver at a libs folder that
    does not exist; the wheel's real one (nvidia_pytriton.libs beside the package) is added here."""
    try:
        import pytriton
    except ImportError:
        return
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libs.is_dir() and str(libs) not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([*paths, str(libs)])


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free right now on `host` (for tests and benchmarks: ask the OS, never guess)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _make_infer(manifest: Manifest, threads: int | None, opened: list, cascade: bool = False,
                precision: str | None = None, backend_name: str = "onnxruntime", max_batch: int = DEFAULT_MAX_BATCH):
    """One instance's callable: a batch of requests (pytriton's @batch joins them) -> the five outputs
    (cascade: routed through the stage graphs of `precision`, runtime/cascade.py, + stage (N, 1)).
    manifest: the graph to run (with_precision's) or, for a cascade, the engine's own manifest.
    backend_name torch-cuda: CUDA graphs with buckets up to max_batch, the batcher's largest batch."""
    from pytriton.decorators import batch

    if backend_name == "torch-cuda":
        backend = make_backend(manifest, "torch-cuda", precision=precision or "fp32", max_batch=max_batch,
                               cascade=cascade, **({"threads": threads} if threads else {})).open()
    else:
        backend = (CascadeBackend(manifest, threads=threads, precision=precision) if cascade
                   else OnnxRuntimeBackend(manifest, threads=threads)).open()
    opened.append(backend)
    names = [i["name"] for i in manifest.inputs]

    @batch
    def infer(**inputs):
        out = backend.infer({n: inputs[n] for n in names})
        if cascade:
            out[iospec.STAGE] = out[iospec.STAGE].reshape(-1, 1)
        return out

    return infer


@dataclass
class Server:
    """A running Triton server for one engine; stop() (or leaving the `with` block) shuts it down."""

    model_name: str
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    access_token: str | None
    _triton: object = field(repr=False, default=None)
    _backends: list = field(repr=False, default_factory=list)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)
    _shm_prefix: str | None = field(repr=False, default=None)
    _shm_before: frozenset = field(repr=False, default=frozenset())
    _workspace: str | None = field(repr=False, default=None)
    _stopping: threading.Event = field(repr=False, default_factory=threading.Event)
    _guard: RequestGuard | None = field(repr=False, default=None)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def headers(self) -> dict:
        """Headers for the token-protected endpoints (statistics, ...)."""
        return {ACCESS_HEADER: self.access_token} if self.access_token else {}

    def serve_forever(self, poll_s: float = MONITOR_S) -> None:
        """Block until Ctrl-C or SIGTERM, then stop (children waited for, shared memory and model store freed).
        A server that dies on its own (tritonserver crashed, a model's stub gone) is stopped the same way and
        raises ClipfuseError, so `clipfuse serve` exits non-zero instead of 0."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminate)
        died = False
        try:
            triton = self._triton
            while triton is not None and triton.is_alive():
                self._stopping.wait(poll_s)
                triton = self._triton
            died = triton is not None
        except (_Terminated, KeyboardInterrupt):
            pass
        finally:
            self.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if died:
            raise ClipfuseError(f"the Triton server serving {self.model_name!r} on {self.host}:{self.http_port} stopped "
                                "on its own (see its log above); it was shut down and its model store removed")

    def stop(self) -> None:
        """Stop Triton and return once tritonserver and its stubs are gone, our shared memory is freed and
        the model store tritonserver made (a temporary /tmp/folderXXXXXX) is removed."""
        with self._lock:
            triton, self._triton = self._triton, None
        self._stopping.set()
        if triton is None:
            return
        children = server_processes(triton)
        try:
            if self._guard is not None:
                self._guard.stop()
            triton.stop()
        finally:
            reap(children, STOP_GRACE_S)
            for b in self._backends:
                b.close()
            free_shared_memory(self._shm_prefix, self._shm_before)
            remove_model_stores(self._workspace)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that serve_forever's clean-up runs."""


def _terminate(signum, frame):
    raise _Terminated()


def start_server(engine, host: str = LOOPBACK, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, max_batch: int = DEFAULT_MAX_BATCH,
                 queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, preferred=None, instances: int = 1,
                 threads: int | None = None, model_name: str | None = None, verify: bool = True,
                 exit_timeout_s: int = 10, precision: str | None = None,
                 cascade: bool | None = None, backend: str = "onnxruntime") -> Server:
    """Start Triton serving `engine` (HTTP, gRPC, metrics) and return once the model is ready.

    max_batch / queue_delay_us / preferred: Triton's dynamic batcher. instances: model instances, each
    with its own ONNX Runtime session (on a small CPU, 1: instances share the cores). threads: each
    session's intra-op threads (default ONNX Runtime's, one per physical core). precision: fp16 or int8
    serves model.fp16.onnx / model.int8.onnx (runtime/precisions.py; refused when the engine lacks it).
    cascade: on a cascade engine, None or True serves the routed stage graphs (outputs + stage), False
    the full graph. backend: onnxruntime (CPU) or torch-cuda (CUDA graphs, fp32 or fp16 computed from the
    fp32 engine; never yet run on a GPU)."""
    if backend not in ("onnxruntime", "torch-cuda"):
        raise ClipfuseError(f"serve runs backend onnxruntime or torch-cuda, not {backend!r}")
    check_serving_environment()
    manifest = engine if isinstance(engine, Manifest) else read_manifest(engine, verify=verify)

    if cascade and not is_cascade(manifest):
        cascade_block(manifest)                  # one line: not a cascade engine
    check_cascade_precision(manifest, cascade, precision)
    cascade = is_cascade(manifest) and cascade is not False
    graph = manifest
    if precision not in (None, "fp32") and backend != "torch-cuda":     # torch-cuda computes fp16 itself

        graph = with_precision(manifest, precision)
    # the same checks (and the same names) as the repository writer
    spec = model_spec(manifest, "onnxruntime", max_batch=max_batch, instances=instances, preferred=preferred,
                      queue_delay_us=queue_delay_us, name=model_name or default_model_name(manifest), cascade=cascade)
    for label, port in (("--port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ClipfuseError(f"{label} must be a TCP port (1-65535), got {port!r}")
    if len({http_port, grpc_port, metrics_port}) != 3:
        raise ClipfuseError(f"--port, --grpc-port and --metrics-port must differ, got {http_port}, {grpc_port}, "
                            f"{metrics_port}")
    for label, port in (("--port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        with socket.socket() as s:
            # as Triton binds (SO_REUSEADDR): connections of a just-stopped server in TIME_WAIT do not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                s.listen()
            except OSError as e:
                raise ClipfuseError(f"cannot listen on {host}:{port} ({label}): {e.strerror}; choose another port "
                                    "or stop what holds it") from None
    _libpython_on_path()
    _pytriton_libs_on_path()
    if not get_logger().isEnabledFor(logging.DEBUG):   # pytriton narrates every step at INFO and echoes
        logging.getLogger("pytriton").setLevel(logging.WARNING)   # Triton's log: for -v only

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    # tritonserver's HTTP endpoint on loopback, behind the request guard that holds the public port (guard.py)
    upstream_port = free_port(LOOPBACK)
    config = TritonConfig(http_address=LOOPBACK, http_port=upstream_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, allow_gpu_metrics=False,
                          exit_timeout_secs=exit_timeout_s, log_verbose=0, id=SERVER_ID_PREFIX + spec.name)
    backends: list = []
    try:
        infer_fns = [_make_infer(manifest if cascade else graph, threads, backends, cascade, precision, backend,
                                 max_batch) for _ in range(spec.instances)]
    except BaseException:
        for b in backends:
            b.close()
        raise
    shm_before = shm_entries()
    triton = Triton(config=config)
    route_triton_log(triton)          # Triton's log: stderr, not stdout; its one harmless error line dropped
    server = Server(spec.name, host, http_port, grpc_port, metrics_port,
                    getattr(getattr(triton, "_security_config", None), "access_token", None), triton, backends,
                    _shm_prefix=python_backend_shm_prefix(triton), _shm_before=shm_before,
                    _workspace=workspace_of(triton))
    try:
        triton.bind(
            model_name=spec.name,
            infer_func=infer_fns,
            inputs=[Tensor(name=n, dtype=np.dtype(d), shape=tuple(dims)) for n, d, dims in spec.inputs],
            outputs=[Tensor(name=n, dtype=np.dtype(d), shape=tuple(dims)) for n, d, dims in spec.outputs],
            config=ModelConfig(max_batch_size=spec.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=spec.queue_delay_us,
                                                      preferred_batch_size=spec.preferred or None)),
            strict=True,
        )
        _add_metadata_parameter(triton, spec.name, spec.metadata)
        triton.run()
        limits = Limits({n: tuple(dims) for n, _, dims in spec.inputs}, spec.max_batch)
        server._guard = RequestGuard(host, http_port, upstream_port, limits).start()
    except BaseException as e:
        server.stop()
        if isinstance(e, ClipfuseError):
            raise
        raise ClipfuseError(f"Triton did not start serving {spec.name!r} on {host}: {type(e).__name__}: "
                            f"{str(e)[:500]}") from None
    log(f"serving {spec.name!r} ({', '.join(manifest.backbone_names)}): HTTP {server.http_url}, "
        f"gRPC {host}:{grpc_port}, metrics {server.metrics_url}; dynamic batching up to {spec.max_batch}, "
        f"queue delay {spec.queue_delay_us} us, {spec.instances} instance(s)", tag="serve")
    return server


def _add_metadata_parameter(triton, model_name: str, metadata: dict) -> None:
    """Put the clipfuse JSON in the model config's parameters, as `clipfuse triton` does, so one client
    reads both. pytriton 0.7.0 has no public hook for config parameters; its generated config is built
    from the model's TritonModelConfig.backend_parameters (which pytriton itself uses for its workspace
    path), so the entry is added there before the server loads the model."""
    import json

    try:
        model = next(m for m in triton._model_manager.models if m.model_name == model_name)
        model._get_triton_model_config().backend_parameters[METADATA_KEY] = json.dumps(metadata, separators=(",", ":"))
    except (AttributeError, StopIteration) as e:
        raise ClipfuseError(f"this pytriton ({type(e).__name__}: {e}) has no place for the model's clipfuse "
                            f"parameter; install the pinned version: {INSTALL_SERVE}") from None
