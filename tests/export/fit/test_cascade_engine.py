"""Cascade engines end to end on tiny towers: fit --cascade writes hashed, validated stage graphs;
the router runs only the stages an image reaches (counted, never timed); a mixed batch answers as each image
alone; predict/compare/triton/bench work on it; fit --budget-* holds the chosen subset; bad options: one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY
from imagefactory import make_labelled_folder
from standins import triton_python_model

from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit.levers.recipe import Levers
from clipfuse.export.fit.pipeline import fit_engine
from clipfuse.runtime.cascade import CascadeBackend
from clipfuse.runtime.manifest import read_manifest

FAST = dict(shots=1, eval_fraction=0.34, templates=["a photo of a {}."], study_shots=(1,), study_seeds=(0,))


@pytest.fixture(scope="module")
def data(tmp_path_factory, photo_paths):
    root = tmp_path_factory.mktemp("cascade-data") / "train"
    make_labelled_folder(root, photo_paths)
    return root


@pytest.fixture(scope="module")
def cascade_engine(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("cascade")
    # 12 calibration images certify no less than ~35 points at 95%: the tiny world cannot do better
    result, report = fit_engine(TINY, data, base / "engine", cache_dir=base / "cache",
                                levers=Levers(cascade=True, max_drop=40), **FAST)
    return result.folder, report, base


@pytest.fixture(scope="module")
def images(data):
    return sorted(p for p in data.rglob("*.jpg"))


class Counting:
    """An ONNX Runtime session that counts its run() calls and the images it ran on."""

    def __init__(self, session, name, log):
        self.session, self.name, self.log = session, name, log

    def run(self, names, feed):
        self.log.append((self.name, len(next(iter(feed.values())))))
        return self.session.run(names, feed)

    def __getattr__(self, attr):
        return getattr(self.session, attr)


def counted(backend):
    log = []
    backend.sessions = {k: Counting(s, k, log) for k, s in backend.sessions.items()}
    return log


def test_fit_writes_hashed_validated_stage_graphs(cascade_engine):
    folder, report, _ = cascade_engine
    m = read_manifest(folder)
    c = m.data["cascade"]
    assert c["order"] == m.backbone_names and len(c["stages"]) == 3
    for k in (1, 2, 3):
        for f in (f"stages/tower_{k}.onnx", f"stages/combine_{k}.onnx"):
            assert len(m.data["artefacts"][f]["sha256"]) == 64 and (folder / f).is_file()
    assert len(c["thresholds"]) == 2 and c["score"] in ("max-prob", "margin")
    assert len(c["expected_exit_rates"]) == 3 and abs(sum(c["expected_exit_rates"]) - 1) < 1e-9
    assert c["cost_unit"] == "GFLOPs" and len(c["cum_costs"]) == 3 and c["cum_costs"] == sorted(c["cum_costs"])
    # every stage validated against PyTorch, and all stages against model.onnx, within the fp32 row
    rows = c["validation"]["batches"]["4"]
    assert set(rows) == {"stage 1 vs PyTorch", "stage 2 vs PyTorch", "stage 3 vs PyTorch", "stage 3 vs model.onnx"}
    assert all(v <= 1e-4 for r in rows.values() for v in r.values())
    assert c["calibration"]["disagreement_bound"] <= c["max_drop"]
    assert "## Cascade" in (folder / "report.md").read_text() and report["cascade"]["order"] == c["order"]


def test_a_tampered_stage_file_is_refused(cascade_engine, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(cascade_engine[0], folder)
    p = folder / "stages" / "combine_2.onnx"
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(ClipfuseError, match="combine_2.onnx.*sha256"):
        read_manifest(folder)
    # an unlisted stage file (manifest edited to point elsewhere) is refused too
    data = json.loads((folder / "manifest.json").read_text())
    data["cascade"]["stages"][1]["tower"] = "stages/other.onnx"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ClipfuseError, match="not among 'artefacts'"):
        read_manifest(folder, verify=False)


def _feed(m, paths):
    from clipfuse.runtime.images import iter_batches

    batch = next(iter(iter_batches(paths, m.preprocess_specs(), batch_size=len(paths))))
    return batch.inputs


def test_an_image_that_leaves_at_stage_1_runs_no_later_backbone(cascade_engine, images):
    m = read_manifest(cascade_engine[0])
    feed = _feed(m, images[:5])
    with CascadeBackend(m, thresholds=[0.0, None]) as b:     # confidence >= 0 always: everyone leaves at 1
        log = counted(b)
        single = b.infer({k: v[:1] for k, v in feed.items()})
        assert log == [("tower_1", 1), ("combine_1", 1)] and single["stage"].tolist() == [1]
        log.clear()
        out = b.infer(feed)
        assert log == [("tower_1", 5), ("combine_1", 5)] and out["stage"].tolist() == [1] * 5
        assert np.isnan(out["temperatures"][:, 1:]).all() and not np.isnan(out["temperatures"][:, 0]).any()
    with CascadeBackend(m, thresholds=[None, None]) as b:    # never leave early: every stage, every image
        log = counted(b)
        assert b.infer(feed)["stage"].tolist() == [3] * 5
        assert log == [(f"{g}_{s}", 5) for s in (1, 2, 3) for g in ("tower", "combine")]


def _mixed_thresholds(m, feed):
    """Stage-1 threshold between the images' confidences, so some leave at 1 and the rest go on."""
    from clipfuse.runtime.routing import confidence

    with CascadeBackend(m, thresholds=[None, None]) as b:
        b.infer(feed)
        f, z = b.sessions["tower_1"].run(None, {m.data["cascade"]["stages"][0]["input"]: feed[m.data["cascade"]["stages"][0]["input"]]})
        logits = b.sessions["combine_1"].run(["logits"], {"features": f, "backbone_logits": z[:, None]})[0]
    conf = np.sort(confidence(logits, m.data["cascade"]["score"]))
    return [float((conf[len(conf) // 2 - 1] + conf[len(conf) // 2]) / 2), None]


def test_a_mixed_batch_answers_as_each_image_alone(cascade_engine, images):
    m = read_manifest(cascade_engine[0])
    feed = _feed(m, images[::3][:8])
    t = _mixed_thresholds(m, feed)
    with CascadeBackend(m, thresholds=t) as b:
        log = counted(b)
        out = b.infer(feed)
        stages = out["stage"]
        assert 0 < (stages == 1).sum() < len(stages), "the batch must mix easy and hard images"
        later = int((stages > 1).sum())
        assert ("tower_2", later) in log and ("tower_3", later) in log      # only the hard ones went on
        for i in range(len(stages)):
            one = b.infer({k: v[i:i + 1] for k, v in feed.items()})
            assert one["stage"][0] == stages[i] and one["logits"].argmax(1)[0] == out["logits"].argmax(1)[i]
            np.testing.assert_allclose(one["probs"][0], out["probs"][i], rtol=1e-5, atol=1e-6)


def test_predict_api_and_cli_say_which_stage_answered(cascade_engine, images):
    import clipfuse

    folder = cascade_engine[0]
    with clipfuse.load(folder, batch_size=4) as p:
        preds = p.predict(images[:6])
        assert all(x.ok and x.stage in (1, 2, 3) for x in preds)
        # temperatures are shown only for backbones the image reached
        assert all(len(x.temperatures) == (x.stage if x.stage < 3 else 3) for x in preds)
    with clipfuse.load(folder, cascade=False) as p:
        full = p.predict(images[:6])
        assert all(x.stage is None and len(x.temperatures) == 3 for x in full)
    r = CliRunner().invoke(cli, ["predict", str(folder), *map(str, images[:2]), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["stage"] for row in rows] == [x.stage for x in preds[:2]]
    r = CliRunner().invoke(cli, ["predict", str(folder), str(images[0])])
    assert "answered by cascade stage" in r.stdout
    r = CliRunner().invoke(cli, ["predict", str(folder), str(images[0]), "--backend", "torch"])
    assert r.exit_code == 1 and "--no-cascade" in r.output and len(r.output.strip().splitlines()) == 1
    # fp16 has no stage graphs: refused on the cascade, not served as fp32 (int8: tests/export/precision/test_int8_cascade.py)
    r = CliRunner().invoke(cli, ["predict", str(folder), str(images[0]), "--precision", "fp16"])
    assert r.exit_code == 1 and "cascade stages" in r.output and "--no-cascade" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_compare_holds_the_last_stage_to_the_full_graph(cascade_engine, images, monkeypatch):
    from clipfuse.runtime.compare import compare_backends

    folder = cascade_engine[0]
    rep = compare_backends(folder, images=[str(p) for p in images[:8]])
    c = rep["cascade"]
    assert rep["ok"] and c["ok"] and sum(c["stage_counts"].values()) == 8
    if c["last_stage"] is not None:
        assert c["last_stage"]["ok"]
    # the check can fail: a router whose last stage drifts from model.onnx is caught
    real = CascadeBackend._infer

    def drifting(self, feed):
        out = real(self, feed)
        out["logits"] = out["logits"] * 1.01
        return out
    monkeypatch.setattr(CascadeBackend, "_infer", drifting)
    init = CascadeBackend.__init__                 # and every image reaches the last stage
    monkeypatch.setattr(CascadeBackend, "__init__", lambda self, m, threads=None, thresholds=None, precision=None:
                        init(self, m, threads, [None, None], precision))
    bad = compare_backends(folder, images=[str(p) for p in images[:8]])
    assert not bad["ok"] and not bad["cascade"]["last_stage"]["ok"]


def test_triton_writes_a_python_backend_model_that_routes(cascade_engine, images, tmp_path, monkeypatch):
    pytest.importorskip("tritonclient.grpc")
    from clipfuse.runtime.serving.repository import check_config, write_repository

    folder = cascade_engine[0]
    model = write_repository(folder, tmp_path / "repo")
    msg = check_config((model / "config.pbtxt").read_text())
    assert msg.backend == "python" and [o.name for o in msg.output][-1] == "stage"
    assert read_manifest(model / "1" / "engine").data["cascade"]["order"] == read_manifest(folder).backbone_names
    # run the written model.py under a stand-in for Triton's triton_python_backend_utils
    tpm = triton_python_model(model, monkeypatch)
    m = read_manifest(folder)
    feed = _feed(m, images[:5])
    responses = tpm.execute([{k: v[:2] for k, v in feed.items()}, {k: v[2:] for k, v in feed.items()}])
    tpm.finalize()
    with CascadeBackend(m) as b:
        want = b.infer(feed)
    got_stage = np.concatenate([r["stage"] for r in responses]).reshape(-1)
    assert got_stage.tolist() == want["stage"].tolist()
    np.testing.assert_allclose(np.concatenate([r["probs"] for r in responses]), want["probs"], rtol=1e-5, atol=1e-6)
    full = write_repository(folder, tmp_path / "repo2", cascade=False)
    assert check_config((full / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"


def test_bench_measures_the_cascade_over_real_exits(cascade_engine, data, tmp_path):
    from clipfuse.bench.cascade_exits import bench_cascade, format_cascade

    m = read_manifest(cascade_engine[0])
    c = bench_cascade(m, data, batches=(1, 8), settle=0.0, include_fit_images=True)
    assert c["images"] == 24 and set(c["latency"]) == {"1", "8"}
    assert c["fit_images"] == {"images_given": 24, "fit_images": 16, "left_out": False}
    for x in c["latency"].values():
        assert x["cascade"]["calls"] > 0 and abs(sum(x["exit_rates"]) - 1) < 1e-9
    assert c["paired_difference"]["n"] == 24 and 0 <= c["accuracy_cascade"]["value"] <= 100
    # the curve's last point never leaves early: it is the full ensemble's accuracy
    assert c["curve"][-1]["exit_rates"][-1] == 1.0
    assert abs(c["curve"][-1]["accuracy"] - c["accuracy_full"]["value"]) < 1e-9
    assert "## Cascade" in "\n".join(format_cascade(c))


def test_bench_times_a_single_beside_the_cascade(cascade_engine, data):
    """single=: that backbone's stage tower alone, interleaved with the cascade and the full graph;
    a name that is not in the cascade is one line."""
    from clipfuse.bench.cascade_exits import bench_cascade, format_cascade

    m = read_manifest(cascade_engine[0])
    one = m.backbone_names[-1]
    c = bench_cascade(m, data, batches=(1,), settle=0.0, include_fit_images=True, single=one)
    x = c["latency"]["1"]
    assert x["single"]["backbone"] == one and x["single"]["calls"] == x["cascade"]["calls"] == 24
    assert x["cascade_over_single_mean"] == x["cascade"]["mean_ms"] / x["single"]["mean_ms"]
    assert f"| 1 | {one} |" in "\n".join(format_cascade(c))
    with pytest.raises(ClipfuseError, match="'RN9000:random:0' is not a backbone of this cascade"):
        bench_cascade(m, data, batches=(1,), settle=0.0, single="RN9000:random:0")


def test_bench_leaves_out_the_fit_images(cascade_engine, data, tmp_path):
    """bench --data on the fit's own folder scores (accuracy table and cascade) only the images the
    engine was not fitted on, and bench.md says how many it left out; --include-fit-images keeps them."""
    from clipfuse.bench.run import run_bench

    fast = dict(batches=(1,), runs=1, warmup=0, torch=False, memory=False, profile=False, singles=False,
                settle=0.0)
    r = run_bench(cascade_engine[0], data=data, out=tmp_path / "b", **fast)
    assert r["accuracy"]["num_images"] == 8 and r["cascade"]["images"] == 8
    assert r["accuracy"]["fit_images"] == r["cascade"]["fit_images"] == {"images_given": 24, "fit_images": 16,
                                                                           "left_out": True}
    md = (tmp_path / "b" / "bench.md").read_text()
    assert md.count("16 of the 24 images are images the engine was fitted on: left out") == 2, md
    r = CliRunner().invoke(cli, ["bench", str(cascade_engine[0]), "-d", str(data), "--batch", "1", "--runs", "1",
                                 "--warmup", "0", "--no-torch", "--no-memory", "--settle-ms", "0", "-o",
                                 str(tmp_path / "c"), "--include-fit-images", "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "bench.json").read_text())
    assert res["accuracy"]["num_images"] == res["cascade"]["images"] == 24
    assert "--include-fit-images" in res["command"]
    assert "scored anyway (--include-fit-images)" in (tmp_path / "c" / "bench.md").read_text()


def test_eval_scores_the_cascade_that_predict_answers(cascade_engine, data):
    """on a cascade engine eval's shipped row is the cascade, with its exit rates, equal to predict's
    answers image by image; the full graph (model.onnx) is the row beside it, equal to predict --no-cascade."""
    import clipfuse
    from clipfuse.export.fit.evaluate import eval_engine
    from clipfuse.export.fit.report import format_eval

    folder, report, _ = cascade_engine
    res = eval_engine(folder, data, include_fit_images=True)
    classes = read_manifest(folder).classes
    paths = res["paths"]
    with clipfuse.load(folder, batch_size=5) as p:
        routed = p.predict(paths)
    with clipfuse.load(folder, cascade=False) as p:
        full = p.predict(paths)
    assert res["shipped"] == "cascade" and res["full_graph"] == report["shipped"]["row"]
    assert res["predictions"] == [classes.index(x.label) for x in routed]
    assert res["cascade"]["stages"] == [x.stage for x in routed]
    assert res["full_graph_predictions"] == [classes.index(x.label) for x in full]
    y = np.array([classes.index(Path(q).parent.name) for q in paths])
    assert res["accuracy"]["cascade"] == pytest.approx(100 * np.mean(np.array(res["predictions"]) == y))
    assert res["accuracy"][res["full_graph"]] == res["full_graph_accuracy"] == pytest.approx(
        100 * np.mean(np.array(res["full_graph_predictions"]) == y))
    stages = np.array(res["cascade"]["stages"])
    assert res["cascade"]["exit_rates"] == pytest.approx([np.mean(stages == s) for s in (1, 2, 3)])
    text = format_eval(res)
    assert "| cascade (shipped) |" in text and f"| {res['full_graph']} (full graph, model.onnx) |" in text
    assert "exit rates stage 1 " in text and "is what `clipfuse predict` answers" in text


def test_report_says_one_thing_about_what_ships(cascade_engine):
    """a cascade engine's report.md ships the cascade, whose last stage (model.onnx) holds the
    chosen controller, in the stage order the manifest holds; where that is not the order given, it says so."""
    from clipfuse.export.fit.levers.plan import REORDERED

    folder, report, _ = cascade_engine
    md = (folder / "report.md").read_text()
    order, row = report["cascade"]["order"], report["shipped"]["row"]
    assert f"## What ships: a cascade, {' -> '.join(order)}" in md and f"## What ships: {row}\n" not in md
    assert f"The last stage is the full graph, model.onnx (what `predict --no-cascade` answers): it holds {row}." in md
    assert f"stage 3 = the full graph model.onnx, with the controller fit chose for it ({row})" in md
    assert "| cascade (shipped) |" in md and f"| {row} (last stage, model.onnx) |" in md and f"| {row} (shipped) |" not in md
    assert read_manifest(folder).backbone_names == order
    assert (REORDERED[1:] in md) == (order != list(TINY))


def test_a_budget_that_keeps_one_backbone_fits_no_controller(data, tmp_path, capsys):
    """one backbone left by the budget ships alone: no NLC study or fit, no controller warnings, and
    the export says "1 backbone"; eval still scores it."""
    from clipfuse.export.fit.evaluate import eval_engine
    from clipfuse.export.graph.backbones import load_backbone

    gflops = {b: load_backbone(b).info["gflops"] for b in TINY}
    cheapest = min(gflops, key=gflops.get)
    result, report = fit_engine(TINY, data, tmp_path / "eng", cache_dir=tmp_path / "cache",
                                levers=Levers(budget=gflops[cheapest] * 1.0001, budget_unit="GFLOPs"),
                                **FAST)
    err = capsys.readouterr().err
    assert report["backbones"] == [cheapest] and report["study"] is None and report["shipped"]["row"] == cheapest
    assert "study:" not in err and "warning:" not in err and "choosing the controller" not in err, err
    assert "exporting the fused graph (1 backbone, opset" in err
    assert report["diversity"]["signatures"] == [] and report["loss_curve"] == []
    m = read_manifest(result.folder)
    assert "nlc.safetensors" not in m.data["artefacts"] and m.data["fit"]["shipped"]["method"] == "single"
    md = (result.folder / "report.md").read_text()
    assert f"## What ships: {cheapest}" in md and "No study of NLC" in md and "NLC" not in md.split("## Budget")[0].replace(
        "No study of NLC", "")
    res = eval_engine(result.folder, data)
    assert res["shipped"] == cheapest and res["accuracy"][cheapest] == res["engine_accuracy"]


def test_budget_fit_holds_the_chosen_subset(data, tmp_path):
    from clipfuse.export.graph.backbones import load_backbone

    gflops = {b: load_backbone(b).info["gflops"] for b in TINY}
    budget = sorted(gflops.values())[1] * 1.0001       # room for one or two of the cheapest, never all three
    result, report = fit_engine(TINY, data, tmp_path / "eng", cache_dir=tmp_path / "cache",
                                levers=Levers(budget=budget, budget_unit="GFLOPs"), **FAST)
    m = read_manifest(result.folder)
    b = report["budget"]
    assert m.backbone_names == list(b["chosen"]["names"]) and sum(gflops[n] for n in m.backbone_names) <= budget
    assert len(b["frontier"]["subsets"]) == 7 and m.data["budget"]["chosen"] == b["chosen"]
    assert "## Budget" in (result.folder / "report.md").read_text()
    assert ("frontier.png" in m.data["artefacts"]) == (b["plot"] == "frontier.png")


@pytest.mark.parametrize("args, expect", [
    (["--budget-gflops", "1e-9"], "below the cheapest backbone"),
    (["--cascade", "--max-drop", "-1"], "--max-drop must be"),
    (["--max-drop", "-1"], "--max-drop must be"),
    (["--max-drop", "nan"], "--max-drop must be"),          # nan was accepted without --cascade
    (["--max-drop", "inf"], "--max-drop must be"),
    (["--cascade", "--budget-gflops", "5"], "cannot be combined"),
    (["--budget-ms", "5", "--budget-gflops", "5"], "give one budget"),
])
def test_bad_options_get_one_line_and_exit_nonzero(data, tmp_path, args, expect):
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-b", TINY[1], "-d", str(data), "-o", str(tmp_path / "e"),
                                 "--cache", str(tmp_path / "c"), "--study-shots", "1", "--study-seeds", "0",
                                 "--eval-fraction", "0.34", "-q", *args])
    assert r.exit_code == 1 and expect in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_cascade_of_one_backbone_and_too_few_calibration_images_are_refused(data, tmp_path):
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(data), "-o", str(tmp_path / "e"), "--cascade", "-q"])
    assert r.exit_code == 1 and "at least 2 backbones" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-b", TINY[1], "-d", str(data), "-o", str(tmp_path / "e"),
                                 "--cache", str(tmp_path / "c"), "--study-shots", "1", "--study-seeds", "0",
                                 "--eval-fraction", "0.34", "-q", "--cascade", "--max-drop", "0.5"])
    assert r.exit_code == 1 and "the bound needs >= " in r.output and "12 images" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_threshold_choice_meets_max_drop_on_a_synthetic_split():
    """plan_cascade (the fit's wiring) on a world where a cheap stage is often enough."""
    from synthetic import synthetic_ensemble

    from clipfuse.export.fit.levers.plan import plan_cascade
    from clipfuse.export.graph.fused import StaticController

    X, Z, y, _ = synthetic_ensemble(200, num_classes=10, num_backbones=3, scenario="one-good", seed=0, wrong_rate=0.4)
    n = len(y) // 2
    built = [SimpleNamespace(spec=f"b{k}", info={"gflops": float(2 ** k)}, embed_dim=X.shape[1] // 3) for k in range(3)]
    shots = np.array([np.flatnonzero(y[:n] == c)[0] for c in range(10)])
    import torch

    shipped = StaticController(torch.tensor([2.0, 1.0, 1.0]))
    plan = plan_cascade(Levers(cascade=True, max_drop=2.0), built, None, X[:n], Z[:n], y[:n], X[n:], Z[n:], y[n:],
                        shots, shipped, None)
    fit = plan["fit"]
    assert fit.calibration["disagreement_bound"] <= 2.0
    assert fit.test["drop"] <= 2.0 and fit.test["within_max_drop"]
    assert fit.test["exit_rates"][-1] < 1.0, "a world where early exit is possible must use it"
    assert fit.test["cost_fraction"] < 1.0
