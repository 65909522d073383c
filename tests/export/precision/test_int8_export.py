"""`clipfuse export ENGINE --precision int8`: both graphs written through the one writer and
recorded, bad input refused in one line with a non-zero exit, and every consumer runs the int8 graph."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from clipfuse.core.errors import ClipfuseError


def _cli(*args):
    from clipfuse.cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


def _grey_folder(tmp_path):
    """One flat grey image, 32 times: a calibration of nothing."""
    from PIL import Image

    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(32):
        Image.new("RGB", (80, 80), (128, 128, 128)).save(grey / f"g{i}.png")
    return grey


@pytest.fixture(scope="module")
def int8_engine(tiny_vit_engine, calib_dir, tmp_path_factory):
    """A copy of the tiny engine (without its collapsed ResNet tower: see tiny_vit_engine) with both int8
    graphs, made through the CLI."""
    folder = tmp_path_factory.mktemp("int8e") / "tiny"
    shutil.copytree(tiny_vit_engine, folder)
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--calibration-count", 32,
             "--int8-target", "both", "-q")
    assert r.exit_code == 0, r.output
    assert "model.int8.onnx (target cpu)" in r.output and "model.int8-trt.onnx (target tensorrt)" in r.output
    assert "embedding cosine min" in r.output and "(bound >= 0.99)" in r.output
    return folder


def test_export_writes_both_graphs_and_records_them(int8_engine, calib_dir):
    import onnx

    from clipfuse.runtime.manifest import read_manifest, sha256_file

    m = read_manifest(int8_engine)              # verifies every artefact's sha256, the new ones included
    e = m.data["precisions"]["int8"]
    assert e["file"] == "model.int8.onnx" and e["tensorrt"]["file"] == "model.int8-trt.onnx"
    assert e["targets"] == ["cpu", "tensorrt"]
    for rec, act in ((e, "QUInt8"), (e["tensorrt"], "QInt8")):
        assert rec["settings"]["activation_type"] == act and rec["settings"]["weight_type"] == "QInt8"
        assert rec["settings"]["per_channel"] and rec["calibration"]["images"] == 32
        assert rec["calibration"]["folder"] == str(calib_dir) and len(rec["calibration"]["sha256"]) == 64
        assert rec["source_sha256"] == sha256_file(int8_engine / "model.onnx")
        assert rec["validation"]["ok"] and rec["validation"]["bounds"]["min_cosine"] == 0.99
        assert rec["float"]["islands"]["feature_norm_and_downstream"]["ReduceL2"] == len(m.backbones)
        assert m.data["artefacts"][rec["file"]]["sha256"] == sha256_file(int8_engine / rec["file"])
    # TensorRT's graph: zero points 0 (symmetric) on every activation QuantizeLinear
    g = onnx.load(str(int8_engine / "model.int8-trt.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    zps = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in g.node if n.op_type == "QuantizeLinear"]
    assert zps and all((z == 0).all() for z in zps)
    assert not [p for p in int8_engine.iterdir() if p.name.startswith(".")]      # nothing staged left over
    assert (int8_engine / "model.int8.onnx").stat().st_size < 0.6 * (int8_engine / "model.onnx").stat().st_size


def test_export_refusals_are_one_line_and_exit_1(tiny_engine, calib_dir, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    before = sorted(p.name for p in folder.iterdir())

    def refused(match, *args):
        r = _cli("export", folder, *args, "-q")
        assert r.exit_code == 1, r.output
        err = r.output.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert match in err, err

    refused("needs --calibration DIR", "--precision", "int8")
    refused("does not exist", "--precision", "int8", "--calibration", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    refused("contains no images", "--precision", "int8", "--calibration", tmp_path / "empty")
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(calib_dir.iterdir())[:5]:
        shutil.copy(p, few / p.name)
    refused("has 5 usable images, need at least 32", "--precision", "int8", "--calibration", few)
    refused("apply to --precision int8 only", "--calibration", calib_dir)
    assert sorted(p.name for p in folder.iterdir()) == before            # nothing written
    (folder / "model.onnx").unlink()
    with pytest.raises(ClipfuseError):       # the manifest lists model.onnx: reading the engine already refuses
        from clipfuse.runtime.manifest import read_manifest

        read_manifest(folder)
    refused("model.onnx", "--precision", "int8", "--calibration", calib_dir)


def test_refused_validation_writes_nothing(tiny_engine, tmp_path):
    """One flat grey image, 32 times: the calibration of nothing; the export is refused, the folder unchanged."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    grey = _grey_folder(tmp_path)
    manifest = (folder / "manifest.json").read_text()
    r = _cli("export", folder, "--precision", "int8", "--calibration", grey, "-q")
    assert r.exit_code == 1 and "refused against fp32" in r.output and "< bound 0.99" in r.output, r.output
    assert (folder / "manifest.json").read_text() == manifest
    assert not (folder / "model.int8.onnx").exists() and not (folder / "model.int8-trt.onnx").exists()


