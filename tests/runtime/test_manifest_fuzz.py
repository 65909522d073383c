"""The manifest as hostile input: wrong types, missing keys, hostile file names; the cascade and int8-stage
blocks, their bindings and the nesting depth.

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
from click.testing import CliRunner

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


def attempt(box: Path, data: dict | str, reader=read_manifest) -> str:
    """Write `data` (or JSON text) as the engine's manifest and hand the folder to `reader` (read_manifest by
    default); -> the refusal's message (asserting what every case must)."""
    global _RECORDING
    engine = box / "engine"
    (engine / "manifest.json").write_text(data if isinstance(data, str) else json.dumps(data))
    _RECORDING = []
    try:
        with pytest.raises(ClipfuseError) as e:
            reader(engine)
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


# ----------------------------------------------------------------------------- the cascade and precision blocks

@pytest.fixture(scope="module")
def cascade_box(tmp_path_factory):
    """box/engine: a two-stage cascade exported directly (no fit), box/secret.bin outside it."""
    import torch
    from conftest import TINY, TINY_CLASSES, TWO_TEMPLATES

    from clipfuse.export.graph.engine import export_engine
    from clipfuse.export.graph.fused import ConstantController, StaticController

    root = tmp_path_factory.mktemp("cascade-box")
    block = {"order": TINY[:2], "score": "max-prob", "thresholds": [0.5], "expected_exit_rates": [0.5, 0.5]}
    export_engine(TINY[:2], TINY_CLASSES, root / "engine", templates=TWO_TEMPLATES,
                  controller=ConstantController(2),
                  cascade={"controllers": [StaticController(torch.ones(1)), ConstantController(2)], "block": block})
    (root / "secret.bin").write_bytes(b"outside")
    return root


@pytest.fixture(scope="module")
def cascade_original(cascade_box):
    return json.loads((cascade_box / "engine" / "manifest.json").read_text())


def attempt_cascade(box: Path, data: dict | str) -> str:
    """As attempt(), for the cascade block: the refusal comes on read or when the cascade is opened."""
    from clipfuse.runtime.cascade import CascadeBackend

    return attempt(box, data, lambda engine: CascadeBackend(read_manifest(engine)).open().close())


CASCADE_FIELDS = [("cascade", "order"), ("cascade", "order", 0), ("cascade", "score"), ("cascade", "thresholds"),
                  ("cascade", "thresholds", 0), ("cascade", "stages"), ("cascade", "stages", 0)] + [
    ("cascade", "stages", 0, k) for k in ("backbone", "input", "embed_dim", "tower", "combine")]


def test_every_wrong_cascade_field_is_one_line(cascade_box, cascade_original):
    cases = 0
    for path in CASCADE_FIELDS:
        for value in [*WRONG, _DELETE, -5, 1000, "abc", [True, False]]:
            data = copy.deepcopy(cascade_original)
            _set(data, path, value)
            attempt_cascade(cascade_box, data)
            cases += 1
    assert cases > 150


@pytest.mark.parametrize("edit, expect", [
    ('"thresholds": [1e400]', "'cascade.thresholds' must be a list of 1 finite number(s) or null"),
    ('"thresholds": [NaN]', "'cascade.thresholds' must be a list of 1 finite number(s) or null"),
    ('"thresholds": [true]', "got [true]"),
])
def test_thresholds_out_of_json_range_or_bool_are_refused(cascade_box, cascade_original, edit, expect):
    text = json.dumps(cascade_original).replace('"thresholds": [0.5]', edit, 1)
    assert edit in text
    assert expect in attempt_cascade(cascade_box, text)


def test_stage_fields_the_router_reads_are_named(cascade_box, cascade_original):
    def edited(fn):
        data = copy.deepcopy(cascade_original)
        fn(data["cascade"])
        return data
    assert "'cascade.stages[0].input' must name one of the graph inputs" in attempt_cascade(
        cascade_box, edited(lambda c: c["stages"][0].pop("input")))
    for dim in ("abc", -5, 1000, _DELETE):
        msg = attempt_cascade(cascade_box, edited(lambda c: _set(c, ("stages", 0, "embed_dim"), dim)))
        assert "'cascade.stages[0].embed_dim' must be backbone 1's embedding width (32)" in msg
    msg = attempt_cascade(cascade_box, edited(lambda c: _set(c, ("order", 0), "RN50:openai")))
    assert "'cascade.order' names unknown backbone(s) ['RN50:openai']" in msg


