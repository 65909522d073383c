"""runtime/images.py: collecting paths, loading (and refusing) images, batching them."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import imagefactory as factory
import numpy as np
import pytest
from PIL import Image, ImageFile

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.iospec import input_name
from clipfuse.runtime import images
from clipfuse.runtime.images import (
    Batch,
    ImageError,
    ImageFailure,
    collect_images,
    iter_batches,
    load_image,
    preprocess_paths,
)
from clipfuse.runtime.preprocess import PreprocessSpec, preprocess_for_inputs


def write_photo(path: Path, size=(60, 45), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return factory.save(factory.in_mode(mode, size), path, fmt or Image.registered_extensions()[path.suffix.lower()])


# ----------------------------------------------------------------------------- collect_images

@pytest.fixture
def tree(tmp_path) -> Path:
    """photos/ with nested folders, mixed-case extensions, a non-image and hidden files."""
    root = tmp_path / "photos"
    for rel in ["b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.TIFF", "sub/e.gif", "z.bmp"]:
        write_photo(root / rel)
    (root / "notes.txt").write_text("not an image")
    write_photo(root / "._a.jpg")                      # macOS companion file
    write_photo(root / ".thumbs" / "t.jpg")
    return root


def test_folder_is_recursive_sorted_and_images_only(tree):
    got = collect_images([tree])
    assert [p.relative_to(tree).as_posix() for p in got] == \
        ["a.PNG", "b.jpg", "sub/c.webp", "sub/deeper/d.TIFF", "sub/e.gif", "z.bmp"]


def test_named_files_keep_their_order_and_any_extension(tree):
    got = collect_images([tree / "z.bmp", tree / "notes.txt", tree / "a.PNG"])
    assert got == [tree / "z.bmp", tree / "notes.txt", tree / "a.PNG"]


def test_globs(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert collect_images(["*.jpg"]) == [Path("b.jpg")]
    assert collect_images(["sub/?.gif"]) == [Path("sub/e.gif")]
    assert collect_images(["**/*.webp", "**/*.TIFF"]) == [Path("sub/c.webp"), Path("sub/deeper/d.TIFF")]
    assert collect_images([str(tree / "sub" / "*")]) == \
        [tree / "sub/c.webp", tree / "sub/deeper/d.TIFF", tree / "sub/e.gif"]   # matched folders recurse
    assert Path("notes.txt") not in collect_images(["*"])                      # globs keep images only


def test_stdin_list(tree):
    listing = io.StringIO(f"{tree / 'sub/e.gif'}\n\n  {tree / 'notes.txt'}  \n{tree / 'sub/deeper'}\n")
    assert collect_images(["-"], stdin=listing) == \
        [tree / "sub/e.gif", tree / "notes.txt", tree / "sub/deeper/d.TIFF"]


def test_stdin_defaults_to_sys_stdin(tree, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{tree / 'b.jpg'}\n"))
    assert collect_images([tree / "z.bmp", "-"]) == [tree / "z.bmp", tree / "b.jpg"]


def test_stdin_paths_are_literal_and_missing_ones_are_named(tree):
    with pytest.raises(ClipfuseError, match=r"no such file or folder: .*\*\.jpg \(stdin line 2\)"):
        collect_images(["-"], stdin=io.StringIO(f"{tree / 'b.jpg'}\n{tree / '*.jpg'}\n"))


def test_duplicates_removed_first_occurrence_wins(tree, monkeypatch):
    monkeypatch.chdir(tree)
    got = collect_images(["b.jpg", "./b.jpg", str(tree / "b.jpg"), ".", "*.jpg"])
    assert got[0] == Path("b.jpg")
    assert len(got) == len(set(os.path.abspath(p) for p in got)) == 6


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ClipfuseError, match=f"no such file or folder: {missing}"):
        collect_images([missing])


def test_empty_folder_and_empty_glob_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    for folder in ("empty", "docs"):
        with pytest.raises(ClipfuseError, match=f"folder {tmp_path / folder} contains no images"):
            collect_images([tmp_path / folder])
    with pytest.raises(ClipfuseError, match=r"pattern '.*\*\.png' matches no image files"):
        collect_images([str(tmp_path / "docs" / "*.png")])


# ----------------------------------------------------------------------------- load_image

def refused(path, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kw)
    err = info.value
    assert isinstance(err, ClipfuseError)
    assert err.path == Path(path) and str(path) in str(err) and err.reason in str(err)
    return err


def test_loads_decoded_in_own_mode(tmp_path):
    for mode, fmt in [("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "TIFF"), ("LA", "PNG")]:
        path = factory.save(factory.in_mode(mode, (50, 40)), tmp_path / f"x.{fmt.lower()}", fmt)
        img = load_image(path)
        assert (img.mode, img.size) == (mode, (50, 40))
        assert img.im is not None                      # decoded: the file is closed already
        np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(path)))


def test_no_exif_transposition(tmp_path):
    """open_clip ignores EXIF orientation, so must we (a phone photo tagged 'rotate 90')."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    factory.in_mode("RGB", (80, 50)).save(path, exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6
    assert load_image(path).size == (80, 50)


