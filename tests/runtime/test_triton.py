"""`clipfuse triton`: the model repository for both backends parses against Triton's ModelConfig schema,
says what the engine says, never touches the engine folder, and refuses bad options by name."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.manifest import read_manifest, sha256_file
from clipfuse.runtime.serving import repository as tr

pytest.importorskip("tritonclient.grpc", reason="Triton's ModelConfig schema comes from tritonclient[grpc]: "
                                                "pip install 'clipfuse[serve]'")
from tritonclient.grpc import model_config_pb2  # noqa: E402


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def engine_with_plan(tiny_engine, tmp_path_factory):
    """A copy of the tiny engine (hard links) with a stand-in TensorRT plan: the writer copies plans, it does
    not read them, so the repository layout and config are testable without TensorRT."""
    d = tmp_path_factory.mktemp("trt") / "tiny-trt"
    shutil.copytree(tiny_engine, d, copy_function=os.link)
    (d / "model.fp16.plan").write_bytes(b"stand-in for a serialised TensorRT engine")
    return d


def parse(path) -> model_config_pb2.ModelConfig:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_repository_parses_against_model_config_schema(backend, tiny_engine, engine_with_plan, tmp_path):
    engine = tiny_engine if backend == "onnxruntime" else engine_with_plan
    m = read_manifest(engine)
    model = tr.write_repository(engine, tmp_path / "repo", backend=backend, max_batch=16, instances=2)
    cfg = parse(model / "config.pbtxt")
    assert cfg.name == model.name == m.folder.name
    assert cfg.platform == {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    assert cfg.max_batch_size == 16
    # uint8 image_<R> inputs, dims without the batch axis
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == \
        [(i["name"], model_config_pb2.TYPE_UINT8, [3, i["shape"][2], i["shape"][3]]) for i in m.inputs]
    assert [t.name for t in cfg.input] == ["image_32", "image_48", "image_64"]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [(o["name"], o["shape"][1:]) for o in m.outputs]
    assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in cfg.output)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == tr.DEFAULT_QUEUE_DELAY_US
    kind = model_config_pb2.ModelInstanceGroup.KIND_CPU if backend == "onnxruntime" else \
        model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, kind)]
    meta = json.loads(cfg.parameters["clipfuse"].string_value)
    assert meta["classes"] == m.classes and meta["backbones"] == m.backbone_names
    assert [i["size"] for i in meta["inputs"]] == [32, 48, 64]
    if backend == "onnxruntime":
        assert (model / "1" / "model.onnx").is_file()
        assert sha256_file(model / "1" / "model.onnx") == sha256_file(m.onnx_path)
    else:
        assert (model / "1" / "model.plan").read_bytes() == (engine / "model.fp16.plan").read_bytes()
    read_manifest(engine, verify=True)        # the engine folder is untouched


def test_external_data_becomes_a_model_directory(tiny_engine, tmp_path):
    """Past 2 GB the graph keeps its weights in model.onnx.data: Triton then wants model.onnx as a folder."""
    eng = tmp_path / "big"
    shutil.copytree(tiny_engine, eng, copy_function=os.link)
    man = json.loads((eng / "manifest.json").read_text())
    man["onnx"]["external_data"] = "model.onnx.data"
    # as the exporter records it: every file the runtime opens is a hashed artefact
    man["artefacts"]["model.onnx.data"] = {"sha256": hashlib.sha256(b"weights").hexdigest(), "bytes": 7}
    (eng / "manifest.json").unlink()            # a hard link: never write through it into the fixture
    (eng / "manifest.json").write_text(json.dumps(man))
    (eng / "model.onnx.data").write_bytes(b"weights")
    model = tr.write_repository(eng, tmp_path / "repo", verify=False)
    assert sorted(p.name for p in (model / "1" / "model.onnx").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (model / "1" / "model.onnx" / "model.onnx.data").read_bytes() == b"weights"


def test_config_text_that_breaks_the_schema_is_refused(tiny_engine):
    spec = tr.model_spec(read_manifest(tiny_engine))
    text = tr.config_text(spec)
    tr.check_config(text, spec)
    with pytest.raises(ClipfuseError, match="does not parse as Triton's ModelConfig"):
        tr.check_config(text.replace("dims:", "dimensions:"))
    with pytest.raises(ClipfuseError, match="does not parse"):
        tr.check_config(text.replace("KIND_CPU", "KIND_TPU"))
    with pytest.raises(ClipfuseError, match="above max_batch_size"):
        tr.check_config(text.replace("max_batch_size: 8", "max_batch_size: 2"))


def test_bad_options_are_named_and_nothing_is_written(tiny_engine, tmp_path):
    out = tmp_path / "repo"
    for kwargs, match in [(dict(backend="tensorrt"), "no TensorRT plan.*clipfuse build"),
                          (dict(backend="tensorrt", kind="cpu"), "--kind gpu"),
                          (dict(backend="openvino"), "unknown Triton backend"),
                          (dict(max_batch=0), "--max-batch"),
                          (dict(instances=0), "--instances"),
                          (dict(max_batch=4, preferred=[8]), "outside 1..max_batch"),
                          (dict(model_name="a/b"), "not valid for Triton")]:
        with pytest.raises(ClipfuseError, match=match):
            tr.write_repository(tiny_engine, out, **kwargs)
    assert not out.exists() or not any(out.iterdir())


def test_plan_profile_bounds_max_batch(engine_with_plan, tmp_path):
    eng = tmp_path / "eng"
    shutil.copytree(engine_with_plan, eng, copy_function=os.link)
    man = json.loads((eng / "manifest.json").read_text())
    man["plans"] = {"fp16": {"batch": [1, 8, 32]}}
    (eng / "manifest.json").unlink()
    (eng / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ClipfuseError, match="above the plan's profile maximum 32"):
        tr.write_repository(eng, tmp_path / "repo", backend="tensorrt", max_batch=64, verify=False)
    assert tr.write_repository(eng, tmp_path / "repo", backend="tensorrt", max_batch=32, verify=False).is_dir()


def test_cli_writes_repository_and_refuses_overwrite(tiny_engine, tmp_path):
    out = tmp_path / "repo"
    r = run("triton", tiny_engine, "--out", out, "--max-batch", 4, "--instances", 1)
    assert r.exit_code == 0, r.output
    cfg = parse(out / "tiny" / "config.pbtxt")
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert str(out / "tiny") in r.stdout
    r = run("triton", tiny_engine, "--out", out)
    assert r.exit_code == 1 and "already exists; pass --force" in r.stderr
    r = run("triton", tiny_engine, "--out", out, "--force", "--queue-delay-us", 500)
    assert r.exit_code == 0 and parse(out / "tiny" / "config.pbtxt").dynamic_batching.max_queue_delay_microseconds == 500
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no temporary folder left behind


def test_force_never_replaces_a_user_folder_a_file_or_a_symlink(tiny_engine, tmp_path):
    """--force replaces only a model folder clipfuse wrote; anything else is one line."""
    repo = tmp_path / "r"
    (repo / "photos").mkdir(parents=True)
    (repo / "photos" / "cat.jpg").write_text("a")
    (repo / "notes").write_text("mine")
    (repo / "link").symlink_to(repo / "photos")
    for model, why in (("photos", "is not a model folder clipfuse wrote (it holds 'cat.jpg')"),
                       ("notes", "is a file, not a model folder"), ("link", "is a symbolic link, not a model folder")):
        r = run("triton", tiny_engine, "--out", repo, "--model", model, "--force")
        assert r.exit_code == 1 and why in r.stderr and "Traceback" not in r.output, r.output
        assert len(r.stderr.strip().splitlines()) == 1
    assert (repo / "photos" / "cat.jpg").read_text() == "a" and (repo / "notes").read_text() == "mine"
    assert (repo / "link").is_symlink()
    # its own model folder is still replaced, and nothing temporary is left
    for _ in range(2):
        r = run("triton", tiny_engine, "--out", repo, "--model", "m", "--force")
        assert r.exit_code == 0, r.output
    assert parse(repo / "m" / "config.pbtxt").name == "m"
    assert sorted(p.name for p in repo.iterdir()) == ["link", "m", "notes", "photos"]
