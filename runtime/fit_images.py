"""The images an engine was fitted on, by content: so that eval, bench and the int8 cascade's
certification do not score (or certify on) them without saying so.

`clipfuse fit` writes fit_images.json into the engine folder, a hashed artefact named by the
manifest's `fit.images_file`: the sha256 of the bytes of every training image (the linear probes'
images and the controller's pool: what the heads, the controller, a budget subset and a cascade's
thresholds were chosen on; the eval split is not among them). The feature cache keys images the same
way (export/fit/features.py), so a renamed or copied file is still recognised; an edited one is not.
A cascade engine's file also names, among them, its cascade calibration images (the controller's pool
outside the shots, and the `fit --certify-on` folder's images that were used): they chose the exits but
fitted nothing, so eval and bench leave them out like the rest, while certifying the int8 stages'
thresholds on them (`export --precision int8 --cascade-images`) is as honest as the fp32 cascade's own
certification.

    digests = fit_image_digests(manifest)                      # frozenset of hex digests (empty: none recorded)
    fitted = digests - cascade_calibration_digests(manifest)   # what the heads and controller were fitted on
    kept, seen = leave_out_fit_images(manifest, paths, include=False, where="--data photos")

An engine made before the record existed, or not by fit, has none: nothing is left out, nothing said.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log

from .manifest import Manifest, confined_path, rebuild_hint, sha256_file

FIT_IMAGES = "fit_images.json"
FORMAT = "clipfuse-fit-images"
_HEX = re.compile(r"[0-9a-f]{64}")


CASCADE_CALIBRATION = "cascade_calibration_sha256"


def fit_images_json(digests, cascade_calibration=()) -> str:
    """The file's text: sorted unique digests, so the same training set writes the same bytes.
    cascade_calibration: the digests, among `digests`, of a cascade's calibration images (none: no key)."""
    uniq, cal = sorted(set(digests)), sorted(set(cascade_calibration))
    if not set(cal) <= set(uniq):
        raise ValueError("cascade calibration images must be among the fit images")
    data = {"format": FORMAT, "hash": "sha256 of the file's bytes", "images": len(uniq), "sha256": uniq}
    if cal:
        data |= {"cascade_calibration_images": len(cal), CASCADE_CALIBRATION: cal}
    return json.dumps(data, indent=0) + "\n"


def _digest_list(manifest: Manifest, key: str) -> frozenset[str]:
    name = (manifest.data.get("fit") or {}).get("images_file")
    if name is None:
        return frozenset()
    where = f"engine {str(manifest.folder)!r}: {name}"
    try:
        data = json.loads(confined_path(manifest.folder, name, "fit.images_file").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClipfuseError(f"{where} cannot be read ({e}); {rebuild_hint(manifest)}") from None
    ok = isinstance(data, dict) and data.get("format") == FORMAT
    digests = data.get(key, [] if key == CASCADE_CALIBRATION else None) if ok else None
    if not isinstance(digests, list) or not all(isinstance(d, str) and _HEX.fullmatch(d) for d in digests):
        raise ClipfuseError(f"{where}: {key!r} is not a list of sha256 digests ('{FORMAT}'); {rebuild_hint(manifest)}")
    return frozenset(digests)


def fit_image_digests(manifest: Manifest) -> frozenset[str]:
    """The sha256 digests of the images the engine was fitted on (empty when none are recorded)."""
    return _digest_list(manifest, "sha256")


def cascade_calibration_digests(manifest: Manifest) -> frozenset[str]:
    """Of those, a cascade engine's calibration images: the pool outside the shots, which chose the exits'
    thresholds but fitted no head or controller (empty when none are recorded)."""
    return _digest_list(manifest, CASCADE_CALIBRATION) & fit_image_digests(manifest)


@dataclass
class FitImages:
    """What leave_out_fit_images found among the images given."""

    total: int              # images given
    seen: int               # of them, images the engine was fitted on
    left_out: bool          # whether those were removed (False: --include-fit-images)

    def to_dict(self) -> dict:
        return {"images_given": self.total, "fit_images": self.seen, "left_out": self.left_out}

    def line(self) -> str:
        """'' when none was met; else the sentence eval and bench print (it starts with a number)."""
        if not self.seen:
            return ""
        if self.left_out:
            return (f"{self.seen} of the {self.total} images are images the engine was fitted on: left out, so the "
                    f"figures are on the other {self.total - self.seen} (--include-fit-images scores them too)")
        return (f"{self.seen} of the {self.total} images are images the engine was fitted on, scored anyway "
                "(--include-fit-images): the figures are biased upwards")


def leave_out_fit_images(manifest: Manifest, paths, include: bool = False, where: str = "the images",
                         tag: str = "clipfuse") -> tuple[list, FitImages]:
    """`paths` without the engine's fit images (all of them with include), and what was found; a warning
    on stderr when any was met. Refuses, in one line, a folder that holds nothing else (unless include).
    A file that cannot be read is kept: the image loader reports it as unreadable."""
    paths = list(paths)
    digests = fit_image_digests(manifest)
    if not digests:
        return paths, FitImages(len(paths), 0, False)
    seen = set()
    for p in paths:
        try:
            if sha256_file(p) in digests:
                seen.add(p)
        except OSError:
            pass
    info = FitImages(len(paths), len(seen), bool(seen) and not include)
    if not seen:
        return paths, info
    if info.left_out and len(seen) == len(paths):
        raise ClipfuseError(f"every one of the {len(paths)} images of {where} is an image engine "
                            f"{str(manifest.folder)!r} was fitted on, so none measures it; give images it has not "
                            "seen (fit's eval split, or new ones), or pass --include-fit-images to score them anyway")
    log(f"warning: {where}: {info.line()}", tag)
    return (paths if include else [p for p in paths if p not in seen]), info
