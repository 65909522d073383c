"""Write an engine folder out as a Triton Inference Server model repository.

    write_repository("engines/pets", "repo")            # onnxruntime_onnx, CPU instances
    write_repository("engines/pets", "repo", backend="tensorrt", kind="gpu")
gives
    repo/<model>/config.pbtxt
    repo/<model>/1/model.onnx            the fused graph (a hard link or copy; never the engine's own file)
    repo/<model>/1/model.onnx/           ... a DIRECTORY holding model.onnx + its data file when the graph
                                         has external data (past 2 GB): Triton's ONNX Runtime backend
                                         loads the directory so the data file resolves beside the graph
    repo/<model>/1/model.plan            (tensorrt) the engine's model.<precision>.plan from `clipfuse build`
                                         (onnxruntime with precision fp16/int8: model.fp16.onnx or
                                         model.int8.onnx, served under the name model.onnx)

The config declares the uint8 `image_<R>` inputs and the five named outputs (dims without the batch),
dynamic batching and an instance group, and a model-config parameter `clipfuse`: a small JSON with what
a client needs to preprocess images on its side (runtime/serving/client.py; docs/triton.md says why
preprocessing is not a Python-backend step of an ensemble).

Every config is parsed against Triton's own ModelConfig protobuf
(`tritonclient.grpc.model_config_pb2`) and checked for what the schema cannot
say (preferred sizes within max_batch_size, ...) before anything is written; a
config that fails is a ClipfuseError, and nothing is left behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError

from ..cascade import check_cascade_precision, is_cascade, model_py
from ..manifest import MANIFEST, Manifest, read_manifest
from ..precisions import with_precision

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
PYTHON = "python"     # a cascade engine's model: Triton's Python backend running clipfuse's router (model.py)
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
TRITON_DTYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
SERVER_ID_PREFIX = "clipfuse:"     # `clipfuse serve` sets its server id to clipfuse:<model>; clients read it
METADATA_KEY = "clipfuse"           # the model-config parameter the client reads
METADATA_FORMAT = "clipfuse-serving"
INSTALL_SERVE = "pip install 'clipfuse[serve]'"
DEFAULT_MAX_BATCH = 8
# How long a request may wait for others to form a batch: noise next to the ~100 ms per image of the
# fused pair on 2 cores, long enough for concurrent requests to meet (benchmarks/serve_bench.py).
DEFAULT_QUEUE_DELAY_US = 2000


def _model_name_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name))


def default_model_name(manifest: Manifest) -> str:
    """The engine folder's name, made a valid Triton model name (letters, digits, . _ -)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", manifest.folder.name).strip("._-")
    return name or "clipfuse"


def preferred_sizes(max_batch: int) -> list[int]:
    """Powers of two from 2 up to max_batch (and max_batch itself): batch shapes the backend is fast at."""
    sizes, p = [], 2
    while p < max_batch:
        sizes.append(p)
        p *= 2
    return sizes + [max_batch] if max_batch > 1 else []


def serving_metadata(manifest: Manifest) -> dict:
    """What a client needs to send images: inputs with open_clip's transform, classes, backbones."""
    return {
        "format": METADATA_FORMAT,
        "version": 1,
        "engine": manifest.data.get("name") or manifest.folder.name,
        "classes": manifest.classes,
        "backbones": manifest.backbone_names,
        "inputs": [{"name": i["name"], **i["preprocess"]} for i in manifest.inputs],
        "outputs": [o["name"] for o in manifest.outputs],
    }


def cascade_outputs(manifest: Manifest) -> list[dict]:
    """A served cascade's outputs: the five, NaN where an image's stage did not reach, + stage (N, 1) int64."""
    return list(manifest.outputs) + [{"name": iospec.STAGE, "dtype": "int64", "shape": ["batch", 1]}]


def cascade_metadata(manifest: Manifest) -> dict:
    """serving_metadata for a served cascade: its outputs include `stage`."""
    return dict(serving_metadata(manifest), outputs=[o["name"] for o in cascade_outputs(manifest)], cascade=True)


# ----------------------------------------------------------------------------- config text

@dataclass
class TritonModelSpec:
    """Everything config.pbtxt says, as data (one object per model)."""

    name: str
    platform: str                       # onnxruntime_onnx | tensorrt_plan
    inputs: list[tuple[str, str, list[int]]]    # (name, numpy dtype, dims without batch)
    outputs: list[tuple[str, str, list[int]]]
    max_batch: int = DEFAULT_MAX_BATCH
    preferred: list[int] = field(default_factory=list)
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = 1
    kind: str = "cpu"
    metadata: dict | None = None


