"""Activation ranges for int8, calibrated tower by tower, once for every graph made from them.

    feeds = calibration_feeds(manifest, "my_photos/", count=256)
    ranges = calibrate_ranges(manifest.onnx_path, feeds, method="minmax", workdir=tmp)

Why tower by tower: `onnxruntime.quantization`'s calibrator runs an augmented copy of the whole graph
in one session, after loading and copying the model in Python, so its peak memory grows with the whole
graph (docs/decisions.md, "int8: calibrated tower by tower"). A tower's activations depend only on its
own image input, so each tower is cut out (the ancestors of its raw embedding), calibrated alone with
its own weights loaded, and the ranges are merged: the same ranges as the whole graph's, one tower in
memory at a time (tests/export/precision/test_int8_calibrate.py checks the QDQ graphs are identical).

Why once: the ranges do not depend on the activation type or symmetry, so both graphs of `export
--precision int8` (U8 for ONNX Runtime CPU, S8 for TensorRT) are quantized from one calibration,
through quantize_static's calibration cache (a JSON file of ranges).

`calibration_feeds(manifest, folder, count)` makes the calibration batches from an image folder
through the runtime's host preprocessing (the same bytes the engine sees).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
from pathlib import Path

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import step
from clipfuse.runtime.fit_images import cascade_calibration_digests, fit_image_digests
from clipfuse.runtime.images import preprocess_paths

from ..unlabelled import FIT, unlabelled_images
from .fp16 import ancestor_nodes, tower_outputs

QUANT_OPS = ("Conv", "MatMul", "Gemm")
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_COUNT = 256             # calibration images used at most (evenly spaced over the folder)
MIN_IMAGES = 32                 # fewer than this and the activation ranges are one photo's ranges
HIST_CHUNK = 8                  # entropy/percentile: images whose activations are held at once (then histogrammed)


# ----------------------------------------------------------------------------- calibration data

def calibration_feeds(manifest, folder, count: int = DEFAULT_COUNT, batch: int = 8,
                      min_images: int = MIN_IMAGES, what: str = "calibration folder",
                      leave_out_fit: bool = False, with_info: bool = False):
    """Calibration batches {input_name: uint8 (n, 3, R, R)} from the images in `folder`.

    Up to `count` images, evenly spaced over the folder's sorted list, read by export/unlabelled.py (the one
    reader of unlabelled folders: `fit --certify-on` uses it too) through runtime/images.py's loading and host
    preprocessing. Refuses, one line each: a missing, unreadable or empty folder; fewer than
    `min_images` readable images (naming a failure when some could not be read). `what` names the folder
    in those messages (the int8 cascade's --cascade-images reads its folder here too). leave_out_fit: leave
    out, with a warning, the images the engine was fitted on (runtime/fit_images.py), and second copies of the
    same bytes: the int8 cascade's thresholds certified on them would exit too early on new images. The
    cascade's own calibration images (the pool outside the shots: nothing was fitted on them) stay.
    with_info: -> (feeds, export/unlabelled.UnlabelledImages: how many images of each kind were found and used).
    """

    if count < min_images:
        raise ClipfuseError(f"--calibration-count {count} is below the minimum of {min_images} images; "
                            f"give at least {min_images}")
    # fit images: fit_images.json's digests (probes' and controller shots'; empty when none are recorded)
    leave_out = ({FIT: fit_image_digests(manifest) - cascade_calibration_digests(manifest)} if leave_out_fit
                 else None)
    feeds, info = unlabelled_images(folder, lambda paths: _feeds(manifest, paths, batch), leave_out=leave_out,
                                    what=what, count=count, min_images=min_images, tag="int8")
    return (feeds, info) if with_info else feeds


def _feeds(manifest, paths: list, batch: int):
    """embed for unlabelled_images: host-preprocessed uint8 batches, as the engine sees them."""
    ok, inputs, failures = preprocess_paths(paths, manifest.preprocess_specs(), batch_size=batch)
    n = len(ok)
    return [{name: arr[i:i + batch] for name, arr in inputs.items()} for i in range(0, n, batch)], n, failures


def feeds_sha256(feeds: list[dict[str, np.ndarray]]) -> str:
    """sha256 over the calibration tensors (names, shapes, bytes, in order): what was calibrated on."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{a.dtype}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def feeds_images(feeds: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(f.values()))) for f in feeds)


def _reader(feeds: list[dict[str, np.ndarray]], inputs=None):
    """A CalibrationDataReader over the feeds, restricted to `inputs` (a tower reads one image input)."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = [{k: v for k, v in f.items() if inputs is None or k in inputs} for f in feeds]

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

        def __len__(self):
            return len(feeds)

    return FeedReader()


@contextlib.contextmanager
def muted_root_logger():
    """quantize_static warns on the root logger to run quant_pre_process (not used: see export/precision/int8.py)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------------------- towers

def tower_nodes(graph, output) -> list:
    """The nodes `output` (a tensor name, or several) depends on, in graph order (the tower, and the input
    scaling it shares)."""

    seen = ancestor_nodes(graph, [output] if isinstance(output, str) else list(output))
    return [n for n in graph.node if n.name in seen]


def tower_model(model, output: str, base_dir: Path):
    """A standalone ModelProto of the tower computing `output`, its weights loaded into memory (only
    this tower's: the rest of a model loaded with load_external_data=False stays on disk)."""
    return subgraph_model(model, {output: output}, base_dir, name="tower")


def subgraph_model(model, outputs: dict, base_dir: Path, name: str = "stage"):
    """A standalone ModelProto computing `outputs` ({tensor: output name}; a new name is given through an
    Identity) from the graph inputs they depend on: their ancestor nodes and only those nodes' weights,
    loaded into memory (the rest of a model loaded with load_external_data=False stays on disk)."""
    import onnx
    from onnx import external_data_helper, helper

    g = model.graph
    nodes = tower_nodes(g, list(outputs))
    used = {t for n in nodes for t in n.input}
    inits = []
    for t in g.initializer:
        if t.name in used:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            if external_data_helper.uses_external_data(c):
                external_data_helper.load_external_data_for_tensor(c, str(base_dir))
                c.data_location = onnx.TensorProto.DEFAULT
                del c.external_data[:]
            inits.append(c)
    inputs = [i for i in g.input if i.name in used]
    vi = [v for v in g.value_info if v.name in used and v.name not in outputs]
    known = {v.name: v for v in list(g.value_info) + list(g.output)}
    outs = []
    for tensor, out_name in outputs.items():
        if out_name != tensor:
            nodes.append(helper.make_node("Identity", [tensor], [out_name], name=f"{name}_output_{out_name}"))
            if tensor in known:
                vi.append(known[tensor])
        elif tensor in known:
            outs.append(known[tensor])
            continue
        outs.append(helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    sub = helper.make_model(helper.make_graph(nodes, name, inputs, outs, initializer=inits, value_info=vi),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


# ----------------------------------------------------------------------------- calibration

def calibrate_ranges(src_onnx: Path, feeds: list[dict[str, np.ndarray]], method: str = "minmax",
                     percentile: float = 99.999, workdir: Path | None = None):
    """Activation ranges (onnxruntime.quantization TensorsData) of every Conv/MatMul/Gemm input and
    output in the towers of the fp32 graph at src_onnx, calibrated tower by tower on `feeds`.
    workdir: where each tower's temporary model goes (removed after)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator

    if method not in METHODS:
        raise ClipfuseError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    if not feeds:
        raise ClipfuseError("no calibration images were given; give a folder of your own images")
    src_onnx = Path(src_onnx)
    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    extra = {"percentile": percentile} if method == "percentile" else {}
    model = onnx.load(str(src_onnx), load_external_data=False)
    outputs = tower_outputs(model.graph)
    merged: dict = {}
    # One image per run: what a tower's session holds at once is one image's activations, not a batch's
    # (RN50, seen here: batch 8 peaked at 2.4 GB, batch 1 at 1.1 GB). The ranges are the same: MinMax is a
    # min/max over images, and the histogram methods merge their per-run histograms.
    singles = [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
    workdir = Path(workdir) if workdir is not None else src_onnx.parent
    for k, output in enumerate(outputs):
        tmp = workdir / f".calib-tower-{k}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            sub = tower_model(model, output, src_onnx.parent)
            path = tmp / "tower.onnx"
            onnx.save_model(sub, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="tower.onnx.data", size_threshold=1024)
            inputs = {i.name for i in sub.graph.input}
            del sub
            with muted_root_logger(), step(f"calibrating tower {k + 1}/{len(outputs)} ({method}, "
                                           f"{feeds_images(feeds)} images)", tag="int8"):
                cal = create_calibrator(path, list(QUANT_OPS), augmented_model_path=str(tmp / "augmented.onnx"),
                                        calibrate_method=cal_method, use_external_data_format=True,
                                        extra_options=extra)
                # MinMax reduces each run to two numbers in the graph; the histogram methods keep every run's
                # whole activations until collect_data returns (RN50 + RN101 on 256 images passed 24 GiB, killed):
                # HIST_CHUNK images per call, merged into one histogram per tensor by onnxruntime's collector
                step_n = len(singles) if method == "minmax" else HIST_CHUNK
                with contextlib.redirect_stdout(io.StringIO()):  # the collector prints a line per call
                    for i in range(0, len(singles), step_n):
                        cal.collect_data(_reader(singles[i:i + step_n], inputs))
                    ranges = cal.compute_data()
                del cal
            for name, td in ranges.data.items():
                # a tensor two towers share (the input scaling) has one value: the same images made it
                merged.setdefault(name, td)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return TensorsData(cal_method, merged)


def save_ranges(ranges, path: Path) -> Path:
    """The ranges as quantize_static's calibration cache (JSON), so each graph is quantized from them."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, Path(path))
    return Path(path)
