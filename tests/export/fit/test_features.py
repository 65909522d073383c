"""Feature computation and its on-disk cache: same numbers as the graph, never computed twice."""
from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY

from clipfuse.export.fit.features import FeatureCache, backbone_key, compute_features
from clipfuse.export.graph.backbones import load_backbone
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.preprocess import preprocess_image


@pytest.fixture(scope="module")
def tiny_backbones():
    return [load_backbone(b) for b in TINY]


def test_features_equal_the_graphs(tiny_engine, tiny_backbones, photo_paths, tmp_path):
    fs = compute_features(tiny_backbones, photo_paths, FeatureCache(tmp_path), batch_size=3, progress=False)
    assert fs.paths == list(photo_paths) and not fs.failures
    from PIL import Image

    m = read_manifest(tiny_engine)
    feed = {n: np.stack([preprocess_image(Image.open(p), s) for p in photo_paths]) for n, s in m.preprocess_specs().items()}
    graph = ort.InferenceSession(str(m.onnx_path), providers=["CPUExecutionProvider"]).run(["features"], feed)[0]
    np.testing.assert_allclose(np.concatenate(fs.features, axis=1), graph, rtol=1e-4, atol=1e-5)


def test_cache_is_reused_and_keyed_by_content(tiny_backbones, photo_paths, tmp_path):
    cache_dir = tmp_path / "cache"
    first = FeatureCache(cache_dir)
    a = compute_features(tiny_backbones, photo_paths[:2], first, progress=False)
    assert (first.stats.hits, first.stats.computed) == (0, 2 * 3)
    # a copy of a file under another name is the same image: reused, not recomputed
    copy = tmp_path / "renamed.jpg"
    shutil.copy(photo_paths[0], copy)
    second = FeatureCache(cache_dir)
    b = compute_features(tiny_backbones, [copy, *photo_paths], second, progress=False)
    assert second.stats.hits == 3 * 3 and second.stats.computed == 2 * 3
    for k in range(3):
        np.testing.assert_array_equal(b.features[k][0], a.features[k][0])
        np.testing.assert_array_equal(b.features[k][1:3], a.features[k])
    # another backbone identity (other seed) has its own entry
    other = load_backbone("clipfuse-test-vit:random:99")
    assert backbone_key(other) != backbone_key(tiny_backbones[0])


def test_corrupt_cache_shard_is_rebuilt_not_trusted(tiny_backbones, photo_paths, tmp_path):
    cache_dir = tmp_path / "cache"
    ref = compute_features(tiny_backbones[:1], photo_paths, FeatureCache(cache_dir), progress=False)
    shard = next((cache_dir / backbone_key(tiny_backbones[0])).glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:40])          # truncated
    cache = FeatureCache(cache_dir)
    again = compute_features(tiny_backbones[:1], photo_paths, cache, progress=False)
    assert cache.stats.rebuilt_shards == 1 and cache.stats.computed == len(photo_paths)
    np.testing.assert_array_equal(again.features[0], ref.features[0])


def test_unreadable_images_are_listed_not_dropped(tiny_backbones, photo_paths, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    fs = compute_features(tiny_backbones[:2], [photo_paths[0], bad, photo_paths[1]], FeatureCache(tmp_path / "c"), progress=False)
    assert fs.paths == [photo_paths[0], photo_paths[1]]
    assert [f.path for f in fs.failures] == [bad] and "not an image" in fs.failures[0].reason
    assert all(f.shape[0] == 2 for f in fs.features)
