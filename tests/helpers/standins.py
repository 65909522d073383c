"""Test helpers for serving: a written Triton Python-backend model.py run under a stand-in for Triton's
triton_python_backend_utils, and predictions through a real pytriton server that is always stopped."""
from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace


def triton_python_model(model: Path, monkeypatch):
    """The TritonPythonModel of model/1/model.py (written by `clipfuse triton`), initialised; call finalize()."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.get_input_tensor_by_name = lambda r, n: SimpleNamespace(as_numpy=lambda: r[n])
    fake.Tensor = lambda name, array: (name, array)
    fake.InferenceResponse = lambda output_tensors: dict(output_tensors)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    ns: dict = {}
    exec(compile((Path(model) / "1" / "model.py").read_text(), "model.py", "exec"), ns)
    tpm = ns["TritonPythonModel"]()
    tpm.initialize({"model_repository": str(model), "model_version": "1"})
    return tpm


def served_predictions(engine, paths, **serve_options) -> list:
    """clipfuse.serve(engine) on free local ports, predict `paths` through clipfuse.connect, stop the server."""
    import clipfuse
    from clipfuse.runtime.serving.server import free_port

    srv = clipfuse.serve(engine, host="127.0.0.1", http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), exit_timeout_s=2, **serve_options)
    try:
        with clipfuse.connect(srv.http_url) as remote:
            return remote.predict(paths)
    finally:
        srv.stop()
