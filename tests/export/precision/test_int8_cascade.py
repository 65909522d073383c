"""int8 stages for a cascade engine: `export --precision int8` on a cascade engine cuts each
backbone's stage tower out of model.int8.onnx, certifies new thresholds on the int8 stages' outputs, and
every consumer runs them; too few images to certify: the full int8 graph ships, the stages do not, and
the runtime says why in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY
from imagefactory import make_labelled_folder
from PIL import Image
from standins import served_predictions, triton_python_model

from clipfuse.cli.main import cli
from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.fit_images import cascade_calibration_digests, fit_image_digests, fit_images_json
from clipfuse.runtime.manifest import read_manifest, sha256_file

FAST = dict(shots=1, eval_fraction=0.34, templates=["a photo of a {}."], study_shots=(1,), study_seeds=(0,))


def _cli(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.fixture(scope="module")
def data(tmp_path_factory, photo_paths):
    root = tmp_path_factory.mktemp("int8-cascade-data") / "train"
    make_labelled_folder(root, photo_paths)
    return root


@pytest.fixture(scope="module")
def fp32_cascade(tmp_path_factory, data):
    """A cascade over the two tiny ViT towers (the tiny RN tower's features are too collapsed for int8, see
    conftest.tiny_vit_engine), fp32 only."""
    from clipfuse.export.fit.levers.recipe import Levers
    from clipfuse.export.fit.pipeline import fit_engine

    base = tmp_path_factory.mktemp("int8-cascade")
    # 12 calibration images certify no less than ~35 points at 95%: the tiny world cannot do better
    result, _ = fit_engine([TINY[0], TINY[2]], data, base / "engine", cache_dir=base / "cache",
                           levers=Levers(cascade=True, max_drop=40), **FAST)
    return result.folder


@pytest.fixture(scope="module")
def int8_cascade(fp32_cascade, calib_dir, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8-cascade-e") / "engine"
    shutil.copytree(fp32_cascade, folder)
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--int8-target", "cpu", "-q")
    assert r.exit_code == 0, r.output
    assert "cascade: int8 stages stages/tower_1.int8.onnx, stages/tower_2.int8.onnx" in r.output, r.output
    return folder


def _feed(m, paths):
    from clipfuse.runtime.images import preprocess_paths

    ok, inputs, failures = preprocess_paths(paths, m.preprocess_specs())
    assert not failures
    return inputs


def test_int8_stages_are_written_hashed_and_certified(int8_cascade, calib_dir):
    m = read_manifest(int8_cascade)                   # verifies every artefact's sha256, the new towers included
    rec = m.data["precisions"]["int8"]["cascade"]
    assert rec["written"] and rec["towers"] == ["stages/tower_1.int8.onnx", "stages/tower_2.int8.onnx"]
    for name in rec["towers"]:
        assert name in m.data["artefacts"] and (int8_cascade / name).is_file()
    # new thresholds, chosen and bounded on the int8 stages' outputs for the calibration folder's images
    c = rec["calibration"]
    assert rec["certified_on"]["images"] == c["n"] == 32 and rec["certified_on"]["folder"] == str(calib_dir)
    assert c["disagreements"] <= c["allowed"] and c["disagreement_bound"] <= rec["max_drop"] == 40
    assert len(rec["thresholds"]) == 1 and rec["fp32_thresholds"] == m.data["cascade"]["thresholds"]
    assert rec["score"] == m.data["cascade"]["score"]
    # the cut towers are model.int8.onnx's own nodes: its last stage reproduces it exactly
    assert all(v <= 1e-6 for v in rec["last_stage_vs_model_int8"].values()), rec["last_stage_vs_model_int8"]


def test_each_cut_tower_is_its_backbones_slice_of_model_int8(int8_cascade, photo_paths):
    import onnx

    from clipfuse.runtime.backends.sessions import open_session

    m = read_manifest(int8_cascade)
    feed = _feed(m, photo_paths)
    full = dict(zip(iospec.OUTPUT_NAMES, open_session(int8_cascade / "model.int8.onnx").run(list(iospec.OUTPUT_NAMES), feed)))
    lo = 0
    for k, st in enumerate(m.data["cascade"]["stages"], 1):
        path = int8_cascade / iospec.tower_file(k, "int8")
        g = onnx.load(str(path)).graph
        assert [i.name for i in g.input] == [st["input"]]             # its own image only
        assert sum(n.op_type == "QuantizeLinear" for n in g.node) > 0  # quantized
        f, z = open_session(path).run([iospec.tower_features(k), iospec.tower_logits(k)], {st["input"]: feed[st["input"]]})
        D = st["embed_dim"]
        np.testing.assert_array_equal(f, full[iospec.FEATURES][:, lo:lo + D])
        np.testing.assert_array_equal(z, full[iospec.BACKBONE_LOGITS][:, k - 1])
        lo += D


def test_load_and_predict_route_through_the_int8_stages(int8_cascade, photo_paths):
    import clipfuse
    from clipfuse.runtime.backends.sessions import open_session
    from clipfuse.runtime.cascade import CascadeBackend

    m = read_manifest(int8_cascade)
    rec = m.data["precisions"]["int8"]["cascade"]
    with clipfuse.load(int8_cascade, precision="int8") as p:
        assert p.backend.towers == rec["towers"] and p.backend.thresholds == rec["thresholds"]
        assert "int8 stages" in p.backend.describe()
    feed = _feed(m, photo_paths)
    with CascadeBackend(m, precision="int8", thresholds=[None]) as b:          # never leave early: every image at the last stage
        out = b.infer(feed)
    assert (out[iospec.STAGE] == 2).all()
    full = dict(zip(iospec.OUTPUT_NAMES, open_session(int8_cascade / "model.int8.onnx").run(list(iospec.OUTPUT_NAMES), feed)))
    np.testing.assert_allclose(out[iospec.LOGITS], full[iospec.LOGITS], rtol=1e-5, atol=1e-5)
    with CascadeBackend(m, thresholds=[None]) as b:                             # fp32 stages: not the same numbers
        assert not np.allclose(b.infer(feed)[iospec.LOGITS], full[iospec.LOGITS], rtol=1e-5, atol=1e-5)
    r = _cli("predict", int8_cascade, photo_paths[0], "--precision", "int8", "--format", "jsonl")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["stage"] in (1, 2)


def test_compare_holds_the_int8_stages_to_model_int8(int8_cascade):
    from clipfuse.runtime.compare import compare_backends

    rep = compare_backends(int8_cascade, "onnxruntime-fp32,onnxruntime-int8", precision="int8")
    c = rep["cascade"]
    assert c["precision"] == "int8" and c["full_graph"] == "model.int8.onnx" and c["ok"]


def test_fp16_on_a_cascade_is_still_refused(int8_cascade, photo_paths):
    r = _cli("predict", int8_cascade, photo_paths[0], "--precision", "fp16")
    assert r.exit_code != 0 and "--no-cascade" in r.output


def test_triton_model_py_runs_the_int8_stages(int8_cascade, photo_paths, tmp_path, monkeypatch):
    pytest.importorskip("tritonclient.grpc")
    from clipfuse.runtime.cascade import CascadeBackend
    from clipfuse.runtime.serving.repository import write_repository

    model = write_repository(int8_cascade, tmp_path / "repo", precision="int8")
    assert "PRECISION = 'int8'" in (model / "1" / "model.py").read_text()
    tpm = triton_python_model(model, monkeypatch)
    m = read_manifest(int8_cascade)
    feed = _feed(m, photo_paths)
    responses = tpm.execute([feed])
    tpm.finalize()
    with CascadeBackend(m, precision="int8") as b:
        want = b.infer(feed)
    np.testing.assert_allclose(responses[0]["probs"], want["probs"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ClipfuseError, match="fp16"):
        write_repository(int8_cascade, tmp_path / "repo16", precision="fp16")


def test_bench_measures_the_int8_cascade(int8_cascade, data):
    from clipfuse.bench.cascade_exits import bench_cascade, format_cascade

    m = read_manifest(int8_cascade)
    c = bench_cascade(m, data, batches=(1,), settle=0.0, precision="int8")
    assert c["precision"] == "int8" and c["thresholds"] == m.data["precisions"]["int8"]["cascade"]["thresholds"]
    assert c["images"] == 8 and abs(sum(c["latency"]["1"]["exit_rates"]) - 1) < 1e-9      # the 16 fit images left out
    assert "int8 stages against int8's full graph" in "\n".join(format_cascade(c))


def test_too_few_images_ship_the_full_int8_graph_and_no_stages(int8_cascade, calib_dir, photo_paths, tmp_path):
    """An engine fitted with --max-drop 5 needs 59 images to certify int8 thresholds; the folder has 32."""
    folder = tmp_path / "engine"
    shutil.copytree(int8_cascade, folder)
    mf = folder / "manifest.json"
    d = json.loads(mf.read_text())
    d["cascade"]["config"]["max_drop"] = 5
    mf.write_text(json.dumps(d))
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--int8-target", "cpu")
    assert r.exit_code == 0, r.output
    assert "int8 stage graphs not written" in r.output and "needs >= 59 images" in r.output, r.output
    m = read_manifest(folder)
    rec = m.data["precisions"]["int8"]["cascade"]
    assert not rec["written"] and "59" in rec["reason"]
    # the earlier export's towers are gone, file and record
    assert not any((folder / iospec.tower_file(k, "int8")).exists() for k in (1, 2))
    assert not any(".int8.onnx" in name for name in m.data["artefacts"] if name.startswith("stages/"))
    r = _cli("predict", folder, photo_paths[0], "--precision", "int8")
    assert r.exit_code != 0 and "were not written" in r.output and "59" in r.output and "--no-cascade" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _cli("predict", folder, photo_paths[0], "--precision", "int8", "--no-cascade")
    assert r.exit_code == 0, r.output


def test_certify_thresholds_fixed_score_bound_and_refusal():
    from synthetic import synthetic_stages

    from clipfuse.export.thresholds import CascadeConfig, certify_thresholds

    Z, _ = synthetic_stages(800, seed=3)
    t, c = certify_thresholds(list(Z), [1.0, 2.0, 4.0], CascadeConfig(max_drop=1.0), "margin")
    assert len(t) == 2 and c["n"] == 800 and c["disagreements"] <= c["allowed"] and c["disagreement_bound"] <= 1.0
    assert c["exit_rates"][0] > 0                        # some images leave early
    with pytest.raises(ClipfuseError, match=r"needs >= 598 images"):
        certify_thresholds(list(Z[:, :500]), [1.0, 2.0, 4.0], CascadeConfig(max_drop=0.5), "max-prob")


def test_a_tower_that_reads_another_input_is_refused(tmp_path):
    """The exporter may take a tower's batch size from another input (Shape, dims 0:1): that is rewired. A
    tower that reads another input's values cannot stand alone and is refused."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipfuse.export.precision.int8_stages import stage_tower_model

    def graph(read_values: bool):
        a = helper.make_tensor_value_info("image_a", TensorProto.FLOAT, ["batch", 4])
        b = helper.make_tensor_value_info("image_b", TensorProto.FLOAT, ["batch", 4])
        init = [numpy_helper.from_array(np.eye(4, 3, dtype=np.float32) * (k + 1), f"w{k}") for k in range(2)]
        init += [numpy_helper.from_array(np.array([1], np.int64), "one"),
                 numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
        nodes = [helper.make_node("Shape", ["image_b"], ["nb"], start=0, end=1),       # image_b's batch size
                 helper.make_node("Concat", ["nb", "minus1"], ["shape_a"], axis=0),
                 helper.make_node("Mul", ["image_a", "image_b"], ["xa"]) if read_values
                 else helper.make_node("Identity", ["image_a"], ["xa"]),
                 helper.make_node("Reshape", ["xa", "shape_a"], ["fa"]),             # tower a uses that batch size
                 helper.make_node("Identity", ["image_b"], ["fb"]),
                 helper.make_node("Concat", ["fa", "fb"], ["features"], axis=1),
                 helper.make_node("MatMul", ["fa", "w0"], ["za"]), helper.make_node("MatMul", ["fb", "w1"], ["zb"]),
                 helper.make_node("Unsqueeze", ["za", "one"], ["ua"]), helper.make_node("Unsqueeze", ["zb", "one"], ["ub"]),
                 helper.make_node("Concat", ["ua", "ub"], ["backbone_logits"], axis=1)]
        for i, n in enumerate(nodes):
            n.name = f"n{i}"                      # node names, as the exporter gives them (the walk keys on them)
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("features", "backbone_logits")]
        return helper.make_model(helper.make_graph(nodes, "g", [a, b], outs, initializer=init),
                                 opset_imports=[helper.make_opsetid("", 17)])

    import onnxruntime as ort

    sub = stage_tower_model(graph(False), 0, tmp_path, "image_a")       # reads image_b's batch size only
    assert [i.name for i in sub.graph.input] == ["image_a"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    f, z = ort.InferenceSession(sub.SerializeToString()).run(["features_1", "logits_1"], {"image_a": x})
    np.testing.assert_array_equal(f, x)
    np.testing.assert_array_equal(z, x @ np.eye(4, 3, dtype=np.float32))
    with pytest.raises(ClipfuseError, match="reads input 'image_b'"):
        stage_tower_model(graph(True), 0, tmp_path, "image_a")


def test_cascade_images_choose_where_thresholds_are_certified(int8_cascade, calib_dir, photo_paths, tiny_vit_engine,
                                                              tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(int8_cascade, folder)
    other = tmp_path / "other"
    other.mkdir()
    for i, p in enumerate(photo_paths * 3):          # 12 images, none of them the calibration folder's
        im = Image.open(p).convert("RGB")
        im.crop((i, i, im.width - i, im.height - i)).save(other / f"x{i}.png")
    shutil.copy2(other / "x0.png", other / "x0-again.png")     # the same bytes twice count once
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--int8-target", "cpu",
             "--cascade-images", other)
    assert r.exit_code == 0, r.output
    rec = read_manifest(folder).data["precisions"]["int8"]["cascade"]
    assert rec["certified_on"]["folder"] == str(other) and rec["certified_on"]["images"] == 12
    assert rec["written"] and rec["calibration"]["n"] == 12
    assert rec["certified_on"]["found"] == {"folder": str(other), "found": 13, "left_out": {"fit images": 0},
                                            "duplicates": 1, "unreadable": 0, "used": 12}
    # a missing folder is refused before anything slow, one line, exit 1; so is the option on a plain engine
    for engine, images, expect in ((folder, tmp_path / "missing", "--cascade-images folder"),
                                   (tiny_vit_engine, other, "not a cascade engine")):
        r = _cli("export", engine, "--precision", "int8", "--calibration", calib_dir, "--cascade-images", images, "-q")
        assert r.exit_code == 1 and expect in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = _cli("export", folder, "--cascade-images", other)
    assert r.exit_code == 1 and "--precision int8 only" in r.output


def test_the_fits_own_images_are_left_out_of_the_certification(int8_cascade, calib_dir, data, tmp_path):
    """the images the heads and controller were fitted on (answered over-confidently) are left out of the int8
    thresholds' certification with a warning saying how many; the fp32 cascade's own calibration images (the
    pool outside the shots, recorded in fit_images.json) stay; a folder of fitted images only is refused."""
    folder = tmp_path / "engine"
    shutil.copytree(int8_cascade, folder)
    m = read_manifest(folder)
    fit, cal = fit_image_digests(m), cascade_calibration_digests(m)
    assert cal and cal < fit                              # the pool outside the shots, among the fit images
    given = [sha256_file(p) for p in sorted(data.rglob("*.jpg"))]
    fitted = sum(d in fit - cal for d in given)
    assert 0 < fitted < len(given) and any(d in cal for d in given)
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--int8-target", "cpu",
             "--cascade-images", data)
    assert r.exit_code == 0, r.output
    kept = len(given) - fitted
    assert (f"warning: {fitted} of the {len(given)} images of the --cascade-images folder" in r.output
            and f"left out of the cascade's threshold certification ({kept} remain)" in r.output), r.output
    rec = read_manifest(folder).data["precisions"]["int8"]["cascade"]
    assert rec["certified_on"]["images"] == rec["calibration"]["n"] == kept
    only_fit = tmp_path / "fit-only"
    only_fit.mkdir()
    for i, p in enumerate(sorted(data.rglob("*.jpg"))):
        if sha256_file(p) in fit - cal:
            shutil.copy2(p, only_fit / f"{i}.jpg")
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--int8-target", "cpu",
             "--cascade-images", only_fit, "-q")
    assert r.exit_code == 1 and "is one the engine was fitted on" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_fit_images_json_names_the_cascade_calibration_among_the_fit_images():
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    data = json.loads(fit_images_json([c, a, b, a], [b]))
    assert data["sha256"] == [a, b, c] and data["cascade_calibration_sha256"] == [b]
    assert "cascade_calibration_sha256" not in json.loads(fit_images_json([a, b]))
    with pytest.raises(ValueError, match="among the fit images"):
        fit_images_json([a], [b])


