"""The host half of preprocessing + the graph's normalisation == open_clip's own eval preprocess.

For every PIL mode and file format a user may hand us (built from real photos, see
imagefactory), `(uint8 / 255 - mean) / std` -- what the fused graph computes from the
runtime's uint8 input -- must equal what open_clip's `preprocess` gives for
`Image.open(path)`, which is what every open_clip user feeds a backbone.
"""
from __future__ import annotations

import imagefactory as factory
import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from clipfuse.core.iospec import input_name
from clipfuse.runtime.images import load_image
from clipfuse.runtime.preprocess import PreprocessSpec, preprocess_for_inputs, preprocess_image, resized_size

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
TOL = 1e-6

SIZES = {
    "portrait": (301, 451),
    "landscape": (517, 300),
    "square224": (224, 224),     # exactly R for R=224: torchvision skips the resize
    "square288": (288, 288),
    "small": (40, 57),           # below every R: upscaled
    "odd": (333, 251),           # odd sides: the centre crop offset lands on .5 for some R
}

# (mode, format, size). The mode is checked again after reopening the saved file.
CASES = [
    ("RGB", "JPEG", "portrait"), ("RGB", "PNG", "landscape"), ("RGB", "WEBP", "square224"),
    ("RGB", "BMP", "small"), ("RGB", "TIFF", "odd"),
    ("L", "JPEG", "landscape"), ("L", "PNG", "square288"), ("L", "BMP", "odd"),
    ("L", "TIFF", "small"), ("L", "GIF", "portrait"),
    ("LA", "PNG", "portrait"), ("LA", "TIFF", "landscape"),
    ("P", "PNG", "odd"), ("P", "GIF", "landscape"), ("P", "BMP", "portrait"), ("P", "TIFF", "square224"),
    ("RGBA", "PNG", "square224"), ("RGBA", "WEBP", "portrait"), ("RGBA", "TIFF", "small"),
    ("CMYK", "JPEG", "portrait"), ("CMYK", "TIFF", "landscape"),
    ("I;16", "PNG", "odd"), ("I;16", "TIFF", "portrait"),
    ("I", "TIFF", "landscape"),
    ("F", "TIFF", "portrait"),
    ("1", "PNG", "landscape"), ("1", "BMP", "odd"), ("1", "TIFF", "small"),
]
# Files used as they are: real photos, a real 24-frame GIF, a real 2-page TIFF, and 2-frame animations.
AS_IS = ["rocket.jpg", "hubble_deep_field.jpg", "chelsea.png", "no_time_for_that_tiny.gif", "multipage.tif"]
ANIMATED = ["GIF", "WEBP"]
# R -> where its eval transform comes from: a tiny odd size, and two real OpenAI configs.
REAL_CONFIGS = {224: "ViT-B-32", 288: "RN50x4"}
RESOLUTIONS = [33, 224, 288]


def case_id(mode: str, fmt: str, size: str) -> str:
    return f"{mode.replace(';', '')}-{fmt}-{size}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Every test image, written once: id -> path."""
    d = tmp_path_factory.mktemp("modes")
    out = {}
    for mode, fmt, size in CASES:
        cid = case_id(mode, fmt, size)
        out[cid] = factory.save(factory.in_mode(mode, SIZES[size]), d / f"{cid}.{fmt.lower()}", fmt)
    for name in AS_IS:
        out[name] = factory.DATA / name
    for fmt in ANIMATED:
        out[f"animated-{fmt}"] = factory.animated(d / f"animated.{fmt.lower()}", fmt)
    return out


def real_config_transform(arch: str):
    """The eval transform create_model_and_transforms(arch, pretrained="openai") returns: the
    model config's image size and the `openai` tag's preprocessing config (no model, no download)."""
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    cfg = open_clip.get_pretrained_cfg(arch, "openai")
    return open_clip.image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                     interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])


@pytest.fixture(scope="module")
def transforms() -> dict:
    """R -> open_clip's eval transform."""
    out = {R: open_clip.image_transform(R, is_train=False) for R in RESOLUTIONS + [64]}
    out.update({R: real_config_transform(arch) for R, arch in REAL_CONFIGS.items()})
    return out


def graph_view(chw: np.ndarray) -> torch.Tensor:
    """What the fused graph computes from the runtime's uint8 input."""
    assert chw.dtype == np.uint8
    return (torch.from_numpy(chw).float() / 255 - MEAN) / STD                   # (3, R, R)


def assert_same(path, transforms: dict) -> None:
    """Ours == open_clip's for every R in `transforms` (each side decodes the file once)."""
    img = load_image(path, min_side=8)
    with Image.open(path) as theirs_img:                                        # what open_clip users do
        for R, transform in transforms.items():
            ours = preprocess_image(img, R)
            assert ours.shape == (3, R, R) and ours.dtype == np.uint8
            diff = (graph_view(ours) - transform(theirs_img)).abs().max().item()
            assert diff <= TOL, f"{path}: max |diff| {diff} at R={R}"


