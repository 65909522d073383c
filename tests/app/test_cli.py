"""The CLI only parses and calls the API: outputs agree, errors are one line and exit non-zero."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import TINY

from clipfuse.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_backbones_lists_the_nine():
    r = run("backbones")
    assert r.exit_code == 0
    for arch in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
        assert f"\n{arch} " in "\n" + r.output
    rows = json.loads(run("backbones", "--json").output)
    assert {r["arch"]: r["image_size"] for r in rows}["RN50x64"] == 448


def test_export_then_inspect(tmp_path, tiny_engine):
    classes = tmp_path / "classes.txt"
    classes.write_text("astronaut\ncat\n")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    out = tmp_path / "engines" / "cli"
    r = run("export", "-b", TINY[0], "-b", TINY[1], "--classes", str(classes), "--templates", str(templates),
            "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    assert "clipfuse-test-vit:random:0" in r.output and "image_32" in r.output and "image_64" in r.output
    info = json.loads(run("inspect", str(out), "--json").output)
    assert info["classes"] == ["astronaut", "cat"]
    assert [b["arch"] for b in info["backbones"]] == ["clipfuse-test-vit", "clipfuse-test-rn"]
    assert info["files"]["model.onnx"] > 0 and info["total_gflops"] > 0
    text = run("inspect", str(tiny_engine)).output
    assert "clipfuse-test-vit48:random:2" in text and "GFLOPs" in text and "model.onnx" in text


def test_inspect_engine_prints_as_the_table_and_stays_data(tiny_engine, capsys):
    """The README prints clipfuse.inspect_engine(...): a table, not a raw dict."""
    import clipfuse
    from clipfuse.cli import present
    info = clipfuse.inspect_engine(tiny_engine, verify=False)
    print(info)
    shown = capsys.readouterr().out
    assert shown.startswith("engine ") and "GFLOPs" in shown and "clipfuse-test-vit48:random:2" in shown
    assert "{" not in shown.splitlines()[0] and "'backbones'" not in shown      # not a dict's repr
    assert shown.rstrip("\n") == str(info) == present.format_inspect(info)
    # still the data: keys, JSON, equality with a plain dict
    assert isinstance(info, dict) and info["classes"] == json.loads(json.dumps(info))["classes"]
    assert dict(info) == json.loads(json.dumps(info)) and info == dict(info)
    assert json.loads(run("inspect", str(tiny_engine), "--json", "--no-verify").output) == dict(info)
    assert run("inspect", str(tiny_engine), "--no-verify").output.rstrip("\n") == str(info)


@pytest.mark.parametrize("args, expect", [
    (["export", "-b", "NoSuchNet", "-c", "a,b", "-o", "{tmp}/x"], "unknown backbone architecture 'NoSuchNet'"),
    (["export", "-b", "RN50:nope", "-c", "a,b", "-o", "{tmp}/x"], "valid tags: openai"),
    (["export", "-b", "RN50:{tmp}/missing.pt", "-c", "a,b", "-o", "{tmp}/x"], "does not exist"),
    (["export", "-b", "clipfuse-test-vit:{tmp}/corrupt.safetensors", "-c", "a,b", "-o", "{tmp}/x"], "could not be read"),
    (["export", "-b", TINY[0], "-c", "a,,b", "-o", "{tmp}/x"], "empty class name"),
    (["export", "-b", TINY[0], "-c", "a,b,a", "-o", "{tmp}/x"], "duplicate class names"),
    (["export", "-b", TINY[0], "-c", "a,b", "--templates", "{tmp}/bad_templates.txt", "-o", "{tmp}/x"], "has no '{}'"),
    (["export", "-b", TINY[0], "-c", "a,b", "-o", "{tmp}/existing"], "is not a clipfuse engine (it holds 'f')"),
    (["export", "-b", TINY[0], "-c", "a,b", "-o", "{tmp}/afile/x"], "cannot create the output's parent folder"),
    (["inspect", "{tmp}/nowhere"], "does not exist"),
])
def test_errors_are_one_line_and_exit_nonzero(tmp_path, args, expect):
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "bad_templates.txt").write_text("a photo of a thing\n")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "f").write_text("x")
    (tmp_path / "afile").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("[clipfuse]")]   # progress lines aside
    assert len(errors) == 1 and errors[0].startswith("error: ") and expect in errors[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_console_script_entry_point(tmp_path):
    """The installed `clipfuse` command exits non-zero with the message on stderr."""
    p = subprocess.run([sys.executable, "-m", "clipfuse.cli.main", "inspect", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
