"""The bench's parts that need no full run: worker processes import the installed clipfuse from any
working folder, the overhead said in words, and the one "busy CPU" formula."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

import clipfuse
from clipfuse.bench import report, worker
from clipfuse.bench.profile import describe_nodes
from clipfuse.runtime.cpu_load import busy_cpu_seconds

INSTALLED = str(Path(clipfuse.__file__).resolve().parent)


@pytest.fixture(params=["package", "namespace"])
def decoy_cwd(request, tmp_path, monkeypatch):
    """A working folder whose clipfuse/ would shadow the installed package: a package with nothing
    in it, or (as when `cd` to the folder holding the clone) a folder without __init__.py."""
    (tmp_path / "clipfuse").mkdir()
    if request.param == "package":
        (tmp_path / "clipfuse" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_plain_python_c_is_shadowed_by_the_decoy(decoy_cwd):
    """The failure this guards against, shown: plain `python -c` breaks in this folder."""
    p = subprocess.run([sys.executable, "-c", "import clipfuse; print(clipfuse.__version__)"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "__version__" in p.stderr


def test_child_command_imports_the_installed_package(decoy_cwd):
    p = subprocess.run(worker.child_command("clipfuse.cli.main", "--version"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert clipfuse.__version__ in p.stdout


def test_timing_worker_and_memory_probe_run_from_a_decoy_folder(decoy_cwd, tiny_engine):
    w = worker.TimingWorker(tiny_engine, ["fused"], [1])
    try:
        assert w.ready["clipfuse"] == INSTALLED
        assert w.time("fused", 1) > 0
    finally:
        w.close()
    assert w.proc.returncode == 0
    mem = worker.measure_memory(tiny_engine, "fused", 1, infers=1)
    assert mem["config"] == "fused" and mem["peak_rss_bytes"] > 0


def test_worker_entry_point_rejects_bad_arguments():
    p = subprocess.run(worker.child_command("clipfuse.bench.worker", "nonsense"), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "usage" in p.stderr


def test_overhead_is_said_in_words_not_node_names():
    assert describe_nodes(["MatMul", "Add", "MatMul", "Softplus", "Relu", "Add", "Mul"]) == \
        "7 nodes (Add x2, MatMul x2, Mul, Relu, Softplus)"
    assert describe_nodes(["Softmax"]) == "1 node (Softmax)"
    assert describe_nodes([]) == "no nodes (folded away)"
    ov = {"downstream_nodes": ["node_linear_54", "n10", "n3"], "downstream_ops": ["Gemm", "Softplus", "Mul"]}
    words = report.overhead_in_words(ov)
    assert words == "controller + combination: 3 nodes (Gemm, Mul, Softplus)"
    assert not any(n in words for n in ov["downstream_nodes"])
    # a results file from before op types were recorded still reads, without the raw names
    assert report.overhead_in_words({"downstream_nodes": ["n1", "n2"]}) == "controller + combination: 2 nodes"


def test_busy_cpu_is_work_not_waiting_stealing_or_guests_counted_twice():
    T = namedtuple("T", "user nice system idle iowait irq softirq steal guest guest_nice")
    t = T(user=10.0, nice=1.0, system=4.0, idle=100.0, iowait=7.0, irq=0.5, softirq=0.5, steal=3.0, guest=2.0,
          guest_nice=1.0)
    assert busy_cpu_seconds(t) == pytest.approx(16.0)
    # the formula the bench used before counted steal and guest time as other processes' work
    assert busy_cpu_seconds(t) != pytest.approx(sum(t) - t.idle - t.iowait)
    Mac = namedtuple("Mac", "user nice system idle")        # platforms without irq/softirq fields
    assert busy_cpu_seconds(Mac(1.0, 0.0, 2.0, 5.0)) == pytest.approx(3.0)


def test_openvino_can_run_a_subset_of_the_precisions():
    """Every configuration's worker is alive at once, and the nine's cannot all be on 24 GB: the bench can
    put only some precisions on OpenVINO."""
    from clipfuse.bench.configs import precision_configs

    p = ("fp32", "fp16", "int8")
    assert precision_configs(p) == ["fused-fp16", "fused-int8"]
    assert precision_configs(p, True) == ["fused-fp16", "fused-int8", "openvino", "openvino-fp16", "openvino-int8"]
    assert precision_configs(p, ("int8",)) == ["fused-fp16", "fused-int8", "openvino-int8"]
    assert precision_configs(("fp32",), ("int8",)) == []


def test_arena_off_reaches_the_sessions(tiny_engine):
    """bench(arena=False) turns ONNX Runtime's CPU arena off in the fused graphs' sessions, and the report says so."""
    from clipfuse.bench.configs import open_config
    from clipfuse.bench.report import format_table  # noqa: F401  (the report module imports cleanly)
    from clipfuse.runtime.backends.sessions import session_options
    from clipfuse.runtime.manifest import read_manifest

    assert session_options().enable_cpu_mem_arena and not session_options(arena=False).enable_cpu_mem_arena
    m = read_manifest(tiny_engine)
    for arena in (True, False):
        b = open_config(m, "fused", arena=arena)
        try:
            assert b.session.get_session_options().enable_cpu_mem_arena is arena
        finally:
            b.close()


def test_the_two_full_graph_timings_are_explained_side_by_side():
    """bench.md gave the full graph at batch 1 as 739.5 ms (Latency p50) and 222.55 ms (Cascade mean)
    with nothing saying why; the Cascade section now names both, how each was measured, and which ratio to read."""
    result = {"latency": {"fused": {"1": {"latency_ms": {"p50": 739.5}}}},
              "cascade": {"latency": {"1": {"full": {"mean_ms": 222.55}}}, "load": {"other_processes_cores": 1.4}}}
    text = "\n".join(report.two_full_graph_timings(result))
    assert "739.5 ms (Latency, p50) and 222.55 ms (Cascade, mean), 3.32x apart" in text
    assert "other processes took 1.40 cores meanwhile" in text and "cascade / full" in text
    assert report.two_full_graph_timings({"latency": {}, "cascade": {"latency": {"8": {}}}}) == []
