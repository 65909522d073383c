"""The GPU path's planning, on CPU: buckets and padding, the stream plan, the fp16 island list, option checks."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.gpu import plan
from clipfuse.export.graph.islands import FP32_OPS


@pytest.mark.parametrize("max_batch, expect", [(1, (1,)), (2, (1, 2)), (8, (1, 2, 4, 8)), (6, (1, 2, 4, 6)),
                                               (32, (1, 2, 4, 8, 16, 32))])
def test_buckets_double_up_to_the_largest_batch(max_batch, expect):
    assert plan.buckets(max_batch) == expect


@pytest.mark.parametrize("n, expect", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_a_batch_runs_in_the_smallest_bucket_that_holds_it(n, expect):
    assert plan.bucket_for(n, plan.buckets(8)) == expect


def test_a_batch_above_the_largest_bucket_is_one_clear_line():
    with pytest.raises(ClipfuseError, match=r"batch of 9 images is above the largest CUDA-graph bucket \(8\)"):
        plan.bucket_for(9, plan.buckets(8))
    with pytest.raises(ClipfuseError, match="max batch must be a positive integer"):
        plan.buckets(0)


def test_padding_repeats_the_last_image_and_unpad_drops_it():
    images = np.arange(3 * 3 * 2 * 2, dtype=np.uint8).reshape(3, 3, 2, 2)
    padded = plan.pad_to(images, 4)
    assert padded.shape == (4, 3, 2, 2)
    assert (padded[:3] == images).all() and (padded[3] == images[2]).all()
    assert plan.pad_to(images, 3) is images
    outs = plan.unpad({"logits": np.zeros((4, 5)), "features": np.zeros((4, 7))}, 3)
    assert {k: v.shape for k, v in outs.items()} == {"logits": (3, 5), "features": (3, 7)}


def test_concurrent_plan_puts_each_tower_on_its_own_stream_and_joins_before_the_controller():
    p = plan.stream_plan(3, concurrent=True)
    assert p.tower_stream == (1, 2, 3) and p.side_streams == (1, 2, 3)
    steps = p.steps()
    forks = [i for i, s in enumerate(steps) if s[0] == "fork"]
    towers = [i for i, s in enumerate(steps) if s[0] == "tower"]
    joins = [i for i, s in enumerate(steps) if s[0] == "join"]
    controller = steps.index(("controller", plan.MAIN))
    assert len(forks) == len(joins) == 3
    assert max(forks) < min(towers) and max(towers) < min(joins) and max(joins) < controller
    assert [s[2] for s in steps if s[0] == "tower"] == [1, 2, 3]
    # the heads, controller and combination run on the main stream after the join
    assert steps[-3:] == [("heads", 0), ("controller", 0), ("combination", 0)]


@pytest.mark.parametrize("k, concurrent", [(3, False), (1, True)])
def test_serial_plan_and_a_single_tower_stay_on_the_main_stream(k, concurrent):
    p = plan.stream_plan(k, concurrent=concurrent)
    assert p.tower_stream == (plan.MAIN,) * k and p.side_streams == ()
    assert not [s for s in p.steps() if s[0] in ("fork", "join")]


def test_fp16_islands_equal_model_fp16_onnx(fp16_engine):
    """The ops model.fp16.onnx kept fp32 are the ops the torch-cuda fp16 path keeps fp32 (one list, two users)."""
    from clipfuse.runtime.manifest import read_manifest

    islands = read_manifest(fp16_engine).data["precisions"]["fp16"]["fp32_islands"]
    assert set(islands["ops"]) == set(FP32_OPS)
    assert plan.torch_fp32_ops() == ("layer_norm", "softmax", "mean")
    # and downstream of the feature norm, the fp16 graph kept the heads (Gemm/MatMul) and the softmax fp32
    assert islands["feature_norm_and_downstream"]


@pytest.mark.parametrize("kw, expect", [
    (dict(device="cpu", precision="fp16"), "fp16 needs a CUDA GPU; PyTorch on the CPU runs fp32 only"),
    (dict(device="cuda", precision="int8"), "runs fp32 or fp16, not 'int8'"),
    (dict(device="tpu", precision="fp32"), "unknown device 'tpu'"),
    (dict(device="cuda", precision="fp32", max_batch=0), "max batch must be a positive integer"),
])
def test_bad_options_are_one_line(kw, expect):
    kw = dict(dict(max_batch=8, compile=False), **kw)
    with pytest.raises(ClipfuseError, match=expect.replace("(", r"\(")):
        plan.check_options(**kw)


def test_compile_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "clipfuse-no-such-compiler")
    with pytest.raises(ClipfuseError, match="--compile cannot work here: inductor needs a C.. compiler"):
        plan.check_options("cpu", "fp32", 8, compile=True)
    real = plan.importlib.util.find_spec
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    assert "needs triton" in plan.compiler_missing("cuda")


@pytest.mark.parametrize("concurrent", [True, False])
def test_the_forward_follows_the_stream_plan(tiny_engine, concurrent):
    """The runner's forward performs the plan's steps in the plan's order (fork, towers on their streams, join,
    then heads, controller, combination on the main stream): the plan is what runs, not a description."""
    from clipfuse.export.gpu.graphs import GraphedEnsemble
    from clipfuse.export.graph.rebuild import rebuild_fused
    from clipfuse.runtime.manifest import read_manifest

    runner = GraphedEnsemble(rebuild_fused(read_manifest(tiny_engine)), device="cpu", max_batch=2,
                             concurrent=concurrent)
    runner.run_bucket(2)
    assert runner.trace == plan.stream_plan(3, concurrent).steps()
    assert runner.trace.index(("controller", plan.MAIN)) > max(i for i, s in enumerate(runner.trace) if s[0] == "tower")
