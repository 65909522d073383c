"""Classify images with a Triton server that serves a clipfuse engine (`clipfuse serve`, or a fleet
running the repository of `clipfuse triton`).

    with clipfuse.connect("http://127.0.0.1:8000") as predictor:     # or grpc://127.0.0.1:8001
        preds = predictor.predict(["a.jpg", pil_image])              # the same Predictions as clipfuse.load

The client reads the model's config once, takes the `clipfuse` parameter (input
sizes with open_clip's transform, classes, backbone names), and then does what
the local runtime does on its side: decode, resize, crop (runtime/images.py,
runtime/preprocess.py, bit for bit), and sends uint8 tensors. The server only
runs the fused graph. The result is a Predictor (runtime/predict.py) whose
backend is the server, so batching, failures and output formats are the local
ones, and a file that is not an image is reported per image without a request.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from clipfuse.core.errors import ClipfuseError

from ..backends.base import Backend
from ..manifest import Manifest
from ..predict import Predictor
from .repository import INSTALL_SERVE, SERVER_ID_PREFIX, read_metadata_parameter

TRITON_DTYPE = {"uint8": "UINT8"}


def parse_url(url: str) -> tuple[str, str]:
    """'http://host:port' | 'grpc://host:port' | 'host:port' (HTTP) -> (protocol, 'host:port')."""
    if "://" not in url:
        url = "http://" + url
    u = urlparse(url)
    try:
        port = u.port                   # ValueError for a port outside 0-65535 or not a number
    except ValueError:
        raise ClipfuseError(f"--url {url!r}: the port must be a number in 1-65535 "
                            "(e.g. http://127.0.0.1:8000)") from None
    if u.scheme not in ("http", "grpc") or not u.hostname or not port:
        raise ClipfuseError(f"--url {url!r} is not http://HOST:PORT or grpc://HOST:PORT (e.g. http://127.0.0.1:8000)")
    if u.path not in ("", "/"):
        raise ClipfuseError(f"--url {url!r}: give the server's address only; name the model with --model")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return u.scheme, f"{host}:{port}"


def _tritonclient(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        from tritonclient.utils import InferenceServerException
    except ImportError as e:
        raise ClipfuseError(f"predicting through a server needs tritonclient[{protocol}] ({e}): {INSTALL_SERVE}") from None
    return tc, InferenceServerException


class TritonBackend(Backend):
    """A Backend (open/infer/close) whose engine is a model on a Triton server."""

    name = "triton"

    def __init__(self, manifest: Manifest, protocol: str, address: str, model: str, timeout_s: float,
                 max_batch: int):
        super().__init__(manifest)
        self.protocol, self.address, self.model, self.timeout_s = protocol, address, model, timeout_s
        self.max_batch = max_batch
        self.client = None

    @property
    def device(self) -> str:
        return f"{self.protocol}://{self.address}/{self.model}"

    def open(self) -> "TritonBackend":
        self.client = _open_client(self.protocol, self.address, self.timeout_s)
        self.is_open = True
        return self

    def _infer(self, feed):
        tc, ServerError = _tritonclient(self.protocol)
        inputs = []
        n = next(iter(feed.values())).shape[0]
        if self.max_batch and n > self.max_batch:     # Triton refuses a request over max_batch_size
            parts = [self._infer({k: v[i:i + self.max_batch] for k, v in feed.items()})
                     for i in range(0, n, self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for name, arr in feed.items():
            x = tc.InferInput(name, list(arr.shape), TRITON_DTYPE[arr.dtype.name])
            if self.protocol == "http":
                x.set_data_from_numpy(arr, binary_data=True)
            else:
                x.set_data_from_numpy(arr)
            inputs.append(x)
        names = [o["name"] for o in self.manifest.outputs]
        if self.protocol == "http":
            outputs = [tc.InferRequestedOutput(o, binary_data=True) for o in names]
        else:
            outputs = [tc.InferRequestedOutput(o) for o in names]
        try:
            if self.protocol == "http":
                result = self.client.infer(self.model, inputs, outputs=outputs)
            else:
                result = self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except ServerError as e:
            raise ClipfuseError(f"server {self.protocol}://{self.address} refused the request to {self.model!r}: "
                                f"{e.message() if hasattr(e, 'message') else e}") from None
        out = {o: result.as_numpy(o) for o in names}
        for o, a in out.items():
            if a is None or a.shape[:1] != (n,):
                raise ClipfuseError(f"server {self.protocol}://{self.address} answered {o!r} with shape "
                                    f"{None if a is None else a.shape} for {n} images; is it serving this engine?")
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        super().close()


def _open_client(protocol: str, address: str, timeout_s: float):
    tc, ServerError = _tritonclient(protocol)
    try:
        if protocol == "http":
            client = tc.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            client = tc.InferenceServerClient(address)
        live = client.is_server_live()
    except (ServerError, OSError, ConnectionError) as e:
        raise ClipfuseError(f"no Triton server answers at {protocol}://{address} ({e}); start one with "
                            "`clipfuse serve ENGINE` or check --url") from None
    if not live:
        raise ClipfuseError(f"the Triton server at {protocol}://{address} is not live")
    return client


def _find_model(client, protocol: str, address: str, ServerError) -> str:
    """The one model the server has ready, when the caller named none: `clipfuse serve` names it in the
    server's id (no token needed); otherwise the repository index (a plain Triton lists its models)."""
    try:
        meta = client.get_server_metadata(as_json=True) if protocol == "grpc" else client.get_server_metadata()
        name = str(meta.get("name", ""))
        if name.startswith(SERVER_ID_PREFIX) and len(name) > len(SERVER_ID_PREFIX):
            return name[len(SERVER_ID_PREFIX):]
    except ServerError:
        pass
    try:
        index = client.get_model_repository_index(as_json=True) if protocol == "grpc" else \
            client.get_model_repository_index()
    except ServerError as e:
        raise ClipfuseError(f"the server at {protocol}://{address} does not list its models ({e}); name the model "
                            "(--model NAME, e.g. the engine folder's name)") from None
    if protocol == "grpc":
        index = index.get("models", [])
    ready = sorted({m["name"] for m in index if m.get("state", "READY") == "READY"})
    if len(ready) != 1:
        raise ClipfuseError(f"the server at {protocol}://{address} serves {len(ready)} models "
                            f"({', '.join(ready) or 'none'}); name one with --model")
    return ready[0]


