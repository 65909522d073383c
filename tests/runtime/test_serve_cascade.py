"""`clipfuse serve` on a cascade engine: a real Triton server (pytriton) routes each image through the stages
it needs, and the client's predictions (labels, probabilities, stage) equal the local cascade's."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, TINY_CLASSES, TWO_TEMPLATES
from standins import served_predictions

import clipfuse
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.serving.server import check_serving_environment

try:
    check_serving_environment()
except ClipfuseError as e:      # as tests/runtime/test_serve.py: not installed, or numpy 2
    pytest.skip(f"serving needs the `serve` extra with numpy<2: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def cascade_engine(tmp_path_factory, photo_paths):
    """A two-stage cascade exported directly (no fit): stage 1 = backbone 1 at temperature 1, stage 2 = LOG-AVG;
    the stage-1 threshold is set between the photos' confidences so some leave early and some do not."""
    import torch

    from clipfuse.export.graph.engine import export_engine
    from clipfuse.export.graph.fused import ConstantController, StaticController

    out = tmp_path_factory.mktemp("serve-cascade") / "cascade"
    block = {"order": TINY[:2], "score": "max-prob", "thresholds": [None], "expected_exit_rates": [0.0, 1.0]}
    export_engine(TINY[:2], TINY_CLASSES, out, templates=TWO_TEMPLATES, controller=ConstantController(2),
                  cascade={"controllers": [StaticController(torch.ones(1)), ConstantController(2)], "block": block})
    with clipfuse.load(out, cascade=False) as p:    # stage 1's confidence = backbone 1's max prob
        z = [x for x in p.predict_arrays(_feed(p, photo_paths))["backbone_logits"][:, 0]]
    conf = np.sort([np.exp(v - v.max()).max() / np.exp(v - v.max()).sum() for v in z])
    import json

    from clipfuse.export.graph.engine_folder import write_manifest_atomic

    data = json.loads((out / "manifest.json").read_text())
    data["cascade"]["thresholds"] = [float(conf[len(conf) // 2 - 1] + conf[len(conf) // 2]) / 2]
    write_manifest_atomic(out, data)            # clipfuse's writer binds the new thresholds (bindings.cascade)
    return out


def _feed(p, paths):
    from clipfuse.runtime.images import iter_batches

    return next(iter(iter_batches(paths, p.manifest.preprocess_specs(), batch_size=len(paths)))).inputs


def test_served_cascade_equals_local(cascade_engine, photo_paths):
    with clipfuse.load(cascade_engine) as local:
        want = local.predict(photo_paths)
    assert {p.stage for p in want} == {1, 2}, "the photos must leave at both stages"
    got = served_predictions(cascade_engine, photo_paths)
    assert [p.stage for p in got] == [p.stage for p in want]
    assert [p.labels for p in got] == [p.labels for p in want]
    np.testing.assert_allclose([p.probs for p in got], [p.probs for p in want], rtol=1e-5, atol=1e-7)
    assert [sorted(p.temperatures) for p in got] == [sorted(p.temperatures) for p in want]