def at(transforms: dict, *sizes: int) -> dict:
    return {R: transforms[R] for R in sizes}


@pytest.mark.parametrize("mode,fmt,size", CASES, ids=[case_id(*c) for c in CASES])
def test_every_mode_and_format_matches_open_clip(files, transforms, mode, fmt, size):
    path = files[case_id(mode, fmt, size)]
    with Image.open(path) as img:
        assert (img.mode, img.format, img.size) == (mode, fmt, SIZES[size])     # the case is what it claims
    assert_same(path, at(transforms, *RESOLUTIONS))


@pytest.mark.parametrize("name", AS_IS + [f"animated-{f}" for f in ANIMATED])
def test_real_files_and_first_frames_match_open_clip(files, transforms, name):
    assert_same(files[name], at(transforms, *RESOLUTIONS))


@pytest.mark.parametrize("name", ["no_time_for_that_tiny.gif", "multipage.tif", "animated-GIF", "animated-WEBP"])
def test_multi_frame_files_use_frame_zero(files, name):
    """Frame 0, as Image.open gives it; the later frame is different, so this would catch a seek."""
    with Image.open(files[name]) as img:
        assert img.n_frames >= 2
        first = preprocess_image(img, 32)
        img.seek(1)
        second = preprocess_image(img, 32)
    ours = preprocess_image(load_image(files[name]), 32)
    np.testing.assert_array_equal(ours, first)
    assert not np.array_equal(ours, second)


@pytest.mark.parametrize("w,h,offset", [(101, 64, 18), (103, 64, 20), (64, 101, 18), (64, 103, 20)])
def test_centre_crop_rounds_half_to_even_like_torchvision(tmp_path, transforms, w, h, offset):
    """(101-64)/2 = 18.5 -> 18 and (103-64)/2 = 19.5 -> 20: Python's round, as torchvision uses."""
    path = factory.save(factory.in_mode("RGB", (w, h)), tmp_path / "x.png", "PNG")
    assert_same(path, at(transforms, 64))
    crop = preprocess_image(load_image(path), 64)
    src = np.asarray(Image.open(path)).transpose(2, 0, 1)                       # no resize: short side is R
    expected = src[:, offset:offset + 64, :] if h > w else src[:, :, offset:offset + 64]
    np.testing.assert_array_equal(crop, expected)


def test_odd_case_really_hits_a_half_pixel_crop():
    w, h = SIZES["odd"]
    long_side = max(resized_size(w, h, 224))
    assert (long_side - 224) % 2 == 1


def test_real_configs_are_the_sizes_tested():
    """ViT-B-32 (224) and RN50x4 (288) as open_clip defines them: size, OpenAI mean/std, bicubic, shortest."""
    for R, arch in REAL_CONFIGS.items():
        assert open_clip.get_model_config(arch)["vision_cfg"]["image_size"] == R
        cfg = open_clip.get_pretrained_cfg(arch, "openai")
        assert (cfg["mean"], cfg["std"]) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        assert (cfg["interpolation"], cfg["resize_mode"]) == ("bicubic", "shortest")
        assert PreprocessSpec(R) == PreprocessSpec(R, cfg["interpolation"], cfg["resize_mode"])


def test_preprocess_for_inputs_gives_each_input_its_own_size(files, transforms):
    path = files["RGB-PNG-landscape"]
    specs = {input_name(224): PreprocessSpec(224), input_name(288): PreprocessSpec(288)}
    out = preprocess_for_inputs(load_image(path), specs)
    assert {k: v.shape for k, v in out.items()} == {"image_224": (3, 224, 224), "image_288": (3, 288, 288)}
    for R in (224, 288):
        with Image.open(path) as img:
            assert (graph_view(out[input_name(R)]) - transforms[R](img)).abs().max() <= TOL


def test_order_matters_resize_before_rgb(files):
    """Why the host resizes in the image's own mode: converting first gives different pixels
    for palette (resized NEAREST by PIL) and alpha (premultiplied resize) images."""
    for cid in ("P-PNG-odd", "RGBA-WEBP-portrait"):
        img = load_image(files[cid])
        ours = preprocess_image(img, 64)
        converted_first = preprocess_image(img.convert("RGB"), 64)
        assert not np.array_equal(ours, converted_first), cid


def test_resize_bound_is_checked_before_allocating(monkeypatch):
    """A 100000 x 2 image resized to 32 px would be 1,600,000 x 32 = 51.2 Mpx: refused before PIL.resize runs."""
    from clipfuse.runtime.preprocess import ResizeTooLarge, preprocess_image

    img = Image.new("L", (100_000, 2))
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resize ran"))
    with pytest.raises(ResizeTooLarge, match=r"makes 1600000x32 = 51,200,000 px, over the limit of 1,000,000 px"):
        preprocess_image(img, 32, max_pixels=1_000_000)
