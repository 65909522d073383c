"""Inputs that used to hang a run or end it with a traceback.

- a FIFO (or any non-regular file) given as an image is named and skipped without being opened, wherever
  images are read: predict (a file, a folder), `fit --data` class folders, `--calibration`/`--cascade-images`;
- a read error on one image (/proc/self/mem gives EIO) names the image, the rest is classified;
- --threads past 4x the CPUs is refused in one line before anything starts;
- `predict --url` with a port out of range is one line.

The FIFO tests cannot hang: a writer thread waits on the FIFO's other end, so code that opens it (the old
behaviour) reads an empty file instead of blocking; afterwards the test releases the writer by opening the
read end without blocking.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.images import ImageError, load_image, preprocess_paths

PROC_MEM = Path("/proc/self/mem")


@contextmanager
def fifo_at(path: Path):
    """mkfifo `path`; a writer thread stands by so that opening it for reading never blocks forever."""
    os.mkfifo(path)
    opened = []

    def writer():
        with open(path, "wb") as w:         # blocks until someone opens the read end
            opened.append(True)
            w.close()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield path
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # release the writer if nobody read the FIFO
        t.join()
        os.close(fd)


def test_load_image_names_a_fifo_without_opening_it(tmp_path):
    with fifo_at(tmp_path / "f.png") as f:
        with pytest.raises(ImageError, match=r"f\.png: is a FIFO \(named pipe\), not a regular file"):
            load_image(f)


def test_a_read_error_is_one_failure_and_the_rest_loads(photo_paths):
    with pytest.raises(ImageError, match=r"/proc/self/mem: cannot read the file \(Input/output error\)"):
        load_image(PROC_MEM)
    ok, inputs, failures = preprocess_paths([PROC_MEM, photo_paths[0]], {"image_32": 32})
    assert ok == [photo_paths[0]] and inputs["image_32"].shape == (1, 3, 32, 32)
    assert [f.path for f in failures] == [PROC_MEM] and "Input/output error" in failures[0].reason


def test_predict_names_a_fifo_and_an_unreadable_file_and_classifies_the_rest(tiny_engine, photo_paths, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo_paths[0].read_bytes())
    with fifo_at(folder / "f.png"):
        r = CliRunner().invoke(cli, ["predict", str(tiny_engine), str(folder), str(folder / "f.png"), str(PROC_MEM),
                                     "--backend", "onnxruntime", "--format", "jsonl"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "is a FIFO (named pipe), not a regular file" in r.stderr
    assert "/proc/self/mem: cannot read the file (Input/output error)" in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(Path(row["path"]).name, row["error"] is None) for row in rows] == [
        ("a.jpg", True), ("f.png", False), ("mem", False)]
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 of 3 images could not be classified")


def test_fit_data_and_calibration_skip_a_fifo(tiny_engine, calib_dir, tmp_path):
    from clipfuse.export.data import scan_labelled_folder
    from clipfuse.export.precision.calibrate import calibration_feeds
    from clipfuse.runtime.manifest import read_manifest

    data = tmp_path / "data"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        (data / c / "x.png").write_bytes((calib_dir / "p00.png").read_bytes())
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted(calib_dir.glob("*.png"))[:4]:
        (calib / p.name).write_bytes(p.read_bytes())
    with fifo_at(data / "cat" / "f.png"), fifo_at(calib / "f.png"):
        paths, labels, names = scan_labelled_folder(data)
        assert [p.name for p in paths] == ["x.png", "x.png"] and names == ["cat", "dog"]
        feeds = calibration_feeds(read_manifest(tiny_engine), calib, 8, min_images=4)
    assert sum(len(next(iter(f.values()))) for f in feeds) == 4


def test_threads_has_an_upper_bound(tiny_engine, photo_paths):
    from clipfuse.runtime.backends.sessions import session_options

    bound = 4 * (os.cpu_count() or 1)
    for cmd in (["predict", str(tiny_engine), str(photo_paths[0])], ["bench", str(tiny_engine)],
                ["serve", str(tiny_engine)]):
        r = CliRunner().invoke(cli, [*cmd, "--threads", str(bound + 1)])
        assert r.exit_code == 1, r.output
        assert r.stderr.strip() == (f"error: --threads {bound + 1} is outside 1..{bound} (4 x this machine's "
                                    f"{os.cpu_count()} CPUs); give at most {bound}, or leave it out for the "
                                    "measured default")
    with pytest.raises(ClipfuseError, match=f"threads 100000 is outside 1..{bound}"):
        session_options(threads=100000)
    assert session_options(threads=bound).intra_op_num_threads == bound


def test_predict_url_with_a_port_out_of_range_is_one_line(photo_paths):
    r = CliRunner().invoke(cli, ["predict", "--url", "http://127.0.0.1:99999", str(photo_paths[0])])
    assert r.exit_code == 1 and not isinstance(r.exception, ValueError), r.output
    assert r.stderr.strip() == ("error: --url 'http://127.0.0.1:99999': the port must be a number in 1-65535 "
                                "(e.g. http://127.0.0.1:8000)")