def _quote(s: str) -> str:
    """A protobuf text-format string literal (C escapes, as text_format writes them)."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(s, as_utf8=True) + '"'


def _dims(shape) -> list[int]:
    return [int(d) for d in shape[1:]]      # the batch axis is Triton's (max_batch_size > 0)


def model_spec(manifest: Manifest, backend: str = "onnxruntime", max_batch: int = DEFAULT_MAX_BATCH,
               instances: int = 1, kind: str | None = None, preferred=None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
               name: str | None = None, cascade: bool = False) -> TritonModelSpec:
    """The Triton model for an engine, arguments checked (each error names the option to change); a cascade
    engine's routed stage graphs (outputs + stage) are served by the Python backend."""
    if cascade and backend != "onnxruntime":
        raise ClipfuseError(f"the cascade runs its stage graphs on ONNX Runtime; --backend {backend} serves only the "
                            "full graph: pass --no-cascade")
    if backend not in PLATFORMS:
        raise ClipfuseError(f"unknown Triton backend {backend!r}; valid: {', '.join(PLATFORMS)}")
    kind = kind or ("gpu" if backend == "tensorrt" else "cpu")
    if kind not in KINDS:
        raise ClipfuseError(f"unknown instance kind {kind!r}; valid: {', '.join(KINDS)}")
    if backend == "tensorrt" and kind != "gpu":
        raise ClipfuseError("a TensorRT plan runs only on a GPU: use --kind gpu (or --backend onnxruntime for CPU)")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ClipfuseError(f"--max-batch must be a positive integer, got {max_batch!r}")
    if not isinstance(instances, int) or instances < 1:
        raise ClipfuseError(f"--instances must be a positive integer, got {instances!r}")
    if not isinstance(queue_delay_us, int) or queue_delay_us < 0:
        raise ClipfuseError(f"--queue-delay-us must be 0 or more microseconds, got {queue_delay_us!r}")
    preferred = preferred_sizes(max_batch) if preferred is None else sorted(set(int(p) for p in preferred))
    bad = [p for p in preferred if not 1 <= p <= max_batch]
    if bad:
        raise ClipfuseError(f"preferred batch sizes {bad} are outside 1..max_batch ({max_batch}); "
                            "lower them or raise --max-batch")
    name = name or default_model_name(manifest)
    if not _model_name_ok(name):
        raise ClipfuseError(f"model name {name!r} is not valid for Triton: use letters, digits, '.', '_' and '-'")

    def tensors(specs):
        out = []
        for s in specs:
            if s["dtype"] not in TRITON_DTYPES:
                raise ClipfuseError(f"engine tensor {s['name']!r} has dtype {s['dtype']}, which this writer does not "
                                    f"map to Triton; re-export the engine with this clipfuse")
            out.append((s["name"], s["dtype"], _dims(s["shape"])))
        return out

    return TritonModelSpec(name=name, platform=PYTHON if cascade else PLATFORMS[backend],
                           inputs=tensors(manifest.inputs),
                           outputs=tensors(cascade_outputs(manifest) if cascade else manifest.outputs),
                           max_batch=max_batch, preferred=preferred,
                           queue_delay_us=queue_delay_us, instances=instances, kind=kind,
                           metadata=cascade_metadata(manifest) if cascade else serving_metadata(manifest))


def config_text(spec: TritonModelSpec) -> str:
    """config.pbtxt for one model, written by hand so it reads well (then checked by check_config)."""
    lines = [f"name: {_quote(spec.name)}",
             f"backend: {_quote(PYTHON)}" if spec.platform == PYTHON else f"platform: {_quote(spec.platform)}",
             f"max_batch_size: {spec.max_batch}"]

    def tensor_block(key, items):
        for name, dtype, dims in items:
            lines.append(f"{key} {{")
            lines.append(f"  name: {_quote(name)}")
            lines.append(f"  data_type: {TRITON_DTYPES[dtype]}")
            lines.append(f"  dims: [ {', '.join(str(d) for d in dims)} ]")
            lines.append("}")

    tensor_block("input", spec.inputs)
    tensor_block("output", spec.outputs)
    lines.append("dynamic_batching {")
    for p in spec.preferred:
        lines.append(f"  preferred_batch_size: {p}")
    lines.append(f"  max_queue_delay_microseconds: {spec.queue_delay_us}")
    lines.append("}")
    lines.append("instance_group {")
    lines.append(f"  count: {spec.instances}")
    lines.append(f"  kind: {KINDS[spec.kind]}")
    lines.append("}")
    if spec.metadata is not None:
        lines.append("parameters {")
        lines.append(f"  key: {_quote(METADATA_KEY)}")
        lines.append(f"  value {{ string_value: {_quote(json.dumps(spec.metadata, separators=(',', ':')))} }}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ClipfuseError(f"checking a Triton config needs Triton's ModelConfig schema from tritonclient[grpc] "
                            f"({e}): {INSTALL_SERVE}") from None
    return model_config_pb2


