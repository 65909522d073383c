"""benchmarks/precision_bench.py on tiny towers: it runs end to end and writes its results with the
exact command at the top. Never at real size in tests; no timing is asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_precision_bench_on_tiny_towers(tmp_path):
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import precision_bench

    argv = ["--backbone", "clipfuse-test-vit:random:0", "--backbone", "clipfuse-test-rn:random:1", "--batch", "1,2",
            "--runs", "1", "--per-class", "12", "--shots", "1", "--calibration-count", "32", "--no-torch",
            "--cache", str(tmp_path / "cache"), "--engine", str(tmp_path / "eng"), "--out", str(tmp_path / "precision_t")]
    result = precision_bench.main(argv)
    md = (tmp_path / "precision_t.md").read_text()
    assert md.startswith("<!-- made by: python benchmarks/precision_bench.py --backbone clipfuse-test-vit:random:0")
    assert f"Command: `{result['command']}`" in md
    data = json.loads((tmp_path / "precision_t.json").read_text())
    assert data["digits"]["images"] == 120 and data["digits"]["train"] + data["digits"]["eval"] == 120
    assert set(data["graphs"]) == {"model.fp16.onnx", "model.int8.onnx", "model.int8-trt.onnx"}
    b = data["bench"]
    assert b["order"][:6] == ["fused", "fused-fp16", "fused-int8", "openvino", "openvino-fp16", "openvino-int8"]
    assert set(b["latency"]["fused-int8"]) == {"1", "2"} and "fused-int8" in b["memory"]
    assert "fused int8 (ONNX Runtime) / fused fp32 <= 0.50" in md and "fused int8 (OpenVINO)" in md
    for name in data["graphs"]:                       # every graph scored on the held-out digits, paired
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("[") == 1 and " - |" not in row, row


def test_precision_bench_lean_options_say_what_they_leave_out(tmp_path):
    """The nine's options: fp32 + int8 (CPU graph) only, no singles, no OpenVINO, a tower kept fp32,
    and --reuse-engine keeps an engine fitted on the same backbones (its model.onnx is not rewritten)."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import precision_bench

    argv = ["--backbone", "clipfuse-test-vit:random:0", "--backbone", "clipfuse-test-rn:random:1", "--batch", "1",
            "--runs", "1", "--per-class", "12", "--shots", "1", "--calibration-count", "32", "--no-torch",
            "--precisions", "fp32,int8", "--int8-target", "cpu", "--no-singles", "--no-openvino",
            "--int8-keep-fp32", "clipfuse-test-rn:random:1", "--reuse-engine",
            "--cache", str(tmp_path / "cache"), "--engine", str(tmp_path / "eng"), "--out", str(tmp_path / "lean")]
    result = precision_bench.main(argv)
    before = (tmp_path / "eng" / "model.onnx").stat().st_mtime_ns
    md = (tmp_path / "lean.md").read_text()
    assert set(result["graphs"]) == {"model.int8.onnx"}
    assert result["bench"]["order"] == ["fused", "fused-int8"]
    assert ("Not measured in this run: fp16, the TensorRT int8 graph, the singles and the naive ensemble, OpenVINO, "
            "PyTorch eager") in md
    assert result["int8"]["float_backbones"] == ["clipfuse-test-rn:random:1"]
    assert "--int8-keep-fp32 clipfuse-test-rn:random:1 -> clipfuse-test-rn:random:1" in md
    assert "| model.int8.onnx | clipfuse-test-rn:random:1 |" in md and "| yes |" in md
    precision_bench.main(argv)
    assert (tmp_path / "eng" / "model.onnx").stat().st_mtime_ns == before
