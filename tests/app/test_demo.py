"""`clipfuse demo` (clipfuse/demo.py): the digits it writes, its stages said as the demo's, and the CLI's
text built from the data run_demo returns (the fit, export and bench themselves are tested elsewhere)."""
from __future__ import annotations

from contextlib import contextmanager

from clipfuse import demo
from clipfuse.cli import present
from clipfuse.runtime.predict import Prediction


def test_write_digits_subsets_are_disjoint(tmp_path):
    assert demo.write_digits(tmp_path / "train", 3) == 30
    assert demo.write_digits(tmp_path / "eval", 2, skip=3) == 20
    train = {p.name for p in (tmp_path / "train").rglob("*.png")}
    held = {p.name for p in (tmp_path / "eval").rglob("*.png")}
    assert len(train) == 30 and len(held) == 20 and not train & held
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"digit_{d}" for d in range(10)]


def test_demo_stages_are_tagged_demo_and_it_returns_data(tmp_path, monkeypatch, capsys):
    """The demo's stages are not prefixed [bench]. Fit, predictor and bench are stand-ins here."""
    import clipfuse.bench.run
    import clipfuse.export.fit.pipeline
    import clipfuse.runtime.predict

    calls = {}
    fit_report = {"shipped": {"shots": 8, "accuracy": {"NLC": 70.0, "LOG-AVG": 60.0}, "row": "LOG-AVG",
                              "reason": "LOG-AVG scored best on held-out pool images"}, "num_eval": 40}
    pred = Prediction(index=0, path="x.png", labels=["digit_1", "digit_7", "digit_4"], probs=[0.7, 0.2, 0.1],
                      temperatures={"a": 1.0, "b": 0.5})

    class FakePredictor:
        backbone_names = ["a", "b"]
        classes = [f"digit_{d}" for d in range(10)]

        def predict(self, paths, top_k):
            calls["predicted"] = len(paths)
            return [pred]

    @contextmanager
    def fake_load(*a, **k):
        yield FakePredictor()

    def fake_bench(engine, **kwargs):
        calls["bench"] = kwargs
        return {"plot": "p.png"}

    monkeypatch.setattr(clipfuse.export.fit.pipeline, "fit_engine", lambda *a, **k: (None, fit_report))
    monkeypatch.setattr(demo, "load_predictor", fake_load)
    monkeypatch.setattr(demo, "run_bench", fake_bench)
    monkeypatch.setattr(present, "format_bench", lambda r: "BENCH TABLE\n")
    got = demo.run_demo(tmp_path / "demo", train_per_class=4, eval_per_class=4, runs=1)
    err = capsys.readouterr().err
    stages = [line for line in err.splitlines() if line.startswith("[")]
    assert [s.split()[1] for s in stages] == ["1/4", "2/4", "3/4", "4/4"], err
    assert all(s.startswith("[demo] ") for s in stages), err
    assert "[bench]" not in err
    assert got["fit"] is fit_report and got["predictions"] == [pred] and got["bench"] == {"plot": "p.png"}
    assert calls["predicted"] == 4 and calls["bench"]["runs"] == 1
    text = present.format_demo(got)
    assert "- NLC: 70.0% [54.6, 81.9] (95%, 40 images)" in text and "- LOG-AVG (shipped): 60.0%" in text
    assert "digit_1" in text
    assert "The engine ships LOG-AVG: LOG-AVG scored best on held-out pool images" in text and "BENCH TABLE" in text and "plot: p.png" in text
