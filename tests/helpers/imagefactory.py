"""Test images built from real photographs shipped with scikit-image (never downloaded).

Every PIL mode the runtime must handle is made from a real photo, so resizing and
cropping see real textures and edges rather than flat synthetic fills.
"""
from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageEnhance

DATA = Path(os.path.dirname(skimage.data.__file__))


def photo(name: str) -> Image.Image:
    """A photo from skimage's data folder, decoded (astronaut.png, camera.png, logo.png, ...)."""
    with Image.open(DATA / name) as im:
        im.load()
        return im.copy()


def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Exactly `size` (w, h): a crop of the photo, resized first only if the photo is too small."""
    w, h = size
    if img.width < w or img.height < h:
        scale = max(w / img.width, h / img.height)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (img.width - w) // 3, (img.height - h) // 3   # off-centre, so crops differ from ours
    return img.crop((left, top, left + w, top + h))


def _gray() -> np.ndarray:
    return np.asarray(photo("camera.png"), dtype=np.int32)                   # (512, 512) 0..255


def in_mode(mode: str, size: tuple[int, int]) -> Image.Image:
    """A real photo of `size` in PIL `mode` (RGB, L, LA, P, RGBA, CMYK, I;16, I, F, 1)."""
    if mode == "RGB":
        return fit(photo("astronaut.png"), size)
    if mode == "L":
        return fit(photo("camera.png"), size)
    # skimage's RGBA photos (logo, horse) are opaque, so the alpha comes from another photo:
    # a varied alpha, down to 0, is what makes PIL's premultiplied RGBA/LA resize matter.
    if mode == "RGBA":
        return Image.merge("RGBA", (*fit(photo("astronaut.png"), size).split(), fit(photo("camera.png"), size)))
    if mode == "LA":
        return Image.merge("LA", (fit(photo("camera.png"), size), fit(photo("coins.png"), size)))
    if mode == "P":
        return fit(photo("coffee.png"), size).quantize(colors=200)
    if mode == "CMYK":
        return fit(photo("chelsea.png"), size).convert("CMYK")
    if mode == "1":
        return fit(photo("camera.png"), size).convert("1")                    # Floyd-Steinberg dither
    # Wide-range modes: values outside 0..255 on purpose (PIL clips them on convert("RGB")).
    if mode == "I;16":
        img = Image.fromarray((_gray() * 3 // 2).astype(np.uint16))             # 0..382
    elif mode == "I":
        img = Image.fromarray(_gray() * 2 - 100)                              # -100..410
    elif mode == "F":
        img = Image.fromarray((_gray() * 1.3 - 20.37).astype(np.float32))      # fractional, <0 and >255
    else:
        raise ValueError(mode)
    assert img.mode == mode, img.mode
    return fit(img, size)


def save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    img.save(path, format=fmt, **kw)
    return path


def animated(path: Path, fmt: str, size: tuple[int, int] = (120, 90)) -> Path:
    """A 2-frame animation (GIF or WEBP) whose frames are different photos."""
    frames = [fit(photo("coffee.png"), size), fit(photo("chelsea.png"), size)]
    if fmt == "GIF":
        frames = [f.quantize(colors=128) for f in frames]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first `fraction` of a real file."""
    data = Path(src).read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A real, valid all-black 1-bit PNG of width x height; zlib squeezes it to ~100 KB.
    Written by hand because PIL would need width*height bytes to build it."""
    row = b"\0" * (1 + (width + 7) // 8)                  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)   # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def make_labelled_folder(root, photo_paths, per_class=6, seed=0):
    """root/<class>/<i>.jpg: each class is crops and colour variants of one real photograph."""
    rng = random.Random(seed)
    names = ["astronaut", "cat", "coffee", "rocket"]
    for name, src in zip(names, photo_paths):
        (root / name).mkdir(parents=True)
        im = Image.open(src).convert("RGB")
        w, h = im.size
        for i in range(per_class):
            x0, y0 = rng.randint(0, w // 4), rng.randint(0, h // 4)
            crop = im.crop((x0, y0, x0 + w // 2 + rng.randint(0, w // 4), y0 + h // 2 + rng.randint(0, h // 4)))
            crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
            crop.save(root / name / f"{i}.jpg", quality=90)
    return names