def test_accuracy_with_data_is_a_paired_difference(int8_engine, photo_paths, tmp_path):
    from imagefactory import make_labelled_folder

    from clipfuse.export.precision.int8_validate import paired_accuracy
    from clipfuse.runtime.manifest import read_manifest

    make_labelled_folder(tmp_path / "data", photo_paths, per_class=4)
    m = read_manifest(int8_engine)
    classes = {"astronaut": "astronaut", "cat": "cat", "coffee": "cup of coffee", "rocket": "rocket"}
    acc = paired_accuracy(m, int8_engine / "model.int8.onnx", tmp_path / "data", classes=classes)
    d = acc["paired"]
    assert acc["images"] == 16 and d["n"] == 16
    assert d["difference"] == pytest.approx(acc["int8"] - acc["fp32"])
    assert d["lo"] <= d["difference"] <= d["hi"] and acc["max_drop"] == 0.5
    with pytest.raises(ClipfuseError, match="not the engine's"):
        paired_accuracy(m, int8_engine / "model.int8.onnx", tmp_path / "data")        # 'coffee' is not a class


def test_with_data_agreement_and_accuracy_come_from_one_pass_on_the_users_images(int8_engine, photo_paths, tmp_path,
                                                                              monkeypatch):
    """The photographs are out of distribution for heads fitted on the user's data: with --data, agreement
    (cosine, top-1) is measured on the user's own images, every readable one, and the accuracy is read from
    the same outputs; fp32 runs once for every graph validated with the same ref_cache."""
    from imagefactory import make_labelled_folder

    from clipfuse.export.precision import int8_validate, validate as precision_validate
    from clipfuse.runtime.backends import sessions
    from clipfuse.runtime.manifest import read_manifest

    make_labelled_folder(tmp_path / "data", photo_paths, per_class=4)
    opened = []
    real = sessions.open_session

    def spy(path, *a, **kw):
        opened.append(Path(path).name)
        return real(path, *a, **kw)
    monkeypatch.setattr(int8_validate, "open_session", spy)      # each module holds the loader it imported
    monkeypatch.setattr(precision_validate, "open_session", spy)
    m = read_manifest(int8_engine)
    classes = {"astronaut": "astronaut", "cat": "cat", "coffee": "cup of coffee", "rocket": "rocket"}
    cache = {}
    for _ in range(2):
        rep = int8_validate.validate_int8(m, int8_engine / "model.int8.onnx", data=tmp_path / "data", classes=classes,
                                          ref_cache=cache)
        assert rep["images"] == 16 and rep["images_from"] == str(tmp_path / "data")
        assert rep["accuracy"]["images"] == 16
    assert opened == ["model.onnx", "model.int8.onnx", "model.int8.onnx"]
    # the accuracy is the fused top-1 of the outputs the comparator read: the same as a separate pass
    sep = int8_validate.paired_accuracy(m, int8_engine / "model.int8.onnx", tmp_path / "data", classes=classes)
    assert (sep["fp32"], sep["int8"]) == (rep["accuracy"]["fp32"], rep["accuracy"]["int8"])
    rep = int8_validate.validate_int8(m, int8_engine / "model.int8.onnx")
    assert rep["images"] == 32 and rep["images_from"].startswith("the shipped photographs")


