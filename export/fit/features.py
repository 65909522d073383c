"""Per-backbone image features, computed once and cached on disk.

Fitting a controller, refitting with another k or seed, and later studies of
backbone subsets all need the same thing: each backbone's unit-norm embedding
f_k of each image. They are computed with the fused module's own pieces
(InputNormalize -> visual -> normalize, exactly what the graph does) and
cached, keyed by

    backbone identity  = architecture + sha256 of the image tower's weights
                         + the host preprocessing (size, interpolation) + mean/std
    image identity     = sha256 of the file's bytes

so nothing is ever computed twice. Logits are not cached: z_k = f_k @ W_k.T + b_k
is cheap and depends on the head, which changes between zero-shot and probes.

Cache layout: <root>/<backbone key>/shard-<hash>.safetensors, each shard a
`features` tensor (n, D) whose row keys are in the file's metadata. A shard
that cannot be read or does not match is deleted and recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.runtime.images import iter_batches
from clipfuse.runtime.manifest import sha256_file
from clipfuse.runtime.preprocess import preprocess_spec

from ..graph.engine_folder import check_writable_folder
from ..graph.fused import InputNormalize


def default_cache_dir() -> Path:
    env = os.environ.get("CLIPFUSE_CACHE")
    if env:
        return Path(env).expanduser() / "features"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipfuse" / "features"


def backbone_key(backbone) -> str:
    """Folder name identifying what a backbone computes from a file's bytes."""
    p = backbone.preprocess
    ident = json.dumps([backbone.spec.arch, backbone.weights_sha256, backbone.image_size,
                        p.get("interpolation", "bicubic"), list(p["mean"]), list(p["std"])])
    safe_arch = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone.spec.arch)
    return f"{safe_arch}-{hashlib.sha256(ident.encode()).hexdigest()[:20]}"


@dataclass
class CacheStats:
    hits: int = 0          # (backbone, image) features read from the cache
    computed: int = 0      # (backbone, image) features computed now
    rebuilt_shards: int = 0  # corrupt or mismatched shards deleted

    def line(self) -> str:
        s = f"feature cache: {self.hits} reused, {self.computed} computed"
        return s + (f", {self.rebuilt_shards} corrupt shard(s) discarded" if self.rebuilt_shards else "")


