"""fit -> engine with the NLC inside -> eval on the exported graph; cache reuse; bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from imagefactory import make_labelled_folder as make_folder

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit.evaluate import eval_engine
from clipfuse.export.fit.pipeline import fit_engine
from clipfuse.runtime.manifest import read_manifest

STUDY = dict(study_shots=(1, 2), study_seeds=(0, 1))


@pytest.fixture(scope="module")
def data(tmp_path_factory, photo_paths):
    root = tmp_path_factory.mktemp("data") / "train"
    make_folder(root, photo_paths)
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("fit")
    # NLC forced: these tests check the fitted NLC inside the graph (auto may ship another method).
    result, report = fit_engine(TINY[:2], data, base / "engine", shots=2, seed=1, eval_fraction=0.34,
                                templates=["a photo of a {}."], cache_dir=base / "cache", controller="nlc", **STUDY)
    return result.folder, report, base


def test_fit_writes_an_engine_with_the_fitted_controller(fitted):
    folder, report, _ = fitted
    m = read_manifest(folder)                  # report and static controller are hashed artefacts too
    assert m.data["controller"]["kind"] == "nlc"
    assert {"report.md", "report.json", "static.safetensors"} <= set(m.data["artefacts"])
    assert m.data["fit"]["shots"] == 2 and m.data["fit"]["seed"] == 1
    study = json.loads((folder / "report.json").read_text())["study"]
    for method in ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1", "LOG-AVG", "PROB-AVG", "VOTE",
                   "C-LOG-AVG", "NLC", "ORACLE"):
        assert set(study["mean"][method]) == {"1", "2"} and method in (folder / "report.md").read_text()
    assert report["num_eval"] == 8 and report["num_train_pool"] == 16
    # every accuracy on the eval split carries its Wilson 95% interval (8 images: wide)
    from clipfuse.export.paired import wilson_interval

    nlc_acc = report["shipped"]["accuracy"]["NLC"]
    iv = wilson_interval(round(nlc_acc * 8 / 100), 8)
    assert f"| NLC (shipped) | {nlc_acc:.1f} | [{iv.lo:.1f}, {iv.hi:.1f}] |" in (folder / "report.md").read_text()


def test_eval_on_the_graph_reproduces_the_pytorch_path(fitted, data):
    """Same predictions as the fitted PyTorch controller on cached features; same temperatures."""
    import torch

    from clipfuse.export.fit.features import FeatureCache, compute_features, head_logits
    from clipfuse.export.fit.nlc import controller_temperatures, predict_controller
    from clipfuse.export.graph.backbones import load_backbone
    from clipfuse.export.graph.fused import load_controller
    from clipfuse.export.graph.heads import load_heads

    folder, report, base = fitted
    res = eval_engine(folder, data, include_fit_images=True)
    assert res["num_images"] == 24
    bbs = [load_backbone(b) for b in TINY[:2]]
    cache = FeatureCache(base / "cache")
    fs = compute_features(bbs, res["paths"], cache, progress=False)
    assert cache.stats.computed == 0                      # all from the fit's cache
    heads = load_heads(folder / "heads.safetensors")
    X = np.concatenate(fs.features, axis=1)
    Z = np.stack([head_logits(f, h) for f, h in zip(fs.features, heads)], axis=1)
    nlc = load_controller(folder / "controller.safetensors")
    assert res["predictions"] == predict_controller(nlc, X, Z).tolist()
    np.testing.assert_allclose(np.array(res["temperatures"]), controller_temperatures(nlc, X), rtol=1e-4, atol=1e-5)
    assert set(res["accuracy"]) >= {"LOG-AVG", "C-LOG-AVG", "NLC", "ORACLE"}
    assert res["accuracy"]["ORACLE"] >= max(res["accuracy"][n] for n in ("clipfuse-test-vit:random:0", "clipfuse-test-rn:random:1"))
    _ = torch


def test_refit_with_other_k_and_seed_computes_no_feature(fitted, data):
    _, _, base = fitted
    _, report = fit_engine(TINY[:2], data, base / "engine2", shots=1, seed=5, eval_fraction=0.34,
                           templates=["a photo of a {}."], cache_dir=base / "cache", **STUDY)
    assert report["cache"]["computed"] == 0 and report["cache"]["hits"] == 2 * 24


def test_linear_probe_heads(tmp_path, data):
    result, report = fit_engine(TINY[:2], data, tmp_path / "probe", head="linear-probe", shots=1, probe_fraction=0.6,
                                eval_fraction=0.34, cache_dir=tmp_path / "cache", **STUDY)
    m = read_manifest(result.folder)
    assert m.data["head_kind"] == "linear-probe" and m.data["templates"] is None
    assert report["probe_images"] > 0 and report["probe_images"] + report["num_train_pool"] == 16


def test_too_many_shots_for_the_probes_pool_is_refused_before_any_feature(tmp_path, photo_paths, monkeypatch):
    """The README's --shots 4 --head linear-probe on 25 images per class: refused at once, naming what passes."""
    from clipfuse.export.fit import pipeline

    def no_features(*a, **k):
        raise AssertionError("features computed before the shots were checked")

    monkeypatch.setattr(pipeline, "compute_features", no_features)
    monkeypatch.setattr(pipeline.bb, "load_backbone", no_features)
    root = tmp_path / "photos"
    make_folder(root, photo_paths, per_class=25)
    with pytest.raises(ClipfuseError) as e:
        fit_engine(TINY[:1], root, tmp_path / "o", shots=4, head="linear-probe", cache_dir=tmp_path / "c", **STUDY)
    msg = str(e.value)
    assert "--shots 4 is more than class" in msg and "(2 images)" in msg
    assert msg.endswith("use --shots 2 or --probe-fraction 0.75 (the probes then train on fewer images)")
    # each suggestion passes the check that refused
    from clipfuse.export.data import check_shots, scan_labelled_folder
    _, labels, names = scan_labelled_folder(root)
    check_shots(labels, 2, names, 0.3, 0.9)
    check_shots(labels, 4, names, 0.3, 0.75)