def test_animated_gif_gives_frame_zero(tmp_path):
    path = factory.animated(tmp_path / "a.gif", "GIF")
    with Image.open(path) as im:
        frame0 = np.asarray(im.convert("RGB"))
        im.seek(1)
        frame1 = np.asarray(im.convert("RGB"))
    got = np.asarray(load_image(path).convert("RGB"))
    np.testing.assert_array_equal(got, frame0)
    assert not np.array_equal(got, frame1)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert refused(tmp_path / "empty.jpg").reason == "empty file (0 bytes)"


def test_text_named_jpg(tmp_path):
    (tmp_path / "fake.jpg").write_text("name,label\ncat.jpg,cat\n")
    err = refused(tmp_path / "fake.jpg")
    assert err.reason == "not an image (cannot identify image file; looks like text)"


def test_unreadable_real_tiff_says_it_is_a_tiff():
    """skimage's planar multipage_rgb.tif is a real TIFF that Pillow cannot identify."""
    err = refused(factory.DATA / "multipage_rgb.tif")
    assert err.reason.startswith("unreadable image") and "TIFF" in err.reason


@pytest.mark.parametrize("name", ["rocket.jpg", "astronaut.png"])
def test_truncated_real_file(tmp_path, name):
    path = factory.truncated(factory.DATA / name, tmp_path / name)
    err = refused(path)
    assert err.reason.startswith("truncated or corrupt image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False       # never flipped globally


def test_too_small(tmp_path):
    path = factory.save(Image.new("RGB", (1, 1), "red"), tmp_path / "dot.png", "PNG")
    assert refused(path).reason == "image is 1x1 px, smaller than the minimum 8 px per side"
    path = write_photo(tmp_path / "strip.png", size=(300, 7))
    assert refused(path).reason == "image is 300x7 px, smaller than the minimum 8 px per side"
    assert load_image(path, min_side=7).size == (300, 7)


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Call it to fail the test if any pixel data is decoded from then on."""
    def load(self):
        raise AssertionError("decoded an image that should have been refused from its header")
    return lambda: monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decompression_bomb_refused_by_pil_before_decoding(tmp_path, forbid_decoding):
    """A real, valid 30000x30000 PNG (900 Mpx, 109 KB): over 2x PIL's limit, PIL refuses it on open."""
    path = factory.bomb_png(tmp_path / "bomb.png")
    forbid_decoding()
    assert path.stat().st_size < 200_000
    err = refused(path)
    assert "decompression bomb" in err.reason and "900000000 pixels" in err.reason


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_between_limit_and_twice_the_limit(tmp_path, forbid_decoding):
    """10000x10000 = 100 Mpx: PIL only warns (89.5 Mpx < 100 Mpx < 179 Mpx), load_image refuses."""
    path = factory.bomb_png(tmp_path / "big.png", 10000, 10000)
    forbid_decoding()
    err = refused(path)
    assert err.reason.startswith(f"image is 10000x10000 = 100,000,000 px, over the limit of "
                                 f"{Image.MAX_IMAGE_PIXELS:,} px (possible decompression bomb)")


def test_max_pixels_is_checked_from_the_header(tmp_path, forbid_decoding):
    path = write_photo(tmp_path / "x.png", size=(100, 80))
    forbid_decoding()
    err = refused(path, max_pixels=7999)
    assert err.reason.startswith("image is 100x80 = 8,000 px, over the limit of 7,999 px")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_default_follows_pil_at_call_time(tmp_path, monkeypatch):
    path = write_photo(tmp_path / "x.png", size=(100, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 7999)
    assert "over the limit of 7,999 px" in refused(path).reason
    assert load_image(path, max_pixels=8000).size == (100, 80)   # an explicit limit wins


def test_folder_and_missing_file(tmp_path):
    assert refused(tmp_path).reason == "is a folder, not an image file"
    assert refused(tmp_path / "gone.png").reason == "no such file"


def test_permission_denied(tmp_path, monkeypatch):
    path = write_photo(tmp_path / "secret.png")
    if os.geteuid() == 0:                  # root reads a chmod 000 file anyway: inject the OS error
        def deny(p, *a, **k):
            raise PermissionError(13, "Permission denied", str(p))
        monkeypatch.setattr(images, "_open_for_reading", deny)
    else:
        path.chmod(0)
    assert refused(path).reason == "cannot read the file: permission denied; check its permissions"


# ----------------------------------------------------------------------------- batching

SPECS = {input_name(32): PreprocessSpec(32), input_name(48): PreprocessSpec(48)}


BAD = {1: b"", 4: b"hello", 5: b"%PDF-1.4"}                     # index -> content of a bad ".jpg"
GOOD = {0: ("RGB", "JPEG"), 2: ("P", "PNG"), 3: ("L", "PNG"), 6: ("RGBA", "WEBP"), 7: ("CMYK", "TIFF"),
        8: ("1", "BMP")}


@pytest.fixture
def mixed(tmp_path) -> tuple[list[Path], set[Path]]:
    """9 paths of assorted sizes and modes, 3 of them bad (positions 1, 4, 5)."""
    paths = []
    for i in range(9):
        if i in BAD:
            p = tmp_path / f"{i}.jpg"
            p.write_bytes(BAD[i])
        else:
            mode, fmt = GOOD[i]
            p = factory.save(factory.in_mode(mode, (50 + 7 * i, 41 + 3 * i)), tmp_path / f"{i}.{fmt.lower()}", fmt)
        paths.append(p)
    return paths, {paths[i] for i in BAD}


def reference(path: Path) -> dict:
    return preprocess_for_inputs(load_image(path), SPECS)


def test_batches_keep_order_boundaries_and_report_failures(mixed):
    paths, bad = mixed
    batches = list(iter_batches(paths, SPECS, batch_size=3, workers=2))
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.paths for b in batches] == [[paths[0], paths[2]], [paths[3]], [paths[6], paths[7], paths[8]]]
    assert [[f.path for f in b.failures] for b in batches] == [[paths[1]], [paths[4], paths[5]], []]
    reasons = {f.path: f.reason for b in batches for f in b.failures}
    assert reasons[paths[1]] == "empty file (0 bytes)"
    assert reasons[paths[4]].startswith("not an image")
    assert reasons[paths[5]] == "not an image (cannot identify image file; looks like a PDF document)"
    for b in batches:
        assert set(b.inputs) == set(SPECS)
        for name, spec in SPECS.items():
            arr = b.inputs[name]
            assert arr.dtype == np.uint8 and arr.shape == (len(b.paths), 3, spec.size, spec.size)
            for i, p in enumerate(b.paths):
                np.testing.assert_array_equal(arr[i], reference(p)[name])


def test_a_batch_of_failures_has_empty_arrays(mixed):
    paths, _ = mixed
    (batch,) = iter_batches(paths[4:6], SPECS, batch_size=8)
    assert batch.paths == [] and len(batch.failures) == 2
    assert {k: v.shape for k, v in batch.inputs.items()} == {"image_32": (0, 3, 32, 32), "image_48": (0, 3, 48, 48)}
    assert all(v.dtype == np.uint8 for v in batch.inputs.values())


def test_worker_count_does_not_change_results(mixed):
    paths, _ = mixed
    one = preprocess_paths(paths, SPECS, batch_size=2, workers=1)
    three = preprocess_paths(paths, SPECS, batch_size=2, workers=3)
    default = preprocess_paths(paths, SPECS, batch_size=4)
    for other in (three, default):
        assert other[0] == one[0] and other[2] == one[2]
        for name in SPECS:
            np.testing.assert_array_equal(other[1][name], one[1][name])


def test_preprocess_paths_concatenates(mixed):
    paths, bad = mixed
    ok, inputs, failures = preprocess_paths(paths, SPECS, batch_size=4, workers=2)
    assert ok == [p for p in paths if p not in bad]
    assert [f.path for f in failures] == [p for p in paths if p in bad]
    assert all(isinstance(f, ImageFailure) for f in failures)
    assert inputs["image_48"].shape == (6, 3, 48, 48)
    np.testing.assert_array_equal(inputs["image_32"][3], reference(ok[3])["image_32"])
    ok, inputs, failures = preprocess_paths([], SPECS)
    assert ok == [] and failures == [] and inputs["image_32"].shape == (0, 3, 32, 32)


def test_prefetch_is_bounded_and_lazy(mixed):
    """A lazy list of 1000 paths: the first batch arrives having pulled only a few batches' worth."""
    paths, _ = mixed
    pulled = []

    def lazy():
        for i in range(1000):
            pulled.append(i)
            yield paths[0]
    it = iter_batches(lazy(), SPECS, batch_size=2, workers=2)
    first = next(it)
    assert len(first.paths) == 2
    assert len(pulled) <= 3 * 2                       # the batch handed over + 2 in flight, never more
    it.close()                                        # stopping early shuts the pool down


def test_bad_arguments_fail_eagerly(mixed):
    with pytest.raises(ClipfuseError, match="batch_size must be at least 1, got 0"):
        iter_batches(mixed[0], SPECS, batch_size=0)
    with pytest.raises(ClipfuseError, match="workers must be at least 1, got 0"):
        iter_batches(mixed[0], SPECS, workers=0)


# ----------------------------------------------------------------------------- bounded work

@pytest.fixture
def forbid_big_resize(monkeypatch):
    """Fail the test if anything asks PIL for a resized image over 1 Mpx (the bomb would ask for 512 Mpx)."""
    real = Image.Image.resize

    def resize(self, size, *a, **kw):
        assert size[0] * size[1] <= 1_000_000, f"resize to {size} should have been refused before allocating"
        return real(self, size, *a, **kw)
    monkeypatch.setattr(Image.Image, "resize", resize)


def test_thin_strip_is_refused_before_resizing_and_the_batch_goes_on(tmp_path, forbid_big_resize, forbid_decoding):
    """A 1,000,000 x 8 PNG (a few KB, 8 Mpx: under PIL's limit) would be 8,000,000 x 64 = 512 Mpx after resizing
    its shortest side to 64; it is refused from its header, named, and the good images around it go on."""
    good = [write_photo(tmp_path / f"ok{i}.png") for i in range(2)]
    strip = factory.bomb_png(tmp_path / "strip.png", 1_000_000, 8)
    assert strip.stat().st_size < 20_000
    batches = list(iter_batches([good[0], strip, good[1]], {"image_32": 32, "image_64": 64}, batch_size=4))
    ok = [p for b in batches for p in b.paths]
    failures = [f for b in batches for f in b.failures]
    assert ok == good and [f.path for f in failures] == [strip]
    reason = failures[0].reason
    assert reason.startswith("image is 1000000x8 px: resizing its shortest side to 32 px makes 4000000x32 = "
                             f"128,000,000 px, over the limit of {Image.MAX_IMAGE_PIXELS:,} px")
    assert "--max-image-pixels" in reason and images.PIXEL_LIMIT_ENV in reason
    forbid_decoding()                               # and the refusal comes from the header alone
    _, _, failures = preprocess_paths([strip], {"image_32": 32})
    assert failures[0].reason == reason


def test_resized_bound_follows_the_pixel_limit(tmp_path, forbid_big_resize):
    strip = factory.bomb_png(tmp_path / "strip.png", 4000, 8)      # 32 px: 16000 x 32 = 512,000 px after resize
    paths, _, failures = preprocess_paths([strip], {"image_32": 32}, max_pixels=500_000)
    assert not paths and "512,000 px, over the limit of 500,000 px" in failures[0].reason
    paths, inputs, failures = preprocess_paths([strip], {"image_32": 32}, max_pixels=600_000)
    assert paths == [strip] and inputs["image_32"].shape == (1, 3, 32, 32) and not failures


def test_memory_error_on_one_image_keeps_the_batch(tmp_path, monkeypatch):
    good, bad = write_photo(tmp_path / "good.png"), write_photo(tmp_path / "bad.png")
    real = images.preprocess_for_inputs

    def flaky(img, specs, max_pixels=None):
        if img.size == (60, 45) and getattr(img, "filename", "").endswith("bad.png"):
            raise MemoryError
        return real(img, specs, max_pixels)
    monkeypatch.setattr(images, "preprocess_for_inputs", flaky)
    bad_img = load_image(bad)
    monkeypatch.setattr(images, "load_image", lambda p, *a, **k: bad_img if Path(p) == bad else load_image(p, *a, **k))
    bad_img.filename = str(bad)
    paths, _, failures = preprocess_paths([good, bad], {"image_32": 32})
    assert paths == [good] and failures[0].path == bad
    assert failures[0].reason.startswith("out of memory while resizing this 60x45 image")


def test_pixel_limit_from_the_environment(tmp_path):
    import subprocess

    code = "import clipfuse.runtime.images; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    env = dict(os.environ, CLIPFUSE_MAX_IMAGE_PIXELS="1234567")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "1234567", out.stderr
    env["CLIPFUSE_MAX_IMAGE_PIXELS"] = "lots"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "CLIPFUSE_MAX_IMAGE_PIXELS='lots' is not a positive integer" in out.stderr