@dataclass
class FeatureCache:
    root: Path | None = None                      # None: default_cache_dir(); False-y path disables
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self.root = Path(self.root) if self.root is not None else default_cache_dir()
        # made and checked here, before features are computed: a cache that cannot be written would
        # otherwise fail after the long part (a file in the way, a read-only folder)
        check_writable_folder(self.root, "feature cache folder (--cache, or $CLIPFUSE_CACHE/features)")

    def _folder(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str, image_keys: list[str], dim: int) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        wanted, found = set(image_keys), {}
        folder = self._folder(key)
        if not folder.is_dir():
            return found
        for shard in sorted(folder.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="np") as f:
                    keys = json.loads((f.metadata() or {})["keys"])
                    if not any(k in wanted for k in keys):
                        continue
                    feats = f.get_tensor("features")
                if feats.shape != (len(keys), dim) or feats.dtype != np.float32:
                    raise ValueError(f"shape {feats.shape} {feats.dtype}, expected ({len(keys)}, {dim}) float32")
                if not np.isfinite(feats).all():
                    raise ValueError("non-finite values")
            except Exception as e:
                log(f"cache shard {shard} is unreadable ({type(e).__name__}: {e}); discarding it")
                shard.unlink(missing_ok=True)
                self.stats.rebuilt_shards += 1
                continue
            for i, k in enumerate(keys):
                if k in wanted:
                    found[k] = feats[i]
        return found

    def store(self, key: str, image_keys: list[str], feats: np.ndarray) -> None:
        from safetensors.numpy import save_file

        if not image_keys:
            return
        folder = self._folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(image_keys).encode()).hexdigest()[:24]
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file({"features": np.ascontiguousarray(feats, dtype=np.float32)}, tmp,
                      metadata={"keys": json.dumps(list(image_keys))})
            os.replace(tmp, folder / f"shard-{name}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class FeatureSet:
    paths: list[Path]                      # images that loaded, in input order
    features: list[np.ndarray]             # per backbone (N, D_k) float32, unit norm
    failures: list                         # runtime.images.ImageFailure for the rest
    digests: dict = field(default_factory=dict)   # {path: sha256 of its bytes} for `paths` (the cache's image key)


class _Tower(torch.nn.Module):
    """uint8 images -> unit-norm embedding: the fused graph's per-backbone path."""

    def __init__(self, backbone):
        super().__init__()

        self.norm = InputNormalize(backbone.preprocess["mean"], backbone.preprocess["std"])
        self.visual = backbone.model.visual if hasattr(backbone.model, "visual") else backbone.model

    def forward(self, x):
        return F.normalize(self.visual(self.norm(x)), dim=-1)


def compute_features(backbones, paths, cache: FeatureCache | None = None, batch_size: int = 32,
                     workers: int | None = None, progress: bool = True) -> FeatureSet:
    """Each backbone's features for each image; cached ones are read, the rest computed in batches."""
    from tqdm import tqdm

    cache = cache or FeatureCache()
    paths = [Path(p) for p in paths]
    if not paths:
        raise ClipfuseError("no images to compute features for")
    digests = {}
    for p in paths:
        try:
            digests[p] = sha256_file(p)
        except OSError:
            digests[p] = None   # unreadable: the loader reports it as a failure below
    per_backbone: list[dict[Path, np.ndarray]] = []
    failures: dict[Path, object] = {}
    for k, b in enumerate(backbones):
        key = backbone_key(b)
        wanted = [digests[p] for p in paths if digests[p] is not None]
        got = cache.lookup(key, wanted, b.embed_dim)
        feats = {p: got[digests[p]] for p in paths if digests[p] in got}
        cache.stats.hits += len(feats)
        missing = [p for p in paths if p not in feats and p not in failures]
        if missing:
            tower = _Tower(b).eval()
            spec = {iospec.input_name(b.image_size): preprocess_spec(b.preprocess)}
            bar = tqdm(total=len(missing), desc=f"features {k + 1}/{len(backbones)} {b.spec}", unit="img",
                       disable=not progress, file=sys.stderr, leave=True)
            new_keys, new_rows = [], []
            for batch in iter_batches(missing, spec, batch_size=batch_size, workers=workers):
                for fail in batch.failures:
                    failures[fail.path] = fail
                if batch.paths:
                    with torch.no_grad():
                        out = tower(torch.from_numpy(next(iter(batch.inputs.values())))).numpy().astype(np.float32)
                    for p, row in zip(batch.paths, out):
                        feats[p] = row
                        new_keys.append(digests[p])
                        new_rows.append(row)
                bar.update(len(batch.paths) + len(batch.failures))
            bar.close()
            cache.stats.computed += len(new_rows)
            if new_rows:
                # one digest may appear for two identical files: store it once
                uniq = dict(zip(new_keys, new_rows))
                cache.store(key, list(uniq), np.stack(list(uniq.values())))
        per_backbone.append(feats)
    ok = [p for p in paths if all(p in f for f in per_backbone)]
    fails = [failures[p] for p in paths if p in failures]
    return FeatureSet(ok, [np.stack([f[p] for p in ok]) if ok else np.zeros((0, b.embed_dim), np.float32)
                           for f, b in zip(per_backbone, backbones)], fails, {p: digests[p] for p in ok})


def head_logits(features: np.ndarray, head) -> np.ndarray:
    """z = f @ W.T + b, as the graph computes it (float32)."""
    return (features.astype(np.float32) @ head.weight.numpy().T + head.bias.numpy()).astype(np.float32)
