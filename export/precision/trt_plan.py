"""Build a TensorRT plan from an engine folder's ONNX graph: `clipfuse build engines/NAME`.

    build_engine("engines/pets", "fp16", batch=(1, 8, 32), aux_streams=4, timing_cache="trt.cache")

writes, through the one engine-folder writer (atomic; the manifest last):

    model.<precision>.plan          the serialised engine
    model.<precision>.layers.json   the engine inspector's layer information (detailed verbosity)

and records in the manifest's "plans" entry the TensorRT version, the GPU name and compute
capability, the batch profile and the build options: a plan runs only on the TensorRT version and
GPU it was built with (runtime/backends/tensorrt.py refuses others).

Precision comes from the graph: TensorRT 11 builds strongly typed networks only. fp16 is built from
model.fp16.onnx and int8 from model.int8-trt.onnx (explicit Q/DQ, the only INT8 path TensorRT 10.1+
keeps), both strongly typed on TensorRT 10 as on 11, so the same graph gives the same precisions on
both; no FP16/INT8 builder flag, no calibrator. On TensorRT 10 `fp16_flag=True` offers the old weakly
typed path (fp32 graph + BuilderFlag.FP16, LayerNorm/softmax/reductions pinned to fp32) for comparison.

TensorRT is imported lazily, inside the functions, and everything a user can get wrong (folder,
precision, missing ONNX file, batch profile) is checked before, so the messages are the same on a
machine without it.

Status: never executed. Written against the TensorRT 10/11 Python API documentation; no machine this
project ran on had TensorRT (tests/runtime/test_trt.py and benchmarks/gpu_check.py skip it there).
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import step
from clipfuse.runtime.backends.tensorrt import gpu_identity, import_tensorrt
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.precisions import precision_onnx_path

from ..graph.engine_folder import update_engine_folder, write_file_atomic

PRECISIONS = ("fp32", "fp16", "int8")


def plan_name(precision: str) -> str:
    return f"model.{precision}.plan"


def layers_name(precision: str) -> str:
    return f"model.{precision}.layers.json"


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".", 1)[0])


def check_batch(batch) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(b) for b in batch)
    except (TypeError, ValueError):
        raise ClipfuseError(f"--batch must be MIN,OPT,MAX (three integers), got {batch!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ClipfuseError(f"--batch {lo},{opt},{hi}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def build_engine(engine_dir, precision: str = "fp32", batch=(1, 8, 32), aux_streams: int | None = None,
                 timing_cache=None, opt_level: int = 3, workspace: int | None = None,
                 fp16_flag: bool = False) -> dict:
    """Build model.<precision>.plan for an engine folder; returns the manifest's plans[precision] entry.

    batch: (min, opt, max) of the one optimisation profile, applied to every image_<R> input.
    aux_streams: the builder's max_aux_streams (None: TensorRT's default heuristic; 0: one stream).
    timing_cache: a file read before and written after the build, so rebuilds skip kernel timing.
    opt_level: builder optimisation level 0-5 (TensorRT's default 3). workspace: bytes, or None.
    """

    if precision not in PRECISIONS:
        raise ClipfuseError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    lo, opt, hi = check_batch(batch)
    if aux_streams is not None and aux_streams < 0:
        raise ClipfuseError(f"--aux-streams must be >= 0, got {aux_streams}")
    if not 0 <= opt_level <= 5:
        raise ClipfuseError(f"--opt-level must be 0-5, got {opt_level}")
    m = read_manifest(engine_dir)
    if fp16_flag and precision != "fp16":
        raise ClipfuseError(f"fp16_flag applies to --precision fp16, not {precision}")
    # int8: the QDQ graph made for TensorRT (S8 symmetric activations, zero point 0), model.int8-trt.onnx
    onnx_path = (precision_onnx_path(m, precision, target="tensorrt") if not (fp16_flag and precision == "fp16")
                 else m.onnx_path)
    trt = import_tensorrt()
    major = trt_major(trt)
    if fp16_flag and major >= 11:
        raise ClipfuseError(f"TensorRT {trt.__version__} has no FP16 builder flag (removed in 11): build "
                            "--precision fp16 from model.fp16.onnx (the default) instead")
    ident = gpu_identity()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = not fp16_flag
    st = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly and st is not None:      # required for strong typing on 10.x, accepted (always on) on 11.x
        flags |= 1 << int(st)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with step(f"TensorRT {trt.__version__}: parsing {onnx_path.name}"):
        # parse_from_file, not parse(bytes): it resolves external data (model.onnx.data) beside the file
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ClipfuseError(f"TensorRT {trt.__version__} cannot parse {str(onnx_path)!r}: {errors[:800]}")

    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.builder_optimization_level = int(opt_level)
    if aux_streams is not None:
        config.max_aux_streams = int(aux_streams)
    # layer names, tactics and formats in the inspector's output (costs nothing at run time)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        # TF32 is on by default for fp32 layers (10-bit mantissa, ~1e-3 relative): fp32 means fp32
        # here, as in the torch backend, so the plan agrees with ONNX Runtime within fp32 tolerances.
        config.clear_flag(tf32)
    if fp16_flag and precision == "fp16":
        _pin_fp32_layers(trt, network, config)
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for t in inputs:
        c, h, w = (int(d) for d in t.shape[1:])
        profile.set_shape(t.name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    with step(f"TensorRT: building {precision} plan, batch {lo},{opt},{hi}, aux streams "
              f"{'default' if aux_streams is None else aux_streams}, opt level {opt_level}"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ClipfuseError(f"TensorRT {trt.__version__} failed to build {str(onnx_path)!r} (see its log above); "
                            "try a smaller --batch MAX or a larger workspace")
    build_s = time.perf_counter() - t0
    plan = bytes(serialized)
    if cache_path is not None:
        write_file_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    layers = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    num_aux = int(getattr(engine, "num_aux_streams", 0))
    del inspector, engine, runtime

    entry = {
        "file": plan_name(precision), "layers": layers_name(precision), "onnx": onnx_path.name,
        "onnx_sha256": m.data["artefacts"][onnx_path.name]["sha256"],
        "tensorrt": trt.__version__, **ident,
        "typing": "strongly typed" if strongly else "weakly typed, BuilderFlag.FP16 + fp32 pinned layers",
        "batch": [lo, opt, hi], "aux_streams_requested": aux_streams, "aux_streams": num_aux,
        "opt_level": int(opt_level), "workspace": workspace, "tf32": bool(tf32 is not None and precision != "fp32"),
        "timing_cache": str(cache_path) if cache_path else None,
        "build_seconds": round(build_s, 1),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with update_engine_folder(m.folder, what=plan_name(precision)) as update:
        update.path(layers_name(precision)).write_bytes(layers.encode() if isinstance(layers, str) else bytes(layers))
        update.path(plan_name(precision)).write_bytes(plan)
        update.edit_manifest(lambda data: data.setdefault("plans", {}).__setitem__(precision, entry))
    return entry


def _pin_fp32_layers(trt, network, config) -> None:
    """TensorRT 10 weak typing: FP16 allowed everywhere except LayerNorm, softmax and reductions,
    pinned to fp32 and obeyed (the same islands model.fp16.onnx has as casts)."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
