"""Backends, engine-loading checks and the Predictor, on the session's tiny 3-backbone engine."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import imagefactory as factory
import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY, TINY_CLASSES, TWO_TEMPLATES
from PIL import Image

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph.torch_backend import TorchBackend
from clipfuse.runtime.backends import registry as bk
from clipfuse.runtime.backends.onnxruntime import OnnxRuntimeBackend
from clipfuse.runtime.backends.registry import open_backend
from clipfuse.runtime.backends.sessions import check_onnxruntime_can_run, onnxruntime_max_opset
from clipfuse.runtime.manifest import Manifest, read_manifest, sha256_file
from clipfuse.runtime.predict import Predictor, load_predictor
from clipfuse.runtime.preprocess import preprocess_image

# ONNX Runtime vs PyTorch, fp32 on both sides: per output |ort - torch| <= ATOL + RTOL * max|torch|.
# The two compute the same graph but order reductions differently (GEMM blocking, conv
# algorithms, attention), which moves results by 1e-6..1e-5 of the output's scale (the
# export's own validation, recorded in the manifest, sees the same). 1e-4 leaves 10x
# headroom yet is far below what a real fault causes (a wrong mean/std or a swapped input
# moves logits by >1e-2 of their scale), so a disagreement here is a bug, not noise.
RTOL, ATOL = 1e-4, 1e-6


def feed_of(manifest, images):
    specs = manifest.preprocess_specs()
    return {name: np.stack([preprocess_image(im, s) for im in images]) for name, s in specs.items()}


@pytest.fixture(scope="module")
def photos(photo_paths):
    images = [Image.open(p) for p in photo_paths]
    # flips and crops: more images with real texture, so top-1 agreement is tested on 12, not 4
    return images + [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images] + \
        [im.crop((0, 0, im.width * 2 // 3, im.height)) for im in images]


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    """A private copy of the tiny engine that a test may damage."""
    return shutil.copytree(tiny_engine, tmp_path / "engine")


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory):
    """Another tiny engine: same backbones, 3 classes instead of 4 (its heads are (3, D))."""
    from clipfuse.export.graph.engine import export_engine

    out = tmp_path_factory.mktemp("other") / "three-classes"
    return export_engine(TINY, TINY_CLASSES[:3], out, templates=TWO_TEMPLATES).folder


# ----------------------------------------------------------------------------- backends agree

def test_onnxruntime_and_torch_agree(tiny_engine, photos):
    m = read_manifest(tiny_engine)
    feed = feed_of(m, photos)
    with OnnxRuntimeBackend(m) as a, TorchBackend(m) as b:
        got, ref = a.infer(feed), b.infer(feed)
    assert list(got) == list(ref) == list(iospec.OUTPUT_NAMES)
    for name in iospec.OUTPUT_NAMES:
        assert got[name].shape == ref[name].shape and got[name].dtype == np.float32
        scale = float(np.abs(ref[name]).max())
        err = float(np.abs(got[name] - ref[name]).max())
        assert err <= ATOL + RTOL * scale, (name, err, scale)
    assert (got["logits"].argmax(-1) == ref["logits"].argmax(-1)).all()
    assert (got["backbone_logits"].argmax(-1) == ref["backbone_logits"].argmax(-1)).all()
    # the images are not all alike to the network: agreement is not trivially on one class
    assert len(set(ref["backbone_logits"].argmax(-1).ravel())) > 1


def test_backend_interface(tiny_engine, photos):
    m = read_manifest(tiny_engine)
    b = OnnxRuntimeBackend(m, threads=1)
    assert b.name == "onnxruntime" and b.providers == ["CPUExecutionProvider"] and not b.is_open
    with pytest.raises(ClipfuseError, match="not open"):
        b.infer(feed_of(m, photos[:1]))
    with b:
        assert b.is_open and "intra-op threads 1" in b.describe()
        out = b.infer(feed_of(m, photos[:2]))
        assert out["logits"].shape == (2, 4) and out["temperatures"].shape == (2, 3)
    assert not b.is_open and b.session is None
    t = TorchBackend(m)
    assert (t.name, t.device, TorchBackend(m, device="cuda").name) == ("torch", "cpu", "torch-cuda-eager")


def test_session_options_are_the_measured_defaults(tiny_engine):
    so = OnnxRuntimeBackend(read_manifest(tiny_engine)).session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL     # ORT_PARALLEL measured ~2x slower
    assert so.intra_op_num_threads == 0                              # ORT's own choice: one per core
    so = OnnxRuntimeBackend(read_manifest(tiny_engine), threads=2, parallel=True).session_options()
    assert so.intra_op_num_threads == 2 and so.execution_mode == ort.ExecutionMode.ORT_PARALLEL


@pytest.mark.parametrize("change, expect", [
    (lambda f: f.pop("image_48"), "expects ['image_32', 'image_48', 'image_64']"),
    (lambda f: f.update(image_48=f["image_48"].astype(np.float32)), "'image_48' must be uint8 (N, 3, 48, 48), got float32"),
    (lambda f: f.update(image_64=f["image_64"][:, :, :32, :32]), "'image_64' must be uint8 (N, 3, 64, 64)"),
    (lambda f: f.update(image_32=f["image_32"][:1]), "'image_32' has 1 images, 'image_48' has 2"),
    (lambda f: f.update({k: v[:0] for k, v in f.items()}), "empty feed"),
])
def test_bad_feeds_are_named(tiny_engine, photos, change, expect):
    m = read_manifest(tiny_engine)
    feed = feed_of(m, photos[:2])
    change(feed)
    with OnnxRuntimeBackend(m) as b, pytest.raises(ClipfuseError) as e:
        b.infer(feed)
    assert expect in str(e.value)


def test_onnxruntime_path_imports_neither_torch_nor_open_clip(tiny_engine, photo_paths):
    code = textwrap.dedent(f"""
        import sys
        from clipfuse.runtime.backends.registry import OnnxRuntimeBackend, open_backend
        from clipfuse.runtime.manifest import read_manifest
        import clipfuse
        m = read_manifest({str(tiny_engine)!r})
        with OnnxRuntimeBackend(m) as b:
            pass
        with clipfuse.load({str(tiny_engine)!r}) as p:          # "auto", as the CLI does
            preds = p.predict([{str(photo_paths[0])!r}])
        assert preds[0].ok and len(preds[0].labels) == 4, preds
        print(sorted(m for m in ("torch", "open_clip") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert "backend auto -> onnxruntime" in r.stderr


# ----------------------------------------------------------------------------- choosing a backend

@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as a CPU-only box with the CPU build of onnxruntime, whatever it really has."""
    monkeypatch.setattr(bk, "nvidia_gpu_visible", lambda: False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_auto_picks_onnxruntime_on_cpu_and_says_so(tiny_engine, no_gpu, capsys):
    # openvino (a dev dependency) is available too, but auto does not try it (see test_openvino.py)
    assert [b for b in bk.available_backends() if b != "openvino"] == ["onnxruntime", "torch"]
    with open_backend(tiny_engine, "auto") as b:
        assert isinstance(b, OnnxRuntimeBackend) and b.provider == "cpu"
    assert "backend auto -> onnxruntime (CPUExecutionProvider" in capsys.readouterr().err


def test_unknown_backend_lists_the_valid_ones(tiny_engine):
    with pytest.raises(ClipfuseError) as e:
        open_backend(tiny_engine, "onnx")
    for name in ("auto", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "torch", "torch-cuda",
                 "torch-cuda-eager", "tensorrt"):
        assert f"{name}," in str(e.value) + ","
    with pytest.raises(ClipfuseError, match="unknown backend 'onnx'"):
        load_predictor(tiny_engine, backend="onnx")


@pytest.mark.parametrize("name, expect", [
    ("onnxruntime-cuda", "pip install onnxruntime-gpu"),
    ("onnxruntime-tensorrt", "pip install 'clipfuse[tensorrt]'"),
    ("tensorrt", "native TensorRT backend needs the tensorrt package and an NVIDIA GPU"),
    ("torch-cuda", "needs an NVIDIA GPU"),
    ("torch-cuda-eager", "needs an NVIDIA GPU"),
])
def test_gpu_backends_on_a_cpu_machine_say_what_to_install(tiny_engine, no_gpu, name, expect):
    with pytest.raises(ClipfuseError) as e:
        open_backend(tiny_engine, name)
    assert expect in str(e.value)


def test_silent_cpu_fallback_is_refused(tiny_engine, monkeypatch):
    """ORT quietly runs on the CPU when the CUDA EP cannot start; a backend must not."""
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    if "CUDAExecutionProvider" in real():
        pytest.skip("this onnxruntime has a working CUDA EP: there is no fallback to provoke")
    with pytest.raises(ClipfuseError) as e:
        OnnxRuntimeBackend(read_manifest(tiny_engine), provider="cuda").open()
    assert "could not start CUDAExecutionProvider" in str(e.value) and "no silent fallback" in str(e.value)


@pytest.fixture
def every_gpu_backend(monkeypatch):
    """This machine as a GPU box where every never-executed backend would start (faked availability)
    and torch sees no CUDA (so torch-cuda, which did run on a GPU, is out of the way)."""
    from clipfuse.export.gpu.backend import TorchCudaBackend
    from clipfuse.runtime.backends.tensorrt import TensorRTBackend

    monkeypatch.setattr(bk, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(TorchCudaBackend, "unavailable_reason", classmethod(lambda cls: "no CUDA here"))
    tried = []
    real = bk.make_backend

    def spy(manifest, name, **options):
        tried.append((name, options))
        return real(manifest, name, **options)

    monkeypatch.setattr(bk, "make_backend", spy)
    return tried


def test_auto_never_picks_a_never_executed_backend(engine_copy, every_gpu_backend, capsys):
    m = read_manifest(engine_copy)
    assert {"tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda"} <= set(bk.available_backends())
    assert bk.auto_candidates(m) == ["torch-cuda", "onnxruntime", "torch"]
    with open_backend(m, "auto") as b:
        assert isinstance(b, OnnxRuntimeBackend) and b.provider == "cpu"
    assert [name for name, _ in every_gpu_backend] == ["onnxruntime"]
    assert "backend auto -> onnxruntime (CPUExecutionProvider" in capsys.readouterr().err


def test_auto_tries_tensorrt_only_when_clipfuse_build_recorded_a_plan(engine_copy, every_gpu_backend, capsys):
    # recorded but not on disk: not a plan the user has
    def record_plan(d):     # as `clipfuse build` records one: in plans and, with its hash, in artefacts
        d.update(plans={"fp16": {"file": "model.fp16.plan", "tensorrt": "10.13.0"}})
        d["artefacts"]["model.fp16.plan"] = {"sha256": hashlib.sha256(b"not a real plan").hexdigest(), "bytes": 15}
    edit_manifest(engine_copy, record_plan)
    assert bk.auto_candidates(read_manifest(engine_copy, verify=False))[0] == "torch-cuda"
    (engine_copy / "model.fp16.plan").write_bytes(b"not a real plan")
    m = read_manifest(engine_copy, verify=False)
    assert bk.auto_candidates(m) == ["tensorrt", "torch-cuda", "onnxruntime", "torch"]
    with open_backend(m, "auto") as b:      # TensorRT itself is absent here: auto says so and goes on
        assert isinstance(b, OnnxRuntimeBackend) and b.provider == "cpu"
    assert every_gpu_backend[0] == ("tensorrt", {"precision": "fp16"})      # the precision that was built
    assert [name for name, _ in every_gpu_backend] == ["tensorrt", "onnxruntime"]
    assert "backend auto: tensorrt cannot run: TensorRT is not installed" in capsys.readouterr().err


def test_torch_backend_comes_from_the_registry(tiny_engine):
    m = read_manifest(tiny_engine)
    assert type(bk.make_backend(m, "torch")) is TorchBackend
    assert bk.backend_class("torch-cuda")(m).device == "cuda"
    assert bk.registered_backends()["torch"].value == "clipfuse.export.graph.torch_backend:TorchBackend"


@pytest.mark.parametrize("value, expect", [
    ("clipfuse_no_such_module:Backend", "is registered as clipfuse_no_such_module:Backend but cannot be imported"),
    ("json:dumps", "is registered as json:dumps, which is not a clipfuse Backend subclass"),
])
def test_a_broken_registration_is_named(tiny_engine, monkeypatch, value, expect):
    from importlib.metadata import EntryPoint

    eps = dict(bk.registered_backends(), extra=EntryPoint("extra", value, bk.ENTRY_POINT_GROUP))
    monkeypatch.setattr(bk, "registered_backends", lambda: eps)
    assert expect in bk.unavailable_reason("extra")
    with pytest.raises(ClipfuseError, match=expect):
        open_backend(tiny_engine, "extra")


def test_an_unregistered_documented_backend_says_to_reinstall(tiny_engine, monkeypatch):
    monkeypatch.setattr(bk, "registered_backends", lambda: {})
    with pytest.raises(ClipfuseError, match="backend torch is not registered .*reinstall clipfuse"):
        open_backend(tiny_engine, "torch")


def test_trt_cache_lives_in_the_engine_folder(engine_copy):
    b = OnnxRuntimeBackend(read_manifest(engine_copy), provider="tensorrt", max_batch=16)
    trt, cuda, cpu = b._provider_list()
    opts = trt[1]
    assert trt[0] == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(engine_copy / "trt_cache") and (engine_copy / "trt_cache").is_dir()
    assert opts["trt_profile_max_shapes"] == "image_32:16x3x32x32,image_48:16x3x48x48,image_64:16x3x64x64"


# ----------------------------------------------------------------------------- engine checks

def test_tampered_graph_is_refused(engine_copy):
    data = bytearray((engine_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ClipfuseError, match="model.onnx' does not match the sha256"):
        load_predictor(engine_copy)


def unchecked(folder):
    """The folder's manifest as written, past read_manifest's checks: reaches the backends' own checks."""
    return Manifest(folder, json.loads((folder / "manifest.json").read_text()))


def test_manifest_classes_not_matching_the_graph(engine_copy):
    edit_manifest(engine_copy, lambda d: d["classes"].append("dog"))
    with pytest.raises(ClipfuseError) as e:         # the heads file's class binding sees it first
        load_predictor(engine_copy, backend="onnxruntime")
    assert "the classes in manifest.json are not those heads.safetensors was exported with" in str(e.value)
    with pytest.raises(ClipfuseError) as e:         # and the graph's own check behind it
        OnnxRuntimeBackend(unchecked(engine_copy)).open()
    msg = str(e.value)
    assert "model.onnx has 4 classes ('logits' is (N, 4)) but the manifest lists 5" in msg
    assert "clipfuse export" in msg and "--force" in msg


def test_heads_file_of_another_engine(engine_copy, other_engine):
    shutil.copy(other_engine / "heads.safetensors", engine_copy / "heads.safetensors")
    with pytest.raises(ClipfuseError, match="heads.safetensors' (has .* bytes|does not match)"):
        read_manifest(engine_copy)
    # ... and with the manifest's hash updated too, the torch backend still sees it
    edit_manifest(engine_copy, lambda d: d["artefacts"]["heads.safetensors"].update(
        sha256=sha256_file(engine_copy / "heads.safetensors"), bytes=(engine_copy / "heads.safetensors").stat().st_size))
    with pytest.raises(ClipfuseError, match="classes in manifest.json are not those heads.safetensors"):
        read_manifest(engine_copy)                  # its class binding is the other engine's
    with pytest.raises(ClipfuseError) as e:
        TorchBackend(unchecked(engine_copy)).open()
    assert "head 0 in heads.safetensors has shape (3, 32), the manifest needs (4 classes, D=32)" in str(e.value)


def test_torch_refuses_weights_it_cannot_rebuild(engine_copy):
    edit_manifest(engine_copy, lambda d: d["backbones"][1].update(weights_sha256="0" * 64))
    with pytest.raises(ClipfuseError) as e:
        TorchBackend(read_manifest(engine_copy)).open()
    assert "backbone 1 (clipfuse-test-rn:random:1)" in str(e.value) and "not the weights" in str(e.value)
    with OnnxRuntimeBackend(read_manifest(engine_copy)):     # the graph itself is fine
        pass


def test_engine_of_another_clipfuse_major_version(engine_copy):
    edit_manifest(engine_copy, lambda d: d["versions"].update(clipfuse="7.0.0"))
    with pytest.raises(ClipfuseError) as e:
        read_manifest(engine_copy)
    assert "made by clipfuse 7.0.0" in str(e.value)
    assert f"clipfuse export -b {TINY[0]} -b {TINY[1]} -b {TINY[2]} -c CLASSES --out {engine_copy} --force" in str(e.value)


def test_opset_newer_than_onnxruntime(engine_copy):
    assert onnxruntime_max_opset() >= 18          # the installed one runs what export writes by default
    m = read_manifest(engine_copy)
    check_onnxruntime_can_run(m, max_opset=18)
    with pytest.raises(ClipfuseError) as e:
        check_onnxruntime_can_run(m, max_opset=17)
    assert "opset 18 graph" in str(e.value) and "up to 17" in str(e.value)
    assert "pip install -U onnxruntime" in str(e.value) and "--force --opset 17" in str(e.value)
    edit_manifest(engine_copy, lambda d: d["onnx"].update(opset=onnxruntime_max_opset() + 1))
    with pytest.raises(ClipfuseError, match="implements opsets up to"):
        OnnxRuntimeBackend(read_manifest(engine_copy)).open()


# ----------------------------------------------------------------------------- the Predictor

@pytest.fixture(scope="module")
def predictor(tiny_engine):
    with load_predictor(tiny_engine, backend="onnxruntime", batch_size=3) as p:
        yield p


def test_predict_mixes_paths_and_pil_images_in_order(predictor, photo_paths):
    pil = [Image.open(p) for p in photo_paths]
    items = [photo_paths[0], pil[1], str(photo_paths[2]), pil[3], pil[0]]
    preds = predictor.predict(items, top_k=2)
    assert [p.index for p in preds] == [0, 1, 2, 3, 4]
    assert [p.path for p in preds] == [str(photo_paths[0]), None, str(photo_paths[2]), None, None]
    assert all(p.ok and len(p.labels) == 2 and p.probs[0] >= p.probs[1] for p in preds)
    # a file and the same file opened by the caller are the same image to the engine
    assert preds[4].labels == preds[0].labels and preds[4].probs == pytest.approx(preds[0].probs, rel=1e-6)
    assert preds[4].name == "<image 4>"


def test_predictions_are_the_backend_outputs(predictor, photo_paths):
    preds = predictor.predict(photo_paths, top_k=10)
    raw = predictor.predict_arrays(feed_of(predictor.manifest, [Image.open(p) for p in photo_paths]))
    for p, probs, temps in zip(preds, raw["probs"], raw["temperatures"]):
        assert len(p.labels) == 4                              # top_k past the class count: all classes
        assert p.labels == [TINY_CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        assert p.probs == pytest.approx(sorted(probs, reverse=True), rel=1e-6)
        assert p.temperatures == pytest.approx(dict(zip(TINY, temps.tolist())))
        assert list(p.temperatures) == TINY                    # keyed by backbone, in engine order


def test_predict_reports_bad_inputs_and_keeps_the_rest(predictor, photo_paths, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    tiny = Image.new("RGB", (1, 1))
    items = [photo_paths[0], text, tiny, factory.truncated(photo_paths[1], tmp_path / "cut.jpg"), photo_paths[2]]
    preds = predictor.predict(items)
    assert [p.ok for p in preds] == [True, False, False, False, True]
    assert "not an image" in preds[1].error and preds[1].path == str(text)
    assert preds[2].error == "image is 1x1 px, smaller than the minimum 8 px per side" and preds[2].path is None
    assert preds[3].error.startswith("truncated or corrupt image data")
    assert preds[0].labels == predictor.predict([photo_paths[0]])[0].labels


def test_predict_batches_streams_in_order(predictor, photo_paths, tmp_path):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    paths = [photo_paths[0], photo_paths[1], bad, photo_paths[2], photo_paths[3], photo_paths[0], bad, bad, bad] * 2
    consumed = []

    def lazily():
        for p in paths:
            consumed.append(p)
            yield p

    stream = predictor.predict_batches(lazily(), top_k=1)
    first = next(stream)
    assert len(consumed) <= 9 < len(paths)      # read lazily: this batch and two decoded ahead
    batches = [first, *stream]
    assert [len(b) for b in batches] == [3] * 6                 # batch_size 3
    flat = [p for b in batches for p in b]
    assert [p.index for p in flat] == list(range(18)) and [p.path for p in flat] == [str(p) for p in paths]
    assert [p.ok for p in flat] == [True, True, False, True, True, True, False, False, False] * 2
    assert flat[5].labels == flat[0].labels and flat[5].probs == pytest.approx(flat[0].probs, rel=1e-6)
    # a batch where every image failed yields its failures (and the engine is not called with nothing)
    assert [p.error for p in batches[2]] == ["empty file (0 bytes)"] * 3


def test_batch_size_does_not_change_results(tiny_engine, photo_paths, predictor):
    with load_predictor(tiny_engine, backend="onnxruntime", batch_size=1) as one:
        a = one.predict(photo_paths)
    b = predictor.predict(photo_paths)
    for x, y in zip(a, b):
        assert x.labels == y.labels and x.probs == pytest.approx(y.probs, rel=1e-5)


@pytest.mark.parametrize("call, expect", [
    (lambda p: p.predict([1.5]), "images\\[0\\] is a float: pass image file paths"),
    (lambda p: p.predict(["a.jpg"], top_k=0), "top_k must be a positive integer"),
    (lambda p: p.predict_batches([], top_k=-1), "top_k must be a positive integer"),
])
def test_predict_argument_errors(predictor, call, expect):
    with pytest.raises(ClipfuseError, match=expect):
        call(predictor)


@pytest.mark.parametrize("kwargs, expect", [
    (dict(batch_size=0), "batch size must be a positive integer"),
    (dict(workers=0), "workers must be at least 1"),
    (dict(backend="torch-gpu"), "unknown backend 'torch-gpu'"),
])
def test_load_argument_errors(tiny_engine, kwargs, expect):
    with pytest.raises(ClipfuseError, match=expect):
        load_predictor(tiny_engine, **kwargs)


def test_public_api(tiny_engine, photo_paths):
    import clipfuse

    with clipfuse.load(tiny_engine, backend="torch", batch_size=2) as p:
        assert isinstance(p, Predictor) and p.backend.name == "torch"
        preds = p.predict(photo_paths[:3], top_k=1)
    assert [len(x.labels) for x in preds] == [1, 1, 1]
    assert "onnxruntime" in clipfuse.available_backends()


def test_one_preprocess_spec_builder_for_export_and_runtime(tiny_engine):
    """The manifest's specs (runtime) equal what export builds from open_clip's preprocess_cfg."""
    from clipfuse.export.graph.backbones import load_backbone
    from clipfuse.export.graph.engine import input_specs
    from clipfuse.runtime.preprocess import PreprocessSpec, preprocess_spec

    assert input_specs([load_backbone(b) for b in TINY]) == read_manifest(tiny_engine).preprocess_specs()
    assert preprocess_spec({"size": (48, 48), "interpolation": "bilinear"}) == PreprocessSpec(48, "bilinear", "shortest")
    with pytest.raises(ValueError, match=r"non-square input size \(48, 64\)"):
        preprocess_spec({"size": (48, 64)})


def test_onnxruntime_backend_opens_through_the_one_session_loader(engine_copy, monkeypatch):
    calls = []
    from clipfuse.runtime.backends import onnxruntime
    real = onnxruntime.open_session
    monkeypatch.setattr(onnxruntime, "open_session", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    with OnnxRuntimeBackend(read_manifest(engine_copy), threads=1) as b:
        assert b.session.get_session_options().intra_op_num_threads == 1
    assert calls == [engine_copy / "model.onnx"]
    (engine_copy / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ClipfuseError) as e:
        OnnxRuntimeBackend(read_manifest(engine_copy, verify=False)).open()
    assert "cannot load" in str(e.value) and "upgrade onnxruntime, or rebuild the engine: `clipfuse export" in str(e.value)


def test_pil_strip_is_refused_before_resizing_and_the_rest_is_classified(tiny_engine, photo_paths, monkeypatch):
    """Bounded work for in-memory images: a 1,000,000 x 8 image would be 4,000,000 x 32 after resizing (128 Mpx)."""
    real = Image.Image.resize

    def resize(self, size, *a, **kw):
        assert size[0] * size[1] <= 1_000_000, f"resize to {size} should have been refused before allocating"
        return real(self, size, *a, **kw)
    monkeypatch.setattr(Image.Image, "resize", resize)
    with load_predictor(tiny_engine, backend="onnxruntime") as p:
        preds = p.predict([Image.new("L", (1_000_000, 8)), Image.open(photo_paths[0])], top_k=1)
    assert not preds[0].ok and "makes 4000000x32 = 128,000,000 px, over the limit" in preds[0].error
    assert "--max-image-pixels" in preds[0].error and preds[1].ok
