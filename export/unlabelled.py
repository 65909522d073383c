"""Unlabelled images to certify a cascade's exits on: one folder, scanned, fit images dropped, embedded.

    embedded, info = unlabelled_images(folder, embed, leave_out={"fit": digests}, what="--certify-on folder")

The cascade's guard bounds disagreement with the full ensemble, which needs no labels, so any image of
the task's domain can certify exits: `clipfuse fit --cascade --certify-on DIR` (export/fit/certify.py,
features through the towers) and `clipfuse export --precision int8 --cascade-images DIR`
(export/precision/calibrate.py, uint8 feeds for the int8 stage graphs) both read their folder here, so
both refuse the same bad folders in the same words and drop the same images:

- any layout: every image file under the folder, recursively (runtime/images.image_files);
- images whose bytes (sha256, as runtime/fit_images.py and the feature cache key them) are in one of the
  `leave_out` sets are dropped and counted per kind: the heads and controller answer the images they
  were fitted on over-confidently, so certifying on them would let images exit too early;
- a second copy of the same bytes counts once (the bound assumes independent images);
- a missing, unreadable or image-less folder, one where nothing is left, or fewer than `min_images`
  usable images: one line naming the folder (ClipfuseError).

`embed(paths) -> (embedded, usable, failures)` is the caller's: what the images become, how many loaded,
and runtime.images.ImageFailure for the rest. This module is numpy-free and torch-free.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.runtime.images import IMAGE_EXTENSIONS, image_files
from clipfuse.runtime.manifest import sha256_file

FIT = "fit images"                                  # the heads' (linear probes') and the controllers' training images
LABELLED = "labelled pool images"                   # already among the calibration images: counted once
EVAL = "eval images"                                # they measure the cascade, so they never choose it
OVERCONFIDENT = "the heads and controller answer them over-confidently"


@dataclass
class UnlabelledImages:
    """What unlabelled_images found in the folder (JSON-able through to_dict)."""

    folder: str
    found: int                                      # image files under the folder
    left_out: dict = field(default_factory=dict)    # kind -> images dropped because their bytes are of that kind
    duplicates: int = 0                             # second copies of the same bytes, counted once
    unreadable: int = 0                             # image files that could not be loaded
    used: int = 0                                   # embedded and used

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """'N of the M images of DIR used (K fit images left out, ...)'."""
        kinds = [f"{n} {kind}" for kind, n in self.left_out.items() if n]
        parts = [", ".join(kinds) + " left out"] if kinds else []
        parts += [f"{self.duplicates} duplicate(s) counted once"] if self.duplicates else []
        parts += [f"{self.unreadable} unreadable"] if self.unreadable else []
        return (f"{self.used} of the {self.found} images of {self.folder!r} used"
                + (f" ({', '.join(parts)})" if parts else ""))


def scan_folder(folder, what: str) -> list[Path]:
    """Every image file under `folder` (recursive, sorted); one line when it is missing, unreadable or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipfuseError(f"{what} {str(folder)!r} does not exist or is not a folder; give a folder of your own images")
    if not os.access(folder, os.R_OK | os.X_OK):    # os.walk would silently see an empty folder
        raise ClipfuseError(f"{what} {str(folder)!r} cannot be read (permission denied); fix its permissions")
    paths = image_files(folder)
    if not paths:
        raise ClipfuseError(f"{what} {str(folder)!r} contains no images ({' '.join(sorted(IMAGE_EXTENSIONS))}, "
                            "searched recursively); give a folder of images of your task")
    return paths


def unlabelled_images(folder, embed, leave_out: dict | None = None, what: str = "folder", count: int | None = None,
                      min_images: int = 1, hint: str = "add more images of your task", tag: str = "clipfuse"):
    """Scan `folder`, drop the images in `leave_out` ({kind: set of sha256}, FIT first) and second copies, keep
    at most `count` (evenly spaced over the sorted list, so a folder sorted by class is not read for its first
    class only), embed them -> (embed's result, UnlabelledImages). A warning says how many were left out.
    Refuses, one line each: a bad folder (scan_folder), nothing left once the left-out kinds are dropped,
    fewer than min_images usable images. leave_out None: nothing is hashed or dropped (int8 calibration)."""
    paths = scan_folder(folder, what)
    info = UnlabelledImages(folder=str(folder), found=len(paths), left_out={k: 0 for k in (leave_out or {})})
    kept, seen = ([], set()) if leave_out is not None else (paths, None)
    for p in paths if leave_out is not None else ():
        try:
            digest = sha256_file(p)
        except OSError:
            kept.append(p)                # the loader names the error and counts it unreadable
            continue
        kind = next((k for k, digests in leave_out.items() if digest in digests), None)
        if kind is not None:
            info.left_out[kind] += 1
        elif digest in seen:
            info.duplicates += 1
        else:
            seen.add(digest)
            kept.append(p)
    dropped = sum(info.left_out.values())
    if not kept:
        kinds = ", ".join(f"{n} {k}" for k, n in info.left_out.items() if n)
        raise ClipfuseError(f"every image of the {what} {str(folder)!r} is one the engine was fitted on or already "
                            f"counts ({kinds}), so none can certify the cascade's exits; give images it has not seen")
    if dropped:
        kinds = ", ".join(f"{n} {k}" + (f" ({OVERCONFIDENT})" if k == FIT else "") for k, n in info.left_out.items() if n)
        log(f"warning: {dropped} of the {len(paths)} images of the {what} {str(folder)!r} ({kinds}) are left out "
            f"of the cascade's threshold certification ({len(kept)} remain)", tag)
    if count is not None and len(kept) > count:
        kept = [kept[i] for i in np.linspace(0, len(kept) - 1, count).round().astype(int)]
    embedded, usable, failures = embed(kept)
    info.used, info.unreadable = int(usable), len(failures)
    if usable < min_images:
        why = f"; {len(failures)} could not be read, e.g. {failures[0].path}: {failures[0].reason}" if failures else ""
        raise ClipfuseError(f"{what} {str(folder)!r} has {usable} usable images, need at least {min_images}{why}; {hint}")
    return embedded, info