def test_served_int8_cascade_equals_local(int8_cascade, photo_paths):
    import clipfuse
    from clipfuse.runtime.serving.server import check_serving_environment

    try:
        check_serving_environment()
    except ClipfuseError as e:                 # as tests/runtime/test_serve.py: not installed, or numpy 2
        pytest.skip(f"serving needs the `serve` extra with numpy<2: {e}")
    with clipfuse.load(int8_cascade, precision="int8") as local:
        want = local.predict(photo_paths)
    with clipfuse.load(int8_cascade) as fp32:
        assert [p.probs for p in fp32.predict(photo_paths)] != [p.probs for p in want]    # int8 is not fp32
    got = served_predictions(int8_cascade, photo_paths, precision="int8")
    assert [p.stage for p in got] == [p.stage for p in want]
    np.testing.assert_allclose([p.probs for p in got], [p.probs for p in want], rtol=1e-5, atol=1e-7)


def test_a_cascade_without_the_fits_costs_ships_int8_without_stages(int8_cascade, calib_dir, tmp_path):
    """A cascade exported by hand (export_engine(cascade=...), no fit) has no stage costs to certify with."""
    folder = tmp_path / "engine"
    shutil.copytree(int8_cascade, folder)
    mf = folder / "manifest.json"
    d = json.loads(mf.read_text())
    del d["cascade"]["cum_costs"]
    mf.write_text(json.dumps(d))
    r = _cli("export", folder, "--precision", "int8", "--calibration", calib_dir, "--int8-target", "cpu", "-q")
    assert r.exit_code == 0, r.output
    rec = read_manifest(folder).data["precisions"]["int8"]["cascade"]
    assert not rec["written"] and "cum_costs" in rec["reason"]
    assert "int8 stage graphs not written" in r.output and (folder / "model.int8.onnx").is_file()


