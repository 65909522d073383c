"""model.fp16.onnx: fp32 islands where they belong, validated against fp32, written atomically."""
from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError


def _types(model):
    """{tensor name: elem type} for every tensor, by onnx shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    t = {v.name: v.type.tensor_type.elem_type for v in
         list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    t.update({i.name: i.data_type for i in model.graph.initializer})
    return t


def test_fp16_folder_and_manifest(fp16_engine):
    import onnx

    from clipfuse.runtime.manifest import read_manifest, sha256_file

    m = read_manifest(fp16_engine)                       # every artefact verifies, the new one included
    entry = m.data["precisions"]["fp16"]
    assert m.data["artefacts"]["model.fp16.onnx"]["sha256"] == sha256_file(fp16_engine / "model.fp16.onnx")
    assert entry["file"] == "model.fp16.onnx" and entry["validation"]["ok"]
    onnx.checker.check_model(str(fp16_engine / "model.fp16.onnx"), full_check=True)
    # every LayerNorm and Softmax of the fp32 graph is listed as an fp32 island
    fp32 = collections.Counter(n.op_type for n in onnx.load(str(fp16_engine / "model.onnx")).graph.node)
    assert entry["fp32_islands"]["ops"]["LayerNormalization"] == fp32["LayerNormalization"] > 0
    assert entry["fp32_islands"]["ops"]["Softmax"] + entry["fp32_islands"]["feature_norm_and_downstream"].get("Softmax", 0) \
        == fp32["Softmax"]
    assert entry["fp32_islands"]["feature_norm_and_downstream"]["ReduceL2"] == len(m.backbones)
    assert not [p for p in fp16_engine.iterdir() if p.name.startswith(".")]     # no temp files left


def test_fp16_graph_precisions(fp16_engine):
    """Towers in fp16; LayerNorm, softmax, feature norm, heads and outputs in fp32; IO types unchanged."""
    import onnx

    model = onnx.load(str(fp16_engine / "model.fp16.onnx"))
    types = _types(model)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.UINT8 for i in model.graph.input)
    assert all(o.type.tensor_type.elem_type == F32 for o in model.graph.output)
    by_op = collections.defaultdict(list)
    for n in model.graph.node:
        by_op[n.op_type].append(n)
    for op in ("LayerNormalization", "Softmax", "ReduceL2"):
        assert by_op[op] and all(types[n.input[0]] == F32 for n in by_op[op]), op
    assert all(types[n.input[1]] == F16 for n in by_op["Conv"])                  # tower weights
    heads = [n for n in by_op["Gemm"] if any(i.startswith("head_weight_") for i in n.input)]
    assert len(heads) == 3 and all(types[i] == F32 for n in heads for i in n.input)
    # no fp32 -> fp16 -> fp32 round trip in front of any output (it would round every output to fp16)
    producer = {o: n for n in model.graph.node for o in n.output}
    for o in model.graph.output:
        p = producer[o.name]
        while p.op_type == "Cast":
            assert next(a.i for a in p.attribute if a.name == "to") != F16, o.name
            p = producer.get(p.input[0])
            if p is None:
                break


def test_fp16_validation_figures(fp16_engine, tiny_engine):
    """The recorded figures meet the bounds, and the graph itself reproduces them."""
    from clipfuse.export.precision.validate import _session, batched_feeds, run_batches
    from clipfuse.runtime.compare import photo_variants
    from clipfuse.runtime.manifest import read_manifest

    v = read_manifest(fp16_engine).data["precisions"]["fp16"]["validation"]
    assert v["images"] == 32
    for b in v["backbones"]:
        assert b["cosine_min"] >= 0.999 and b["logits_max_abs"] <= b["logits_bound"]
    m = read_manifest(fp16_engine)
    feeds = batched_feeds(m, photo_variants()[:8])
    ref = run_batches(_session(m.onnx_path), feeds)
    got = run_batches(_session(fp16_engine / "model.fp16.onnx"), feeds)
    # the constant controller's 1/K is fp32 all the way: exactly equal, not fp16-rounded (0.33325)
    np.testing.assert_array_equal(got[iospec.TEMPERATURES], ref[iospec.TEMPERATURES])
    assert not np.array_equal(got[iospec.FEATURES], ref[iospec.FEATURES])      # the towers did run in fp16
    rel = np.abs(got[iospec.LOGITS] - ref[iospec.LOGITS]).max() / np.abs(ref[iospec.LOGITS]).max()
    assert 1e-6 < rel < 1e-2


def _synthetic(rng, n=16, dims=(8, 6), classes=5):
    f = [rng.normal(size=(n, d)) for d in dims]
    f = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in f]
    w = [rng.normal(size=(classes, d)) * 10 for d in dims]
    z = np.stack([x @ wk.T for x, wk in zip(f, w)], axis=1)
    t = np.full((n, len(dims)), 0.5)
    logits = (t[..., None] * z).sum(1)
    out = {iospec.FEATURES: np.concatenate(f, 1), iospec.BACKBONE_LOGITS: z, iospec.TEMPERATURES: t,
           iospec.LOGITS: logits, iospec.PROBS: np.exp(logits) / np.exp(logits).sum(1, keepdims=True)}
    data = {"backbones": [{"arch": f"b{k}", "weights": "x", "embed_dim": d} for k, d in enumerate(dims)]}
    norms = [float(np.linalg.norm(wk, axis=1).max()) for wk in w]
    return out, data, norms, w


def test_compare_precisions_catches_what_it_must():
    from clipfuse.export.precision.validate import compare_precisions

    rng = np.random.default_rng(0)
    ref, data, norms, w = _synthetic(rng)
    same = compare_precisions(ref, {k: v.copy() for k, v in ref.items()}, data, norms)
    assert same["ok"] and same["backbones"][0]["cosine_min"] > 0.999999
    # a backbone whose embeddings drift (cosine ~0.99) fails the 0.999 bound
    bad = {k: v.copy() for k, v in ref.items()}
    bad[iospec.FEATURES][:, :8] += rng.normal(size=(16, 8)) * 0.15
    r = compare_precisions(ref, bad, data, norms)
    assert not r["ok"] and any("cosine" in f for f in r["failures"])
    # logits that move more than the features allow (an fp16 head, a misplaced cast) fail the logit bound
    bad = {k: v.copy() for k, v in ref.items()}
    bad[iospec.BACKBONE_LOGITS][:, 1] *= 1.01
    r = compare_precisions(ref, bad, data, norms)
    assert not r["ok"] and any("b1:x: logit error" in f for f in r["failures"])


def test_failed_validation_writes_nothing(tiny_engine, tmp_path, monkeypatch):
    from clipfuse.export.precision import fp16
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    before = (folder / "manifest.json").read_bytes()
    monkeypatch.setattr(fp16, "validate_fp16", lambda m, p: {"ok": False, "failures": ["planted failure"]})
    with pytest.raises(ClipfuseError, match="planted failure.*run the fp32 graph"):
        fp16.export_fp16(folder)
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_engine.iterdir())


def test_a_fitted_linear_probe_engine_gets_an_fp16_graph(tmp_path, photo_paths):
    """a probe fitted on the tiny RN tower's nearly collapsed features has rows of norm ~1e3, so that
    tower's fp16 error moved probs past their bound with everything after the embeddings already fp32. The
    export keeps the tower whose logits moved most fp32, validates again, and ships."""
    from conftest import TINY
    from imagefactory import make_labelled_folder

    from clipfuse.cli.main import cli
    from clipfuse.export.fit.pipeline import fit_engine
    from clipfuse.runtime.manifest import read_manifest

    make_labelled_folder(tmp_path / "data", photo_paths)
    folder = fit_engine(TINY[:2], tmp_path / "data", tmp_path / "probe", head="linear-probe", shots=1,
                        eval_fraction=0.34, study_shots=(1,), study_seeds=(0,), cache_dir=tmp_path / "cache")[0].folder
    r = CliRunner().invoke(cli, ["export", str(folder), "--precision", "fp16"])
    assert r.exit_code == 0, r.output
    rn = "clipfuse-test-rn:random:1"
    assert f"keeping {rn}'s tower fp32 (its logits moved most) and validating again" in r.stderr
    assert f"towers kept fp32: {rn}" in r.stdout
    entry = read_manifest(folder).data["precisions"]["fp16"]
    assert entry["validation"]["ok"] and entry["float_backbones"] == [rn]
    assert entry["fp32_islands"]["float_towers"]["backbones"] == [1]


def test_drop_round_trips_rewires_and_removes():
    import onnx
    from onnx import TensorProto, helper

    from clipfuse.export.precision.fp16 import drop_round_trips

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="r"),
         helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16, name="c16"),
         helper.make_node("Cast", ["a16"], ["y"], to=TensorProto.FLOAT, name="c32")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert drop_round_trips(g) == 1
    assert [n.name for n in g.node] == ["r", "c32"]
    assert g.node[-1].input[0] == "a"
    onnx.checker.check_graph(g)


def test_cli_export_precision_fp16(tiny_engine, tmp_path):
    from clipfuse.cli.main import cli

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_engine, folder)
    r = CliRunner().invoke(cli, ["export", str(folder), "--precision", "fp16", "-q"])
    assert r.exit_code == 0, r.output
    assert "embedding cosine" in r.output and (folder / "model.fp16.onnx").is_file()
    assert "fp16" in json.loads((folder / "manifest.json").read_text())["precisions"]
    r = CliRunner().invoke(cli, ["export", "-b", "clipfuse-test-vit:random:0", "-c", "a,b", "-o", str(tmp_path / "x"),
                                 "--precision", "fp16"])
    assert r.exit_code == 1 and "applies to an existing engine" in r.output


def test_missing_fp16_names_the_command(tiny_engine):
    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.precisions import precision_onnx_path

    with pytest.raises(ClipfuseError, match=r"clipfuse export .* --precision fp16"):
        precision_onnx_path(read_manifest(tiny_engine), "fp16")


def test_dedupe_nodes_drops_repeated_casts():
    """onnxruntime < 1.32's converter repeats a Cast per kept consumer, same name, same output."""
    import onnx
    from onnx import TensorProto, helper

    from clipfuse.export.precision.fp16 import dedupe_nodes

    cast = lambda: helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="x_cast_to_fp32_node")
    g = helper.make_graph(
        [cast(), helper.make_node("Relu", ["x32"], ["a"], name="r"), cast(),
         helper.make_node("Neg", ["x32"], ["b"], name="r")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    assert dedupe_nodes(g) == 1
    assert [n.name for n in g.node] == ["x_cast_to_fp32_node", "r", "r_1"]
    onnx.checker.check_model(helper.make_model(g), full_check=True)


def test_stale_fp16_graph_is_refused(fp16_engine, tmp_path):
    """A re-export replaces model.onnx and carries other files over: the old fp16 graph must not be used."""
    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.precisions import precision_onnx_path

    folder = tmp_path / "stale"
    shutil.copytree(fp16_engine, folder)
    assert precision_onnx_path(read_manifest(folder), "fp16") == folder / "model.fp16.onnx"
    data = json.loads((folder / "manifest.json").read_text())
    data["artefacts"]["model.onnx"]["sha256"] = "0" * 64        # what a re-export changes
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ClipfuseError, match=r"earlier model.onnx.*--precision fp16"):
        precision_onnx_path(read_manifest(folder, verify=False), "fp16")


def test_a_graph_with_external_weights_converts_tensor_by_tensor_to_the_same_fp16_graph(tiny_engine, tmp_path):
    """Past 2 GB the weights live in model.onnx.data and the in-memory conversion holds them several times over
    (docs/decisions.md). The streaming way must write exactly what the in-memory way
    writes: the same tensors, bit for bit, and the same outputs."""
    import onnx
    from onnx import numpy_helper

    from clipfuse.export.precision.fp16 import convert_fp16
    from clipfuse.runtime.backends.sessions import open_session

    ext = tmp_path / "ext"
    ext.mkdir()
    model = onnx.load(str(tiny_engine / "model.onnx"))
    onnx.save_model(model, str(ext / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=256)
    assert (ext / "model.onnx.data").stat().st_size > 0
    a = convert_fp16(tiny_engine / "model.onnx", tmp_path / "mem.fp16.onnx")
    b = convert_fp16(ext / "model.onnx", ext / "model.fp16.onnx")
    assert a["external_data"] is None and b["external_data"] == "model.fp16.onnx.data"
    assert (a["nodes"], a["casts"], a["fp32_nodes"]) == (b["nodes"], b["casts"], b["fp32_nodes"])
    ta = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "mem.fp16.onnx")).graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ext / "model.fp16.onnx")).graph.initializer}
    assert ta.keys() == tb.keys() and any(v.dtype == np.float16 for v in tb.values())
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and np.array_equal(ta[name], tb[name]), name
    rng = np.random.default_rng(0)
    s = open_session(ext / "model.fp16.onnx")
    feed = {i.name: rng.integers(0, 256, (2, *i.shape[1:]), dtype=np.uint8) for i in s.get_inputs()}
    out_b = s.run(None, feed)
    out_a = open_session(tmp_path / "mem.fp16.onnx").run(None, feed)
    for x, y in zip(out_a, out_b):
        np.testing.assert_array_equal(x, y)
