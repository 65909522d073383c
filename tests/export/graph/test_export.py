"""The fused graph and the engine folder: outputs, names, shapes, manifest, atomicity, errors."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY, TINY_CLASSES, TWO_TEMPLATES
from PIL import Image

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph import engine as engine_mod
from clipfuse.export.graph.engine import export_engine
from clipfuse.export.graph.heads import LINEAR_PROBE, Head
from clipfuse.runtime.manifest import read_manifest, sha256_file
from clipfuse.runtime.preprocess import preprocess_image


def _feed(manifest, images):
    specs = manifest.preprocess_specs()
    return {name: np.stack([preprocess_image(im, s) for im in images]) for name, s in specs.items()}


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def test_manifest_is_complete(tiny_engine):
    m = read_manifest(tiny_engine)              # verifies every sha256
    d = m.data
    assert d["schema_version"] == 1 and d["classes"] == TINY_CLASSES and d["templates"] == TWO_TEMPLATES
    assert [f"{b['arch']}:{b['weights']}" for b in d["backbones"]] == TINY      # user order kept
    assert [i["name"] for i in d["inputs"]] == ["image_32", "image_48", "image_64"]  # ascending
    assert [o["name"] for o in d["outputs"]] == list(iospec.OUTPUT_NAMES)
    assert d["outputs"][3]["shape"] == ["batch", 3, 4]
    assert d["outputs"][4]["shape"] == ["batch", 32 + 32 + 24]
    for b in d["backbones"]:
        assert len(b["weights_sha256"]) == 64 and b["weights_kind"] == "random"
        assert b["visual_params"] > 0 and b["gflops"] > 0
    for name in ("model.onnx", "heads.safetensors", "controller.safetensors"):
        assert d["artefacts"][name]["sha256"] == sha256_file(tiny_engine / name)
    assert {"torch", "onnx", "onnxruntime", "open_clip_torch"} <= set(d["versions"])
    assert d["validation"]["batches"]["4"]["top1_identical"]


def test_graph_io_names_and_dynamic_batch(tiny_engine, photo_paths):
    model = onnx.load(str(tiny_engine / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["image_32", "image_48", "image_64"]
    assert [o.name for o in model.graph.output] == list(iospec.OUTPUT_NAMES)
    for i in model.graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert i.type.tensor_type.shape.dim[0].dim_param            # symbolic batch
    m = read_manifest(tiny_engine)
    sess = _session(tiny_engine)
    images = [Image.open(p) for p in photo_paths]
    for n in (1, 3, 7):
        outs = sess.run(None, _feed(m, [images[i % len(images)] for i in range(n)]))
        logits, probs, temps, bb, feats = outs
        assert logits.shape == (n, 4) and temps.shape == (n, 3) and bb.shape == (n, 3, 4) and feats.shape == (n, 88)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        # unfitted controller: constant 1/K, so the fused logits are LOG-AVG
        np.testing.assert_allclose(temps, 1 / 3, rtol=1e-6)
        np.testing.assert_allclose(logits, bb.mean(1), rtol=1e-5, atol=1e-5)
        # the features are the concatenated unit-norm embeddings
        for lo, hi in ((0, 32), (32, 64), (64, 88)):
            np.testing.assert_allclose(np.linalg.norm(feats[:, lo:hi], axis=-1), 1.0, rtol=1e-5)


def test_batch_rows_are_independent(tiny_engine, photo_paths):
    """An image's outputs do not depend on what else is in its batch."""
    m = read_manifest(tiny_engine)
    sess = _session(tiny_engine)
    images = [Image.open(p) for p in photo_paths]
    alone = sess.run(["backbone_logits"], _feed(m, images[:1]))[0]
    batched = sess.run(["backbone_logits"], _feed(m, images))[0]
    np.testing.assert_allclose(batched[:1], alone, rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])     # the towers do see the images


def test_existing_output_needs_force(tiny_engine, tmp_path):
    out = tmp_path / "e"
    export_engine(TINY[:1], "a,b", out, templates=TWO_TEMPLATES)
    (out / "keep.txt").write_text("x")        # an engine folder with a stray file is still an engine folder
    with pytest.raises(ClipfuseError, match="already exists; pass --force"):
        export_engine(TINY[:1], "a,b", out, templates=TWO_TEMPLATES)
    export_engine(TINY[:1], "a,b", out, templates=TWO_TEMPLATES, force=True)
    # --force replaces the engine, not what its manifest does not list
    assert (out / "keep.txt").read_text() == "x" and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["e"]        # no temporary, old or lock files left


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ClipfuseError, match="cannot create the output's parent folder"):
        export_engine(TINY[:1], "a,b", blocker / "engine", templates=TWO_TEMPLATES)
    with pytest.raises(ClipfuseError, match="exists and is not a folder"):
        export_engine(TINY[:1], "a,b", blocker, templates=TWO_TEMPLATES)


