"""Tiny open_clip towers for tests and examples (the `test_vit` idea from timm).

They are real open_clip architectures (VisionTransformer, ModifiedResNet, a
text transformer) shrunk to a few layers and 32-64 px so a test builds,
exports and runs one in well under a second. Names start with
`clipfuse-test-` and are registered with open_clip on first use; they are not
meant for anything but tests and demos of the machinery.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}

TEST_TOWERS: dict[str, dict] = {
    # ViT, 32 px, patch 8: 16 tokens + class token
    "clipfuse-test-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": _TEXT,
    },
    # ViT at another resolution, to exercise one graph input per resolution
    "clipfuse-test-vit48": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": _TEXT,
    },
    # ModifiedResNet (CLIP's RN family: attention pooling), 64 px
    "clipfuse-test-rn": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "patch_size": None},
        "text_cfg": _TEXT,
    },
}

_registered: Path | None = None


def register_test_towers() -> None:
    """Make the tiny towers known to open_clip (idempotent, public open_clip API only)."""
    global _registered
    if _registered is not None:
        return
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="clipfuse-test-towers-"))
    for name, cfg in TEST_TOWERS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    _registered = folder