def test_clipfuse_bench_with_int8_measures_both_cascades(int8_cascade, data, tmp_path):
    from clipfuse.bench.run import run_bench

    r = run_bench(int8_cascade, data=data, batches=(1,), runs=1, warmup=0, torch=False, memory=False, profile=False,
                  singles=False, precisions=("fp32", "int8"), out=tmp_path / "bench")
    assert r["cascade"]["precision"] == "fp32" and r["cascade_int8"]["precision"] == "int8"
    assert r["cascade_int8"]["thresholds"] == read_manifest(int8_cascade).data["precisions"]["int8"]["cascade"]["thresholds"]
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "## Cascade (" in md and "## Cascade, int8 stages against int8's full graph" in md


def test_int8_tower_files_must_be_hashed_artefacts(int8_cascade, tmp_path):
    """The manifest may only name int8 stage towers it hashes: one pointed at an unlisted file is refused on read."""
    folder = tmp_path / "engine"
    shutil.copytree(int8_cascade, folder)
    shutil.copy2(folder / "stages" / "tower_2.int8.onnx", folder / "stages" / "other.onnx")
    mf = folder / "manifest.json"
    d = json.loads(mf.read_text())
    d["precisions"]["int8"]["cascade"]["towers"][0] = "stages/other.onnx"
    mf.write_text(json.dumps(d))
    with pytest.raises(ClipfuseError, match=r"precisions\.int8\.cascade\.towers\[0\].*not among 'artefacts'"):
        read_manifest(folder)


def test_a_cut_that_does_not_reproduce_model_int8_is_refused(int8_cascade, photo_paths):
    """check_last_stage holds the cut towers to model.int8.onnx with the fp32 row: the fp32 towers fail it."""
    from clipfuse.export.precision.int8_stages import check_last_stage, stage_sessions

    m = read_manifest(int8_cascade)
    inputs = [st["input"] for st in m.data["cascade"]["stages"]]
    feed = _feed(m, photo_paths)
    int8 = [int8_cascade / iospec.tower_file(k, "int8") for k in (1, 2)]
    fp32 = [int8_cascade / iospec.tower_file(k) for k in (1, 2)]
    assert check_last_stage(m, stage_sessions(m, int8), int8_cascade / "model.int8.onnx", feed, inputs)
    with pytest.raises(ClipfuseError, match="do not reproduce it"):
        check_last_stage(m, stage_sessions(m, fp32), int8_cascade / "model.int8.onnx", feed, inputs)
