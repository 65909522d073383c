"""Folders that cannot be written are refused before the work, in one line naming them:
bench's results and singles folders (the singles go under --out when given, so a read-only engine can be
benched), fit's feature cache (--cache or $CLIPFUSE_CACHE)."""
from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import TINY

from clipfuse.bench import run
from clipfuse.cli.main import cli
from clipfuse.export.fit import pipeline


def _read_only(monkeypatch, *folders):
    """Make the writers see `folders` (and what is under them) as a user would see read-only folders: root
    ignores permission bits, so os.access is what answers."""
    real = os.access
    roots = [str(f) for f in folders]

    def access(p, mode):
        if mode & os.W_OK and any(str(p) == r or str(p).startswith(r + os.sep) for r in roots):
            return False
        return real(p, mode)

    monkeypatch.setattr(os, "access", access)


def _one_line_error(r, *parts):
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and all(p in r.output for p in parts), r.output


@pytest.fixture
def data(tmp_path, photo_paths):
    for i, p in enumerate(photo_paths[:4]):
        (tmp_path / "data" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, tmp_path / "data" / "ab"[i % 2] / p.name)
    return tmp_path / "data"


def _no_features(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("features were computed before the cache folder was checked")

    monkeypatch.setattr(pipeline, "compute_features", refuse)


def test_fit_cache_that_is_a_file_is_refused_before_features(data, tmp_path, monkeypatch):
    _no_features(monkeypatch)
    (tmp_path / "c").write_text("not a folder")
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(data), "-o", str(tmp_path / "e"),
                                 "--cache", str(tmp_path / "c" / "sub"), "-q"])
    _one_line_error(r, "feature cache folder", str(tmp_path / "c" / "sub"), "a part of its path is a file")
    monkeypatch.setenv("CLIPFUSE_CACHE", str(tmp_path / "c"))
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(data), "-o", str(tmp_path / "e"), "-q"])
    _one_line_error(r, "feature cache folder", str(tmp_path / "c" / "features"), "a part of its path is a file")
    assert not (tmp_path / "e").exists()


def test_fit_cache_in_a_read_only_folder_is_refused_before_features(data, tmp_path, monkeypatch):
    _no_features(monkeypatch)
    (tmp_path / "ro").mkdir()
    _read_only(monkeypatch, tmp_path / "ro")
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(data), "-o", str(tmp_path / "e"),
                                 "--cache", str(tmp_path / "ro"), "-q"])
    _one_line_error(r, "feature cache folder", str(tmp_path / "ro"), "cannot be written: no write permission")


def test_bench_out_that_cannot_be_written_is_refused_before_the_work(tiny_engine, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("singles were built before the results folder was checked")

    monkeypatch.setattr(run, "ensure_singles", refuse)
    (tmp_path / "ro").mkdir()
    (tmp_path / "file").write_text("x")
    _read_only(monkeypatch, tmp_path / "ro", tiny_engine)
    for out, why in ((tmp_path / "ro", "cannot be written: no write permission"),
                     (tmp_path / "file" / "sub", "a part of its path is a file")):
        r = CliRunner().invoke(cli, ["bench", str(tiny_engine), "--out", str(out), "--runs", "1", "--no-torch",
                                     "--no-memory"])
        _one_line_error(r, "bench results folder", str(out), why)
    # a read-only engine without --out: say so, and how to write elsewhere
    r = CliRunner().invoke(cli, ["bench", str(tiny_engine), "--runs", "1", "--no-torch", "--no-memory"])
    _one_line_error(r, "bench results folder", str(tiny_engine / "bench"), "pass --out")


def test_bench_of_a_read_only_engine_writes_its_singles_under_out(tiny_engine, tmp_path, monkeypatch):
    folder = tmp_path / "e"
    shutil.copytree(tiny_engine, folder)
    before = sorted(p.name for p in folder.iterdir())
    kw = {"batches": (1,), "runs": 1, "warmup": 0, "torch": False, "memory": False, "profile": False}
    with monkeypatch.context() as mp:
        _read_only(mp, folder)
        r = run.run_bench(folder, out=tmp_path / "b", **kw)
        assert r["order"][:1] == ["fused"] and "naive" in r["order"] and r["singles_cache_reused"] == [False] * 3
        assert len(list((tmp_path / "b" / "singles").iterdir())) == 3 and (tmp_path / "b" / "bench.json").is_file()
        assert sorted(p.name for p in folder.iterdir()) == before          # nothing written into the engine
    # singles cached in the engine by an earlier bench are reused, read-only, by a bench with --out
    shutil.move(tmp_path / "b" / "singles", folder / "singles")
    _read_only(monkeypatch, folder)
    r = run.run_bench(folder, out=tmp_path / "c", **kw)
    assert r["singles_cache_reused"] == [True] * 3 and not (tmp_path / "c" / "singles").exists()