def check_config(text: str, spec: TritonModelSpec | None = None, where: str = "config.pbtxt"):
    """Parse `text` against Triton's ModelConfig protobuf -> the message; ClipfuseError if it does not parse
    or (given its spec) does not say what the spec says."""
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    msg = pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise ClipfuseError(f"{where} does not parse as Triton's ModelConfig: {e}") from None
    if msg.max_batch_size < 0:
        raise ClipfuseError(f"{where}: max_batch_size must not be negative")
    if msg.HasField("dynamic_batching"):
        over = [p for p in msg.dynamic_batching.preferred_batch_size if p > msg.max_batch_size]
        if over:
            raise ClipfuseError(f"{where}: preferred_batch_size {over} above max_batch_size {msg.max_batch_size}; "
                                "Triton refuses to load such a model")
    for group in msg.instance_group:
        if group.count < 1:
            raise ClipfuseError(f"{where}: instance_group count must be at least 1")
    if spec is not None:
        got_in = [(t.name, list(t.dims)) for t in msg.input]
        got_out = [(t.name, list(t.dims)) for t in msg.output]
        if got_in != [(n, d) for n, _, d in spec.inputs] or got_out != [(n, d) for n, _, d in spec.outputs]:
            raise ClipfuseError(f"{where}: the parsed inputs/outputs differ from the engine's (a clipfuse bug)")
        if spec.metadata is not None and json.loads(msg.parameters[METADATA_KEY].string_value) != spec.metadata:
            raise ClipfuseError(f"{where}: the clipfuse parameter did not survive parsing (a clipfuse bug)")
    return msg


def read_metadata_parameter(parameters: dict, where: str) -> dict:
    """The clipfuse JSON from a model config's parameters (as tritonclient returns them: a dict)."""
    entry = (parameters or {}).get(METADATA_KEY)
    value = entry.get("string_value") if isinstance(entry, dict) else None
    if not value:
        raise ClipfuseError(f"{where} has no {METADATA_KEY!r} parameter: it was not written by `clipfuse triton` "
                            "or `clipfuse serve`; serve the engine with clipfuse, or predict with a local engine folder")
    try:
        meta = json.loads(value)
    except json.JSONDecodeError as e:
        raise ClipfuseError(f"{where}: the {METADATA_KEY!r} parameter is not JSON ({e})") from None
    if meta.get("format") != METADATA_FORMAT or meta.get("version") != 1:
        raise ClipfuseError(f"{where}: the {METADATA_KEY!r} parameter is of another format or version "
                            f"({meta.get('format')} v{meta.get('version')}); use a matching clipfuse")
    return meta


# ----------------------------------------------------------------------------- the repository

