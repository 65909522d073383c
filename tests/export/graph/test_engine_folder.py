"""The one engine-folder writer: --force rules, the writer lock, leftovers of killed writers, write
errors and bad weights in one line, and progress that the logger at WARNING silences."""
from __future__ import annotations

import errno
import logging
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, TWO_TEMPLATES

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph import engine_folder
from clipfuse.export.graph.engine import export_engine
from clipfuse.runtime.manifest import read_manifest


def _export(out, **kw):
    return export_engine(TINY[:1], "a,b", out, templates=TWO_TEMPLATES, **kw)


def _user_folder(tmp_path):
    out = tmp_path / "notes"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub" / "data.csv").write_text("1,2\n")
    return out


def test_force_refuses_a_folder_that_is_not_an_engine(tmp_path):
    out = _user_folder(tmp_path)
    for force in (False, True):
        with pytest.raises(ClipfuseError, match=r"not a clipfuse engine \(it holds 'thesis.txt'\).*even with --force"):
            _export(out, force=force)
    assert (out / "thesis.txt").read_text() == "four years of work" and (out / "sub" / "data.csv").is_file()


def test_cli_force_refusal_is_one_line(tmp_path):
    from clipfuse.cli.main import cli

    out = _user_folder(tmp_path)
    r = CliRunner().invoke(cli, ["export", "-b", TINY[0], "-c", "a,b", "-o", str(out), "--force", "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "not a clipfuse engine" in r.output
    assert (out / "thesis.txt").is_file()


def test_force_replaces_an_empty_folder(tmp_path):
    (tmp_path / "e").mkdir()
    _export(tmp_path / "e")          # empty: no --force needed
    read_manifest(tmp_path / "e")


def test_output_that_is_or_holds_the_current_folder_is_refused(tmp_path, monkeypatch):
    from clipfuse.cli.main import cli

    out = tmp_path / "e"
    _export(out)
    (out / "sub").mkdir()
    for cwd, arg in ((out, "."), (out / "sub", "..")):
        monkeypatch.chdir(cwd)
        r = CliRunner().invoke(cli, ["export", "-b", TINY[0], "-c", "a,b", "-o", arg, "--force", "-q"])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "is the current folder or holds it" in r.output
    read_manifest(out)


def test_second_writer_is_refused_while_the_lock_is_held(tmp_path):
    out = tmp_path / "e"
    _export(out)
    before = (out / "manifest.json").read_text()
    with engine_folder.folder_lock(out):             # another writer, mid-export
        with pytest.raises(ClipfuseError, match="another clipfuse process is writing"):
            _export(out, force=True)
        assert engine_folder.is_locked(out)
    assert (out / "manifest.json").read_text() == before and not engine_folder.is_locked(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]     # the lock file is gone too


def test_lock_refuses_across_processes(tmp_path):
    """flock between processes: a child holding the lock makes this process's export refuse."""
    import subprocess
    import sys

    out = tmp_path / "e"
    code = ("import sys, time; from clipfuse.export.graph.engine_folder import folder_lock\n"
            f"with folder_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ClipfuseError, match="another clipfuse process is writing"):
            _export(out)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert not out.exists() and not engine_folder.is_locked(out)


def test_leftovers_of_killed_writers_are_removed_with_progress(tmp_path, capsys, caplog):
    out = tmp_path / "e"
    _export(out)
    dead_tmp = tmp_path / ".e.tmp-killed1"          # what a kill -9 mid-export leaves beside the folder
    dead_tmp.mkdir()
    (dead_tmp / "model.onnx").write_bytes(b"x" * 1000)
    dead_old = tmp_path / ".e.old-12345"
    dead_old.mkdir()
    dead_stage = out / ".clipfuse.tmp-killed2"      # and what a killed fp16/TensorRT writer leaves inside
    dead_stage.mkdir()
    capsys.readouterr()
    _export(out, force=True)
    err = capsys.readouterr().err
    assert not dead_tmp.exists() and not dead_old.exists() and not dead_stage.exists()
    assert "removed 3 leftover temporary item(s)" in err and ".e.tmp-killed1" in err
    # progress: counted steps through the export, and the zero-shot head's bar over classes
    assert "[1/5] backbone 1/1" in err and "[5/5] writing and hashing artefacts" in err
    assert "zero-shot head" in err and "class" in err
    caplog.set_level(logging.WARNING, logger="clipfuse")       # what -q does
    _export(out, force=True)
    assert capsys.readouterr().err == ""


def test_leftovers_of_a_live_writer_are_kept(tmp_path):
    out = tmp_path / "e"
    live = tmp_path / ".e.tmp-live"
    live.mkdir()
    with engine_folder.folder_lock(out):
        with pytest.raises(ClipfuseError, match="another clipfuse process"):
            _export(out)
        assert live.is_dir()


def test_disk_full_during_export_is_one_line(tmp_path, monkeypatch):
    from clipfuse.export.graph import heads
    out = tmp_path / "e"
    _export(out)
    before = (out / "manifest.json").read_text()

    def full(heads_, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(heads, "save_heads", full)
    with pytest.raises(ClipfuseError, match="cannot write engine folder .*no space left on the device.*nothing "
                                            "was changed") as e:
        _export(out, force=True)
    assert "\n" not in str(e.value)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_nan_weights_name_the_backbone_and_the_real_folder(tmp_path):
    from clipfuse.export.graph.backbones import load_backbone

    b = load_backbone(TINY[0])
    with torch.no_grad():
        next(b.model.visual.parameters()).fill_(float("nan"))
    out = tmp_path / "e"
    with pytest.raises(ClipfuseError) as e:
        export_engine([b], "a,b", out, templates=TWO_TEMPLATES)
    msg = str(e.value)
    assert f"non-finite outputs/weights in backbone {TINY[0]} of {str(out)!r}" in msg, msg
    assert ".tmp-" not in msg and "tolerance nan" not in msg
    assert list(tmp_path.iterdir()) == []


def test_fp16_into_a_read_only_engine_folder_is_one_line(tiny_engine, tmp_path, monkeypatch):
    from clipfuse.cli.main import cli

    folder = tmp_path / "ro"
    shutil.copytree(tiny_engine, folder)
    real = os.access
    # root ignores permission bits: make the writer see what a user would (readable, not writable)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder) and mode & os.W_OK
                        else real(p, mode))
    r = CliRunner().invoke(cli, ["export", str(folder), "--precision", "fp16", "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "is read-only: cannot add model.fp16.onnx" in r.output
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_engine.iterdir())


def test_fp16_disk_full_is_one_line_and_changes_nothing(tiny_engine, tmp_path, monkeypatch):
    from clipfuse.export.precision import fp16
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    before = (folder / "manifest.json").read_bytes()

    def full(src, dst, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(fp16, "convert_fp16", full)
    with pytest.raises(ClipfuseError, match="cannot write model.fp16.onnx into engine folder .*no space left"):
        fp16.export_fp16(folder)
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_engine.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_shape_inference_failure_is_recorded_not_swallowed(monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    from clipfuse.export.precision import validate
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g)
    ops, notes = validate._fp32_compute_nodes(model)
    assert ops == ["Relu"] and notes == []

    def broken(m):
        raise onnx.shape_inference.InferenceError("unknown op")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    ops, notes = validate._fp32_compute_nodes(model)
    assert ops == ["Relu"] and "shape inference failed (InferenceError: unknown op)" in notes[0]


def test_lock_falls_back_inside_the_folder_when_the_parent_refuses(tmp_path, monkeypatch):
    """Adding files (fp16, TensorRT) to an engine whose parent is read-only still takes a lock."""
    folder = tmp_path / "e"
    folder.mkdir()
    real = os.open

    def no_parent(path, *a, **k):
        if str(path) == str(engine_folder.lock_path(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", no_parent)
    with engine_folder.folder_lock(folder, inside_ok=True) as path:
        assert path == folder / ".clipfuse.lock"
        with pytest.raises(ClipfuseError, match="another clipfuse process"):
            with engine_folder.folder_lock(folder, inside_ok=True):
                pass
    assert not path.exists()
    with pytest.raises(ClipfuseError, match="cannot create the lock file"):
        with engine_folder.folder_lock(folder):
            pass
