"""`clipfuse predict`: agrees with the API, names every failed image, exits 1 on failures and bad engines."""
from __future__ import annotations

import csv
import io
import json
import shutil

import imagefactory as factory
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import TINY, TINY_CLASSES

from clipfuse.cli.main import cli
from clipfuse.runtime.backends import registry as bk
from clipfuse.runtime.predict import load_predictor


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory, photo_paths):
    """One file of every kind runtime/images refuses, with the start of its reason."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.jpg").write_text("a shopping list, not a photo\n")
    (d / "empty.png").write_bytes(b"")
    factory.save(factory.in_mode("RGB", (1, 1)), d / "dot.png", "PNG")
    return {
        d / "notes.jpg": "not an image (cannot identify image file; looks like text)",
        factory.truncated(photo_paths[1], d / "cut.jpg"): "truncated or corrupt image data",
        d / "empty.png": "empty file (0 bytes)",
        d / "dot.png": "image is 1x1 px, smaller than the minimum 8 px per side",
        factory.bomb_png(d / "bomb.png"): "too many pixels, possible decompression bomb",
    }


def test_jsonl_is_the_api_result(tiny_engine, photo_paths):
    r = run("predict", tiny_engine, *photo_paths, "--format", "jsonl", "--top-k", "3", "--batch", "3",
            "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    with load_predictor(tiny_engine, backend="onnxruntime", batch_size=3) as p:
        expected = [x.to_dict() for x in p.predict([str(x) for x in photo_paths], top_k=3)]
    assert rows == expected
    assert len(rows) == 4 and all(len(x["labels"]) == 3 and list(x["temperatures"]) == TINY for x in rows)


def test_table_shows_labels_probabilities_and_temperatures(tiny_engine, photo_paths):
    r = run("predict", tiny_engine, photo_paths[0], "-k", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == str(photo_paths[0])
    assert lines[1].startswith("  1. ") and lines[1].endswith("%") and lines[2].startswith("  2. ")
    assert lines[1].split()[1] in TINY_CLASSES
    assert lines[3] == "    temperatures: " + ", ".join(f"{b} 0.333" for b in TINY)   # constant controller: 1/K
    assert "backend auto -> onnxruntime" in r.stderr


def test_csv_has_one_row_per_image_failures_included(tiny_engine, photo_paths, bad_images):
    bad = next(iter(bad_images))
    r = run("predict", tiny_engine, photo_paths[0], bad, photo_paths[2], "--format", "csv", "-k", "2",
            "--allow-failures")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == ["path", "error", "label_1", "prob_1", "label_2", "prob_2", *[f"temperature:{b}" for b in TINY]]
    assert [x["path"] for x in rows] == [str(photo_paths[0]), str(bad), str(photo_paths[2])]
    assert rows[1]["error"].startswith("not an image") and rows[1]["label_1"] == "" and rows[0]["error"] == ""
    assert float(rows[0]["prob_1"]) >= float(rows[0]["prob_2"]) > 0


def test_every_bad_kind_is_a_named_failure(tiny_engine, photo_paths, bad_images):
    paths = [photo_paths[0], *bad_images, photo_paths[3]]
    r = run("predict", tiny_engine, *paths, "--format", "jsonl", "--batch", "4")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["path"] for x in rows] == [str(p) for p in paths]           # nothing dropped, order kept
    assert rows[0]["error"] is None and rows[-1]["error"] is None and rows[-1]["labels"]
    for row, (path, reason) in zip(rows[1:-1], bad_images.items()):
        assert row["error"].startswith(reason) and row["labels"] == []
        assert f"failed: {path}: {reason}" in r.stderr
    assert error_lines(r) == [f"error: 5 of 7 images could not be classified (named above); "
                              "fix or remove them, or pass --allow-failures to exit 0 anyway"]


def test_allow_failures_exits_zero_and_table_keeps_failures_on_stderr(tiny_engine, photo_paths, bad_images):
    bad = list(bad_images)[1]
    r = run("predict", tiny_engine, photo_paths[0], bad, "--allow-failures")
    assert r.exit_code == 0
    assert str(photo_paths[0]) in r.stdout and str(bad) not in r.stdout
    assert f"failed: {bad}: truncated or corrupt image data" in r.stderr
    assert "1 of 2 images could not be classified (allowed by --allow-failures)" in r.stderr


def test_folders_globs_and_stdin(tiny_engine, photo_paths, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photo_paths[:2]:
        shutil.copy(p, folder / p.name)
    r = run("predict", tiny_engine, folder, "--format", "jsonl")
    assert [json.loads(x)["path"] for x in r.stdout.splitlines()] == [str(folder / p.name) for p in photo_paths[:2]]
    r = run("predict", tiny_engine, str(photo_paths[0].parent / "c*.jpg"), "--format", "jsonl")
    assert sorted(json.loads(x)["path"].rsplit("/", 1)[1] for x in r.stdout.splitlines()) == ["chelsea.jpg", "coffee.jpg"]
    r = run("predict", tiny_engine, "-", "--format", "jsonl", input=f"{photo_paths[3]}\n\n{photo_paths[1]}\n")
    assert r.exit_code == 0 and [json.loads(x)["path"] for x in r.stdout.splitlines()] == [str(photo_paths[3]), str(photo_paths[1])]
    r = run("predict", tiny_engine, "-", input="\n")
    assert r.exit_code == 1 and error_lines(r) == ["error: no images to classify: the list on stdin was empty"]


@pytest.fixture
def tampered(tiny_engine, tmp_path):
    folder = shutil.copytree(tiny_engine, tmp_path / "tampered")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-100] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))
    return folder


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(bk, "nvidia_gpu_visible", lambda: False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.mark.parametrize("engine, extra, expect", [
    ("{tmp}/nowhere", [], "engine folder '{tmp}/nowhere' does not exist; make it with `clipfuse export"),
    ("{tampered}", [], "model.onnx' does not match the sha256 in the manifest: the file was changed; re-run `clipfuse export`"),
    ("{engine}", ["--backend", "gpu"], "unknown backend 'gpu'; valid: auto, tensorrt, onnxruntime-tensorrt, "
                                       "onnxruntime-cuda, torch-cuda, torch-cuda-eager, onnxruntime, openvino, "
                                       "torch"),
    ("{engine}", ["--backend", "onnxruntime-cuda"], "Install the GPU build: pip install onnxruntime-gpu"),
    ("{engine}", ["--backend", "tensorrt"], "needs the tensorrt package and an NVIDIA GPU"),
])
def test_engine_and_backend_errors(tiny_engine, tampered, tmp_path, photo_paths, cpu_only, engine, extra, expect):
    fill = dict(tmp=tmp_path, tampered=tampered, engine=tiny_engine)
    r = run("predict", engine.format(**fill), photo_paths[0], *extra)
    assert r.exit_code == 1 and r.stdout == ""
    assert len(error_lines(r)) == 1 and expect.format(**fill) in error_lines(r)[0], r.stderr
    assert "Traceback" not in r.output


def test_missing_image_path_is_named(tiny_engine, tmp_path):
    r = run("predict", tiny_engine, tmp_path / "holiday.jpg")
    assert r.exit_code == 1 and f"failed: {tmp_path / 'holiday.jpg'}: no such file" in r.stderr
    assert error_lines(r) == ["error: 1 of 1 images could not be classified (named above); "
                              "fix or remove them, or pass --allow-failures to exit 0 anyway"]


def test_missing_path_among_others_is_a_failed_row(tiny_engine, photo_paths, tmp_path):
    """The rest is predicted, the missing one named, exit 1 (the run is not aborted)."""
    gone = tmp_path / "gone.jpg"
    r = run("predict", tiny_engine, photo_paths[0], gone, photo_paths[1], "--format", "jsonl")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["path"] for x in rows] == [str(photo_paths[0]), str(gone), str(photo_paths[1])]
    assert rows[0]["labels"] and rows[2]["labels"] and rows[1]["error"] == "no such file"
    assert f"failed: {gone}: no such file" in r.stderr
    r = run("predict", tiny_engine, "-", "--format", "jsonl", input=f"{gone}\n{photo_paths[2]}\n")
    assert r.exit_code == 1 and [json.loads(x)["error"] for x in r.stdout.splitlines()] == ["no such file", None]


def test_control_characters_in_file_names_are_escaped_in_the_table(tiny_engine, photo_paths, tmp_path):
    odd = tmp_path / "two\nlines.jpg"
    shutil.copy(photo_paths[0], odd)
    broken = tmp_path / "bad\tname\x1b[31m.jpg"
    broken.write_text("not an image")
    r = run("predict", tiny_engine, odd, broken, "-k", "1")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0] == str(odd).replace("\n", "\\n") and lines[1].startswith("  1. ")   # no forged row
    assert f"failed: {str(broken)!r}"[:-1].replace("'", "", 1) in r.stderr and "\x1b" not in r.stderr
    r = run("predict", tiny_engine, odd, "--format", "jsonl")                # programs get the name as it is
    assert json.loads(r.stdout)["path"] == str(odd)


def test_max_image_pixels_option_exists_and_is_named_by_the_refusal(tiny_engine, photo_paths, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)   # the option sets it: restore after
    strip = factory.bomb_png(tmp_path / "strip.png", 1_000_000, 8)
    r = run("predict", tiny_engine, photo_paths[0], strip, "--format", "jsonl")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["labels"] and "over the limit of 89,478,485 px" in rows[1]["error"]
    assert "--max-image-pixels N" in rows[1]["error"]
    r = run("predict", tiny_engine, photo_paths[0], "--max-image-pixels", "200000", "--format", "jsonl")
    assert r.exit_code == 1 and "= 262,144 px, over the limit of 200,000 px" in json.loads(r.stdout)["error"]
    assert "DecompressionBombWarning" not in r.stderr


def test_an_image_without_an_engine_says_the_engine_comes_first(photo_paths):
    r = CliRunner().invoke(cli, ["predict", str(photo_paths[0])])
    assert r.exit_code == 2
    assert "the engine folder comes first (clipfuse predict ENGINE IMAGES...)" in r.stderr
    assert repr(str(photo_paths[0])) in r.stderr