def test_load_predict_and_compare_run_int8(int8_engine, photo_paths):
    import clipfuse

    with clipfuse.load(int8_engine, backend="onnxruntime", precision="int8") as p:
        assert p.backend.manifest.onnx_path.name == "model.int8.onnx"
        int8 = p.predict(photo_paths)
    with clipfuse.load(int8_engine, backend="onnxruntime") as p:
        fp32 = p.predict(photo_paths)
    assert [a.label for a in int8] == [b.label for b in fp32]
    r = _cli("predict", int8_engine, *photo_paths, "--precision", "int8", "--backend", "onnxruntime", "--format", "jsonl")
    assert r.exit_code == 0, r.output
    assert len([line for line in r.output.splitlines() if line.startswith("{")]) == len(photo_paths)
    r = _cli("compare", int8_engine, "--backends", "onnxruntime,onnxruntime-int8", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["ok"] and rep["comparisons"][0]["tolerance_set"] == "int8"
    assert rep["backends"][1]["name"] == "onnxruntime-int8"
    r = _cli("compare", int8_engine, "--backends", "onnxruntime,torch-int8")
    assert r.exit_code == 1 and "fp32 reference" in r.output


def test_consumers_refuse_int8_of_an_engine_without_it(tiny_engine, photo_paths):
    import clipfuse

    with pytest.raises(ClipfuseError, match=r"has no model\.int8\.onnx: make it with `clipfuse export .* --precision "
                                            r"int8 --calibration DIR`"):
        clipfuse.load(tiny_engine, backend="onnxruntime", precision="int8")
    with pytest.raises(ClipfuseError, match="torch runs the fp32 reference only"):
        clipfuse.load(tiny_engine, backend="torch", precision="int8")
    with pytest.raises(ClipfuseError, match="unknown precision 'int4'"):
        clipfuse.load(tiny_engine, precision="int4")
    r = _cli("build", tiny_engine, "--precision", "int8")
    assert r.exit_code == 1 and "model.int8-trt.onnx" in r.output and "--calibration DIR" in r.output, r.output


def test_auto_with_int8_skips_torch(int8_engine):
    from clipfuse.runtime.backends.registry import open_backend

    with open_backend(int8_engine, "auto", precision="int8") as b:
        assert b.name != "torch" and b.manifest.onnx_path.name == "model.int8.onnx"


def test_triton_repository_serves_the_int8_graph(int8_engine, tmp_path):
    from clipfuse.runtime.manifest import sha256_file

    r = _cli("triton", int8_engine, "--out", tmp_path / "repo", "--precision", "int8")
    assert r.exit_code == 0, r.output
    served = next((tmp_path / "repo").glob("*/1/model.onnx"))
    assert sha256_file(served) == sha256_file(int8_engine / "model.int8.onnx")


def test_reexport_makes_the_int8_graph_stale(int8_engine, tmp_path):
    """A model.onnx replaced after quantization: the old int8 graph is refused with the command that remakes it."""
    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.precisions import precision_onnx_path

    m = read_manifest(int8_engine)
    data = json.loads(json.dumps(m.data))
    data["precisions"]["int8"]["source_sha256"] = "0" * 64
    stale = type(m)(m.folder, data)
    with pytest.raises(ClipfuseError, match=r"made from an earlier model\.onnx; make it again: `clipfuse export"):
        precision_onnx_path(stale, "int8")
    assert precision_onnx_path(m, "int8", "tensorrt").name == "model.int8-trt.onnx"
    assert np.isfinite(m.data["precisions"]["int8"]["validation"]["fused"]["logits_max_abs"])


def test_bench_refuses_a_precision_the_engine_lacks_at_once(tiny_engine):
    r = _cli("bench", tiny_engine, "--precisions", "fp32,int8", "-q")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "has no model.int8.onnx" in r.output, r.output
    r = _cli("bench", tiny_engine, "--precisions", "fp32,int4", "-q")
    assert r.exit_code == 1 and "valid are fp32, fp16, int8" in r.output, r.output


# --------------------------------------------------------------------------- towers kept fp32 (--int8-keep-fp32)

def test_a_tower_kept_fp32_is_that_backbones_slice_and_has_no_qdq(tiny_engine, calib_dir, tmp_path):
    """float_towers=(k,): backbone k's weighted ops read no DequantizeLinear and its features equal fp32's,
    for every k, so the tower found for backbone k (export/int8_calibrate.backbone_towers) is backbone k's."""
    import onnx

    from clipfuse.core import iospec
    from clipfuse.export.precision.calibrate import calibrate_ranges, calibration_feeds
    from clipfuse.export.precision.int8 import quantize_int8
    from clipfuse.export.precision.validate import batched_feeds, run_batches
    from clipfuse.runtime.backends.sessions import open_session
    from clipfuse.runtime.compare import photo_variants
    from clipfuse.runtime.manifest import read_manifest
    m = read_manifest(tiny_engine)
    feeds = calibration_feeds(m, calib_dir, count=32)
    ranges = calibrate_ranges(m.onnx_path, feeds, workdir=tmp_path)
    imgs = batched_feeds(m, photo_variants()[:8])
    ref = run_batches(open_session(m.onnx_path), imgs)[iospec.FEATURES]
    dims = [b["embed_dim"] for b in m.data["backbones"]]
    edges = np.cumsum([0] + dims)
    for k in range(len(dims)):
        out = tmp_path / f"keep{k}.onnx"
        rec = quantize_int8(m.onnx_path, out, feeds, ranges=ranges, float_towers=(k,))
        assert rec["float"]["islands"]["float_towers"]["backbones"] == [k]
        got = run_batches(open_session(out), imgs)[iospec.FEATURES]
        for j in range(len(dims)):
            err = np.abs(got[:, edges[j]:edges[j + 1]] - ref[:, edges[j]:edges[j + 1]]).max()
            assert (err < 1e-5) if j == k else (err > 1e-4), (k, j, err)
        g = onnx.load(str(out)).graph
        assert sum(n.op_type == "QuantizeLinear" for n in g.node) > 0


def test_auto_keeps_the_collapsed_tower_fp32_and_ships_the_rest_int8(tiny_engine, calib_dir, tmp_path):
    """The tiny RN tower fails error-to-spread in int8 (tests/export/precision/test_int8.py); --int8-keep-fp32 auto keeps it
    fp32, validates again and ships; the record names it and the manifest keeps the validation."""
    from clipfuse.runtime.manifest import read_manifest

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--calibration-count", 32,
             "--int8-target", "cpu", "--int8-keep-fp32", "auto", "-q")
    assert r.exit_code == 0, r.output
    rn = "clipfuse-test-rn:random:1"
    assert f"towers kept fp32: {rn}" in r.output
    e = read_manifest(folder).data["precisions"]["int8"]
    assert e["float_backbones"] == [rn] and e["validation"]["ok"]
    rows = {b["backbone"]: b for b in e["validation"]["backbones"]}
    assert rows[rn]["cosine_min"] > 0.99999 and rows[rn]["error_to_spread"] < 1e-3      # that tower is fp32 now
    # without it, the same export is refused by the RN tower's error-to-spread
    folder2 = tmp_path / "tiny2"
    shutil.copytree(tiny_engine, folder2)
    r = _cli("export", folder2, "--precision", "int8", "--calibration", calib_dir, "--calibration-count", 32,
             "--int8-target", "cpu", "-q")
    assert r.exit_code == 1 and f"{rn}: feature error" in r.output and "> bound 0.25" in r.output, r.output


