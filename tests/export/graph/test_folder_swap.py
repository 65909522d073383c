"""Replacing a whole engine folder loses nothing: a re-export keeps what it did
not make, a writer killed between the swap's two renames leaves the old engine recoverable (the next writer
restores it, even one that fails), and an output that is a symbolic link is written through."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import TINY

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph import engine_folder
from clipfuse.export.graph.engine_folder import new_engine_folder
from clipfuse.runtime.manifest import read_manifest


def _engine(folder, model=b"old graph", **extra):
    """A minimal engine folder (what is_engine_folder and the swap look at): manifest + listed artefacts."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"model.onnx": model, "stages/tower_1.onnx": b"tower", **extra}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({"format": "clipfuse-engine",
                                                      "artefacts": {n: {} for n in files}}))
    return folder


def _foreign(folder):
    """What bench and a user add: none of it listed in the manifest."""
    (folder / "bench").mkdir()
    (folder / "bench" / "bench.json").write_text("{}")
    (folder / "singles" / "0-rn").mkdir(parents=True)
    (folder / "singles" / "0-rn" / "model.onnx").write_bytes(b"single")
    (folder / "NOTES.md").write_text("my notes")
    (folder / "mine").mkdir()
    (folder / "mine" / "a.txt").write_text("mine")


def _assert_foreign_kept(folder):
    assert (folder / "bench" / "bench.json").read_text() == "{}"
    assert (folder / "singles" / "0-rn" / "model.onnx").read_bytes() == b"single"
    assert (folder / "NOTES.md").read_text() == "my notes" and (folder / "mine" / "a.txt").read_text() == "mine"


def _write_new(tmp, model=b"new graph"):
    (tmp / "model.onnx").write_bytes(model)
    (tmp / "manifest.json").write_text(json.dumps({"format": "clipfuse-engine", "artefacts": {"model.onnx": {}}}))


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_replacing_an_engine_keeps_what_its_manifest_does_not_list(tmp_path):
    out = _engine(tmp_path / "e")
    _foreign(out)
    with new_engine_folder(out, force=True) as tmp:
        _write_new(tmp)
    assert (out / "model.onnx").read_bytes() == b"new graph"
    _assert_foreign_kept(out)
    assert not (out / "stages").exists()                # the old engine's own artefacts are not carried
    assert _siblings(out) == []                          # no .e.old-*, no .e.tmp-*, no lock


def test_a_foreign_name_the_new_folder_also_writes_is_refused_before_the_swap(tmp_path):
    out = _engine(tmp_path / "e")
    (out / "NOTES.md").write_text("my notes")
    with pytest.raises(ClipfuseError, match=r"holds 'NOTES.md', which its manifest does not list.*nothing was changed"):
        with new_engine_folder(out, force=True) as tmp:
            _write_new(tmp)
            (tmp / "NOTES.md").write_text("the writer's")
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "model.onnx").read_bytes() == b"old graph"
    assert _siblings(out) == []


def _kill_between_renames(out):
    """A writer killed (os._exit, no cleanup) after `out -> .out.old-PID` and before the new folder's rename."""
    code = ("import os, sys, pathlib\n"
            "from clipfuse.export.graph import engine_folder\n"
            "engine_folder._before_swap = lambda: os._exit(9)\n"
            "with engine_folder.new_engine_folder(pathlib.Path(sys.argv[1]), force=True) as tmp:\n"
            "    (tmp / 'model.onnx').write_bytes(b'new graph')\n"
            "    (tmp / 'manifest.json').write_text('{\"format\": \"clipfuse-engine\", \"artefacts\": {}}')\n")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 9, p.stderr
    olds = [n for n in _siblings(out) if n.startswith(".e.old-")]
    assert not out.exists() and len(olds) == 1     # the kill window: the old engine lives only under the old name
    return out.parent / olds[0]


