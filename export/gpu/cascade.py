"""A cascade engine on the GPU: stage 1 the first (cheapest) tower alone, every later tower concurrently.

The cascade's order and thresholds are the manifest's (runtime/cascade.py, `clipfuse fit --cascade`). Here:

    stage 1   GraphedEnsemble of tower 1 alone (its CUDA graphs, its bucket)
    then      combine_1 (the stage graph, ONNX Runtime CPU: a tiny MLP) and the threshold: who leaves
    the rest  ONE GraphedEnsemble of towers 2..S, each on its own stream, over the images still undecided
    then      combine_2 .. combine_S on their features in turn, routed by the same rule as the CPU cascade

So every prediction names its stage, and an image answered at stage s got the answer the CPU cascade gives it
(same routing, same combine graphs); only the towers ran elsewhere. Running towers 2..S together costs an image
that would have left at stage 2 the later towers too: on a GPU at batch 1 they overlap (DESIGN.md "The GPU"),
and a stage per tower would pay a graph launch and a host round trip each. `launches` counts graph launches
per part ("stage1", "rest"), `calls` images per stage graph, as runtime/cascade.py does. Never run on a GPU yet.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from clipfuse.core import iospec
from clipfuse.runtime.backends.sessions import open_session, session_options
from clipfuse.runtime.cascade import cascade_block, record_exits
from clipfuse.runtime.manifest import Manifest, confined_path, rebuild_hint
from clipfuse.runtime.routing import confidence

from ..graph.fused import ConstantController, FusedEnsemble
from .graphs import GraphedEnsemble


class _Head:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def sub_ensemble(model: FusedEnsemble, idx) -> FusedEnsemble:
    """The towers idx of `model` (shared, not copied) with their heads, as a FusedEnsemble of their own."""
    norm = [model.normalizers[model.norm_index[k]] for k in idx]
    return FusedEnsemble([model.visuals[k] for k in idx],
                         [_Head(getattr(model, f"head_weight_{k}"), getattr(model, f"head_bias_{k}")) for k in idx],
                         [model.resolutions[model.input_index[k]] for k in idx],
                         [n.mean.flatten().tolist() for n in norm], [n.std.flatten().tolist() for n in norm],
                         ConstantController(len(idx))).eval().to(model.head_weight_0.device)


class GraphedCascade:
    """infer(feed) -> the five outputs + "stage", as CascadeBackend; see the module docstring."""

    def __init__(self, manifest: Manifest, model: FusedEnsemble, threads: int | None = None, **graph_options):
        self.manifest, self.block = manifest, cascade_block(manifest)
        self.stages = self.block["stages"]
        self.score = self.block["score"]
        self.limits = [np.inf if v is None else float(v) for v in self.block["thresholds"]]
        S = len(self.stages)
        self.first = GraphedEnsemble(sub_ensemble(model, [0]), **graph_options)
        self.rest = GraphedEnsemble(sub_ensemble(model, list(range(1, S))), **graph_options) if S > 1 else None
        so = session_options(threads=threads)
        self.combine = [open_session(confined_path(manifest.folder, st["combine"], f"cascade.stages[{s}].combine"), so,
                                     hint=f"rebuild it: {rebuild_hint(manifest)}") for s, st in enumerate(self.stages)]
        self.launches: Counter = Counter()
        self.calls: Counter = Counter()

    def _combine(self, s, feats, zs):
        X, Z = np.concatenate(feats, axis=1), np.stack(zs, axis=1)
        logits, probs, t = self.combine[s - 1].run(list(iospec.COMBINE_OUTPUTS),
                                                   {iospec.FEATURES: X, iospec.BACKBONE_LOGITS: Z})
        self.calls[f"combine_{s}"] += len(X)
        return X, Z, logits, probs, t

    def infer(self, feed: dict) -> dict:
        S, C = len(self.stages), len(self.manifest.classes)
        N = next(iter(feed.values())).shape[0]
        dims = [int(st["embed_dim"]) for st in self.stages]
        out = {iospec.LOGITS: np.full((N, C), np.nan, np.float32), iospec.PROBS: np.full((N, C), np.nan, np.float32),
               iospec.TEMPERATURES: np.full((N, S), np.nan, np.float32),
               iospec.BACKBONE_LOGITS: np.full((N, S, C), np.nan, np.float32),
               iospec.FEATURES: np.full((N, sum(dims)), np.nan, np.float32)}
        stage = np.zeros(N, np.int64)
        rows = np.arange(N)
        one = self.first.infer([feed[self.stages[0]["input"]]])
        self.launches["stage1"] += 1
        self.calls["tower_1"] += N
        feats, zs = [one[iospec.FEATURES]], [one[iospec.BACKBONE_LOGITS][:, 0]]
        later = None
        for s in range(1, S + 1):
            if s > 1:
                if later is None:             # towers 2..S at once, concurrently, for the undecided rows only
                    later = self.rest.infer([feed[iospec.input_name(r)][rows] for r in self.rest.model.resolutions])
                    self.launches["rest"] += 1
                    lo = np.cumsum([0] + dims[1:])
                    cached = [(later[iospec.FEATURES][:, lo[i]:lo[i + 1]], later[iospec.BACKBONE_LOGITS][:, i])
                              for i in range(S - 1)]
                f, z = cached[s - 2]
                feats.append(f)
                zs.append(z)
                self.calls[f"tower_{s}"] += len(rows)
            X, Z, logits, probs, t = self._combine(s, feats, zs)
            decided = confidence(logits, self.score) >= self.limits[s - 1] if s < S else np.ones(len(rows), bool)
            rows = record_exits(out, stage, rows, decided, s, sum(dims[:s]), (logits, probs, t, Z, X))
            feats, zs = [a[~decided] for a in feats], [a[~decided] for a in zs]
            if later is not None:
                cached = [(f[~decided], z[~decided]) for f, z in cached]
            if not len(rows):
                break
        out[iospec.STAGE] = stage
        return out
