"""The openvino backend: registered through the entry points, the runtime's checks, and the same
answers as onnxruntime by the one comparator, fp32 and int8."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError

pytest.importorskip("openvino", reason="the openvino backend needs `pip install 'clipfuse[openvino]'` (in dev)")


@pytest.fixture(scope="module")
def int8_engine(tiny_vit_engine, tmp_path_factory):
    """A copy of the tiny engine with model.int8.onnx (CPU target only: what OpenVINO runs); without its
    collapsed ResNet tower, whose int8 graph the validation refuses (see tiny_vit_engine)."""
    from clipfuse.export.precision.int8_export import export_int8
    from clipfuse.runtime.compare import photo_variants

    calib = tmp_path_factory.mktemp("ovcal")
    for i, im in enumerate(photo_variants()):
        im.save(calib / f"p{i:02d}.png")
    folder = tmp_path_factory.mktemp("ov") / "tiny"
    shutil.copytree(tiny_vit_engine, folder)
    export_int8(folder, calib, count=32, targets=("cpu",))
    return folder


def _run(backend, feeds):
    outs = [backend.infer(f) for f in feeds]
    return {k: np.concatenate([o[k] for o in outs]) for k in iospec.OUTPUT_NAMES}


def _feeds(m):
    from clipfuse.export.precision.validate import batched_feeds
    from clipfuse.runtime.compare import photo_variants

    return batched_feeds(m, photo_variants(), 8)


def test_registered_and_available():
    from clipfuse.runtime.backends.openvino import OpenVINOBackend
    from clipfuse.runtime.backends.registry import available_backends, backend_class, registered_backends

    assert registered_backends()["openvino"].value == "clipfuse.runtime.backends.openvino:OpenVINOBackend"
    assert backend_class("openvino") is OpenVINOBackend
    assert "openvino" in available_backends()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_agrees_with_onnxruntime(int8_engine, precision):
    """Same graph, same images: within the precision's tolerance (fp32: 1e-4 relative, cosine 0.99999, no changed
    answer), against ONNX Runtime running that graph and against fp32."""
    from clipfuse.runtime import agreement
    from clipfuse.runtime.backends.registry import open_backend
    from clipfuse.runtime.compare import backbone_slices, head_row_norms
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(int8_engine)
    feeds = _feeds(m)
    with open_backend(m, "openvino", precision=precision) as ov, open_backend(m, "onnxruntime", precision=precision) as ort:
        assert ov.manifest.onnx_path.name == ("model.onnx" if precision == "fp32" else "model.int8.onnx")
        assert "openvino" in ov.describe() and ov.manifest.onnx_path.name in ov.describe()
        got, ref = _run(ov, feeds), _run(ort, feeds)
    assert list(got) == list(iospec.OUTPUT_NAMES)
    assert all(got[k].shape == ref[k].shape and got[k].dtype == np.float32 for k in got)
    norms = head_row_norms(m.folder, len(m.backbones))
    r = agreement.compare_outputs(ref, got, backbone_slices(m.backbones), iospec.tolerance(precision), norms)
    assert r["ok"], r["failures"]
    if precision == "int8":       # and the int8 graph on OpenVINO still is the fp32 engine (the export's bounds)
        with open_backend(m, "onnxruntime") as fp32:
            base = _run(fp32, feeds)
        r = agreement.compare_outputs(base, got, backbone_slices(m.backbones), iospec.tolerance("int8"), norms,
                                       heads_exact=True)
        assert r["ok"], r["failures"]


def test_results_are_copied_out_of_the_request(tiny_engine):
    """The request's buffers are reused by the next call: an earlier result must not change."""
    from clipfuse.bench.configs import make_feed
    from clipfuse.runtime.backends.registry import open_backend
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(tiny_engine)
    with open_backend(m, "openvino", threads=1) as b:
        first = b.infer(make_feed(m, 2, seed=0))
        kept = {k: v.copy() for k, v in first.items()}
        b.infer(make_feed(m, 2, seed=1))
    assert all(np.array_equal(first[k], kept[k]) for k in kept)


def test_runtime_checks(tiny_engine, tmp_path):
    from clipfuse.runtime.backends.registry import open_backend
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(tiny_engine)
    with open_backend(m, "openvino") as b:
        with pytest.raises(ClipfuseError, match="feed has inputs"):
            b.infer({"image_32": np.zeros((1, 3, 32, 32), np.uint8)})
    data = json.loads(json.dumps(m.data))
    data["outputs"][0], data["outputs"][1] = data["outputs"][1], data["outputs"][0]     # swapped order
    with pytest.raises(ClipfuseError, match="differ from the graph's"):
        open_backend(type(m)(m.folder, data), "openvino")
    data = json.loads(json.dumps(m.data))
    data["inputs"][0]["shape"][2] = 99
    with pytest.raises(ClipfuseError, match="along axis 2 but the manifest says 99"):
        open_backend(type(m)(m.folder, data), "openvino")
    with pytest.raises(ClipfuseError, match=r"threads 0 is outside 1\.\."):
        open_backend(m, "openvino", threads=0)


def test_bench_opens_a_configuration_per_backend_and_precision(int8_engine):
    from clipfuse.bench.configs import config_label, make_feed, open_config, precision_configs
    from clipfuse.runtime.manifest import read_manifest

    assert precision_configs(["int8", "fp32"], openvino=True) == ["fused-int8", "openvino", "openvino-int8"]
    assert config_label("openvino-int8") == "fused int8 (OpenVINO)"
    m = read_manifest(int8_engine)
    b = open_config(m, "openvino-int8", threads=1)
    try:
        assert b.name == "openvino" and b.manifest.onnx_path.name == "model.int8.onnx"
        assert b.infer(make_feed(m, 1))[iospec.LOGITS].shape == (1, len(m.classes))
    finally:
        b.close()
    with pytest.raises(ClipfuseError, match=r"has no model\.fp16\.onnx"):
        open_config(m, "openvino-fp16")


def test_auto_picks_openvino_for_int8_only(int8_engine, monkeypatch, capsys):
    """Measured on a quiet machine OpenVINO's int8 beat ONNX Runtime's (0.98x / 0.87x / 0.74x at batch 1 / 8 / 32)
    while fp32 tied: auto tries openvino first for int8, onnxruntime for fp32, and onnxruntime for int8 when
    openvino is not installed."""
    from clipfuse.runtime.backends import registry as bk
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(int8_engine)
    assert bk.auto_candidates(m, "int8") == ["torch-cuda", "openvino", "onnxruntime", "torch"]
    with bk.open_backend(m, "auto", precision="int8") as b:
        assert b.name == "openvino" and b.manifest.onnx_path.name == "model.int8.onnx"
    assert "backend auto -> openvino" in capsys.readouterr().err
    with bk.open_backend(m, "auto") as b:
        assert b.name == "onnxruntime"
    real = bk.unavailable_reason
    monkeypatch.setattr(bk, "unavailable_reason",
                        lambda name: "openvino is not installed" if name == "openvino" else real(name))
    with bk.open_backend(m, "auto", precision="int8") as b:
        assert b.name == "onnxruntime" and b.manifest.onnx_path.name == "model.int8.onnx"