def test_bad_input(tmp_path, data, photo_paths):
    kw = dict(templates=["a {}"], cache_dir=tmp_path / "cache", **STUDY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipfuseError, match="empty"):
        fit_engine(TINY[:1], tmp_path / "empty", tmp_path / "o1", **kw)
    with pytest.raises(ClipfuseError, match=r"--shots 9 is more than class"):
        fit_engine(TINY[:1], data, tmp_path / "o2", shots=9, eval_fraction=0.34, **kw)
    bad = tmp_path / "bad"
    make_folder(bad, photo_paths, per_class=3)
    for f in (bad / "cat").iterdir():
        f.write_bytes(b"not an image")
    with pytest.raises(ClipfuseError, match="class 'cat' has no readable training image"):
        fit_engine(TINY[:1], bad, tmp_path / "o3", eval_fraction=0.34, **kw)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_eval_refuses_other_classes(fitted, tmp_path, photo_paths):
    folder, _, _ = fitted
    other = tmp_path / "other"
    make_folder(other, photo_paths, per_class=1)
    (other / "rocket").rename(other / "spaceship")
    with pytest.raises(ClipfuseError, match="only in --data .*spaceship"):
        eval_engine(folder, other)


def test_paper_zero_shot_script_end_to_end(tmp_path, data):
    """benchmarks/paper_zero_shot.py on tiny towers and a tiny generated folder."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "paper_zero_shot.py"
    spec = importlib.util.spec_from_file_location("paper_zero_shot", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    out = tmp_path / "results" / "tiny"
    report = mod.main(["--backbone", TINY[0], "--backbone", TINY[2], "--data", str(data), "--templates", str(templates),
                       "--shots", "1", "2", "--seeds", "0", "1", "--out", str(out), "--engine", str(tmp_path / "eng"),
                       "--cache", str(tmp_path / "cache")])
    md = out.with_suffix(".md").read_text()
    assert "| NLC | " in md and "| C-LOG-AVG | " in md and "1-shot | 2-shot" in md
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["study"]["shots"] == [1, 2] and saved["study"]["seeds"] == [0, 1]
    assert saved["head"] == "zero-shot" and report["backbones"] == [TINY[0], TINY[2]]
    shipped = read_manifest(tmp_path / "eng").data["fit"]["shipped"]
    kind = read_manifest(tmp_path / "eng").data["controller"]["kind"]
    assert kind == {"nlc": "nlc", "static": "static", "single": "static", "mean": "constant"}[shipped["method"]]


def test_reexport_keeps_the_fitted_controller_and_reports(fitted, tmp_path):
    import shutil

    from clipfuse.export.graph.engine import reexport_engine

    folder, _, _ = fitted
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = read_manifest(copy).data
    after = reexport_engine(copy, opset=19).manifest
    assert after["onnx"]["opset"] == 19 and after["controller"]["kind"] == "nlc" and after["fit"] == before["fit"]
    for name in ("heads.safetensors", "static.safetensors", "report.md"):        # carried or rewritten verbatim
        assert after["artefacts"][name]["sha256"] == before["artefacts"][name]["sha256"], name
    # the controller is saved anew (safetensors' metadata order is not fixed): compare its tensors
    import torch

    from clipfuse.export.graph.fused import load_controller

    a, b = load_controller(folder / "controller.safetensors"), load_controller(copy / "controller.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    data = json.loads((copy / "manifest.json").read_text())
    data["backbones"][0]["weights_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ClipfuseError, match="no longer has the weights"):
        reexport_engine(copy)


def test_cli_fit_eval_and_reexport(tmp_path, data):
    """The CLI calls the same API: fit writes the engine and prints the report; eval and export ENGINE work."""
    from click.testing import CliRunner

    from clipfuse.cli.main import cli

    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    out = tmp_path / "engine"
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(data), "-k", "2", "--templates", str(templates),
                                 "--eval-fraction", "0.34", "--study-shots", "1,2", "--study-seeds", "0",
                                 "--cache", str(tmp_path / "cache"), "-o", str(out), "-q", "--controller", "nlc"])
    assert r.exit_code == 0, r.output
    assert "| NLC |" in r.stdout and read_manifest(out).data["fit"]["shots"] == 2
    assert "## What ships: NLC" in r.stdout and "forced by --controller nlc" in r.stdout
    assert read_manifest(out).data["controller"]["kind"] == "nlc"
    r = CliRunner().invoke(cli, ["eval", str(out), "-d", str(data), "-q", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["num_images"] == 8 and "NLC" in res["accuracy"] and res["shipped"] == "NLC"     # the 16 fit images left out
    r = CliRunner().invoke(cli, ["eval", str(out), "-d", str(data), "-q", "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "| NLC (shipped) |" in r.stdout and "Cohen's kappa" in r.stdout and "Failure signatures" in r.stdout
    assert f"heat map: {tmp_path / 'rep' / 'diversity.png'}" in r.stdout
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"eval.md", "eval.json", "diversity.png"}
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(data), "-o", str(tmp_path / "y"), "--controller", "best"])
    assert r.exit_code == 2 and "Invalid value for '--controller'" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["export", str(out), "-q"])
    assert r.exit_code == 0, r.output and read_manifest(out).data["controller"]["kind"] == "nlc"
    r = CliRunner().invoke(cli, ["export", str(out), "-b", TINY[0]])
    assert r.exit_code == 1 and "rebuilds an existing engine" in r.stderr
    r = CliRunner().invoke(cli, ["export", "-b", TINY[0]])
    assert r.exit_code == 1 and "needs --classes, --out" in r.stderr
    r = CliRunner().invoke(cli, ["fit", "-b", TINY[0], "-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_auto_ships_the_selected_method_and_eval_marks_it(fitted, data):
    """auto: the manifest, report and eval agree on what ships, and it is the best of the selection scores."""
    from clipfuse.export.fit import select
    _, _, base = fitted
    result, report = fit_engine(TINY[:2], data, base / "auto", shots=1, seed=0, eval_fraction=0.34,
                                templates=["a photo of a {}."], cache_dir=base / "cache", **STUDY)
    sel = report["shipped"]["selection"]
    assert sel["mode"] == "held-out pool" and not sel["forced"] and report["shipped"]["method"] == sel["auto_choice"]
    cand = {"mean": sel["scores"]["LOG-AVG"], "single": sel["scores"][sel["best_single"]],
            "static": sel["scores"]["C-LOG-AVG"], "nlc": sel["scores"]["NLC"]}
    best = max(cand.values())
    assert report["shipped"]["method"] == next(m for m in select.TIE_ORDER if cand[m] == best)
    m = read_manifest(result.folder)
    assert m.data["fit"]["shipped"]["row"] == report["shipped"]["row"]
    assert m.data["controller"]["kind"] == {"nlc": "nlc", "static": "static", "single": "static",
                                            "mean": "constant"}[report["shipped"]["method"]]
    md = (result.folder / "report.md").read_text()
    assert f"## What ships: {report['shipped']['row']}" in md and f"| {report['shipped']['row']} (shipped) |" in md
    res = eval_engine(result.folder, data)
    assert res["shipped"] == report["shipped"]["row"] and res["accuracy"][res["shipped"]] == res["engine_accuracy"]


def test_forced_single_ships_that_backbones_logits_through_the_graph(fitted, data):
    from clipfuse.runtime.backends.registry import open_backend
    from clipfuse.runtime.images import iter_batches

    _, _, base = fitted
    result, report = fit_engine(TINY[:2], data, base / "single", shots=2, seed=0, eval_fraction=0.34,
                                templates=["a photo of a {}."], cache_dir=base / "cache", controller="single", **STUDY)
    name = report["shipped"]["backbone"]
    k = report["backbones"].index(name)
    m = read_manifest(result.folder)
    assert m.data["controller"]["kind"] == "static" and m.data["fit"]["shipped"]["method"] == "single"
    assert "forced by --controller single" in (result.folder / "report.md").read_text()
    backend = open_backend(m, "onnxruntime")
    paths = sorted(p for p in data.rglob("*") if p.is_file())
    for batch in iter_batches(paths, m.preprocess_specs(), batch_size=8):
        out = backend.infer(batch.inputs)
        np.testing.assert_array_equal(out["logits"], out["backbone_logits"][:, k])       # exactly, not approximately
        assert set(np.unique(out["temperatures"])) == {0.0, 1.0}
    backend.close()
    res = eval_engine(result.folder, data)
    assert res["shipped"] == name and res["accuracy"][name] == res["engine_accuracy"]


def test_fit_report_holds_diversity_loss_curve_and_heat_map(fitted):
    folder, report, _ = fitted
    div = report["diversity"]
    assert len(div["pairwise"]["kappa"]) == 2 and div["num_images"] == report["num_eval"]
    assert len(report["loss_curve"]) == report["config"]["steps"] and div["loss"]["steps"] == report["config"]["steps"]
    assert div["temperature_spread"]["threshold_cv"] == 0.05
    assert (folder / "diversity.png").read_bytes()[:4] == b"\x89PNG"
    md = (folder / "report.md").read_text()
    for text in ("## Diversity of the backbones on the eval split", "![pairwise diversity](diversity.png)",
                 "collapse threshold: std/mean < 5%", "Failure signatures:", "use no shots"):
        assert text in md, text


def test_identical_draws_are_detected_and_footnoted():
    from clipfuse.export.fit.pipeline import identical_draws
    from clipfuse.export.fit.report import render_report

    y = np.repeat(np.arange(4), 2)                          # exactly 2 images per class: k = 2 takes them all
    assert identical_draws(y, 4, [1, 2], [0, 1, 2]) == [2]
    assert identical_draws(y, 4, [2], [0]) == []            # one seed: nothing to compare
    study = {"methods": ["NLC"], "shots": [1, 2], "seeds": [0, 1, 2], "mean": {"NLC": {"1": 50.0, "2": 60.0}},
             "std": {"NLC": {"1": 3.0, "2": 0.0}}}
    md = render_report({"backbones": ["a"], "data": "d", "eval": "e", "num_eval": 4, "head": "zero-shot",
                        "num_train_pool": 8, "probe_images": 0, "unreadable_images": [], "shots_skipped": [],
                        "identical_draws": [2], "study": study,
                        "shipped": {"shots": 1, "seed": 0, "accuracy": {"NLC": 50.0}, "row": "NLC", "reason": "r"}})
    assert "| 1-shot | 2-shot † |" in md and "† every seed drew the same shots at k = 2" in md


def test_eval_leaves_out_the_images_the_engine_was_fitted_on(fitted, data, tmp_path):
    """fit records its training images' content hashes (a hashed artefact the runtime reads); eval on
    the fit's own folder scores only the others and says how many it left out; --include-fit-images keeps them;
    "held-out" is said only where true; a folder of fit images alone is refused in one line."""
    import shutil

    from click.testing import CliRunner

    from clipfuse.cli.main import cli
    from clipfuse.runtime.fit_images import fit_image_digests
    from clipfuse.runtime.manifest import sha256_file

    folder, report, _ = fitted
    m = read_manifest(folder)                          # verifies fit_images.json's sha256 like every artefact
    assert m.data["fit"]["images_file"] in m.data["artefacts"]
    digests = fit_image_digests(m)
    assert len(digests) == report["num_train_pool"] == 16
    res = eval_engine(folder, data)
    assert res["num_images"] == report["num_eval"] == 8
    assert res["fit_images"] == {"images_given": 24, "fit_images": 16, "left_out": True}
    assert not any(sha256_file(p) in digests for p in res["paths"])
    # scored on the eval split alone, eval reproduces the fit report's figure for it
    assert res["accuracy"]["NLC"] == pytest.approx(report["shipped"]["accuracy"]["NLC"])
    assert res["diversity"]["images"] == "images the engine was not fitted on"
    both = eval_engine(folder, data, include_fit_images=True)
    assert both["num_images"] == 24 and both["fit_images"]["left_out"] is False and both["fit_images"]["fit_images"] == 16
    assert "held-out" not in both["diversity"]["images"]

    r = CliRunner().invoke(cli, ["eval", str(folder), "-d", str(data)])
    assert r.exit_code == 0, r.output
    assert "16 of the 24 images are images the engine was fitted on: left out, so the figures are on the other 8" in r.stdout
    assert "warning: --data" in r.stderr and "held-out" not in r.stdout
    r = CliRunner().invoke(cli, ["eval", str(folder), "-d", str(data), "--include-fit-images", "-q"])
    assert r.exit_code == 0, r.output
    assert ": 24 images" in r.stdout and "scored anyway (--include-fit-images): the figures are biased upwards" in r.stdout
    assert "held-out" not in r.stdout

    only_fit = tmp_path / "fit-only"
    for p in sorted(data.rglob("*.jpg")):
        if sha256_file(p) in digests:
            (only_fit / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, only_fit / p.parent.name / f"copy-{p.name}")     # renamed: known by content
    r = CliRunner().invoke(cli, ["eval", str(folder), "-d", str(only_fit), "-q"])
    assert r.exit_code == 1 and "every one of the 16 images" in r.output and "--include-fit-images" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_what_ships_reconciles_a_rival_that_scores_as_well_on_eval():
    """"What ships: NLC" beside "NLC is no better than C-LOG-AVG" on the eval split says why it ships."""
    from clipfuse.export.fit.report import _what_ships

    def report(acc, forced=False):
        return {"shipped": {"row": "NLC", "reason": "NLC scored best on the pool.", "accuracy": acc,
                            "selection": {"forced": forced}}, "num_eval": 9, "backbones": ["A", "B"]}

    tie = "\n".join(_what_ships(report({"A": 20.0, "B": 10.0, "C-LOG-AVG": 33.3, "NLC": 33.3, "ORACLE": 60.0})))
    assert "## What ships: NLC" in tie
    assert "On the eval split C-LOG-AVG (33.3%) scores at least as well as NLC (33.3%). NLC ships all the same" in tie
    assert "one image moves an accuracy by 11.1 points" in tie
    better = "\n".join(_what_ships(report({"A": 20.0, "B": 10.0, "C-LOG-AVG": 30.0, "NLC": 33.3, "ORACLE": 60.0})))
    assert "at least as well" not in better
    forced = "\n".join(_what_ships(report({"A": 40.0, "B": 10.0, "C-LOG-AVG": 30.0, "NLC": 33.3}, forced=True)))
    assert "A (40.0%) scores at least as well as NLC" in forced and "ships because --controller asked for it" in forced