def test_read_only_parent(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if os.geteuid() == 0:   # root ignores permission bits: make the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(ClipfuseError, match="no write permission"):
        export_engine(TINY[:1], "a,b", ro / "engine", templates=TWO_TEMPLATES)


def test_crash_mid_export_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated crash during validation")

    monkeypatch.setattr("clipfuse.export.graph.engine.validate_onnx", boom)
    out = tmp_path / "engine"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_engine(TINY[:1], "a,b", out, templates=TWO_TEMPLATES)
    assert list(tmp_path.iterdir()) == []


def test_crash_during_force_keeps_the_old_engine(tiny_engine, tmp_path, monkeypatch):
    out = tmp_path / "engine"
    export_engine(TINY[:1], "a,b", out, templates=TWO_TEMPLATES)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr("clipfuse.export.graph.engine.validate_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        export_engine(TINY[1:2], "a,b", out, templates=TWO_TEMPLATES, force=True)
    assert (out / "manifest.json").read_text() == before
    read_manifest(out)


def test_validation_catches_a_wrong_graph(tmp_path):
    """validate_onnx fails when the graph does not compute what the module does."""
    from clipfuse.export.graph.backbones import load_backbone
    from clipfuse.export.graph.fused import FusedEnsemble
    from clipfuse.export.graph.onnx_export import export_onnx, validate_onnx

    b = load_backbone("clipfuse-test-vit:random:0")
    head = Head(torch.randn(3, 32), torch.zeros(3))
    fused = FusedEnsemble([b.model.visual], [head], [32], [b.preprocess["mean"]], [b.preprocess["std"]]).eval()
    export_onnx(fused, tmp_path / "m.onnx")
    feeds = engine_mod.feeds_by_batch(engine_mod.shipped_photos(), {"image_32": 32})
    validate_onnx(fused, tmp_path / "m.onnx", feeds)          # passes as exported
    with torch.no_grad():
        fused.head_weight_0.mul_(1.01)                        # 1% off: a real bug's size
    with pytest.raises(ClipfuseError, match="disagrees with PyTorch"):
        validate_onnx(fused, tmp_path / "m.onnx", feeds)


def test_external_data(tmp_path):
    """Past 2 GB the weights go to model.onnx.data; forced here on a tiny model."""
    from clipfuse.export.graph.backbones import load_backbone
    from clipfuse.export.graph.fused import FusedEnsemble
    from clipfuse.export.graph.onnx_export import export_onnx, validate_onnx

    b = load_backbone("clipfuse-test-rn:random:0")
    fused = FusedEnsemble([b.model.visual], [Head(torch.randn(2, 32), torch.zeros(2))], [64],
                          [b.preprocess["mean"]], [b.preprocess["std"]]).eval()
    info = export_onnx(fused, tmp_path / "model.onnx", external_data=True)
    assert info["external_data"] == "model.onnx.data"
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    feeds = engine_mod.feeds_by_batch(engine_mod.shipped_photos(), {"image_64": 64})
    validate_onnx(fused, tmp_path / "model.onnx", feeds)


def test_linear_probe_heads_go_through_the_same_path(tmp_path, photo_paths):
    torch.manual_seed(0)
    heads = [Head(torch.randn(3, 32), torch.randn(3), LINEAR_PROBE), Head(torch.randn(3, 24), torch.randn(3), LINEAR_PROBE)]
    out = tmp_path / "probe"
    r = export_engine([TINY[0], TINY[2]], "a,b,c", out, heads=heads)
    assert r.manifest["head_kind"] == LINEAR_PROBE and r.manifest["templates"] is None
    m = read_manifest(out)
    bb, feats = _session(out).run(["backbone_logits", "features"], _feed(m, [Image.open(photo_paths[0])]))
    ref0 = feats[:, :32] @ heads[0].weight.numpy().T + heads[0].bias.numpy()
    np.testing.assert_allclose(bb[:, 0], ref0, rtol=1e-4, atol=1e-4)


def test_progress_counts_from_one_when_backbones_come_built(tmp_path, capsys):
    """fit hands export built backbones and fitted heads: the counter shows only the steps that run."""
    from clipfuse.export.graph.backbones import load_backbone

    torch.manual_seed(0)
    heads = [Head(torch.randn(3, 32), torch.randn(3), LINEAR_PROBE), Head(torch.randn(3, 24), torch.randn(3), LINEAR_PROBE)]
    built = load_backbone(TINY[0])
    capsys.readouterr()
    export_engine([built, TINY[2]], "a,b,c", tmp_path / "probe", heads=heads)
    counters = [ln.split("] ", 1)[1] for ln in capsys.readouterr().err.splitlines() if ln.endswith(" ...")]
    assert [c.split()[0] for c in counters] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], counters
    assert "clipfuse-test-vit48:random:2: building" in counters[0]


def test_bad_export_arguments(tmp_path):
    with pytest.raises(ClipfuseError, match="given twice"):
        export_engine([TINY[0], TINY[0]], "a,b", tmp_path / "x", templates=TWO_TEMPLATES)
    with pytest.raises(ClipfuseError, match="no backbones"):
        export_engine([], "a,b", tmp_path / "x")
    with pytest.raises(ClipfuseError, match="1 heads given for 2 backbones"):
        export_engine(TINY[:2], "a,b", tmp_path / "x", heads=[Head(torch.zeros(2, 32), torch.zeros(2))])
    assert not (tmp_path / "x").exists()


def test_tampered_or_incomplete_engine_is_refused(tiny_engine, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    with open(copy / "heads.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ClipfuseError, match="does not match the sha256"):
        read_manifest(copy)
    shutil.copy(tiny_engine / "heads.safetensors", copy / "heads.safetensors")
    read_manifest(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ClipfuseError, match="missing model.onnx"):
        read_manifest(copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ClipfuseError, match="schema version 99"):
        read_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ClipfuseError, match="no manifest.json"):
        read_manifest(copy)