def test_a_kill_between_the_swap_renames_is_restored_by_the_next_writer_even_one_that_fails(tmp_path, capsys):
    out = _engine(tmp_path / "e")
    _foreign(out)
    old = _kill_between_renames(out)
    assert (old / "model.onnx").read_bytes() == b"old graph"
    with pytest.raises(ClipfuseError, match=r"is missing, but .*\.e\.old-\d+' holds it: a clipfuse writer was "
                                            "interrupted"):
        read_manifest(out)                              # a reader says where the engine is
    with pytest.raises(RuntimeError, match="build failed"):
        with new_engine_folder(out, force=True):
            raise RuntimeError("build failed")
    assert "restored" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == b"old graph" and (out / "stages" / "tower_1.onnx").is_file()
    _assert_foreign_kept(out)
    assert _siblings(out) == []
    # and the next successful writer replaces it, keeping the foreign files
    _kill_between_renames(out)
    with new_engine_folder(out, force=True) as tmp:
        _write_new(tmp)
    assert (out / "model.onnx").read_bytes() == b"new graph"
    _assert_foreign_kept(out)
    assert _siblings(out) == []


def test_an_interrupt_between_the_renames_puts_the_old_engine_back_at_once(tmp_path, monkeypatch):
    out = _engine(tmp_path / "e")

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_folder, "_before_swap", interrupt)
    with pytest.raises(KeyboardInterrupt):
        with new_engine_folder(out, force=True) as tmp:
            _write_new(tmp)
    assert (out / "model.onnx").read_bytes() == b"old graph" and _siblings(out) == []


def test_an_old_folder_left_after_the_new_one_is_in_place_gives_back_its_foreign_files(tmp_path):
    out = _engine(tmp_path / "e", model=b"new graph")
    old = _engine(tmp_path / ".e.old-4242")          # killed after the second rename, before moving these
    _foreign(old)
    (old / "model.onnx").write_bytes(b"old graph")
    with new_engine_folder(out, force=True) as tmp:
        _write_new(tmp, b"newer graph")
    assert (out / "model.onnx").read_bytes() == b"newer graph"
    _assert_foreign_kept(out)
    assert _siblings(out) == []


def test_an_old_folder_that_cannot_be_settled_is_kept_and_reported(tmp_path, capsys):
    out = _engine(tmp_path / "e")
    (out / "NOTES.md").write_text("the new one's")      # a foreign name taken in the folder in place
    old = _engine(tmp_path / ".e.old-4242")
    (old / "NOTES.md").write_text("my notes")
    with new_engine_folder(out, force=True) as tmp:
        _write_new(tmp)
    assert (old / "NOTES.md").read_text() == "my notes"
    assert "kept" in capsys.readouterr().err


def test_an_output_that_is_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    real = _engine(tmp_path / "v3")
    _foreign(real)
    link = tmp_path / "current"
    link.symlink_to("v3")
    with new_engine_folder(link, force=True) as tmp:
        _write_new(tmp)
    assert link.is_symlink() and os.readlink(link) == "v3"
    assert (real / "model.onnx").read_bytes() == b"new graph"
    _assert_foreign_kept(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]     # no .current.old-* link


def test_a_dangling_symlink_output_is_one_line(tmp_path):
    from clipfuse.cli.main import cli

    (tmp_path / "current").symlink_to("gone")
    r = CliRunner().invoke(cli, ["export", "-b", TINY[0], "-c", "a,b", "-o", str(tmp_path / "current"), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "is a symbolic link to 'gone', which does not exist" in r.output
    assert (tmp_path / "current").is_symlink() and not (tmp_path / "gone").exists()


def test_a_leftover_old_symlink_is_removed_and_its_target_untouched(tmp_path):
    real = _engine(tmp_path / "v3")
    out = _engine(tmp_path / "e")
    (tmp_path / ".e.old-99").symlink_to("v3")            # what an older clipfuse left for a symlinked --out
    with new_engine_folder(out, force=True) as tmp:
        _write_new(tmp)
    assert not (tmp_path / ".e.old-99").is_symlink() and (real / "model.onnx").read_bytes() == b"old graph"


def test_reexport_keeps_bench_singles_and_user_files(tiny_engine, tmp_path):
    from clipfuse.cli.main import cli

    out = tmp_path / "e"
    shutil.copytree(tiny_engine, out, ignore=shutil.ignore_patterns("bench", "singles"))  # other tests bench it
    _foreign(out)
    r = CliRunner().invoke(cli, ["export", str(out), "-q"])
    assert r.exit_code == 0, r.output
    _assert_foreign_kept(out)
    read_manifest(out)
    assert _siblings(out) == []
