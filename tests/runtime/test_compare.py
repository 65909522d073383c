"""`clipfuse compare`: backends agree within tolerance on the tiny engine, and a perturbed graph fails."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from clipfuse.core.errors import ClipfuseError


def _cli(*args):
    from clipfuse.cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


def test_compare_fp32_onnxruntime_vs_torch(tiny_engine):
    r = _cli("compare", tiny_engine, "--backends", "onnxruntime,torch", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    c = report["comparisons"][0]
    assert report["ok"] and report["images"] == 8 and c["tolerance_set"] == "fp32"
    assert {o["output"] for o in c["outputs"]} == {"logits", "probs", "temperatures", "backbone_logits", "features"}
    assert all(o["max_rel"] < 1e-4 for o in c["outputs"])
    assert c["top1_agreement"] == 1.0 and all(b["top1_agreement"] == 1.0 for b in c["backbones"])


def test_compare_fp16_onnxruntime_vs_torch(fp16_engine):
    r = _cli("compare", fp16_engine, "--backends", "onnxruntime,torch", "--precision", "fp16")
    assert r.exit_code == 0, r.output
    assert "onnxruntime-fp16" in r.output and "fp16 tolerances" in r.output and "agree" in r.output
    report = json.loads(_cli("compare", fp16_engine, "--backends", "torch,onnxruntime-fp16", "--json").output)
    c = report["comparisons"][0]
    # fp16 really ran: errors above fp32 level, yet within the fp16 tolerance
    logits = next(o for o in c["outputs"] if o["output"] == "logits")
    assert 1e-6 < logits["max_rel"] < 1e-2 and all(b["cosine_min"] >= 0.999 for b in c["backbones"])


def test_compare_with_images(tiny_engine, photo_paths):
    r = _cli("compare", tiny_engine, "--backends", "onnxruntime,torch", "--images", photo_paths[0],
             "--images", photo_paths[1], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["images"] == 2


def _perturb(src, dst, scale=1.01):
    """Copy an engine and scale one initializer (head 0's weight) of model.onnx by `scale`, re-hashed
    into the manifest so the folder still verifies: only the comparison can notice."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from clipfuse.runtime.manifest import sha256_file

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    init = next(t for t in model.graph.initializer if t.name == "head_weight_0")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32) * scale, init.name))
    onnx.save(model, str(dst / "model.onnx"))
    data = json.loads((dst / "manifest.json").read_text())
    data["artefacts"]["model.onnx"] = {"sha256": sha256_file(dst / "model.onnx"), "bytes": (dst / "model.onnx").stat().st_size}
    (dst / "manifest.json").write_text(json.dumps(data, indent=2))


def test_compare_fails_on_perturbed_graph(tiny_engine, tmp_path):
    _perturb(tiny_engine, tmp_path / "bad")
    r = _cli("compare", tmp_path / "bad", "--backends", "onnxruntime,torch")
    assert r.exit_code == 1, r.output
    assert "FAIL: backbone_logits" in r.output and "error: backends disagree" in r.output


def test_parse_backends_errors():
    from clipfuse.runtime.compare import parse_backends

    assert parse_backends("onnxruntime,torch", "fp16") == [("onnxruntime", "fp16"), ("torch", "fp32")]
    assert parse_backends("torch,onnxruntime-fp16,onnxruntime", None) == [
        ("torch", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "fp32")]
    with pytest.raises(ClipfuseError, match="at least two"):
        parse_backends("onnxruntime", None)
    with pytest.raises(ClipfuseError, match="torch runs the fp32 reference only"):
        parse_backends("onnxruntime,torch-fp16", None)
    with pytest.raises(ClipfuseError, match="twice"):
        parse_backends("onnxruntime,onnxruntime-fp32", None)


def test_fp16_backend_without_fp16_graph_names_the_command(tiny_engine):
    r = _cli("compare", tiny_engine, "--backends", "onnxruntime,onnxruntime-fp16")
    assert r.exit_code == 1 and "--precision fp16" in r.output and "clipfuse export" in r.output


def test_fp32_tolerance_is_the_export_validations():
    from clipfuse.export.graph.onnx_export import ATOL, RTOL
    from clipfuse.runtime.compare import tolerance

    assert tolerance("fp32")["rtol"] == RTOL and tolerance("fp32")["atol"] == ATOL
    assert tolerance("fp16")["rtol"] > RTOL


def test_onnxruntime_only_compare_does_not_import_torch(fp16_engine, tmp_path):
    code = ("import sys; from clipfuse.runtime.compare import compare_backends; "
            f"r = compare_backends({str(fp16_engine)!r}, 'onnxruntime,onnxruntime-fp16'); "
            "assert r['ok'], r; print('torch' in sys.modules)")
    # cwd away from the checkout: `python -c` puts the cwd first on sys.path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU visible to torch")
def test_compare_torch_cuda_vs_onnxruntime_cpu(tiny_engine):
    """On a GPU machine: the CUDA PyTorch reference (TF32 off) agrees with ORT CPU within fp32 tolerances."""
    r = _cli("compare", tiny_engine, "--backends", "onnxruntime,torch-cuda", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["backends"][1]["name"] == "torch-cuda"


def test_help_and_output_name_the_same_reference(fp16_engine):
    """--help says the first backend stays the reference under --precision; the output names that one."""
    assert "the first backend stays the reference" in " ".join(_cli("compare", "--help").output.split())
    r = _cli("compare", fp16_engine, "--backends", "onnxruntime,torch", "--precision", "fp16")
    assert r.exit_code == 0, r.output
    assert "reference onnxruntime-fp16" in r.output and "torch stays the fp32 reference" not in r.output
    r = _cli("compare", fp16_engine, "--backends", "torch,onnxruntime", "--precision", "fp16")
    assert r.exit_code == 0, r.output
    assert "reference torch" in r.output and "onnxruntime-fp16 vs torch" in r.output