def test_thresholds_and_order_are_bound_to_a_hash(cascade_box, cascade_original):
    """A well-formed edit (0.5 -> 0.9) used to be served silently; now the recorded sha256 no longer matches."""
    data = copy.deepcopy(cascade_original)
    data["cascade"]["thresholds"] = [0.9]
    assert "the 'cascade' block of manifest.json is not the one clipfuse wrote" in attempt_cascade(cascade_box, data)
    data = copy.deepcopy(cascade_original)
    data["cascade"]["score"] = "margin"
    assert "is not the one clipfuse wrote" in attempt_cascade(cascade_box, data)
    data = copy.deepcopy(cascade_original)
    del data["bindings"]
    assert "carries no recorded sha256" in attempt_cascade(cascade_box, data)


def test_combine_graphs_swapped_between_stages_are_refused_at_load(cascade_box, cascade_original):
    """Both files are hashed artefacts, and the binding is rewritten too: only the graphs' IO can tell."""
    from clipfuse.runtime.manifest_checks import bind_blocks

    for kind in ("combine", "tower"):
        data = copy.deepcopy(cascade_original)
        st = data["cascade"]["stages"]
        st[0][kind], st[1][kind] = st[1][kind], st[0][kind]
        msg = attempt_cascade(cascade_box, bind_blocks(data))
        assert f"the {kind} graph of stage 1 has" in msg and "stage graphs swapped or replaced" in msg


@pytest.mark.parametrize("value", [*WRONG, "yes", ["a"]], ids=repr)
def test_a_bad_int8_cascade_record_stops_only_the_int8_stages(cascade_box, cascade_original, value, photo_paths):
    """precisions.int8.cascade "yes" used to break every command with an AttributeError: fp32 predict and inspect
    go on, and the int8 stages are refused in one line."""
    from clipfuse.cli.main import cli
    from clipfuse.runtime.manifest_checks import check_int8_cascade

    engine = cascade_box / "engine"
    data = copy.deepcopy(cascade_original)
    data["precisions"] = {"int8": {"cascade": value}}
    (engine / "manifest.json").write_text(json.dumps(data))
    m = read_manifest(engine)
    with pytest.raises(ClipfuseError) as e:
        check_int8_cascade(m.data, 2, "engine E", "HINT", "RERUN")
    assert "\n" not in str(e.value) and str(e.value).startswith("engine E")
    if value in ("yes", ["a"]):
        runner = CliRunner()
        assert runner.invoke(cli, ["inspect", str(engine)]).exit_code == 0
        r = runner.invoke(cli, ["predict", str(engine), str(photo_paths[0])])
        assert r.exit_code == 0, r.output


def test_int8_towers_must_be_the_int8_files(cascade_box, cascade_original):
    from clipfuse.runtime.manifest_checks import bind_blocks, check_int8_cascade

    data = bind_blocks(dict(copy.deepcopy(cascade_original), precisions={"int8": {"cascade": {
        "written": True, "towers": ["stages/tower_1.onnx", "stages/tower_2.onnx"], "thresholds": [0.5]}}}))
    with pytest.raises(ClipfuseError, match=r"'precisions.int8.cascade.towers' must be the int8 stage towers "
                                            r"\['stages/tower_1.int8.onnx', 'stages/tower_2.int8.onnx'\]"):
        check_int8_cascade(data, 2, "engine E", "HINT", "RERUN")
    rec = data["precisions"]["int8"]["cascade"]
    rec["towers"] = ["stages/tower_1.int8.onnx", "stages/tower_2.int8.onnx"]
    with pytest.raises(ClipfuseError, match="is not the one clipfuse wrote"):      # edited after binding
        check_int8_cascade(data, 2, "engine E", "HINT", "RERUN")
    assert check_int8_cascade(bind_blocks(data), 2, "engine E", "HINT", "RERUN") is rec
    rec["thresholds"] = [True]
    with pytest.raises(ClipfuseError, match="'precisions.int8.cascade.thresholds' must be a list of 1"):
        check_int8_cascade(bind_blocks(data), 2, "engine E", "HINT", "RERUN")


# ----------------------------------------------------------------------------- nesting depth

def test_deep_nesting_is_one_line_everywhere(box, original, tmp_path, photo_paths):
    from clipfuse.cli.main import cli
    from clipfuse.export.graph.engine_folder import check_output_folder

    text = json.dumps(original)[:-1] + ', "extra": ' + "[" * 1500 + "]" * 1500 + "}"
    msg = attempt(box, text)
    assert "nests lists or objects deeper than 32 levels" in msg
    engine = box / "engine"
    runner = CliRunner()
    for args in (["predict", str(engine), str(photo_paths[0])], ["inspect", str(engine)],
                 ["export", str(engine), "--precision", "fp16"]):
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and "nests lists or objects deeper than 32" in r.output, (args, r.output)
        assert not isinstance(r.exception, RecursionError)
    with pytest.raises(ClipfuseError):          # export --force: not an engine folder it may replace
        check_output_folder(engine, force=True)
    (engine / "manifest.json").write_text(json.dumps(original))
