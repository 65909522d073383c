"""Host preprocessing: open_clip's eval transform, up to (not including) ToTensor/Normalize.

open_clip's eval `preprocess` for a square size R and resize_mode "shortest" is

    Resize(R, bicubic) -> CenterCrop(R) -> convert("RGB") -> ToTensor -> Normalize

This module does the first three with the same PIL calls torchvision makes,
in the same order (the resize runs in the image's own mode, before the RGB
conversion, as open_clip does), and returns uint8 (3, R, R). The graph does
`/255` and Normalize itself, so each backbone sees bit-for-bit what open_clip
would feed it. No torch or torchvision is needed here.

Bounded work: resizing the shortest side to R multiplies the long side by
R / short, so a 1,000,000 x 8 strip (a few KB of PNG) would ask for a
28,000,000 x 224 image (~6 GB). `preprocess_image` computes the resized size
first and refuses (ResizeTooLarge, a ValueError) an output over `max_pixels`
before anything is allocated; runtime/images.py applies the same bound from
the file's header, before decoding, and names the file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessSpec:
    """What the host does for one graph input (recorded per input in the manifest)."""

    size: int                      # square side R
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def to_json(self) -> dict:
        return {"size": self.size, "interpolation": self.interpolation, "resize_mode": self.resize_mode}

    @classmethod
    def from_json(cls, d: dict) -> "PreprocessSpec":
        return preprocess_spec(d)


def preprocess_spec(cfg: dict) -> PreprocessSpec:
    """The one PreprocessSpec builder, for export (open_clip's preprocess_cfg, size R or (R, R)) and
    the runtime (a manifest input's "preprocess" entry, size R) alike; interpolation and resize_mode
    default to open_clip's, bicubic and shortest."""
    size = cfg["size"]
    if not isinstance(size, int):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"non-square input size {tuple(size)} is not supported")
        size = size[0]
    return PreprocessSpec(int(size), cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_w, new_h) with the shortest side = size, as torchvision computes it (long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


class ResizeTooLarge(ValueError):
    """The resized copy of an image would hold more than the allowed number of pixels."""


def check_resize(width: int, height: int, size: int, max_pixels: int | None) -> None:
    """Raise ResizeTooLarge when resizing (width, height)'s shortest side to `size` makes more than
    max_pixels pixels (None or 0: no bound). Called before resizing, so nothing is allocated."""
    if not max_pixels:
        return
    new_w, new_h = resized_size(width, height, size)
    if new_w * new_h > max_pixels:
        raise ResizeTooLarge(f"image is {width}x{height} px: resizing its shortest side to {size} px makes "
                             f"{new_w}x{new_h} = {new_w * new_h:,} px, over the limit of {max_pixels:,} px "
                             f"(aspect ratio {max(width, height) / min(width, height):,.0f}:1)")


def resize_shortest(img: Image.Image, size: int, interpolation: str = "bicubic",
                    max_pixels: int | None = None) -> Image.Image:
    w, h = img.size
    check_resize(w, h, size, max_pixels)
    new_w, new_h = resized_size(w, h, size)
    if (new_w, new_h) == (w, h):          # torchvision returns the image untouched
        return img
    return img.resize((new_w, new_h), _RESAMPLE[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:              # cannot happen after resize_shortest; kept for direct callers
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, spec: PreprocessSpec | int, max_pixels: int | None = None) -> np.ndarray:
    """One PIL image -> uint8 array (3, R, R), exactly open_clip's eval transform before ToTensor.
    max_pixels bounds the resized copy (ResizeTooLarge before allocating); None: no bound."""
    if isinstance(spec, int):
        spec = PreprocessSpec(spec)
    if spec.resize_mode != "shortest":
        raise ValueError(f"resize_mode {spec.resize_mode!r} is not supported")
    out = center_crop(resize_shortest(img, spec.size, spec.interpolation, max_pixels), spec.size).convert("RGB")
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()   # HWC -> CHW


def preprocess_for_inputs(img: Image.Image, specs: dict, max_pixels: int | None = None) -> dict:
    """One image -> {input_name: (3, R, R) uint8} for every graph input (max_pixels: see preprocess_image)."""
    for spec in specs.values():          # every size checked before the first resize allocates
        check_resize(*img.size, spec if isinstance(spec, int) else spec.size, max_pixels)
    return {name: preprocess_image(img, spec, max_pixels) for name, spec in specs.items()}
