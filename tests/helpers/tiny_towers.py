"""Tiny open_clip towers for the tests (the `test_vit` idea from timm), registered by the tests only.

They are real open_clip architectures (VisionTransformer, ModifiedResNet, a text transformer)
shrunk to a few layers and 32-64 px, so a test builds, exports and runs one in well under a
second. Their configs are the JSON files in tests/helpers/towers/:

    clipfuse-test-vit     ViT, 32 px, patch 8 (16 tokens + class token), D = 32
    clipfuse-test-vit48   ViT at another resolution (48 px, patch 16), D = 24: one graph input per resolution
    clipfuse-test-rn      ModifiedResNet (CLIP's RN family: attention pooling), 64 px, D = 32

Production code never registers them: conftest.py points CLIPFUSE_MODEL_CONFIGS (read by
clipfuse.export.graph.backbones, the documented way to add an architecture) at tests/helpers/towers/, so this
process and every child process a test starts (bench workers, servers, the CLI) know them.
"""
from __future__ import annotations

import os
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "towers"
NAMES = sorted(p.stem for p in FOLDER.glob("*.json"))
ENV = "CLIPFUSE_MODEL_CONFIGS"     # clipfuse.export.graph.backbones.MODEL_CONFIGS_ENV


def use_tiny_towers(environ=os.environ) -> None:
    """Add tests/helpers/towers/ to CLIPFUSE_MODEL_CONFIGS in `environ` (kept: a user's own entries)."""
    entries = [e for e in environ.get(ENV, "").split(os.pathsep) if e]
    if str(FOLDER) not in entries:
        environ[ENV] = os.pathsep.join([*entries, str(FOLDER)])
