"""backend="auto" never answers for a folder that fails its own checks, and never reads the weights files a
manifest names unless the torch backend is asked for by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError, EngineMismatch
from clipfuse.runtime.predict import load_predictor


def _edited(tiny_engine, tmp_path, fn) -> Path:
    engine = Path(shutil.copytree(tiny_engine, tmp_path / "e"))
    data = json.loads((engine / "manifest.json").read_text())
    fn(data)
    (engine / "manifest.json").write_text(json.dumps(data))
    return engine


def test_auto_refuses_a_folder_that_mixes_two_exports(tiny_engine, tmp_path, photo_paths):
    engine = _edited(tiny_engine, tmp_path, lambda d: d["inputs"][0].__setitem__("name", "x"))
    with pytest.raises(EngineMismatch, match="the folder mixes two exports"):
        load_predictor(engine, backend="auto")
    r = CliRunner().invoke(cli, ["predict", str(engine), str(photo_paths[0])])
    assert r.exit_code == 1 and "the folder mixes two exports" in r.stderr, r.output
    assert "backend auto -> torch" not in r.stderr


def test_auto_does_not_read_weights_files_and_torch_names_a_text_file(tiny_engine, tmp_path, photo_paths):
    notes = tmp_path / "hostname"
    notes.write_text("buildhost\n")

    def edit(d):
        d["backbones"][0]["weights"] = str(notes)
        d["onnx"]["opset"] = 99             # ONNX Runtime cannot run it: auto would move on to torch

    engine = _edited(tiny_engine, tmp_path, edit)
    with pytest.raises(ClipfuseError) as e:
        load_predictor(engine, backend="auto")
    assert "opset 99" in str(e.value) and f"torch: it would read the weights files the manifest names ({notes})" \
        in str(e.value) and "--backend torch" in str(e.value)
    with pytest.raises(ClipfuseError) as e:           # asked for by name: read, and named for what it is
        load_predictor(engine, backend="torch")
    assert "is not a PyTorch or safetensors file (it looks like text)" in str(e.value)
    assert "pickled" not in str(e.value)
