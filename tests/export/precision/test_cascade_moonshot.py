"""benchmarks/cascade_int8.py --set five (issue #26's moonshot): renders, target checks, and the run on tiny towers."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cascade_int8", BENCH / "cascade_int8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)          # puts benchmarks/ on sys.path: its helper modules import by name
    return mod


@pytest.fixture(scope="module")
def digits(tmp_path_factory, script):
    """The first 6 digits of each class, split 3 'pool' / 3 'eval' per class."""
    root = tmp_path_factory.mktemp("digits")
    script.write_digits(root / "all")
    for cls in sorted((root / "all").iterdir()):
        for j, p in enumerate(sorted(cls.iterdir())[:6]):
            dst = root / ("pool" if j < 3 else "eval") / cls.name / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    return root


def _bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_renders_are_deterministic_8x8_and_never_an_eval_digit(script, digits, tmp_path):
    renders = importlib.import_module("digit_renders")
    a = script.certify_folder(digits / "pool", digits / "eval", tmp_path / "a", copies=2)
    b = script.certify_folder(digits / "pool", digits / "eval", tmp_path / "b", copies=2)
    assert a == b and a["pool"] == 30 and a["renders"] == 60
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")                  # same bytes: the feature cache hits
    pool = {renders.digit_index(p) for p in (digits / "pool").rglob("*.png")}
    evals = {renders.digit_index(p) for p in (digits / "eval").rglob("*.png")}
    assert set(a["render_sources"]) == pool and not pool & evals             # rendered from the pool only
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 90 and sum(n.startswith("render-") for n in names) == 60
    eval_bytes = {p.read_bytes() for p in (digits / "eval").rglob("*.png")}
    assert not eval_bytes & set(_bytes(tmp_path / "a").values())
    i = sorted(pool)[0]
    r0, r1 = (np.asarray(Image.open(tmp_path / "a" / f"render-{c}-{i:04d}.png")) for c in (0, 1))
    src = np.asarray(Image.open(next((digits / "pool").rglob(f"{i:04d}.png"))))
    assert r0.shape == (8, 8) and r0.dtype == np.uint8 and not np.array_equal(r0, src) and not np.array_equal(r0, r1)


def test_a_certification_image_with_an_eval_digits_bytes_is_refused(script, digits, tmp_path):
    leak = tmp_path / "pool"
    for p in list((digits / "pool").rglob("*.png"))[:3] + list((digits / "eval").rglob("*.png"))[:1]:
        (leak / p.parent.name).mkdir(parents=True, exist_ok=True)
        (leak / p.parent.name / p.name).write_bytes(p.read_bytes())
    with pytest.raises(SystemExit, match="1 certification images have the bytes of an eval digit"):
        script.certify_folder(leak, digits / "eval", tmp_path / "certify", copies=1)


def test_a_run_without_max_drop_0_5_says_the_targets_were_not_measured(script):
    res = {"command": "c", "seconds": 1, "set": "five", "backbones": ["a"], "targets": None,
           "drops": {"1": {"max_drop": 1.0, "error": "refused"}},
           "setup": {k: 0 for k in ("digits", "eval_images", "pool_outside_shots", "renders", "copies", "timed_images")}
           | {"best_single": "a", "timing_rule": "r"}}
    md = script.moonshot.markdown(res)
    assert "- not measured: this run has no max-drop 0.5" in md and "Refused: refused" in md


def test_a_run_stopped_after_its_first_max_drop_keeps_that_max_drops_figures(script, monkeypatch, tmp_path):
    """The full run takes hours: each max-drop is written as soon as it is measured, the rest named pending."""
    setup = {k: 0 for k in ("digits", "eval_images", "pool_outside_shots", "copies", "timed_images")} | {
        "best_single": "a", "timing_rule": "r"}
    monkeypatch.setattr(script, "prepare", lambda *a, **k: (tmp_path, tmp_path, tmp_path, dict(setup)))
    monkeypatch.setattr(script, "certify_folder", lambda *a, **k: {"renders": 0, "render_sources": 0})
    monkeypatch.setattr(script.moonshot, "timing_subset", lambda *a, **k: [])

    def one_drop(d, *a, **k):
        if d == 1.0:
            raise KeyboardInterrupt            # the run stopped by hand during max-drop 1
        return {"max_drop": d, "error": "refused here"}
    monkeypatch.setattr(script, "_five_at", one_drop)
    args = script.argparse.Namespace(max_drop="0.5,1", images=None, cache=None, unlabelled_copies=4,
                                     bench_images=200, engine=None)
    out = tmp_path / "results" / "moonshot"
    with pytest.raises(KeyboardInterrupt):
        script._run_five(args, ["a"], (1,), "c", out)
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["drops"]) == ["0.5"] and res["pending"] == [1.0]
    assert "**Part-way:** written when max-drop 0.5 finished; max-drop 1 was still to run" in out.with_suffix(
        ".md").read_text()


def _five(drops: dict, command: str, seconds: float = 10.0, **extra) -> dict:
    setup = {k: 0 for k in ("digits", "eval_images", "pool_outside_shots", "renders", "copies", "timed_images")} | {
        "best_single": "a", "timing_rule": "r"}
    return {"set": "five", "command": command, "seconds": seconds, "backbones": ["a"], "setup": setup,
            "drops": drops, "targets": None} | extra


def test_runs_that_measured_different_max_drops_merge_into_one_file(script, tmp_path):
    """The stopped run kept max-drop 0.5; a later run measured max-drop 1 alone: --merge writes one file with both,
    the targets from 0.5, both commands, and no part-way line; other setups or a drop measured twice are refused."""
    first = _five({"0.5": {"max_drop": 0.5, "error": "refused at 0.5"}}, "run --max-drop 0.5,1", 7150.0, pending=[1.0])
    second = _five({"1": {"max_drop": 1.0, "error": "refused here"}}, "run --max-drop 1", 5000.0)
    files = []
    for k, r in enumerate((first, second)):
        files.append(tmp_path / f"r{k}.json")
        files[-1].write_text(json.dumps(r))
    out = tmp_path / "merged"
    res = script.main(["--set", "five", "--merge", *map(str, files), "--out", str(out)])
    assert list(res["drops"]) == ["0.5", "1"] and "pending" not in res and res["seconds"] == 12150.0
    assert len(res["targets"]) == 3 and all("not measured (refused at 0.5)" in c["line"] for c in res["targets"])
    md = out.with_suffix(".md").read_text()
    assert md.startswith("<!-- made by: run --max-drop 0.5,1 (7150 s on this machine) -->\n"
                         "<!-- made by: run --max-drop 1 (5000 s on this machine) -->")
    assert "Measured in 2 runs of the same setup" in md and "max-drop 1 by `run --max-drop 1` (5000 s)" in md
    assert "Part-way" not in md and "Refused: refused here" in md and "Refused: refused at 0.5" in md
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_five({"1": {"max_drop": 1.0, "error": "x"}}, "c") | {"backbones": ["b"]}))
    with pytest.raises(SystemExit, match="--merge: result 2 has another 'backbones' than result 1"):
        script.main(["--set", "five", "--merge", str(files[0]), str(other), "--out", str(out)])
    with pytest.raises(SystemExit, match="--merge: max-drop 0.5 is in more than one result"):
        script.main(["--set", "five", "--merge", str(files[0]), str(files[0]), "--out", str(out)])
    (tmp_path / "pair.json").write_text(json.dumps({"set": "pair", "bench": {}}))
    (tmp_path / "broken.json").write_text("{not json")
    for bad, why in (("missing.json", "cannot be read as JSON"), ("broken.json", "cannot be read as JSON"),
                     ("pair.json", "is not a --set five results file (it has no 'drops')")):
        with pytest.raises(SystemExit, match=f"--merge: .*{bad} {re.escape(why)}"):
            script.main(["--set", "five", "--merge", str(files[0]), str(tmp_path / bad), "--out", str(out)])


def test_the_timing_subset_takes_every_class(script, digits, tmp_path):
    names = script.moonshot.timing_subset(digits / "eval", tmp_path / "timed", 10)
    assert len(names) == 10 and len({n.split("/")[0] for n in names}) == 10
    assert len(script.moonshot.timing_subset(digits / "eval", tmp_path / "all", 100)) == 30    # never more than all


def _drop(ratio=1.2, diff=-0.2, int8_ms=40.0, single_ms=60.0, int8=True) -> dict:
    lat = lambda cas, one: {"1": {"cascade": {"mean_ms": cas}, "single": {"backbone": "ViT-B-32", "mean_ms": one},
                                  "cascade_over_single_mean": cas / one}}
    d = {"bench": {"fp32": {"latency": lat(ratio * single_ms, single_ms)}},
         "fp32_accuracy": {"paired_difference": {"n": 539, "difference": diff, "lo": diff - 0.4, "hi": diff + 0.4,
                                                 "a_only": 1, "b_only": 2}},
         "int8": {"cascade": {"written": int8, "reason": None if int8 else "too few images: need 598"}}}
    if int8:
        d["bench"]["int8"] = {"latency": lat(int8_ms, single_ms)}
    return d


@pytest.mark.parametrize("case, failing", [
    ({}, []),
    ({"ratio": 1.5, "diff": -0.5}, []),                   # the bounds themselves pass (<= 1.5x, >= -0.5 points)
    ({"ratio": 1.51}, [0]),
    ({"diff": -0.51}, [1]),
    ({"int8_ms": 60.0}, [2]),                             # below, strictly: equal fails
    ({"int8": False}, [2]),                               # int8 stages not written: not measured, fails
    ({"ratio": 3.0, "diff": -2.0, "int8_ms": 90.0}, [0, 1, 2]),
])
def test_each_target_fails_past_its_bound_and_prints_it(script, case, failing):
    checks = script.moonshot.target_checks(_drop(**case))
    assert [k for k, c in enumerate(checks) if not c.ok] == failing
    lines = [c.line() for c in checks]
    assert "<= 1.5x" in lines[0] and ">= -0.5" in lines[1]
    assert all(ln.startswith("FAIL: " if k in failing else "PASS: ") for k, ln in enumerate(lines))
    if case.get("int8") is False:
        assert "not measured (too few images: need 598)" in lines[2]
    else:
        assert "< 60 ms" in lines[2]


def test_a_batch_not_timed_fails_the_latency_target(script):
    d = _drop()
    x = copy.deepcopy(d)
    x["bench"]["fp32"]["latency"] = {"8": d["bench"]["fp32"]["latency"]["1"]}
    c = script.moonshot.target_checks(x)[0]
    assert not c.ok and "not measured (batch 1 with the single was not timed)" in c.line()


def test_a_refused_max_drop_fails_every_target_and_says_why(script):
    checks = script.moonshot.target_checks({"max_drop": 0.5, "error": "too few calibration images: need 875"})
    assert len(checks) == 3 and not any(c.ok for c in checks)
    assert all("not measured (too few calibration images: need 875)" in c.line() for c in checks)


def test_the_moonshot_runs_on_tiny_towers(script, tmp_path):
    out = tmp_path / "moonshot"
    res = script.main(["--set", "five", "--backbones", *TINY[:2], "--images", "20", "--max-drop", "0.5,20,30",
                       "--unlabelled-copies", "2", "--bench-images", "10", "--batch", "1,2",
                       "--cache", str(tmp_path / "cache"), "--out", str(out), "--quiet"])
    s = res["setup"]
    assert s["digits"] == 200 and s["eval_images"] == 60 and s["renders"] == 2 * s["pool_outside_shots"]
    assert s["timed_images"] == len(s["timed"]) == 10
    assert list(res["drops"]) == ["0.5", "20", "30"]
    # 90 images cannot certify 0.5 points: that max-drop is refused in the fit's words, the others still measured,
    # and the targets (stated at 0.5) fail
    refused = res["drops"].pop("0.5")
    assert "too few calibration images" in refused["error"] and "--certify-on" in refused["error"]
    assert [t["ok"] for t in res["targets"]] == [False] * 3
    for d, r in res["drops"].items():
        found = r["engine"]["certified_on"]
        # the fit counted the pool once (its own labelled pool) and used every render
        assert found["labelled_pool"] == s["pool_outside_shots"] and found["unlabelled"]["used"] == s["renders"]
        assert found["unlabelled"]["left_out"]["labelled pool images"] == s["pool_outside_shots"]
        # the int8 certification keeps the pool digits too: they are the fp32 cascade's calibration, not fitted on
        f8 = r["int8"]["cascade"]["certified_on"]["found"]
        assert f8["found"] == s["pool_outside_shots"] + s["renders"] and not f8["left_out"].get("fit images"), f8
        a = r["fp32_accuracy"]
        assert a["n"] == 60 and abs(sum(a["exit_rates"]) - 1) < 1e-9                # accuracy on every eval digit
        assert r["bench"]["fp32"]["images"] == 10 and set(r["bench"]["fp32"]["latency"]) == {"1", "2"}
        assert r["int8"]["cascade"]["max_drop"] == float(d)
        checks = script.moonshot.target_checks(r)                                  # the keys it reads exist
        assert checks[0].value is not None and checks[1].value == a["paired_difference"]["difference"]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("<!-- made by: python benchmarks/cascade_int8.py --set five --backbones")
    assert "## Targets (max-drop 0.5" in md and "- FAIL: fp32 cascade" in md and "## max-drop 0.5\n\nRefused: " in md
    assert "## max-drop 20" in md and "## max-drop 30" in md and "| fp32 | 1 |" in md and "| 20 | fp32 |" in md
    out.with_suffix(".md").unlink()
    assert list(script.main(["--render", str(out.with_suffix(".json"))])["drops"]) == ["0.5", "20", "30"]
    assert out.with_suffix(".md").read_text() == md
    assert json.loads(out.with_suffix(".json").read_text())["setup"]["copies"] == 2


def test_the_moonshot_options_are_refused_for_the_other_sets(script):
    with pytest.raises(SystemExit):
        script.main(["--set", "pair", "--max-drop", "0.5"])
