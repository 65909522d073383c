"""The Backend interface every runtime implements (open -> infer -> close), and the check of a feed.

Its own module so that the built-in ONNX Runtime backend (runtime/backends/onnxruntime.py) and the
registry (runtime/backends/registry.py, which re-exports Backend) can both import it without a cycle.
"""
from __future__ import annotations

import numpy as np

from clipfuse.core.errors import ClipfuseError

from ..manifest import Manifest


class Backend:
    """open() -> infer(feed) -> close(); also a context manager.

    feed:    {input_name: uint8 (N, 3, R, R)} with exactly the engine's inputs (iospec names)
    returns: {output_name: array} with all five outputs in iospec order
    """

    name = "backend"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.is_open = False

    # what the user sees in logs and benchmark tables
    @property
    def providers(self) -> list[str]:
        return []

    @property
    def device(self) -> str:
        return "cpu"

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.providers) or self.device})"

    def open(self) -> "Backend":
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        self.is_open = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_open:
            raise ClipfuseError(f"backend {self.name} is not open: call open() or use it in a `with` block")
        return self._infer(check_feed(self.manifest, feed))

    def __enter__(self) -> "Backend":
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_feed(manifest: Manifest, feed: dict) -> dict:
    """The feed must hold exactly the engine's inputs, uint8 (N, 3, R, R), one N for all."""
    expected = [i["name"] for i in manifest.inputs]
    if sorted(feed) != sorted(expected):
        raise ClipfuseError(f"feed has inputs {sorted(feed)}, engine {manifest.folder.name!r} expects {expected}")
    n, first = None, None
    for spec in manifest.inputs:
        a = feed[spec["name"]]
        R = spec["shape"][2]
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (3, R, R):
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ClipfuseError(f"input {spec['name']!r} must be uint8 (N, 3, {R}, {R}), got {got}")
        if n is not None and a.shape[0] != n:
            raise ClipfuseError(f"inputs disagree on the batch size: {first!r} has {n} images, {spec['name']!r} has "
                                f"{a.shape[0]}; every input holds the same images, resized for each resolution")
        n, first = a.shape[0], first or spec["name"]
    if not n:
        raise ClipfuseError("empty feed: the batch holds no images")
    return {name: np.ascontiguousarray(feed[name]) for name in expected}