def _not_ready(client, protocol: str, address: str, model: str, where: str, ServerError) -> str:
    """Why `model` is not ready: no such model on the server (a typo in --model; the served one named
    where the server says), or a known model still loading or failed to load."""
    try:
        client.get_model_metadata(model)
    except ServerError as e:
        if "unknown model" in str(e).lower() and "not found" in str(e).lower():
            try:
                served = f"; it serves {_find_model(client, protocol, address, ServerError)!r}"
            except ClipfuseError:
                served = ""
            return f"no such model {model!r} at {protocol}://{address}{served}: check --model"
    return f"{where} is not ready (not loaded, or still loading); check the server's log"


def manifest_from_metadata(meta: dict, where: str) -> Manifest:
    """A Manifest-shaped view of the served engine: what the Predictor needs, nothing on disk."""
    backbones = []
    for name in meta["backbones"]:
        arch, _, weights = name.partition(":")
        backbones.append({"arch": arch, "weights": weights})
    inputs = [{"name": i["name"], "dtype": "uint8", "shape": ["batch", 3, int(i["size"]), int(i["size"])],
               "preprocess": {k: i[k] for k in ("size", "interpolation", "resize_mode") if k in i}}
              for i in meta["inputs"]]
    outputs = [{"name": o} for o in meta["outputs"]]
    return Manifest(Path(where), {"name": meta.get("engine"), "classes": list(meta["classes"]),
                                  "backbones": backbones, "inputs": inputs, "outputs": outputs})


def connect(url: str, model: str | None = None, batch_size: int = 8, workers: int | None = None,
            timeout_s: float = 60.0):
    """A Predictor whose backend is the model `model` on the Triton server at `url` (http:// or grpc://).

    model: default the one `clipfuse serve` names in its server id, or the one model a plain Triton lists. batch_size: images per request (at most the model's
    max_batch_size: larger batches are split). Concurrency: one connect() per thread (tritonclient's
    HTTP client is gevent-based and belongs to the thread that made it); the server batches across them."""

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ClipfuseError(f"batch size must be a positive integer, got {batch_size!r}")
    protocol, address = parse_url(url)
    tc, ServerError = _tritonclient(protocol)
    client = _open_client(protocol, address, timeout_s)
    try:
        if model is None:
            model = _find_model(client, protocol, address, ServerError)
        where = f"model {model!r} at {protocol}://{address}"
        try:
            if not client.is_model_ready(model):
                raise ClipfuseError(_not_ready(client, protocol, address, model, where, ServerError))
            config = client.get_model_config(model, as_json=True) if protocol == "grpc" else \
                client.get_model_config(model)
        except ServerError as e:
            raise ClipfuseError(f"{where}: {e}") from None
        config = config.get("config", config)
        meta = read_metadata_parameter(config.get("parameters", {}), where)
        max_batch = int(config.get("max_batch_size", 0))
    finally:
        client.close()
    manifest = manifest_from_metadata(meta, f"{protocol}://{address}/{model}")
    backend = TritonBackend(manifest, protocol, address, model, timeout_s, max_batch).open()
    return Predictor(manifest, backend, batch_size=min(batch_size, max_batch) if max_batch else batch_size,
                     workers=workers)
