"""Real-size RN50 + ViT-B-32 (seeded random weights): the ONNX graph against open_clip alone.

The reference (benchmarks/check_reference.py) uses nothing of clipfuse:
open_clip's own model (same seed), its eval `preprocess`, `encode_image`,
normalisation, and a zero-shot head from its tokenizer and text tower.
clipfuse's side is the exported ONNX graph fed by clipfuse's host preprocessing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "check_reference", Path(__file__).resolve().parents[2] / "benchmarks" / "check_reference.py")
check_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_reference)


def test_backbone_logits_match_open_clip(tmp_path, photo_paths):
    images = [Image.open(p) for p in photo_paths]
    rows = check_reference.compare(["RN50:random:11", "ViT-B-32:random:12"], tmp_path / "e", images)
    for r in rows:
        assert r["max_rel"] < 1e-3, r
        assert r["top1_agree"] == 1.0, r
