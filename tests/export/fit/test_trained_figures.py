"""The figures on trained towers (benchmarks/trained_nlc.py, cascade_digits.py --set trained), on tiny towers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import TINY

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nlc_against_every_baseline_with_paired_differences_at_every_k(tmp_path):
    mod = load("trained_nlc")
    out = tmp_path / "trained_nlc"
    res = mod.main(["--backbones", *TINY[:2], "--images", "300", "--shots", "1", "2", "--seeds", "0", "1",
                    "--cache", str(tmp_path / "cache"), "--out", str(out)])
    f = res["figures"]
    assert [(r["shots"], r["seed"]) for r in f["runs"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    n = f["eval_images"]
    assert 85 <= n <= 95 and f["best_single"] in TINY[:2]        # 30% of 300, stratified per class
    for r in f["runs"]:
        assert set(r["accuracy"]) == {*TINY[:2], "LOG-AVG", "PROB-AVG", "VOTE", "C-LOG-AVG", "NLC"}
        for a in r["accuracy"].values():
            assert a["n"] == n and a["lo"] <= a["value"] <= a["hi"]
        for key in ("nlc_vs_clogavg", "nlc_vs_best_single"):
            d = r[key]
            assert d["n"] == n and d["lo"] <= d["difference"] <= d["hi"]
    # every method against the full ensemble, paired; the full ensemble against itself is exactly zero
    rows = f["vs_full"]["rows"]
    assert len(rows) == 7 and all(r["vs_full"]["n"] == n for r in rows.values())
    md = out.with_suffix(".md").read_text()
    assert md.startswith("<!-- made by: python benchmarks/trained_nlc.py --backbones")
    assert "## NLC - C-LOG-AVG, paired" in md and "## NLC - best single" in md and "| ORACLE |" in md
    assert json.loads(out.with_suffix(".json").read_text())["images"] == 300
    out.with_suffix(".md").unlink()
    assert mod.main(["--render", str(out.with_suffix(".json"))])["figures"] == json.loads(json.dumps(f))
    assert out.with_suffix(".md").read_text() == md
    name = mod.train_towers.display_name
    assert name("RN50:/c/towers/RN50-seed0-ab12.safetensors") == "RN50 (trained, seed 0)"
    assert name("ViT-B-32:random:1") == "ViT-B-32:random:1"


def test_the_cascade_figures_take_the_trained_set(tmp_path):
    mod = load("cascade_digits")
    out = tmp_path / "cascade_trained"
    res = mod.main(["--set", "trained", "--backbones", *TINY[:2], "--images", "16", "--max-drop", "20",
                    "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet"])
    assert 100 <= res["images"] <= 160
    md = out.with_suffix(".md").read_text()
    assert "tower_digits.py" in md and "Towers trained here" in md and "Seeded random towers" not in md
