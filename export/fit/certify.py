"""`clipfuse fit --cascade --certify-on DIR`: unlabelled images of the task that certify the cascade's exits.

The cascade's guard (export/thresholds.py) bounds disagreement with the full ensemble, whose answers need no
labels, and zero disagreements on n images certify a rate of about 3/n at best: 0.5 points needs about
600-875 calibration images. A user with a few labelled images per class usually has many unlabelled ones
of the same domain, so the thresholds are chosen on both:

    labelled pool images outside the k shots   (as without --certify-on)
  + the images of DIR (any layout, recursive)  through the same towers and heads, features cached

Read by export/unlabelled.py, the one reader of unlabelled folders (`export --precision int8
--cascade-images` uses it too). Left out, by content (sha256 of the bytes, as fit_images.json records
them), each kind counted in the log, report and manifest:

    fit images            the linear probes' images and the controller's shots: answered over-confidently
    labelled pool images  already among the calibration images: counted once
    eval images           they measure the cascade, so they never choose it
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from clipfuse.core.log import log, progress_shown

from ..unlabelled import EVAL, FIT, LABELLED, UnlabelledImages, scan_folder, unlabelled_images
from .features import FeatureCache, compute_features, head_logits

WHAT = "--certify-on folder"


def check_folder(folder) -> None:
    """Before any backbone is built: a missing, unreadable or image-less folder is refused in one line."""
    scan_folder(folder, WHAT)


class CertifyImages(NamedTuple):
    """The --certify-on images that certify the exits, as the threshold search and fit_images.json take them."""

    X: np.ndarray                   # (N, sum D) features, the towers' in order
    Z: np.ndarray                   # (N, K, C) each head's logits
    found: UnlabelledImages         # what the folder held, what was left out and why, what was used
    digests: tuple                  # sha256 of the N images' bytes: fit_images.json records them (they chose exits)


def certify_on_arrays(folder, built, heads, cache: FeatureCache, batch_size: int, fit_digests, labelled_digests,
                      eval_digests) -> CertifyImages:
    """The folder's images without fit, labelled-pool and eval images, embedded. *_digests: sha256 of those
    images' bytes (FeatureSet.digests)."""

    def embed(paths):
        fs = compute_features(built, paths, cache, batch_size=batch_size, progress=progress_shown())
        return (fs.features, tuple(fs.digests[p] for p in fs.paths)), len(fs.paths), fs.failures

    (feats, digests), info = unlabelled_images(folder, embed, what=WHAT,
                                               leave_out={FIT: set(fit_digests), LABELLED: set(labelled_digests),
                                                          EVAL: set(eval_digests)})
    X = np.concatenate(feats, axis=1)                                                  # (N, sum D)
    Z = np.stack([head_logits(f, h) for f, h in zip(feats, heads)], axis=1)            # (N, K, C)
    log(f"cascade: --certify-on {info.line()}")
    return CertifyImages(X, Z, info, digests)


def describe(n_labelled: int, info: UnlabelledImages | None) -> str:
    """The calibration images in words (report.md and the manifest's cascade.calibration_images)."""
    s = f"{n_labelled} pool images outside the shots"
    if info is not None:
        s += f" + {info.used} unlabelled images of --certify-on {info.folder}"
    return s + " (no labels used by the bound)"


def certified_line(found: dict) -> str:
    """report.md's sentence on the --certify-on folder, from UnlabelledImages.to_dict()."""
    return f"--certify-on: {UnlabelledImages(**found).line()}."
