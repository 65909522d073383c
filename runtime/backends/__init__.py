"""clipfuse.runtime.backends: every runtime that can execute an engine folder, behind one interface.

base (the Backend interface: open -> infer -> close), registry (find, choose and open a
backend; optional ones through the `clipfuse.backends` entry points), sessions (the one ONNX
Runtime session loader), onnxruntime, openvino and tensorrt (the backends themselves).
A new backend is a module here plus an entry point in pyproject.toml.
"""