def find_plan(manifest: Manifest, precision: str | None = None) -> Path:
    """The engine's TensorRT plan `model.<precision>.plan` (written by `clipfuse build`)."""
    plans = sorted(manifest.folder.glob("model.*.plan"))
    if precision is not None:
        plans = [p for p in plans if p.name == f"model.{precision}.plan"]
    if not plans:
        want = f"model.{precision}.plan" if precision else "model.<precision>.plan"
        raise ClipfuseError(f"engine {str(manifest.folder)!r} has no TensorRT plan ({want}); build one first on a "
                            f"machine with the target GPU: `clipfuse build {manifest.folder}`"
                            f"{' --precision ' + precision if precision else ''}, or use --backend onnxruntime")
    if len(plans) > 1:
        raise ClipfuseError(f"engine {str(manifest.folder)!r} has several plans ({', '.join(p.name for p in plans)}); "
                            "choose one with --precision")
    return plans[0]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no space; the repository never writes to it), or across file systems a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_repository(engine, out, backend: str = "onnxruntime", max_batch: int = DEFAULT_MAX_BATCH,
                     instances: int = 1, kind: str | None = None, preferred=None,
                     queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, model_name: str | None = None,
                     precision: str | None = None, force: bool = False, verify: bool = True,
                     cascade: bool | None = None) -> Path:
    """Write OUT/<model>/{config.pbtxt, 1/model.onnx|model.plan} for an engine folder -> OUT/<model>.

    A cascade engine (unless cascade=False) becomes a Python-backend model instead: 1/model.py runs
    clipfuse's router (runtime/cascade.py) on a copy of the engine in 1/engine/ (hard links), so each
    image pays for the stages it reaches; the Triton server's Python needs clipfuse installed. Per-stage
    ONNX models chained by an ensemble cannot route per image (an ensemble's steps run for every
    request), and BLS would re-implement the router in model.py: the router itself is the honest form.

    The config is checked against Triton's schema before anything is written; the model folder is
    assembled under a temporary name and renamed into place, so a failure leaves OUT as it was."""
    manifest = engine if isinstance(engine, Manifest) else read_manifest(engine, verify=verify)

    if cascade and not is_cascade(manifest):
        raise ClipfuseError(f"engine {str(manifest.folder)!r} has no cascade stages; make one with `clipfuse fit "
                            "... --cascade`, or drop --cascade")
    if cascade is None:     # a cascade engine is served routed unless the caller asks for a plan or the full graph
        cascade = is_cascade(manifest) and backend == "onnxruntime"
    if cascade:             # int8 stages when certified; fp16 has none: one line, never fp32 stages served as fp16
        check_cascade_precision(manifest, True, precision)
    spec = model_spec(manifest, backend=backend, max_batch=max_batch, instances=instances, kind=kind,
                      preferred=preferred, queue_delay_us=queue_delay_us, name=model_name, cascade=cascade)
    text = config_text(spec)
    check_config(text, spec, where=f"the config of model {spec.name!r}")
    plan = find_plan(manifest, precision) if backend == "tensorrt" else None
    graph = manifest
    if backend == "onnxruntime" and precision not in (None, "fp32"):

        graph = with_precision(manifest, precision)     # model.fp16.onnx / model.int8.onnx, checked; served as model.onnx
    if plan is not None:    # the plan's one optimisation profile bounds the batch Triton may form
        entry = (manifest.data.get("plans") or {}).get(plan.name[len("model."):-len(".plan")], {})
        hi = (entry.get("batch") or [None, None, None])[-1]
        if hi is not None and spec.max_batch > int(hi):
            raise ClipfuseError(f"--max-batch {spec.max_batch} is above the plan's profile maximum {hi} "
                                f"({plan.name}); lower --max-batch or rebuild with `clipfuse build` for a larger batch")

    out = Path(out).expanduser()
    target = out / spec.name
    check_model_target(target, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipfuseError(f"cannot create the repository folder {str(out)!r} ({e.strerror})") from None
    if out.resolve() == manifest.folder.resolve() or manifest.folder.resolve() in out.resolve().parents:
        raise ClipfuseError(f"--out {str(out)!r} is inside the engine folder; write the repository elsewhere")
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out))
    try:
        version = tmp / "1"
        version.mkdir()
        if cascade:

            for name in [MANIFEST, *manifest.data["artefacts"]]:
                (version / "engine" / name).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(manifest.folder / name, version / "engine" / name)
            (version / "model.py").write_text(model_py(precision), encoding="utf-8")
        elif plan is not None:
            _link_or_copy(plan, version / "model.plan")
        else:
            onnx_file = graph.onnx_path
            data = graph.data["onnx"].get("external_data")
            if data:            # Triton wants model.onnx as a directory holding the graph and its data
                folder = version / "model.onnx"
                folder.mkdir()
                _link_or_copy(onnx_file, folder / "model.onnx")
                for name in [data] if isinstance(data, str) else list(data):
                    _link_or_copy(manifest.folder / name, folder / Path(name).name)
            else:
                _link_or_copy(onnx_file, version / "model.onnx")
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        check_model_target(target, force)       # again: it may have changed during the copy
        old = None
        if target.exists():     # swap, then drop the old one: a failure between leaves the old model in place
            old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=out)) / spec.name
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_model_folder(folder: Path) -> bool:
    """Written by write_repository: config.pbtxt with clipfuse's metadata parameter, and version folders."""
    try:
        names = [p.name for p in folder.iterdir()]
        text = (folder / "config.pbtxt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return (all(n == "config.pbtxt" or n.isdigit() for n in names) and f'key: "{METADATA_KEY}"' in text
            and METADATA_FORMAT in text)


def check_model_target(target: Path, force: bool) -> None:
    """Refuse a file or symlink, a folder without --force, and (even with --force) one clipfuse did not write."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ClipfuseError(f"{str(target)!r} is {'a symbolic link' if target.is_symlink() else 'a file'}, not a "
                            "model folder; remove it, or choose another --model or --out")
    if not target.exists():
        return
    if not force:
        raise ClipfuseError(f"{str(target)!r} already exists; pass --force to replace it, or choose another --out")
    if any(target.iterdir()) and not is_model_folder(target):
        raise ClipfuseError(f"{str(target)!r} is not a model folder clipfuse wrote (it holds "
                            f"{min(p.name for p in target.iterdir())!r}): --force "
                            "replaces only a clipfuse model folder or an empty one; choose another --model or --out")
