"""TensorRT: clear messages where it is absent; build, run and compare a tiny plan where it exists.

The tests marked `tensorrt` need the tensorrt package and a CUDA GPU and skip with the reason
elsewhere; they build real plans of the tiny engine and compare them with ONNX Runtime.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from click.testing import CliRunner

from clipfuse.core.errors import ClipfuseError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _skip_reason():
    if not HAVE_TRT:
        return "tensorrt is not installed (pip install 'clipfuse[tensorrt]' on a GPU machine)"
    if not _cuda():
        return "no CUDA GPU visible to torch"
    return None


needs_trt = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _cli(*args):
    from clipfuse.cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


# ----------------------------------------------------------------------------- everywhere

@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: the missing-TensorRT message cannot show")
def test_build_without_tensorrt_says_what_to_install(tiny_engine):
    r = _cli("build", tiny_engine)
    assert r.exit_code == 1
    assert "TensorRT is not installed: pip install 'clipfuse[tensorrt]'" in r.output
    assert not list(tiny_engine.glob("*.plan"))


def test_build_fp16_without_fp16_graph_names_the_command(tiny_engine):
    # checked before TensorRT is imported: the same message with or without it
    r = _cli("build", tiny_engine, "--precision", "fp16")
    assert r.exit_code == 1
    assert f"clipfuse export {tiny_engine} --precision fp16" in r.output


@pytest.mark.parametrize("batch, msg", [("1,8", "three integers"), ("8,4,32", "MIN <= OPT <= MAX"),
                                        ("0,1,2", "MIN <= OPT <= MAX")])
def test_build_checks_the_batch_profile(tiny_engine, batch, msg):
    r = _cli("build", tiny_engine, "--batch", batch)
    assert r.exit_code == 1 and msg in r.output


def test_plan_from_another_tensorrt_or_gpu_is_refused(tiny_engine):
    from clipfuse.runtime.backends.tensorrt import check_plan_matches
    from clipfuse.runtime.manifest import read_manifest

    m = read_manifest(tiny_engine)
    entry = {"file": "model.fp32.plan", "tensorrt": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    check_plan_matches(entry, "10.13.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, m, "fp32")
    with pytest.raises(ClipfuseError, match=r"TensorRT 10\.13\.0, this is TensorRT 11\.1\.0.*clipfuse build .* --precision fp32"):
        check_plan_matches(entry, "11.1.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, m, "fp32")
    with pytest.raises(ClipfuseError, match=r"built on NVIDIA H100.*this is NVIDIA L4.*rebuild it here"):
        check_plan_matches(entry, "10.13.0", {"gpu": "NVIDIA L4", "compute_capability": "8.9"}, m, "fp32")


def test_tensorrt_backend_without_plan_names_the_build_command(tiny_engine):
    from clipfuse.runtime.backends.tensorrt import TensorRTBackend
    from clipfuse.runtime.manifest import read_manifest

    with pytest.raises(ClipfuseError, match=r"no fp16 TensorRT plan: build it with `clipfuse build .* --precision fp16`"):
        TensorRTBackend(read_manifest(tiny_engine), precision="fp16").open()


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_tensorrt_backend_unavailable_reason():
    from clipfuse.runtime.backends.registry import available_backends, unavailable_reason

    assert "pip install 'clipfuse[tensorrt]'" in unavailable_reason("tensorrt")
    assert "tensorrt" not in available_backends()


# ----------------------------------------------------------------------------- where TensorRT runs

@pytest.fixture(scope="module")
def trt_engine(tiny_engine, tmp_path_factory):
    if _skip_reason():
        pytest.skip(_skip_reason())
    from clipfuse.export.precision.fp16 import export_fp16

    folder = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny_engine, folder)
    export_fp16(folder)
    return folder


@pytest.mark.tensorrt
@needs_trt
def test_build_fp32_plan_runs_and_agrees_with_onnxruntime(trt_engine, tmp_path):
    import tensorrt

    from clipfuse.export.precision.trt_plan import build_engine
    from clipfuse.runtime.compare import compare_backends
    from clipfuse.runtime.manifest import read_manifest

    cache = tmp_path / "timing.cache"
    entry = build_engine(trt_engine, "fp32", batch=(1, 4, 8), aux_streams=2, timing_cache=cache)
    assert entry["tensorrt"] == tensorrt.__version__ and entry["gpu"] and entry["compute_capability"]
    assert cache.stat().st_size > 0                                         # the timing cache was written
    layers = json.loads((trt_engine / entry["layers"]).read_text())          # the inspector's JSON
    assert layers
    m = read_manifest(trt_engine)                                            # plan hashed into the manifest
    assert m.data["plans"]["fp32"]["file"] == "model.fp32.plan" and "model.fp32.plan" in m.data["artefacts"]
    report = compare_backends(trt_engine, "onnxruntime,tensorrt", batch=8)
    assert report["ok"], report
    # a rebuild reuses the timing cache
    build_engine(trt_engine, "fp32", batch=(1, 4, 8), aux_streams=0, timing_cache=cache)


@pytest.mark.tensorrt
@needs_trt
def test_build_fp16_plan_strongly_typed_agrees(trt_engine):
    from clipfuse.export.precision.trt_plan import build_engine
    from clipfuse.runtime.compare import compare_backends

    entry = build_engine(trt_engine, "fp16", batch=(1, 4, 8))
    assert entry["onnx"] == "model.fp16.onnx" and entry["typing"] == "strongly typed"
    report = compare_backends(trt_engine, "torch,tensorrt-fp16,onnxruntime-fp16", batch=8)
    assert report["ok"], report


@pytest.mark.tensorrt
@needs_trt
def test_plan_with_other_recorded_version_is_refused(trt_engine):
    from clipfuse.export.graph.engine_folder import write_manifest_atomic
    from clipfuse.export.precision.trt_plan import build_engine
    from clipfuse.runtime.backends.registry import open_backend

    if "fp32" not in json.loads((trt_engine / "manifest.json").read_text()).get("plans", {}):
        build_engine(trt_engine, "fp32", batch=(1, 2, 4))
    data = json.loads((trt_engine / "manifest.json").read_text())
    real = data["plans"]["fp32"]["tensorrt"]
    data["plans"]["fp32"]["tensorrt"] = "9.0.0"
    write_manifest_atomic(trt_engine, data)
    try:
        with pytest.raises(ClipfuseError, match="rebuild it with"):
            open_backend(trt_engine, "tensorrt")
    finally:
        data["plans"]["fp32"]["tensorrt"] = real
        write_manifest_atomic(trt_engine, data)
