"""clipfuse: one deployable classifier from several CLIP backbones.

Public API (imports are lazy: `import clipfuse` pulls in neither torch nor open_clip):

    clipfuse.export_engine(backbones, classes, out, ...)   build + validate engines/<name>/
    clipfuse.reexport_engine(folder)                       rebuild an engine's graph (e.g. after fit)
    clipfuse.fit_engine(backbones, data, out, ...)         few-shot NLC + baselines -> engine + report
    clipfuse.eval_engine(folder, data) -> dict             accuracy of the exported graph + baselines
    clipfuse.inspect_engine(folder) -> dict                what an engine folder holds (print() it: the table)
    clipfuse.list_backbones() -> list[dict]                the nine OpenAI CLIP backbones
    clipfuse.load(engine_dir, backend="auto", precision="fp32") -> Predictor  classify images with an engine folder:
        .predict(images, top_k=5) -> [Prediction]          paths and/or PIL images, one result each
        .predict_batches(paths) -> iterator of [Prediction]  streaming, for large folders
        .predict_arrays(feed) -> {output: array}             ready-made uint8 tensors
    clipfuse.available_backends() -> list[str]             backends that run here, fastest first
    clipfuse.bench_engine(folder, data=None, batches=(1, 8)) -> dict   fused vs singles vs naive vs torch
    clipfuse.run_demo("engines/demo") -> dict              fit -> export -> predict -> bench, offline
    clipfuse.export_fp16(folder) -> dict                   add model.fp16.onnx (fp32 islands), validated on CPU
    clipfuse.export_int8(folder, "photos/") -> dict        add model.int8.onnx (+ -trt where TensorRT is), calibrated, validated
    clipfuse.build_engine(folder, "fp16", batch=(1, 8, 32)) build a TensorRT plan (needs TensorRT + GPU)
    clipfuse.compare_backends(folder, "onnxruntime,torch") -> dict   do the backends agree? (report["ok"])
    clipfuse.write_triton_repository(folder, "repo")       Triton model repository (config checked against the schema)
    clipfuse.serve(folder, http_port=8000) -> Server       Triton (pytriton) serving the engine; .stop()
    clipfuse.connect("http://127.0.0.1:8000") -> Predictor  the same Predictor, the engine on a Triton server
    clipfuse.ClipfuseError                                 every error a user can cause
"""


from clipfuse.core.errors import ClipfuseError

__version__ = "0.1.0"

_LAZY = {      # public name -> (its home, its name there)
    "export_engine": ("clipfuse.export.graph.engine", "export_engine"),
    "reexport_engine": ("clipfuse.export.graph.engine", "reexport_engine"),
    "fit_engine": ("clipfuse.export.fit.pipeline", "fit_engine"),
    "eval_engine": ("clipfuse.export.fit.evaluate", "eval_engine"),
    "inspect_engine": ("clipfuse.api", "inspect_engine"),
    "list_backbones": ("clipfuse.api", "list_backbones"),
    "load": ("clipfuse.runtime.predict", "load_predictor"),
    "available_backends": ("clipfuse.runtime.backends.registry", "available_backends"),
    "bench_engine": ("clipfuse.bench.run", "run_bench"),
    "run_demo": ("clipfuse.demo", "run_demo"),
    "export_fp16": ("clipfuse.export.precision.fp16", "export_fp16"),
    "export_int8": ("clipfuse.export.precision.int8_export", "export_int8"),
    "build_engine": ("clipfuse.export.precision.trt_plan", "build_engine"),
    "compare_backends": ("clipfuse.runtime.compare", "compare_backends"),
    "parse_backbone": ("clipfuse.export.graph.backbones", "parse_backbone"),
    "write_triton_repository": ("clipfuse.runtime.serving.repository", "write_repository"),
    "serve": ("clipfuse.runtime.serving.server", "start_server"),
    "connect": ("clipfuse.runtime.serving.client", "connect"),
}

__all__ = ["ClipfuseError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'clipfuse' has no attribute {name!r}")
