"""Precisions are independent and their commit is atomic: a writer killed between an
added graph's rename and the manifest update leaves the old pair (put back by the next writer) or the new
one, and a precision whose file does not match its record is named and set aside while fp32, inspect,
re-export and the other precisions keep working; exporting that precision again rebuilds it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph.engine_folder import update_engine_folder
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.precisions import precision_onnx_path

INT8 = "model.int8.onnx"


def _add_int8(folder, data: bytes, kill_before_manifest: bool = False):
    """Add (or replace) an int8 record + file through the one writer; optionally in a child killed
    (os._exit, no cleanup) after the file's rename and before the manifest update."""
    code = ("import os, sys, pathlib\n"
            "from clipfuse.export.graph import engine_folder\n"
            f"if {kill_before_manifest}:\n"
            "    engine_folder._before_manifest = lambda: os._exit(9)\n"
            "with engine_folder.update_engine_folder(pathlib.Path(sys.argv[1])) as u:\n"
            f"    u.path({INT8!r}).write_bytes(sys.argv[2].encode())\n"
            "    u.edit_manifest(lambda d: d.setdefault('precisions', {}).__setitem__('int8', "
            f"{{'file': {INT8!r}}}))\n")
    p = subprocess.run([sys.executable, "-c", code, str(folder), data.decode()], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == (9 if kill_before_manifest else 0), p.stderr


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_kill_before_the_manifest_update_leaves_the_old_pair_and_blocks_nothing(tiny_engine, tmp_path, photo_paths):
    e = tmp_path / "e"
    shutil.copytree(tiny_engine, e)
    _add_int8(e, b"old int8 graph")
    _add_int8(e, b"new int8 graph!", kill_before_manifest=True)
    assert (e / INT8).read_bytes() == b"new int8 graph!"          # the kill window: new file, old record
    # readers: int8 is named and set aside; fp32 predict and inspect work
    m = read_manifest(e)
    assert "int8" in m.broken and "int8" not in m.data.get("precisions", {})
    with pytest.raises(ClipfuseError, match=r"int8 is set aside.*model.int8.onnx.*make it again with `clipfuse "
                                            r"export .* --precision int8"):
        precision_onnx_path(m, "int8")
    r = _cli("predict", e, photo_paths[0])
    assert r.exit_code == 0, r.output
    assert _cli("inspect", e).exit_code == 0
    # the next writer (any: here one that adds nothing) puts the old pair back
    with update_engine_folder(e):
        pass
    assert (e / INT8).read_bytes() == b"old int8 graph"
    m = read_manifest(e)
    assert m.broken == {} and precision_onnx_path(m, "int8") == e / INT8


def test_a_precision_whose_file_does_not_match_is_set_aside_and_rebuilt(fp16_engine, tmp_path, photo_paths):
    from clipfuse.export.precision.fp16 import export_fp16

    e = tmp_path / "e"
    shutil.copytree(fp16_engine, e)
    _add_int8(e, b"int8 graph")
    (e / INT8).write_bytes(b"int8 graph, half-copied")
    (e / "model.fp16.onnx").write_bytes((e / "model.fp16.onnx").read_bytes()[:-10])
    m = read_manifest(e)
    assert set(m.broken) == {"int8", "fp16"}
    assert _cli("predict", e, photo_paths[0]).exit_code == 0
    r = _cli("predict", e, photo_paths[0], "--precision", "fp16")
    assert r.exit_code == 1 and "fp16 is set aside" in r.output and "Traceback" not in r.output
    # exporting fp16 again rebuilds it, with int8 still broken beside it
    export_fp16(e)
    m = read_manifest(e)
    assert set(m.broken) == {"int8"}
    assert _cli("predict", e, photo_paths[0], "--precision", "fp16").exit_code == 0
    # a re-export keeps working and does not carry the broken graph over as if it were good
    r = _cli("export", e, "-q")
    assert r.exit_code == 0, r.output
    m = read_manifest(e)
    assert m.broken == {} and "int8" not in m.data.get("precisions", {}) and not (e / INT8).exists()
    assert INT8 not in json.loads((e / "manifest.json").read_text())["artefacts"]


def test_fp32_files_are_not_optional(tiny_engine, tmp_path):
    e = tmp_path / "e"
    shutil.copytree(tiny_engine, e)
    (e / "model.onnx").write_bytes((e / "model.onnx").read_bytes()[:-1])
    with pytest.raises(ClipfuseError, match="model.onnx' has .* bytes, the manifest says"):
        read_manifest(e)


def test_int8_export_killed_before_its_manifest_update_then_rebuilt(tiny_vit_engine, calib_dir, tmp_path, photo_paths):
    """The issue's case on a real int8 export: re-exporting int8 over an existing one, killed after the graphs'
    renames and before the manifest update; every other command keeps working and the next int8 export
    rebuilds it."""
    e = tmp_path / "e"
    shutil.copytree(tiny_vit_engine, e)
    args = ["export", str(e), "--precision", "int8", "--calibration", str(calib_dir), "--calibration-count", "32",
            "-q"]
    assert _cli(*args).exit_code == 0
    first = (e / INT8).read_bytes()
    code = ("import os, sys\n"
            "from clipfuse.export.graph import engine_folder\n"
            "from clipfuse.cli.main import cli\n"
            "engine_folder._before_manifest = lambda: os._exit(9)\n"
            "cli(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", code, *args[:-1], "--int8-keep-fp32", "clipfuse-test-vit:random:0", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 9, p.stderr
    assert (e / INT8).read_bytes() != first          # the kill window: the new graph under the old record
    m = read_manifest(e)                             # no refusal: int8 is named and set aside
    assert "int8" in m.broken
    assert _cli("predict", e, photo_paths[0]).exit_code == 0 and _cli("inspect", e).exit_code == 0
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    m = read_manifest(e)
    assert m.broken == {} and precision_onnx_path(m, "int8") == e / INT8
    assert _cli("predict", e, photo_paths[0], "--precision", "int8").exit_code == 0
