"""The manifest as hostile input: wrong types, missing keys, hostile file names.

Every case must end in a ClipfuseError with a one-line message, and nothing outside the engine folder
may be opened while reading it (an audit hook records every `open`). Names that point outside are
refused from the text alone: the message is the same whether the outside file exists or not.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.manifest import read_manifest, sha256_file

# Audit hooks cannot be removed: one is installed once and records only while a test asks it to.
_RECORDING: list | None = None


def _audit(event, args):
    if _RECORDING is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _RECORDING.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace")))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def box(tiny_engine, tmp_path_factory):
    """box/engine (a copy of the tiny engine), box/secret.bin (a file outside it)."""
    root = tmp_path_factory.mktemp("box")
    engine = Path(shutil.copytree(tiny_engine, root / "engine"))
    (root / "secret.bin").write_bytes(b"outside")
    (root / "outside_heads.safetensors").write_bytes((engine / "heads.safetensors").read_bytes())
    (engine / "link.safetensors").symlink_to(root / "outside_heads.safetensors")
    (engine / "inside_link.safetensors").symlink_to("heads.safetensors")
    return root


def opened_outside(folder: Path, paths: list[str]) -> list[str]:
    inside = folder.resolve()
    return [p for p in paths if not Path(p).resolve().is_relative_to(inside)]


def attempt(box: Path, data: dict) -> str:
    """Write `data` as the engine's manifest, read it; -> the refusal's message (asserting what every case must)."""
    global _RECORDING
    engine = box / "engine"
    (engine / "manifest.json").write_text(json.dumps(data))
    _RECORDING = []
    try:
        with pytest.raises(ClipfuseError) as e:
            read_manifest(engine)
    finally:
        seen, _RECORDING = _RECORDING, None
    msg = str(e.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    assert not opened_outside(engine, seen), f"opened outside the folder: {opened_outside(engine, seen)}"
    return msg


@pytest.fixture(scope="module")
def original(box):
    return json.loads((box / "engine" / "manifest.json").read_text())


def _set(data, path, value):
    *head, last = path
    for k in head:
        data = data[k]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()
WRONG = [None, 0, 1.5, True, "x", [], {}, [1], {"a": 1}]
FIELDS = [("backbones",), ("backbones", 0), ("backbones", 0, "arch"), ("classes",), ("classes", 0), ("templates",),
          ("inputs",), ("inputs", 0), ("inputs", 0, "name"), ("inputs", 0, "shape"), ("inputs", 0, "preprocess"),
          ("inputs", 0, "preprocess", "size"), ("inputs", 0, "preprocess", "interpolation"),
          ("inputs", 0, "preprocess", "resize_mode"), ("outputs",), ("outputs", 0), ("outputs", 0, "name"),
          ("onnx",), ("onnx", "file"), ("heads_file",), ("controller",), ("controller", "file"),
          ("artefacts",), ("artefacts", "model.onnx"), ("artefacts", "model.onnx", "sha256"),
          ("artefacts", "model.onnx", "bytes"), ("schema_version",), ("versions",), ("format",)]
# Well-typed values that read_manifest accepts on purpose: names the graph check refuses when the backend
# opens (test_renamed_tensor_is_refused_when_the_backend_opens), a label, and optional objects.
ACCEPTED = {(("backbones", 0, "arch"), "'x'"), (("inputs", 0, "name"), "'x'"), (("outputs", 0, "name"), "'x'"),
            (("controller",), "{}"), (("controller",), "{'a': 1}"), (("versions",), "None"),
            (("versions",), "{}"), (("versions",), "{'a': 1}")}
REQUIRED = ["format", "schema_version", "backbones", "classes", "inputs", "outputs", "onnx", "artefacts"]


def test_every_wrong_type_is_one_line(box, original):
    cases = 0
    for path in FIELDS:
        for value in WRONG:
            data = copy.deepcopy(original)
            try:
                current = data
                for k in path:
                    current = current[k]
            except (KeyError, IndexError, TypeError):
                continue
            if (type(value) is type(current) and value == current) or (path, repr(value)) in ACCEPTED:
                continue
            _set(data, path, value)
            msg = attempt(box, data)
            cases += 1
            assert "Traceback" not in msg
    assert cases > 200


@pytest.mark.parametrize("key", REQUIRED + ["heads_file", "controller"])
def test_missing_keys(box, original, key):
    data = copy.deepcopy(original)
    del data[key]
    attempt(box, data)


def test_schema_version_as_a_string_is_reported_with_its_type(box, original):
    msg = attempt(box, dict(original, schema_version="1"))
    assert "schema version '1' (a str), this clipfuse reads version 1 (an integer)" in msg
    assert "(a bool)" in attempt(box, dict(original, schema_version=True))


HOSTILE = ["/etc/passwd", "../secret.bin", "../../secret.bin", "sub/../../secret.bin", "a\0b", "a\nb",
           "..", "C:\\secret.bin", "\\\\server\\share\\x", "link.safetensors"]
FILE_FIELDS = [("onnx", "file"), ("onnx", "external_data"), ("heads_file",), ("controller", "file"),
               ("precisions", "fp16", "file"), ("plans", "fp32", "file"), ("plans", "fp32", "layers"),
               ("fit", "static_file"), ("fit", "report")]


def _with_file(original, path, name, box):
    data = copy.deepcopy(original)
    for group in ("precisions", "plans", "fit"):
        data.setdefault(group, {})
    data["precisions"].setdefault("fp16", {})
    data["plans"].setdefault("fp32", {})
    _set(data, path, name)
    target = box / "engine" / name if "\0" not in name else None
    try:            # listed with the hash of what it points at: only where the name leads is wrong
        meta = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    except (OSError, TypeError, ValueError):
        meta = {"sha256": "0" * 64, "bytes": 1}
    data["artefacts"][name] = meta
    return data


@pytest.mark.parametrize("field", FILE_FIELDS, ids=".".join)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_names_are_refused_unopened(box, original, field, name):
    msg = attempt(box, _with_file(original, field, name, box))
    assert "secret" not in msg or "refused without opening" in msg or "control character" in msg


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_artefact_names_are_refused_unopened(box, original, name):
    data = copy.deepcopy(original)
    data["artefacts"][name] = {"sha256": "0" * 64, "bytes": 7}
    attempt(box, data)


def test_outside_refusal_does_not_tell_whether_the_file_exists(box, original):
    for there, absent in (("../secret.bin", "../absent.bin"), (str(box / "secret.bin"), str(box / "absent.bin"))):
        a, b = (copy.deepcopy(original) for _ in range(2))
        a["artefacts"][there] = b["artefacts"][absent] = {"sha256": "0" * 64, "bytes": 7}
        assert attempt(box, a).replace(there, "X") == attempt(box, b).replace(absent, "X")


def test_file_fields_must_be_hashed_artefacts(box, original):
    for path in (("onnx", "file"), ("heads_file",), ("controller", "file")):
        data = copy.deepcopy(original)
        name = {("onnx", "file"): "model.onnx", ("heads_file",): "heads.safetensors",
                ("controller", "file"): "controller.safetensors"}[path]
        del data["artefacts"][name]
        assert "is not among 'artefacts'" in attempt(box, data)
    assert "'artefacts' is empty" in attempt(box, dict(original, artefacts={}))


def test_symlinks_inside_the_folder_are_followed(box, original):
    data = copy.deepcopy(original)
    data["heads_file"] = "inside_link.safetensors"
    data["artefacts"]["inside_link.safetensors"] = dict(data["artefacts"]["heads.safetensors"])
    (box / "engine" / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(box / "engine").data["heads_file"] == "inside_link.safetensors"
    (box / "engine" / "manifest.json").write_text(json.dumps(original))
    assert read_manifest(box / "engine").classes == original["classes"]     # the untouched copy still reads


def test_edited_class_name_is_refused(box, original):
    """Same count, one name changed -> refused, not answered under the new name."""
    data = copy.deepcopy(original)
    data["classes"][1] = "tiger"
    assert "the classes in manifest.json are not those heads.safetensors was exported with" in attempt(box, data)
    data = copy.deepcopy(original)
    data["templates"] = data["templates"][::-1]
    assert "the templates in manifest.json" in attempt(box, data)


def test_engine_without_a_class_binding_is_refused_with_the_rebuild_command(tmp_path, tiny_engine):
    from safetensors.numpy import load_file, save_file

    engine = Path(shutil.copytree(tiny_engine, tmp_path / "old"))
    heads = {k: v for k, v in load_file(str(engine / "heads.safetensors")).items() if k.startswith("head.")}
    save_file(heads, str(engine / "heads.safetensors"),
              metadata={"kinds": "zero-shot,zero-shot,zero-shot"})     # as clipfuse wrote it before the binding
    data = json.loads((engine / "manifest.json").read_text())
    data["artefacts"]["heads.safetensors"] = {"sha256": sha256_file(engine / "heads.safetensors"),
                                              "bytes": (engine / "heads.safetensors").stat().st_size}
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ClipfuseError) as e:
        read_manifest(engine)
    assert "exported before class names were bound" in str(e.value) and "--force" in str(e.value)


def test_artefact_that_is_a_folder_is_named_as_such(box, original):
    (box / "engine" / "adir").mkdir(exist_ok=True)
    data = copy.deepcopy(original)
    data["artefacts"]["adir"] = {"sha256": "0" * 64, "bytes": 0}
    assert "artefact adir is a folder, not a file" in attempt(box, data)


def test_renamed_tensor_is_refused_when_the_backend_opens(tmp_path, tiny_engine):
    from clipfuse.runtime.predict import load_predictor

    engine = Path(shutil.copytree(tiny_engine, tmp_path / "e"))
    data = json.loads((engine / "manifest.json").read_text())
    data["inputs"][0]["name"] = "x"
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ClipfuseError, match="the folder mixes two exports"):
        load_predictor(engine, backend="onnxruntime")


def test_the_open_recorder_sees_opens(box, original):
    """The audit hook behind every 'nothing opened outside' assertion does record: a valid read opens the
    manifest and hashes the artefacts."""
    global _RECORDING
    (box / "engine" / "manifest.json").write_text(json.dumps(original))
    _RECORDING = []
    try:
        read_manifest(box / "engine")
    finally:
        seen, _RECORDING = _RECORDING, None
    names = {Path(p).name for p in seen}
    assert {"manifest.json", "model.onnx", "heads.safetensors"} <= names
    assert opened_outside(box / "engine", [str(box / "secret.bin")])      # and the outside test can fail
