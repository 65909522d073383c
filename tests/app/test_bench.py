"""The bench machinery on tiny towers: it runs, its JSON holds every configuration and figure, the
plot is a valid PNG, the singles cache is reused. No timing is asserted (numbers belong in benchmarks/)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from clipfuse.bench import configs, probes, report, run, worker
from clipfuse.bench.profile import describe_nodes
from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime import cpu_load
from clipfuse.runtime.manifest import read_manifest

LAT_FIELDS = {"p50", "p90", "p99", "min", "max", "n"}


@pytest.fixture(scope="module")
def engine(tiny_engine, tmp_path_factory):
    """A private copy of the tiny engine: the bench writes singles/ into it."""
    dst = tmp_path_factory.mktemp("bench") / "tiny"
    shutil.copytree(tiny_engine, dst)
    return dst


@pytest.fixture(scope="module")
def data(photo_paths, tmp_path_factory, tiny_engine):
    """Two real photographs per class folder (the photo and its mirror image)."""
    root = tmp_path_factory.mktemp("labelled")
    for cls, p in zip(read_manifest(tiny_engine, verify=False).classes, photo_paths):
        (root / cls).mkdir()
        with Image.open(p) as im:
            im.convert("RGB").save(root / cls / "a.jpg")
            ImageOps.mirror(im.convert("RGB")).save(root / cls / "b.jpg")
    return root


@pytest.fixture(scope="module")
def full_run(engine, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = run.run_bench(engine, data=data, batches=(2, 1), runs=2, out=out, command="test")
    return result, out


def test_json_has_every_configuration_and_figure(full_run, engine):
    result, out = full_run
    saved = json.loads((out / "bench.json").read_text())
    K = 3
    configs = ["fused", "single:0", "single:1", "single:2", "sum", "naive", "torch"]
    assert saved["order"] == configs
    assert saved["settings"]["batches"] == [1, 2]
    for c in configs:
        for bs in ("1", "2"):
            x = saved["latency"][c][bs]
            assert set(x["latency_ms"]) == LAT_FIELDS and x["latency_ms"]["n"] == 2
            s = x["latency_ms"]
            assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
            assert x["images_per_s"] > 0 and x["gflops"] > 0 and x["achieved_gflops_per_s"] > 0
    m = read_manifest(engine, verify=False)
    assert saved["latency"]["fused"]["2"]["gflops"] == pytest.approx(2 * sum(b["gflops"] for b in m.backbones))
    assert saved["latency"]["single:1"]["1"]["gflops"] == pytest.approx(m.backbones[1]["gflops"])
    # the sum is the per-round sum of the singles, never a separate timing: every round's sum lies between
    # the sum of the singles' fastest rounds and the sum of their slowest (a separate timing, or a mean or
    # max of the singles, falls outside; sum p50 >= one single's min would hold for any of them)
    for bs in ("1", "2"):
        lo = sum(saved["latency"][f"single:{k}"][bs]["latency_ms"]["min"] for k in range(K))
        hi = sum(saved["latency"][f"single:{k}"][bs]["latency_ms"]["max"] for k in range(K))
        s = saved["latency"]["sum"][bs]["latency_ms"]
        assert lo * (1 - 1e-9) <= s["min"] <= s["max"] <= hi * (1 + 1e-9), (lo, s, hi)
    t = saved["targets"]
    for key in ("fused_over_sum", "naive_over_fused", "torch_over_fused"):
        assert set(t[key]) == {"1", "2"} and all(v["min"] <= v["median"] <= v["max"] for v in t[key].values())
    assert set(t["fused_memory_over_sum"]) == {"peak_rss_bytes", "net_peak_bytes"}
    for c in ["fused", "single:0", "single:1", "single:2", "naive", "torch", "sum"]:
        mem = saved["memory"][c]
        assert mem["peak_rss_bytes"] > 0 and mem["net_peak_bytes"] > 0
    assert saved["memory"]["sum"]["peak_rss_bytes"] == sum(saved["memory"][f"single:{k}"]["peak_rss_bytes"] for k in range(K))
    ov = saved["overhead"]
    assert ov["downstream_nodes"] and math.isfinite(ov["pct_of_fused_p50"]) and ov["pct_of_fused_p50"] >= 0
    assert 0 <= ov["controller_combination_pct_of_nodes"] <= 100
    assert saved["machine"]["matmul_peak_gflops"] > 0
    # each configuration group timed in its own worker process, with a rest before each call
    assert saved["settings"]["processes"] == [["fused"], ["single:0", "single:1", "single:2", "naive"], ["torch"]]
    assert saved["settings"]["settle_s"] == 0.05
    # the ceiling: eager's p50 over the time the same FLOPs take at the measured matmul peak
    for bs in ("1", "2"):
        lat = saved["latency"]["torch"][bs]
        assert t["torch_over_fused_ceiling"][bs] == pytest.approx(
            lat["latency_ms"]["p50"] / 1e3 / (lat["gflops"] / saved["machine"]["matmul_peak_gflops"]))
    assert {"timing", "memory"} <= set(saved["load"])
    assert (saved["device_memory"] is None) == (probes.gpu_memory() is None)   # NVML figures exactly where a GPU is
    # the naive ensemble and PyTorch compute what the fused graph computes
    assert saved["agreement_with_fused_rel"]["naive"] < 1e-4
    assert saved["agreement_with_fused_rel"]["torch"] < 1e-3
    methods = saved["accuracy"]["methods"]
    assert set(m.backbone_names) | {"LOG-AVG", "PROB-AVG", "VOTE", "ORACLE"} <= set(methods)
    assert any(k.startswith("ENGINE") or k == "NLC" for k in methods)
    assert saved["accuracy"]["num_images"] == 8


def test_markdown_and_png(full_run):
    result, out = full_run
    md = (out / "bench.md").read_text()
    for needle in ("Command: `test`", "## Latency", "## Targets", "fused / sum of singles", "PyTorch eager / fused",
                   "ceiling", "one worker process per group", "50 ms rest",
                   "controller + combination", "## Peak host memory", "## Accuracy", "other processes took"):
        assert needle in md
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert result["plot"] == str(png)
    kinds = {p["kind"] for p in result["plot_points"]}
    assert kinds == {"single", "static ensemble", "engine"}
    assert any(p["pareto"] for p in result["plot_points"])
    # the overhead line says what the controller + combination nodes are, not ORT's node names
    ov = result["overhead"]
    assert len(ov["downstream_ops"]) == len(ov["downstream_nodes"]) > 0
    assert all(op.isalnum() and op[0].isupper() for op in ov["downstream_ops"])
    line = next(x for x in md.splitlines() if x.startswith("Overhead profile"))
    assert f"controller + combination: {describe_nodes(ov['downstream_ops'])}" in line
    assert not any(f" {n}," in line or f" {n} " in line for n in ov["downstream_nodes"] if n not in ov["downstream_ops"])


def test_singles_cache_is_reused_then_rebuilt_when_stale(full_run, engine, tmp_path):
    result, out = full_run
    assert result["singles_cache_reused"] == [False, False, False]
    assert not (engine / "singles").exists()            # with --out, the singles go there, not into the engine
    single1 = out / "singles" / "1-clipfuse-test-rn" / "model.onnx"
    before = single1.stat().st_mtime_ns
    again = run.run_bench(engine, batches=(1,), runs=1, warmup=0, out=out, stem="again", torch=False, memory=False,
                          profile=False)
    assert again["singles_cache_reused"] == [True, True, True]
    assert single1.stat().st_mtime_ns == before
    assert again["accuracy"] is None and "torch" not in again["latency"] and again["memory"] is None
    assert not (out / "again.png").exists()       # no data, no accuracy: no plot
    # a single whose classes no longer match the engine is exported again
    mpath = out / "singles" / "2-clipfuse-test-vit48" / "manifest.json"
    mf = json.loads(mpath.read_text())
    mf["classes"] = list(reversed(mf["classes"]))
    mpath.write_text(json.dumps(mf))
    m = read_manifest(engine, verify=False)
    _, reused = configs.ensure_singles(m, root=out / "singles")
    assert reused == [True, True, False]
    assert read_manifest(mpath.parent, verify=False).classes == m.classes


def test_numpy_controller_matches_torch(tmp_path):
    import torch

    from clipfuse.export.graph.fused import NLCController, save_controller

    torch.manual_seed(0)
    c = NLCController(in_dim=12, num_backbones=3, hidden=8).eval()
    with torch.no_grad():
        c.in_mean.normal_()
        c.in_std.uniform_(0.5, 2.0)
    save_controller(c, tmp_path / "c.safetensors")
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    with torch.no_grad():
        want = c(torch.from_numpy(x)).numpy()
    got = configs.NumpyController(tmp_path / "c.safetensors").temperatures(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    zs = [np.random.default_rng(k).standard_normal((5, 4)).astype(np.float32) for k in range(3)]
    out = configs.NumpyController(tmp_path / "c.safetensors").combine([x[:, :4], x[:, 4:8], x[:, 8:]], zs)
    np.testing.assert_allclose(out["logits"], (want[:, :, None] * np.stack(zs, 1)).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, rtol=1e-6)


def test_pareto_front():
    result = {"settings": {"batches": [1]}, "backbones": ["a", "b"],
              "accuracy": {"num_images": 10, "methods": {"a": 50.0, "b": 70.0, "LOG-AVG": 65.0, "NLC": 80.0, "ORACLE": 90.0}},
              "latency": {"single:0": {"1": {"latency_ms": {"p50": 10.0}}}, "single:1": {"1": {"latency_ms": {"p50": 30.0}}},
                          "fused": {"1": {"latency_ms": {"p50": 40.0}}}}}
    pts = {p["method"]: p for p in report.plot_points(result)}
    assert set(pts) == {"a", "b", "LOG-AVG", "NLC"}             # ORACLE is a ceiling, not a method one can run
    assert {m for m, p in pts.items() if p["pareto"]} == {"a", "b", "NLC"}
    assert pts["LOG-AVG"]["latency_ms"] == 40.0


def test_cli_bench(engine, tmp_path):
    r = CliRunner().invoke(cli, ["bench", str(engine), "--batch", "1", "--runs", "1", "--no-torch", "--no-memory",
                                 "--out", str(tmp_path), "--name", "b", "-q"])
    assert r.exit_code == 0, r.output
    assert "## Latency" in r.output and "fused / sum of singles" in r.output
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["command"].startswith(f"clipfuse bench {engine} --batch 1 --runs 1")
    assert "--no-torch" in saved["command"] and (tmp_path / "b.md").is_file()


def test_cli_bench_refuses_other_backends_and_bad_batches(engine):
    r = CliRunner().invoke(cli, ["bench", str(engine), "--backend", "torch"])
    assert r.exit_code == 1 and "error:" in r.output and "onnxruntime" in r.output
    r = CliRunner().invoke(cli, ["bench", str(engine), "--batch", "0"])
    assert r.exit_code == 1 and "--batch" in r.output


def test_worker_failure_names_the_configuration(tmp_path):
    with pytest.raises(ClipfuseError, match=r"bench worker for fused: .*nope"):
        worker.TimingWorker(tmp_path / "nope", ["fused"], [1])


def test_worker_times_and_returns_logits(engine):
    w = worker.TimingWorker(engine, ["fused"], [1, 2])
    try:
        assert w.ready["pid"] == w.pid != __import__("os").getpid()
        assert w.time("fused", 2) > 0
        logits = w.logits("fused", 2)
        assert logits.shape == (2, len(read_manifest(engine, verify=False).classes)) and np.isfinite(logits).all()
    finally:
        w.close()
    assert w.proc.returncode == 0


def test_load_probe_counts_live_workers_as_ours():
    import subprocess
    import sys
    import time

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ninput()"], stdin=subprocess.PIPE, text=True)
    try:
        probe = cpu_load.LoadProbe(pids=[child.pid])
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 60
        while sum(proc.cpu_times()[:2]) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)                   # the child burns 0.6 s of CPU, then waits (still alive)
        got = probe.stop()
    finally:
        child.communicate("\n", timeout=30)
    assert got["own_cpu_s"] >= 0.4


def test_settle_is_checked(engine):
    with pytest.raises(ClipfuseError, match="settle"):
        run.run_bench(engine, batches=(1,), settle=-1)


def test_verdict_says_how_a_target_was_met():
    assert report.verdict({"median": 0.95, "min": 0.9, "max": 0.99}, 1.0) == "yes"
    assert report.verdict({"median": 0.998, "min": 0.97, "max": 1.086}, 1.0) == "yes at the median (worst round 1.09)"
    assert report.verdict({"median": 1.019, "min": 0.959, "max": 1.057}, 1.0).startswith("NO at the median, within")
    assert report.verdict({"median": 1.2, "min": 1.1, "max": 1.3}, 1.0) == "NO"
    assert report.verdict({"median": 1.59, "min": 1.45, "max": 1.64}, 2.0, at_least=True) == "NO"
    assert report.verdict({"median": 2.1, "min": 1.9, "max": 2.2}, 2.0, at_least=True) == "yes at the median (worst round 1.9)"


def test_without_singles_only_the_fused_graph_is_measured(tiny_engine, tmp_path):
    """singles=False (precision_bench --set nine: its singles cost as much as the ensemble again): no single,
    sum or naive configuration is opened, timed or sized, and the report still renders."""
    from clipfuse.bench.report import format_table

    folder = tmp_path / "e"
    shutil.copytree(tiny_engine, folder)
    r = run.run_bench(folder, batches=(1,), runs=1, warmup=0, out=tmp_path / "b", torch=False, memory=True,
                      profile=False, singles=False, memory_infers=1)
    assert r["order"] == ["fused"] and r["singles_cache_reused"] is None
    assert set(r["memory"]) == {"fused"} and "fused_over_sum" not in r["targets"]
    assert not (folder / "singles").exists()
    md = format_table(r)
    assert "| fused (ONNX Runtime) | 1 |" in md and "sum of singles" not in md