def test_keep_fp32_names_are_checked(tiny_engine, calib_dir, tmp_path):
    from clipfuse.export.precision.int8_export import export_int8

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    with pytest.raises(ClipfuseError, match=r"--int8-keep-fp32 'RN51' is not a backbone of .*its backbones: "
                                            r"clipfuse-test-vit:random:0, "):
        export_int8(folder, calib_dir, count=32, keep_fp32=["RN51"])
    names = ["clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1", "clipfuse-test-vit48:random:2"]
    with pytest.raises(ClipfuseError, match="names every backbone"):
        export_int8(folder, calib_dir, count=32, keep_fp32=names)
    r = _cli("export", folder, "--int8-keep-fp32", "auto")
    assert r.exit_code == 1 and "apply to --precision int8 only" in r.output
    assert not (folder / "model.int8.onnx").exists()


def test_auto_refuses_when_every_tower_fails(tiny_engine, tmp_path):
    """A broken calibration (one flat grey image, 32 times) fails every tower: auto would keep them all fp32,
    which gains nothing, so it is refused in one line and nothing is written."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    grey = _grey_folder(tmp_path)
    r = _cli("export", folder, "--precision", "int8", "--calibration", grey, "--int8-target", "cpu",
             "--int8-keep-fp32", "auto", "-q")
    assert r.exit_code == 1 and "every backbone fails in int8" in r.output and "nothing written" in r.output, r.output
    assert len(r.output.strip().splitlines()[-1]) > 0 and not (folder / "model.int8.onnx").exists()


def test_default_target_fits_the_machine(tiny_vit_engine, calib_dir, tmp_path):
    """Without --int8-target: the TensorRT graph only where TensorRT is installed (here, without it: CPU only)."""
    import importlib.util

    from clipfuse.runtime.manifest import read_manifest

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_vit_engine, folder)
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--calibration-count", 32)
    assert r.exit_code == 0, r.output
    has_trt = importlib.util.find_spec("tensorrt") is not None
    assert read_manifest(folder).data["precisions"]["int8"]["targets"] == (["cpu", "tensorrt"] if has_trt else ["cpu"])
    assert (folder / "model.int8.onnx").is_file() and (folder / "model.int8-trt.onnx").is_file() == has_trt
    if not has_trt:
        assert "TensorRT is not installed here: writing the CPU graph only" in r.output
        # what asks for the TensorRT graph names the command that writes it here (the default would not)
        from clipfuse.runtime.precisions import with_precision
        with pytest.raises(ClipfuseError, match=r"has no model.int8-trt.onnx: make it with `clipfuse export .* "
                                                r"--precision int8 --calibration DIR --int8-target both`"):
            with_precision(read_manifest(folder), "int8", "tensorrt")


def test_each_option_a_refusal_names_passes(tiny_engine, calib_dir, tmp_path):
    """The tiny RN tower fails in int8: the refusal names --int8-keep-fp32 for it (and auto); each runs and
    passes on the same engine; no refusal suggests the fp16 export blind."""
    import re

    def export(name, *args):
        folder = tmp_path / name
        shutil.copytree(tiny_engine, folder)
        return _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--calibration-count", 32,
                    "--int8-target", "cpu", *args, "-q")

    r = export("refused")
    assert r.exit_code == 1, r.output
    rn = "clipfuse-test-rn:random:1"
    assert f"try keep the failing tower fp32: --int8-keep-fp32 {rn} (or --int8-keep-fp32 auto)" in r.output
    assert "--precision fp16" not in r.output and "calibrate on more" in r.output
    suggested = re.findall(r"--int8-keep-fp32 (\S+?)\)?(?:[ ;]|$)", r.output)
    assert suggested == [rn, "auto"], suggested
    for i, value in enumerate(suggested):
        r = export(f"fix{i}", "--int8-keep-fp32", value)
        assert r.exit_code == 0, (value, r.output)
        assert f"towers kept fp32: {rn}" in r.output


def test_a_failing_tensorrt_graph_keeps_the_cpu_graph_that_passed(tiny_vit_engine, calib_dir, tmp_path, monkeypatch):
    """The TensorRT graph's validation fails (injected: the tiny towers pass both): the CPU graph is still
    written, the TensorRT graph is not, and the record says why, naming --int8-target cpu."""
    from clipfuse.export.precision import int8_export
    from clipfuse.runtime.manifest import read_manifest

    real = int8_export.validate_int8

    def trt_fails(m, path, **kw):
        report = real(m, path, **kw)
        if path.name.startswith("model.int8-trt"):
            report = dict(report, ok=False, failures=["logits: max |err| 9.9 > tolerance 0.1 (injected)"])
        return report

    monkeypatch.setattr(int8_export, "validate_int8", trt_fails)
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_vit_engine, folder)
    info = int8_export.export_int8(folder, calib_dir, count=32, targets=("cpu", "tensorrt"))
    assert info["targets"] == ["cpu"] and "tensorrt" not in info
    assert "(injected)" in info["tensorrt_refused"] and "--int8-target cpu" in info["tensorrt_refused"]
    assert (folder / "model.int8.onnx").is_file() and not (folder / "model.int8-trt.onnx").exists()
    assert read_manifest(folder).data["precisions"]["int8"]["tensorrt_refused"] == info["tensorrt_refused"]
    from clipfuse.runtime.precisions import with_precision
    with pytest.raises(ClipfuseError, match=r"has no model.int8-trt.onnx: its int8 export refused it \(.*injected"):
        with_precision(read_manifest(folder), "int8", "tensorrt")     # not a suggestion to run the same export
    # asked for the TensorRT graph alone, the same failure is refused, naming the CPU target
    with pytest.raises(ClipfuseError, match=r"injected.*--int8-target cpu"):
        int8_export.export_int8(folder, calib_dir, count=32, targets=("tensorrt",))
