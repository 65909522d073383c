"""benchmarks/cascade_digits.py (a committed-results script) on tiny towers and a few digits."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import TINY

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "cascade_digits.py"


def load_script():
    spec = importlib.util.spec_from_file_location("cascade_digits", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_script_writes_every_figure_with_its_interval(tmp_path):
    mod = load_script()
    assert mod.SETS["five"][0] == ["ViT-B-32:random:5", "RN50:random:0", "RN101:random:1", "ViT-B-16:random:6",
                                   "RN50x4:random:2"] and mod.SETS["nine"] == (mod.ALL, 30)
    out = tmp_path / "cascade_pair"
    res = mod.main(["--set", "pair", "--backbones", *TINY, "--images", "20", "--out", str(out),
                    "--cache", str(tmp_path / "cache"), "--quiet"])
    assert res["images"] == 200
    f = res["figures"]
    labels = list(f["rows"])
    assert labels[0].startswith("full ensemble") and "best single" in labels and len(labels) == 5
    for r in f["rows"].values():
        assert r["accuracy"]["lo"] <= r["accuracy"]["value"] <= r["accuracy"]["hi"] and r["accuracy"]["n"] == 60
        assert "agreement" in r["vs_full"]
    c = f["cascade"]
    assert c["max_drop"] in mod.DROPS and c["calibration"]["disagreement_bound"] <= c["max_drop"]
    assert abs(sum(c["exit_rates"]) - 1) < 1e-9 and 0 < c["cost_fraction"] <= 1
    md = out.with_suffix(".md").read_text()
    assert md.startswith("<!-- made by: python benchmarks/cascade_digits.py --set pair --backbones")
    assert "| cascade (--max-drop" in md and json.loads(out.with_suffix(".json").read_text())["set"] == "pair"
    assert "## Diversity of the backbones" in md and "kappa" in md
    assert res["figures"]["diversity"]["pairwise"]["disagreement"][0][0] == 0       # a backbone agrees with itself
