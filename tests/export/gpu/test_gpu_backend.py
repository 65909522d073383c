"""The torch-cuda backend: its forward on CPU (the same code path, eager), bad options through the CLI, and on a
CUDA GPU (skipped without one) the claims the GPU path makes: concurrent == serial, padded == unpadded, fp16
within the fp16 bounds of ONNX Runtime fp32."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.gpu import plan
from clipfuse.export.gpu.backend import TorchCudaBackend
from clipfuse.runtime.backends import registry as bk
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.manifest_checks import bind_blocks
from clipfuse.runtime.preprocess import preprocess_image


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="no CUDA GPU visible to torch")


def _cli(*args):
    from clipfuse.cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.fixture(scope="module")
def feed(tiny_engine, photo_paths):
    from PIL import Image

    m = read_manifest(tiny_engine)
    images = [Image.open(p) for p in photo_paths][:4]
    return {name: np.stack([preprocess_image(im, s) for im in images]) for name, s in m.preprocess_specs().items()}


def _run(engine, feed, **kw):
    with TorchCudaBackend(read_manifest(engine), **kw) as b:
        return b.infer(feed)


def test_cpu_forward_matches_the_onnx_graph_and_drops_the_padding(tiny_engine, feed):
    """device=cpu runs the plan's forward eagerly: 3 images in the 4-bucket, answers for 3, equal to ORT's."""
    three = {k: v[:3] for k, v in feed.items()}
    got = _run(tiny_engine, three, device="cpu", max_batch=4)
    with bk.make_backend(read_manifest(tiny_engine), "onnxruntime") as ort:
        ref = ort.infer(three)
    for name in iospec.OUTPUT_NAMES:
        assert got[name].shape == ref[name].shape and got[name].shape[0] == 3
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref[name]).max()))


def test_a_batch_above_the_largest_bucket_is_refused(tiny_engine, feed):
    with pytest.raises(ClipfuseError, match=r"batch of 4 images is above the largest CUDA-graph bucket \(2\)"):
        _run(tiny_engine, feed, device="cpu", max_batch=2)


def test_bad_options_through_the_cli_are_one_line(tiny_engine, photo_paths, monkeypatch):
    photo = photo_paths[0]
    r = _cli("predict", tiny_engine, photo, "--backend", "torch", "--precision", "fp16")
    assert r.exit_code == 1 and "fp32 reference only" in r.output and "Traceback" not in r.output
    r = _cli("predict", tiny_engine, photo, "--backend", "onnxruntime", "--compile")
    assert r.exit_code == 1 and "--compile is an option of --backend torch-cuda, not of onnxruntime" in r.output
    # torch-cuda on this machine as if a GPU were there: the option checks come before anything loads
    monkeypatch.setattr(TorchCudaBackend, "unavailable_reason", classmethod(lambda cls: None))
    real = plan.importlib.util.find_spec
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    r = _cli("predict", tiny_engine, photo, "--backend", "torch-cuda", "--compile")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "error: backend torch-cuda: --compile cannot work here: inductor needs triton" in r.output
    r = _cli("predict", tiny_engine, photo, "--backend", "torch-cuda", "--precision", "int8")
    assert r.exit_code == 1 and "torch-cuda runs fp32 or fp16, not 'int8'" in r.output


def test_torch_cuda_is_the_graph_backend_and_the_eager_reference_keeps_its_own_name(tiny_engine):
    m = read_manifest(tiny_engine)
    assert bk.registered_backends()["torch-cuda"].value == "clipfuse.export.gpu.backend:TorchCudaBackend"
    assert bk.backend_class("torch-cuda-eager")(m).name == "torch-cuda-eager"
    assert bk.for_precision(m, "torch-cuda", "fp16", {"max_batch": 8})[1] == {"max_batch": 8, "precision": "fp16"}
    # other backends take any batch: the bucket hint is not theirs
    assert bk.for_precision(m, "onnxruntime", None, {"max_batch": 8}) == (m, {})


def test_the_backend_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, clipfuse.export.gpu.backend, clipfuse.export.graph.torch_backend; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("spec, expect", [("clipfuse-test-rn:random:1", {"mean": 1}),          # the attention pool
                                          ("clipfuse-test-vit:random:0", {"layer_norm": 6})])
def test_fp32_islands_catch_the_towers_ops_and_compute_them_in_fp32(spec, expect):
    """Under autocast (bf16 on CPU: the same mechanism as fp16 on CUDA) the towers' LayerNorm and the RN
    attention pool's mean go through the islands (the attention softmax is inside scaled_dot_product_attention,
    whose kernels accumulate it in fp32)."""
    import torch

    from clipfuse.export.gpu.graphs import Fp32Islands
    from clipfuse.export.graph.backbones import load_backbone

    b = load_backbone(spec)
    x = torch.randn(2, 3, b.image_size, b.image_size, generator=torch.Generator().manual_seed(0))
    islands = Fp32Islands()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), islands:
        b.model.visual.eval()(x)
    assert islands.seen == expect


# ----------------------------------------------------------------------------- on a CUDA GPU only

@needs_cuda
def test_concurrent_equals_serial(tiny_engine, feed):
    serial = _run(tiny_engine, feed, concurrent=False)
    concurrent = _run(tiny_engine, feed, concurrent=True)
    for name in iospec.OUTPUT_NAMES:
        np.testing.assert_array_equal(concurrent[name], serial[name])


@needs_cuda
def test_padded_equals_unpadded(tiny_engine, feed):
    three = {k: v[:3] for k, v in feed.items()}
    padded = _run(tiny_engine, three, max_batch=4)            # 3 images in the 4-graph
    exact = _run(tiny_engine, {k: v[:3] for k, v in feed.items()}, max_batch=3)   # buckets 1, 2, 3
    for name in iospec.OUTPUT_NAMES:
        np.testing.assert_allclose(padded[name], exact[name], rtol=1e-5, atol=1e-6)


@needs_cuda
def test_fp16_within_the_fp16_bounds_of_onnxruntime_fp32(tiny_engine):
    r = _cli("compare", tiny_engine, "--backends", "onnxruntime,torch-cuda-fp16", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["backends"][1]["name"] == "torch-cuda-fp16"


@pytest.mark.skipif(not _cuda() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton")
def test_compiled_equals_eager_graphs(tiny_engine, feed):
    compiled = _run(tiny_engine, feed, compile=True)
    plain = _run(tiny_engine, feed)
    for name in iospec.OUTPUT_NAMES:
        np.testing.assert_allclose(compiled[name], plain[name], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the cascade (CPU and CUDA)

@pytest.fixture(scope="module")
def cascade3(tmp_path_factory):
    """A three-stage cascade exported directly: stage 1 = tower 1 at temperature 1, then LOG-AVG of 2 and of 3."""
    import torch

    from conftest import TINY, TINY_CLASSES, TWO_TEMPLATES

    from clipfuse.export.graph.engine import export_engine
    from clipfuse.export.graph.fused import ConstantController, StaticController

    out = tmp_path_factory.mktemp("gpu-cascade") / "cascade"
    block = {"order": TINY, "score": "max-prob", "thresholds": [None, None], "expected_exit_rates": [0.0, 0.0, 1.0]}
    export_engine(TINY, TINY_CLASSES, out, templates=TWO_TEMPLATES, controller=ConstantController(3),
                  cascade={"controllers": [StaticController(torch.ones(1)), ConstantController(2), ConstantController(3)],
                           "block": block})
    return out


def _with_thresholds(engine, thresholds):
    m = read_manifest(engine)
    m.data["cascade"]["thresholds"] = thresholds
    bind_blocks(m.data)          # as clipfuse's own writers do: a hand edit would be refused
    return m


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_an_image_leaving_at_stage_1_launches_no_later_tower(cascade3, feed, device):
    from clipfuse.runtime.cascade import CascadeBackend

    feed3 = {k: v for k, v in feed.items()}
    for thresholds, stages in (([0.0, 0.0], {1}), ([None, None], {3})):
        m = _with_thresholds(cascade3, thresholds)
        with TorchCudaBackend(m, device=device, cascade=True, max_batch=4) as b:
            got = b.infer(feed3)
            launches = dict(b.runner.launches)
        assert set(got[iospec.STAGE].tolist()) == stages
        # counted, not timed: leaving at stage 1 never launches the later towers' graph
        assert launches == ({"stage1": 1} if stages == {1} else {"stage1": 1, "rest": 1})
        with CascadeBackend(m) as ort:                 # the CPU cascade: the same stages, the same answers
            ref = ort.infer(feed3)
        np.testing.assert_array_equal(got[iospec.STAGE], ref[iospec.STAGE])
        np.testing.assert_allclose(got[iospec.LOGITS], ref[iospec.LOGITS], rtol=1e-4, atol=1e-4)


def test_serve_takes_onnxruntime_or_torch_cuda_only(tiny_engine):
    from clipfuse.runtime.serving.server import start_server

    with pytest.raises(ClipfuseError, match="serve runs backend onnxruntime or torch-cuda, not 'tensorrt'"):
        start_server(tiny_engine, backend="tensorrt")
    r = _cli("serve", tiny_engine, "--backend", "torch")
    assert r.exit_code == 2 and "'torch' is not one of 'onnxruntime', 'torch-cuda'" in r.output


def test_bench_levers_run_on_the_engine(tiny_engine, tmp_path):
    """`clipfuse bench --backend torch-cuda`'s measurement, on the CPU (eager, the same code): every configuration
    of every tower, the cascade's stage costs, written atomically."""
    from clipfuse.bench.gpu import bench_torch_cuda

    r = bench_torch_cuda(tiny_engine, batches=(1, 2), runs=1, iters=1, warmup=0, precisions=("fp32",), out=tmp_path,
                         device="cpu", command="test")
    rows = r["levers"]["sets"][tiny_engine.name]["rows"]
    modes = {row["mode"] for row in rows}
    assert {"serial", "concurrent", "backend"} <= modes
    assert {m for m in modes if m.startswith("single ")} == {f"single {n}" for n in read_manifest(tiny_engine).backbone_names}
    assert all("p99" in row["latency_ms"] for row in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_gpu.json", "bench_gpu.md"]


def test_bench_torch_cuda_without_a_gpu_is_one_line(tiny_engine):
    r = _cli("bench", tiny_engine, "--backend", "torch-cuda", "--no-memory")
    if _cuda():
        pytest.skip("a CUDA GPU is here")
    assert r.exit_code == 1 and "bench --backend torch-cuda needs a CUDA GPU" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_auto_tries_torch_cuda_first_where_a_gpu_is(fp16_engine, monkeypatch, precision):
    """On a GPU machine (faked) auto tries torch-cuda first, fp16 included, with the predictor's batch as its
    largest bucket; when it cannot start, auto says why and goes on."""
    tried = []
    real = bk.make_backend

    def spy(manifest, name, **options):
        tried.append((name, options))
        return real(manifest, name, **options)

    monkeypatch.setattr(TorchCudaBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(TorchCudaBackend, "open", lambda self: (_ for _ in ()).throw(ClipfuseError("no CUDA here")))
    monkeypatch.setattr(bk, "make_backend", spy)
    with bk.open_backend(fp16_engine, "auto", precision=precision, max_batch=4) as b:
        assert b.name == "onnxruntime"
    assert tried[0] == ("torch-cuda", {"max_batch": 4, **({"precision": "fp16"} if precision else {})})
    assert tried[1][0] == "onnxruntime" and "max_batch" not in tried[1][1]


def test_compare_runs_torch_cuda_at_fp16_and_keeps_the_eager_reference_fp32():
    from clipfuse.runtime.compare import parse_backends

    assert parse_backends("onnxruntime,torch-cuda,torch-cuda-eager", "fp16") == [
        ("onnxruntime", "fp16"), ("torch-cuda", "fp16"), ("torch-cuda-eager", "fp32")]
    assert parse_backends("onnxruntime,torch-cuda-fp16", None) == [("onnxruntime", "fp32"), ("torch-cuda", "fp16")]
    with pytest.raises(ClipfuseError, match="torch-cuda runs fp32 or fp16"):
        parse_backends("onnxruntime,torch-cuda-int8", None)
    with pytest.raises(ClipfuseError, match="torch runs the fp32 reference only"):
        parse_backends("onnxruntime,torch-cuda-eager-fp16", None)
