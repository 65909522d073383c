"""export/graph/rebuild.py: an engine's towers are rebuilt only when they are the network its graph was exported
from (weights hash, size), and its heads only when they fit its classes; each refusal is one line that says what
it means for the caller (the torch backends, the bench's singles)."""
from __future__ import annotations

import copy

import pytest

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph.rebuild import export_single, rebuild_fused
from clipfuse.runtime.manifest import read_manifest


def _tampered(engine, change):
    m = read_manifest(engine)
    m.data = copy.deepcopy(m.data)
    change(m.data)
    return m


def test_a_tower_with_other_weights_is_refused_by_the_backend_and_by_the_bench(tiny_engine, tmp_path):
    def other_weights(d):
        d["backbones"][1]["weights_sha256"] = "0" * 64
    m = _tampered(tiny_engine, other_weights)
    with pytest.raises(ClipfuseError, match=r"backbone 1 \(.*\) rebuilt here has image-tower weights .* not the weights "
                                            r"the graph was exported from .*so the torch backend cannot reproduce it"):
        rebuild_fused(m)
    with pytest.raises(ClipfuseError, match="so the single-backbone comparison would not measure the same network"):
        export_single(m, 1, tmp_path / "single")
    assert not (tmp_path / "single").exists()
    export_single(m, 0, tmp_path / "single0")            # tower 0 is still the exported one
    assert read_manifest(tmp_path / "single0").backbone_names == [read_manifest(tiny_engine).backbone_names[0]]


def test_heads_of_another_engine_are_refused(tiny_engine):
    m = _tampered(tiny_engine, lambda d: d["classes"].append("extra"))
    with pytest.raises(ClipfuseError, match=r"head 0 in heads.safetensors has shape \(\d+, \d+\), the manifest needs "
                                            r"\(\d+ classes, D=\d+\): the heads file comes from another engine"):
        rebuild_fused(m)

