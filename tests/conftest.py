"""Shared fixtures: tiny seeded towers, one tiny engine per session, the shipped photographs.

Nothing here downloads anything: every backbone is `ARCH:random:SEED`. The tiny towers
(tests/helpers/tiny_towers.py) are registered here, through CLIPFUSE_MODEL_CONFIGS, before any test runs.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The shared helpers (tiny towers, image factory, stand-ins, synthetic stages) import by bare name.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from tiny_towers import use_tiny_towers  # noqa: E402

# Never let a test reach a model hub, even by mistake.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytriton's workspaces go to a folder of this session (read when pytriton is first imported, after this):
# the model stores tritonserver leaves in /tmp name their workspace, which tells this session's from others'.
_PYTRITON_HOME = tempfile.mkdtemp(prefix="clipfuse-tests-pytriton-")
os.environ["PYTRITON_HOME"] = _PYTRITON_HOME
# Set at import, before any test starts a child process: children inherit it.
use_tiny_towers()

TINY = ["clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1", "clipfuse-test-vit48:random:2"]
TINY_CLASSES = ["astronaut", "cat", "cup of coffee", "rocket"]
TWO_TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    import clipfuse

    paths = sorted((Path(clipfuse.__file__).parent / "assets").glob("*.jpg"))
    assert len(paths) >= 4
    return paths


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """A 3-backbone tiny engine (32, 48 and 64 px inputs), exported once per session."""
    from clipfuse.export.graph.engine import export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny"
    return export_engine(TINY, TINY_CLASSES, out, templates=TWO_TEMPLATES).folder


@pytest.fixture(scope="session")
def tiny_vit_engine(tmp_path_factory):
    """The tiny engine without its ResNet tower, for tests that need an int8 graph the validation accepts.
    Random ResNet towers embed every image nearly alike (random RN50: two digits at cosine 0.99996,
    benchmarks/results/feature_spread.md): the tiny RN tower's median distance between two unit
    embeddings is 0.0065 on the photo variants (0.0009 on noise, 0.015 on flat colours), and int8 moves
    them 2x that, which the comparator's error-to-spread bound refuses (tests/export/precision/test_int8.py)."""
    from clipfuse.export.graph.engine import export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny_vit"
    return export_engine([TINY[0], TINY[2]], TINY_CLASSES, out, templates=TWO_TEMPLATES).folder


@pytest.fixture(scope="session")
def fp16_engine(tiny_engine, tmp_path_factory):
    """A copy of the tiny engine with model.fp16.onnx added (the shared engine stays untouched)."""
    import shutil

    from clipfuse.export.precision.fp16 import export_fp16

    folder = tmp_path_factory.mktemp("fp16") / "tiny"
    shutil.copytree(tiny_engine, folder)
    export_fp16(folder)
    return folder


# ----------------------------------------------------------------------------- no process left behind
# multiprocessing's helpers live as long as the interpreter by design (pytriton's shared memory starts the
# resource tracker): they are not processes a test started.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def leftover_children(grace_s: float = 10.0) -> list:
    """Child processes of this pytest process still alive after grace_s, interpreter helpers aside."""
    import psutil

    def ours(p):
        try:
            return not any(h in " ".join(p.cmdline()) for h in _INTERPRETER_HELPERS)
        except psutil.Error:
            return False
    children = [p for p in psutil.Process().children(recursive=True) if ours(p)]
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    return alive


def leftover_model_stores() -> list[Path]:
    """tritonserver's model stores (/tmp/folderXXXXXX holding a config.pbtxt) made for this session's pytriton
    workspaces."""
    found = []
    for d in Path("/tmp").glob("folder*"):
        try:
            text = (d / "config.pbtxt").read_text(errors="replace")[:1 << 20]
        except OSError:
            continue
        if _PYTRITON_HOME in text:
            found.append(d)
    return found


def _triton_processes() -> list:
    """tritonserver and Python-backend stubs whose command line names this session's pytriton workspaces."""
    import psutil

    out = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE:        # dead, waiting for its parent or init to reap it
                continue
            if ("tritonserver" in (p.info["name"] or "") or "triton_python_backend_stub" in cmd) and _PYTRITON_HOME in cmd:
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_session():
    yield
    alive = leftover_children()
    tritons = [p for p in _triton_processes() if p.pid not in {a.pid for a in alive}]
    for p in alive + tritons:       # fail loudly, but do not leave them running either
        try:
            p.kill()
        except Exception:
            pass
    stores = leftover_model_stores()
    for d in stores:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(_PYTRITON_HOME, ignore_errors=True)
    assert not alive, f"processes outlived the test session: {[(p.pid, p.name()) for p in alive]}"
    assert not tritons, f"tritonserver or stubs outlived the test session: {[(p.pid, p.name()) for p in tritons]}"
    assert not stores, f"pytriton model stores outlived the test session: {[str(d) for d in stores]}"


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory):
    """The 32 photo variants (4 shipped photographs, crops, mirrors) as PNG files the test writes: an
    int8 calibration folder."""
    from clipfuse.runtime.compare import photo_variants

    folder = tmp_path_factory.mktemp("calib")
    for i, im in enumerate(photo_variants()):
        im.save(folder / f"p{i:02d}.png")
    return folder
