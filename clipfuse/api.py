"""The Python API behind the CLI: every command is one call here, returning data (the CLI parses the
arguments and shows the result through clipfuse.cli.present)."""
from __future__ import annotations

from pathlib import Path

from clipfuse.bench.run import run_bench
from clipfuse.cli.present import format_inspect
from clipfuse.demo import run_demo as _demo
from clipfuse.export.precision.fp16 import export_fp16 as _fp16
from clipfuse.export.precision.int8_export import export_int8 as _int8
from clipfuse.export.precision.trt_plan import build_engine as _build
from clipfuse.export.thresholds import CascadeConfig
from clipfuse.runtime.backends.registry import available_backends as _available
from clipfuse.runtime.compare import compare_backends as _compare
from clipfuse.runtime.images import collect_images as _collect
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.predict import load_predictor
from clipfuse.runtime.serving.client import connect as _connect
from clipfuse.runtime.serving.repository import default_model_name, write_repository
from clipfuse.runtime.serving.server import start_server


def export_engine(backbones, classes, out, templates=None, force=False, opset=None, quiet=False):
    """Build engines/<name>/: fused ONNX graph validated against PyTorch, heads, controller, manifest."""

    from clipfuse.export.graph.engine import export_engine as _export

    return _export(backbones, classes, out, templates=templates, force=force, opset=opset, quiet=quiet)


def reexport_engine(folder, opset=None, quiet=False):
    """Rebuild an existing engine's graph from its manifest (keeps heads, fitted controller, reports)."""

    from clipfuse.export.graph.engine import reexport_engine as _reexport

    return _reexport(folder, opset=opset, quiet=quiet)


def fit_engine(backbones, data, out, **kwargs):
    """Few-shot NLC + every baseline on a labelled folder -> engine folder with report (see export.fit.pipeline)."""

    from clipfuse.export.fit.pipeline import fit_engine as _fit

    return _fit(backbones, data, out, **kwargs)


def fit_levers(**kwargs):
    """fit's levers (budget-chosen subset, cascade) as one recipe, checked by fit (see export.fit.levers.Levers)."""

    from clipfuse.export.fit.levers import Levers

    if not kwargs.get("cascade"):       # a bad value (negative, nan, inf) is refused even unused
        CascadeConfig(max_drop=kwargs.get("max_drop", 0.5)).check()
    return Levers(**kwargs)


def eval_engine(engine, data, **kwargs):
    """Accuracy of the exported graph and every baseline on a labelled folder (see export.fit.pipeline)."""

    from clipfuse.export.fit.pipeline import eval_engine as _eval

    return _eval(engine, data, **kwargs)


def list_backbones(measure: bool = False) -> list[dict]:
    """The nine OpenAI CLIP backbones: input size, image-tower parameters, GFLOPs, embedding width."""

    from clipfuse.export.graph.backbones import OPENAI_BACKBONES, load_backbone

    rows = []
    for arch, info in OPENAI_BACKBONES.items():
        row = dict(arch=arch, **info)
        if measure:   # rebuild at random weights and count: FLOPs do not depend on weight values
            b = load_backbone(f"{arch}:random:0", measure_flops=True)
            row.update(visual_params=b.info["visual_params"], gflops=b.info["gflops"], embed_dim=b.embed_dim)
            del b
        rows.append(row)
    return rows


class EngineInfo(dict):
    """What inspect_engine returns: a plain dict of data (keys, JSON, ==) whose str() is the table
    `clipfuse inspect` prints, so `print(clipfuse.inspect_engine(folder))` reads as text."""

    def __str__(self) -> str:
        return format_inspect(self)


def inspect_engine(folder, verify: bool = True) -> EngineInfo:
    """What an engine folder holds: backbones, classes, IO, files, parameters, GFLOPs, validation.
    A dict (EngineInfo); print() it for the table `clipfuse inspect` shows."""

    m = read_manifest(folder, verify=verify)
    d = m.data
    files = {}
    for p in sorted(Path(m.folder).iterdir()):
        if p.is_file():
            files[p.name] = p.stat().st_size
    val = d.get("validation", {})
    worst = {}
    for batch in val.get("batches", {}).values():
        for name, o in batch["outputs"].items():
            worst[name] = max(worst.get(name, 0.0), o["max_rel"])
    return EngineInfo({
        "folder": str(m.folder),
        "name": d.get("name"),
        "created": d.get("created"),
        "backbones": d["backbones"],
        "classes": d["classes"],
        "head_kind": d.get("head_kind"),
        "controller": d.get("controller", {}).get("kind"),
        "inputs": d["inputs"],
        "outputs": d["outputs"],
        "files": files,
        "total_visual_params": sum(b["visual_params"] for b in d["backbones"]),
        "total_gflops": round(sum(b["gflops"] for b in d["backbones"]), 3),
        "validation_max_rel": worst,
        "onnx": d["onnx"],
        "versions": d.get("versions", {}),
    })


