"""Unlabelled digits rendered from labelled ones: the images that certify the five's cascade exits beside the pool.

    render_unlabelled(sources, folder, copies=4) -> the written paths
    certify_folder(pool, evald, folder, copies=4) -> what was written: the pool digits and their renders

The augmentation, exactly: each source is one of scikit-learn's 8x8 digits as benchmarks/nlc_digits.py
writes it (grey levels 0-16 scaled to 0-255). Copy c of the digit with sklearn index i draws, from
numpy's default_rng((26, c, i)), in this order: a rotation angle uniform in [-15, +15] degrees, a scale
uniform in [0.9, 1.1], then a shift dx, dy each uniform in [-0.75, +0.75] pixels. The digit's 8x8 grey
levels (0-16, float) are mapped by that rotation and scale about the image centre, then the shift,
sampled bilinearly with black (0) outside (Pillow's affine transform, mode F), scaled by 255/16, rounded,
clipped to 0-255 and saved as an 8x8 greyscale PNG `render-<c>-<i>.png` in one flat folder, without
labels. The same sources, copies and Pillow give the same bytes, so a rerun reuses the feature cache.

benchmarks/cascade_int8.py --set five renders from the non-eval digits that neither the probes nor the
controller saw (the controller's pool outside its shots, the issue's "same set"), never from eval digits
(they stay held-out, with no near-duplicate among the images that choose the thresholds) nor from the
probes' images (a probe answers near-copies of its own training images over-confidently, which would let
images exit too early). The renders are not independent draws: each is a perturbed copy of one of those
pool digits, so the bound's n overstates the independent evidence; the eval digits, never rendered,
measure what the cascade actually loses.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from clipfuse.runtime.manifest import sha256_file

SEED = 26                      # issue #26
ANGLE, SCALE, SHIFT = 15.0, (0.9, 1.1), 0.75
SIZE = 8


def digit_index(path: Path) -> int:
    """The sklearn index of a digit file written by nlc_digits.write_digits (digit_<label>/<index>.png)."""
    return int(Path(path).stem)


def augment(levels: np.ndarray, copy: int, index: int) -> np.ndarray:
    """Copy `copy` of digit `index`: (8, 8) grey levels 0-16 -> (8, 8) uint8 0-255, as the module docstring says."""
    rng = np.random.default_rng((SEED, copy, index))
    angle = math.radians(rng.uniform(-ANGLE, ANGLE))
    scale = rng.uniform(*SCALE)
    dx, dy = rng.uniform(-SHIFT, SHIFT, size=2)
    # forward p' = scale * R (p - c) + c + t; Pillow wants the inverse (output -> input):
    # p = R^T (p' - c - t) / scale + c
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    c = SIZE / 2.0
    ox, oy = c + dx, c + dy
    inverse = (cos, sin, c - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy)
    img = Image.fromarray(np.asarray(levels, np.float32))
    out = img.transform((SIZE, SIZE), Image.Transform.AFFINE, inverse, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.clip(np.asarray(out, np.float64) * (255.0 / 16.0), 0, 255).round().astype(np.uint8)


def render_unlabelled(sources, folder: Path, copies: int) -> list[Path]:
    """`copies` renders of each source digit (paths written by nlc_digits.write_digits) into one flat folder."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for copy in range(copies):
        for src in sorted(sources, key=digit_index):
            i = digit_index(src)
            dst = folder / f"render-{copy}-{i:04d}.png"
            Image.fromarray(augment(images[i], copy, i), mode="L").save(dst)
            written.append(dst)
    return written


def certify_folder(pool: Path, evald: Path, folder: Path, copies: int) -> dict:
    """One flat folder that certifies both precisions' exits: every digit of `pool` (the controller's pool outside
    its shots, as pool-<index>.png; the fit counts them once, as its labelled pool) and `copies` renders of each.
    Refused (SystemExit) if any image written has the bytes of an image of `evald`: the eval digits must stay
    held out. -> {"pool": n, "renders": n, "render_sources": sklearn indices rendered}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(pool).rglob("*.png"), key=digit_index)
    written = []
    for p in sources:
        written.append(folder / f"pool-{p.stem}.png")
        written[-1].write_bytes(p.read_bytes())
    renders = render_unlabelled(sources, folder, copies)
    eval_digests = {sha256_file(p) for p in Path(evald).rglob("*.png")}
    clash = [p.name for p in written + renders if sha256_file(p) in eval_digests]
    if clash:
        raise SystemExit(f"{len(clash)} certification images have the bytes of an eval digit (e.g. {clash[0]}): "
                         "the eval split would not be held out")
    return {"pool": len(sources), "renders": len(renders), "render_sources": [digit_index(p) for p in sources]}
