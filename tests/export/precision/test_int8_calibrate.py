"""Tower-by-tower calibration (export/calibrate.py): the same ranges and graph as the whole graph's, one
tower's weights in memory at a time, and one calibration shared by both int8 graphs."""
from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest


@pytest.fixture(scope="module")
def engine(tiny_engine, calib_dir, tmp_path_factory):
    """(manifest, calibration feeds) for a copy of the tiny engine."""
    from clipfuse.export.precision.calibrate import calibration_feeds
    from clipfuse.runtime.manifest import read_manifest

    folder = tmp_path_factory.mktemp("calib") / "tiny"
    shutil.copytree(tiny_engine, folder)
    m = read_manifest(folder)
    return m, calibration_feeds(m, calib_dir, count=32)


def _whole_graph_ranges(path: Path, feeds, tmp: Path):
    """The reference: onnxruntime's calibrator on the whole fused graph at once (what quantize_static does)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from clipfuse.export.precision.calibrate import QUANT_OPS, _reader

    cal = create_calibrator(path, list(QUANT_OPS), augmented_model_path=str(tmp / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax)
    cal.collect_data(_reader(feeds))
    return cal.compute_data()


def test_towers_are_the_backbones_and_share_only_the_input_scaling(engine):
    import onnx

    from clipfuse.export.precision.calibrate import QUANT_OPS, tower_nodes
    from clipfuse.export.precision.fp16 import tower_outputs

    m, _ = engine
    g = onnx.load(str(m.onnx_path)).graph
    outs = tower_outputs(g)
    assert len(outs) == len(m.backbones) >= 2
    sets = [{n.name for n in tower_nodes(g, o)} for o in outs]
    by_name = {n.name: n for n in g.node}
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            shared = sets[i] & sets[j]
            # towers reading the same input may share its scaling, never a weighted op
            assert not any(by_name[s].op_type in QUANT_OPS for s in shared), shared


def test_tower_model_holds_only_its_own_weights(engine):
    import onnx

    from clipfuse.export.precision.calibrate import tower_model
    from clipfuse.export.precision.fp16 import tower_outputs

    m, _ = engine
    full = onnx.load(str(m.onnx_path), load_external_data=False)
    total = sum(t.ByteSize() for t in full.graph.initializer)
    sizes = []
    for out in tower_outputs(full.graph):
        sub = tower_model(full, out, m.folder)
        onnx.checker.check_model(sub)
        assert [o.name for o in sub.graph.output] == [out]
        sizes.append(sum(t.ByteSize() for t in sub.graph.initializer))
    assert all(0 < s < total for s in sizes)
    assert sum(sizes) <= total                      # the heads and controller belong to no tower


def test_tower_by_tower_ranges_equal_the_whole_graphs(engine, tmp_path):
    from clipfuse.export.precision.calibrate import calibrate_ranges

    m, feeds = engine
    whole = _whole_graph_ranges(m.onnx_path, feeds, tmp_path)
    per_tower = calibrate_ranges(m.onnx_path, feeds, "minmax", workdir=tmp_path)
    assert not list(tmp_path.glob(".calib-tower-*"))          # its temporary towers are gone
    assert len(per_tower.data) > 20
    # every tower tensor has the whole graph's range; the whole graph also calibrates the heads (islands)
    assert set(per_tower.data) <= set(whole.data)
    for name, td in per_tower.data.items():
        ref = whole.data[name]
        np.testing.assert_allclose([td.range_value[0], td.range_value[1]],
                                   [ref.range_value[0], ref.range_value[1]], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_qdq_graph_is_the_one_quantize_static_makes_on_the_whole_graph(engine, tmp_path):
    """quantize_int8 (tower-by-tower ranges) against quantize_static calibrating the whole graph itself,
    same settings: the same Q/DQ nodes and the same outputs."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from clipfuse.export.precision.calibrate import _reader
    from clipfuse.export.precision.int8 import float_island_inputs, quantization_plan, quantize_int8
    from clipfuse.export.precision.validate import run_batches
    from clipfuse.runtime.backends.sessions import open_session

    m, feeds = engine
    quantize_int8(m.onnx_path, tmp_path / "ours.onnx", feeds, activations="u8", activation_symmetric=False)
    island, _, to_quantize, _ = quantization_plan(onnx.load(str(m.onnx_path), load_external_data=False))
    quantize_static(str(m.onnx_path), str(tmp_path / "ref.onnx"), _reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True, reduce_range=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=to_quantize, nodes_to_exclude=sorted(island),
                    extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False})
    ref = onnx.load(str(tmp_path / "ref.onnx"))
    float_island_inputs(ref.graph, island)
    onnx.save(ref, str(tmp_path / "ref.onnx"))
    ours = onnx.load(str(tmp_path / "ours.onnx"))
    count = lambda g: collections.Counter(n.op_type for n in g.node)            # noqa: E731
    assert count(ours.graph) == count(ref.graph)
    a = run_batches(open_session(tmp_path / "ours.onnx"), feeds[:2])
    b = run_batches(open_session(tmp_path / "ref.onnx"), feeds[:2])
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_both_graphs_of_an_export_come_from_one_calibration(engine, calib_dir, tmp_path, monkeypatch):
    """export_int8 calibrates once for the cpu and tensorrt graphs (not inside each quantize)."""
    from clipfuse.export.precision import calibrate, int8_export
    m, _ = engine
    folder = tmp_path / "e"
    shutil.copytree(m.folder, folder)
    calls = []
    real = calibrate.calibrate_ranges

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(int8_export, "calibrate_ranges", counting)
    info = int8_export.export_int8(folder, calib_dir, count=32, targets=("cpu", "tensorrt"),
                                   strict=False)
    assert len(calls) == 1 and info["targets"] == ["cpu", "tensorrt"]
    assert info["calibration"]["sha256"] == info["tensorrt"]["calibration"]["sha256"]
    assert (folder / "model.int8.onnx").is_file() and (folder / "model.int8-trt.onnx").is_file()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]      # no temporary left behind


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_collect_a_few_images_at_a_time(engine, tmp_path, monkeypatch, method):
    """entropy and percentile hold every collected run's whole activations until collect_data returns, so they
    are fed HIST_CHUNK images per call (256 images of RN50 + RN101 in one call passed 24 GiB); every image is
    still seen, and the merged histograms give a range for every tower tensor."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    from clipfuse.export.precision import calibrate

    m, feeds = engine
    n = sum(len(next(iter(f.values()))) for f in feeds)
    assert n > calibrate.HIST_CHUNK                            # else one call would hold them all anyway
    calls = []
    real = HistogramCalibrater.collect_data

    def spy(self, reader):
        before = len(calls)
        while (item := reader.get_next()) is not None:
            calls.append(item)
        chunk = calls[before:]
        assert 0 < len(chunk) <= calibrate.HIST_CHUNK
        return real(self, calibrate._reader(chunk))

    monkeypatch.setattr(HistogramCalibrater, "collect_data", spy)
    ranges = calibrate.calibrate_ranges(m.onnx_path, feeds, method, workdir=tmp_path)
    towers = len(calibrate.tower_outputs(onnx.load(str(m.onnx_path), load_external_data=False).graph))
    assert len(calls) == n * towers                             # every image, once per tower
    assert len(ranges.data) > 20
    assert all(np.isfinite(td.range_value).all() and td.range_value[0] <= td.range_value[1]
               for td in ranges.data.values())