def load(engine_dir, backend: str = "auto", batch_size: int = 8, workers: int | None = None,
         threads: int | None = None, verify: bool = True, quiet: bool = False, precision: str | None = None,
         cascade: bool | None = None):
    """Open an engine folder for prediction -> Predictor (predict, predict_batches, predict_arrays).

    backend: "auto" (the fastest that runs here, logged on stderr), "onnxruntime", "onnxruntime-cuda",
    "onnxruntime-tensorrt", "torch", "torch-cuda" or "tensorrt". batch_size: images per engine call.
    workers: image-decoding threads (default min(4, CPUs)). threads: the backend's intra-op threads
    (default: the measured best, see benchmarks/results/runtime_thin.md). Needs neither torch nor
    open_clip unless a torch backend is asked for. precision: "fp32", "fp16" or "int8" runs that graph
    (model.fp16.onnx, model.int8.onnx; TensorRT: its plan); made by `clipfuse export ENGINE --precision`.
    cascade: on a cascade engine (`fit --cascade`), None or True routes each image through the stages it
    needs (Prediction.stage says which answered; fp32 stages, or with precision="int8" the int8 ones that
    `export --precision int8` cut and certified; fp16 has none); False runs the full graph.
    """

    return load_predictor(engine_dir, backend=backend, batch_size=batch_size, workers=workers,
                          threads=threads, verify=verify, quiet=quiet, precision=precision, cascade=cascade)


def available_backends() -> list[str]:
    """Backends that can run here, fastest first (the order `backend="auto"` tries)."""

    return _available()


def export_fp16(engine_dir, quiet: bool = False) -> dict:
    """Add model.fp16.onnx to an engine folder (fp32 islands by explicit casts), validated against
    model.onnx on ONNX Runtime CPU; returns the manifest's precisions["fp16"] entry (see export.precision.fp16)."""

    return _fp16(engine_dir, quiet=quiet)


def export_int8(engine_dir, calibration, count: int = 256, method: str = "minmax", targets=("cpu", "tensorrt"),
                data=None, classes=None, quiet: bool = False, keep_fp32=(), cascade_images=None) -> dict:
    """Add model.int8.onnx (ONNX Runtime CPU / OpenVINO) and model.int8-trt.onnx (TensorRT) to an engine
    folder, calibrated on the images in `calibration` and validated against fp32 (with `data`: accuracy,
    paired); keep_fp32: backbone names whose towers stay fp32, or ["auto"] (those failing their own checks);
    cascade_images: on a cascade engine, the folder its int8 exit thresholds are certified on (default
    `calibration`; export/precision/int8_stages.py); returns the manifest's precisions["int8"] entry (see export.precision.int8_export)."""

    return _int8(engine_dir, calibration, count=count, method=method, targets=targets, data=data, classes=classes,
                 quiet=quiet, keep_fp32=keep_fp32, cascade_images=cascade_images)


def build_engine(engine_dir, precision: str = "fp32", batch=(1, 8, 32), aux_streams=None, timing_cache=None,
                 opt_level: int = 3, workspace=None, quiet: bool = False) -> dict:
    """Build model.<precision>.plan with TensorRT (needs TensorRT and a GPU; see export.precision.trt_plan)."""

    return _build(engine_dir, precision, batch=batch, aux_streams=aux_streams, timing_cache=timing_cache,
                  opt_level=opt_level, workspace=workspace, quiet=quiet)


def compare_backends(engine_dir, backends="onnxruntime,torch", images=None, precision=None, batch: int = 8,
                     verify: bool = True, cascade: bool = True) -> dict:
    """Identical inputs through each backend, each compared with the first; report["ok"] says whether all
    agree within the precision's tolerance (see runtime.compare)."""

    return _compare(engine_dir, backends, images=images, precision=precision, batch=batch, verify=verify,
                    cascade=cascade)


def collect_images(sources, stdin=None) -> list[Path]:
    """Image paths from files, folders (recursive), globs and "-" (a list on stdin)."""

    return _collect(sources, stdin=stdin)


def bench_engine(engine, **kwargs) -> dict:
    """The fused graph vs each backbone alone, their sum, the naive ensemble and PyTorch eager, side by
    side; writes bench.md/.json/.png (see clipfuse.bench.run.run_bench for the options)."""

    return run_bench(engine, **kwargs)


def run_demo(out="engines/demo", **kwargs) -> dict:
    """The whole offline flow: fit on a digits subset -> export -> predict -> bench (see clipfuse.demo.run_demo)
    -> {"fit", "predictions", "backbone_names", "bench", "seconds"}."""

    return _demo(out, **kwargs)


# ----------------------------------------------------------------------------- Triton (runtime/triton, serve, client)

TRITON_ACCESS_HEADER = "triton-access-token"


def write_triton_repository(engine, out, **kwargs):
    """Triton model repository OUT/<model>/{config.pbtxt, 1/model.onnx|plan} -> the model folder
    (options: backend, max_batch, instances, kind, queue_delay_us, model_name, precision, force)."""

    return write_repository(engine, out, **kwargs)


def serve(engine, **kwargs):
    """Start a Triton server (pytriton) for an engine folder -> Server (stop() or `with`; serve_forever())."""

    return start_server(engine, **kwargs)


def connect(url: str, model: str | None = None, batch_size: int = 8, workers: int | None = None,
            timeout_s: float = 60.0):
    """A Predictor (predict, predict_batches, predict_arrays) whose engine runs on a Triton server."""

    return _connect(url, model=model, batch_size=batch_size, workers=workers, timeout_s=timeout_s)


def remote_predict_args(engine, images, model):
    """`clipfuse predict --url`: ENGINE is optional. An engine folder names the model (unless --model);
    anything else is the first image source. -> (engine or None, images, model)."""
    engine_dir = Path(engine)
    if (engine_dir / "manifest.json").is_file():
        if model is None:

            model = default_model_name(read_manifest(engine_dir, verify=False))
        return engine, tuple(images), model
    return None, (engine, *images), model
