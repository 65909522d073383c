"""`fit --cascade --certify-on DIR` on tiny towers: unlabelled images certify a tighter --max-drop than the
labelled pool alone; the fit's own, pool and eval images in the folder are found by content and left out,
counted per kind; bad folders get one line and a non-zero exit. The int8 side of the shared reader
(`--cascade-images`) is tested in tests/export/precision/test_int8_cascade.py."""
from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner
from conftest import TINY
from imagefactory import make_labelled_folder

from clipfuse.cli.main import cli
from clipfuse.export.thresholds import required_calibration_images
from clipfuse.runtime.fit_images import cascade_calibration_digests, fit_image_digests, leave_out_fit_images
from clipfuse.runtime.manifest import read_manifest, sha256_file

# 24 labelled images, eval 0.34 -> 16 in the pool, 1 shot per class -> 12 calibration images: they certify no
# less than ~30 points (2-4 configurations tried at 95%); 12 + 60 unlabelled ones certify 10.
MAX_DROP = 10.0
FIT = ["--study-shots", "1", "--study-seeds", "0", "--eval-fraction", "0.34", "--templates"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, photo_paths):
    root = tmp_path_factory.mktemp("certify-data") / "train"
    make_labelled_folder(root, photo_paths)
    return root


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory, photo_paths, data):
    """60 new images in nested folders (any layout), plus a copy of every labelled image (24) under other names."""
    root = tmp_path_factory.mktemp("certify-unlabelled") / "photos"
    make_labelled_folder(root / "new" / "batch-1", photo_paths, per_class=15, seed=7)
    for i, p in enumerate(sorted(data.rglob("*.jpg"))):
        (root / "copies").mkdir(exist_ok=True)
        shutil.copy(p, root / "copies" / f"copy-{i:02d}.jpg")
    return root


def _fit(data, out, *args, cache):
    templates = out.parent / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    return CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-b", TINY[1], "-d", str(data), "-o", str(out),
                                    "--cache", str(cache), *FIT, str(templates), "--cascade", "--max-drop",
                                    str(MAX_DROP), *args])


def test_unlabelled_images_certify_what_the_pool_alone_cannot(data, unlabelled, tmp_path):
    """the pool alone is refused at --max-drop 10 with the number needed; with --certify-on the same fit certifies
    it, on 12 pool + 60 unlabelled images: the copies of the labelled images are found by content and left out,
    each kind counted (1 shot x 4 classes = fit images, 12 pool, 8 eval) in the log, report and manifest."""
    cache = tmp_path / "cache"
    alone = _fit(data, tmp_path / "alone", "-q", cache=cache)
    tries = int(re.search(r"\((\d+) configurations tried", alone.output).group(1))    # orders x scores
    need = required_calibration_images(MAX_DROP, 0.95, tries)
    assert alone.exit_code == 1 and len(alone.output.strip().splitlines()) == 1, alone.output
    assert f"the bound needs >= {need}" in alone.output and "--certify-on DIR with >= " in alone.output, alone.output
    assert f">= {need - 12} more unlabelled images" in alone.output, alone.output

    r = _fit(data, tmp_path / "eng", "--certify-on", str(unlabelled), cache=cache)
    assert r.exit_code == 0, r.output
    assert "60 of the 84 images of" in r.output and "(4 fit images, 12 labelled pool images, 8 eval images left out)" \
        in r.output, r.output
    assert "24 of the 84 images of the --certify-on folder" in r.output          # the warning
    block = read_manifest(tmp_path / "eng").data["cascade"]
    cal, found = block["calibration"], block["certified_on"]
    assert cal["n"] == 72 and found["labelled_pool"] == 12
    assert found["unlabelled"]["used"] == 60 and found["unlabelled"]["found"] == 84
    assert found["unlabelled"]["left_out"] == {"fit images": 4, "labelled pool images": 12, "eval images": 8}
    assert cal["disagreement_bound"] <= MAX_DROP
    assert "12 pool images outside the shots + 60 unlabelled images of --certify-on" in block["calibration_images"]
    md = (tmp_path / "eng" / "report.md").read_text()
    assert "--certify-on: 60 of the 84 images" in md and "4 fit images" in md
    report = json.loads((tmp_path / "eng" / "report.json").read_text())
    assert report["cascade"]["certified_on"] == found
    # the 60 chose the exits: fit_images.json names them among the cascade's calibration images, so eval and
    # bench leave them out as they leave out the pool (and int8's --cascade-images may certify on them again)
    m = read_manifest(tmp_path / "eng")
    new = {sha256_file(p) for p in (unlabelled / "new").rglob("*.jpg")}
    assert len(new) == 60 and new <= cascade_calibration_digests(m) and new <= fit_image_digests(m)
    assert len(cascade_calibration_digests(m)) == 72
    kept, seen = leave_out_fit_images(m, sorted((unlabelled / "new").rglob("*.jpg"))[:5] + sorted(data.rglob("*.jpg")))
    assert seen.seen == 5 + 16 and len(kept) == 8        # the 5 certify images and the 16 pool ones; eval's 8 stay


def test_a_second_copy_counts_once(data, tmp_path, photo_paths):
    """the bound assumes independent images: the same bytes twice are one image."""
    from clipfuse.export.unlabelled import unlabelled_images

    folder = tmp_path / "dups"
    make_labelled_folder(folder / "a", photo_paths, per_class=2)
    shutil.copytree(folder / "a", folder / "b")
    got, info = unlabelled_images(folder, lambda ps: (ps, len(ps), []), leave_out={})
    assert len(got) == 8 and info.duplicates == 8 and info.found == 16 and info.used == 8


@pytest.mark.parametrize("kind, expect", [
    ("text", "contains no images"),
    ("empty", "contains no images"),
    ("garbage", "has 0 usable images, need at least 1; 6 could not be read"),
    ("missing", "does not exist or is not a folder"),
    ("few", "the bound needs >= "),
    ("fit-only", "is one the engine was fitted on or already counts (4 fit images, 12 labelled pool images, 8 eval images)"),
])
def test_bad_certify_on_folders_get_one_line(data, tmp_path, kind, expect):
    folder = tmp_path / kind
    if kind != "missing":
        folder.mkdir()
    if kind == "text":
        for i in range(5):
            (folder / f"notes{i}.txt").write_text("not an image")
    elif kind == "garbage":
        for i in range(6):
            (folder / f"x{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(200)) + bytes([i]))   # JPEG magic, garbage
    elif kind == "few":
        make_labelled_folder(folder / "x", sorted(data.rglob("*.jpg"))[:4], per_class=1, seed=3)
    elif kind == "fit-only":
        for i, p in enumerate(sorted(data.rglob("*.jpg"))):
            shutil.copy(p, folder / f"{i}.jpg")
    r = _fit(data, tmp_path / "eng", "--certify-on", str(folder), "-q", cache=tmp_path / "cache")
    assert r.exit_code == 1 and expect in r.output and len(r.output.strip().splitlines()) == 1, r.output
    if kind == "few":
        assert "--certify-on gave 4 unlabelled images" in r.output and "--certify-on DIR with >= " in r.output
    assert not (tmp_path / "eng").exists()


def test_certify_on_needs_cascade(data, tmp_path):
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-b", TINY[1], "-d", str(data), "-o", str(tmp_path / "e"),
                                 "--certify-on", str(data), "-q"])
    assert r.exit_code == 1 and "--certify-on applies to --cascade only" in r.output
    assert len(r.output.strip().splitlines()) == 1
