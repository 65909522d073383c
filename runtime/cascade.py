"""Run a cascade engine: each image pays for exactly the stages it reaches.

A cascade engine (`clipfuse fit --cascade`) holds, beside model.onnx (the full ensemble, backbones
in stage order), one graph per stage under stages/ (clipfuse.core.iospec): tower_<k>.onnx (backbone k:
image -> features_k, logits_k) and combine_<s>.onnx (the controller fitted for the first s
backbones: features, backbone_logits -> logits, probs, temperatures). The manifest's `cascade`
block gives the order, the confidence score and the S - 1 thresholds (null = never leave there).

    with CascadeBackend(manifest) as backend:           # a Backend: open, infer, close
        out = backend.infer(feed)    # the five outputs + "stage" (N,) int64, 1-based
    CascadeBackend(manifest, precision="int8")          # the int8 stages and their own thresholds

int8: `clipfuse export ENGINE --precision int8` cuts stages/tower_<k>.int8.onnx out of model.int8.onnx and
certifies new thresholds on their outputs (export/precision/int8_stages.py), recorded in the manifest's
precisions["int8"]["cascade"]; the combine graphs are shared. fp16 has no stages (refused in one line).

For a batch: every image runs tower_1 and combine_1; those whose confidence (the same
clipfuse.runtime.routing functions the fit chose the thresholds with) reaches threshold 1 leave
with stage 1's answer; the rest, and only they, are gathered into a smaller batch for tower_2 and
combine_2, and so on. The answer of an image never depends on the others in its batch (routing
is row by row; a test checks that a mixed batch gives exactly what each image alone gives).
Outputs for backbones an image never reached are NaN (temperatures, backbone_logits, features):
not run, so not known. `calls` counts the images each stage graph ran on.

One graph per stage with the routing here, not one graph with an ONNX `If` per stage: an `If` takes
one branch for a whole batch, TensorRT cannot skip work per sample inside it, and Triton's dynamic
batcher mixes requests, so per-sample exit must happen after batching (docs/cascade.md). The price: one
ONNX Runtime call per stage reached, plus gathering rows (`clipfuse bench`: "cascade overhead").
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError, EngineMismatch
from clipfuse.core.iospec import tolerance
from clipfuse.core.log import log

from .agreement import compare_outputs
from .backends.base import Backend
from .backends.registry import make_backend
from .backends.sessions import check_onnxruntime_can_run, open_session, session_options
from .manifest import Manifest, confined_path, rebuild_hint
from .manifest_checks import check_cascade_block, check_int8_cascade
from .precisions import precision_onnx_path, with_precision
from .routing import confidence, route


def is_cascade(manifest: Manifest) -> bool:
    """Whether the engine holds cascade stage graphs."""
    return isinstance(manifest.data.get("cascade"), dict)


def cascade_block(manifest: Manifest) -> dict:
    """The manifest's cascade entry, checked (runtime/manifest_checks.py): stages, order, score, thresholds,
    and that none of them was edited since clipfuse wrote them."""
    where = f"engine {str(manifest.folder)!r}"
    if not is_cascade(manifest):
        raise ClipfuseError(f"{where} is not a cascade engine (no 'cascade' in its manifest); "
                            "make one with `clipfuse fit ... --cascade`")
    return check_cascade_block(manifest.data, manifest.backbone_names, where, _REFIT)


_REFIT = "rebuild the cascade with `clipfuse fit ... --cascade`"


class CascadeBackend(Backend):
    """The cascade's stage graphs on ONNX Runtime (CPU), routed per image (module docstring)."""

    name = "cascade-onnxruntime"

    def __init__(self, manifest: Manifest, threads: int | None = None, thresholds=None, precision: str | None = None):
        super().__init__(manifest)
        self.block = cascade_block(manifest)
        self.threads = threads
        self.score = self.block["score"]
        self.precision = precision or "fp32"
        # int8: towers cut out of model.int8.onnx and thresholds certified on their outputs (export/precision/int8_stages.py)
        stages = int8_stages(manifest) if self.precision == "int8" else None
        if self.precision not in ("fp32", "int8"):
            check_cascade_precision(manifest, True, self.precision)        # raises: fp16 has no stages
        self.towers = stages["towers"] if stages else [st["tower"] for st in self.block["stages"]]
        # thresholds may be overridden (the bench's curve over thresholds); None = the manifest's
        default = stages["thresholds"] if stages else self.block["thresholds"]
        self.thresholds = list(default if thresholds is None else thresholds)
        route(np.zeros((1, len(self.block["stages"]))), self.thresholds)     # checks count and values
        self._limits = [np.inf if v is None else float(v) for v in self.thresholds]
        self.sessions: dict = {}
        self.calls: Counter = Counter()          # images run per stage graph ("tower_2": 5, ...)

    @property
    def providers(self) -> list[str]:
        return ["CPUExecutionProvider"]

    def describe(self) -> str:
        return (f"{self.name} ({len(self.block['stages'])} {'int8 ' if self.precision == 'int8' else ''}stages, "
                f"{self.score} thresholds {self.thresholds})")

    def open(self) -> "CascadeBackend":
        check_onnxruntime_can_run(self.manifest)
        so = session_options(threads=self.threads)
        where = f"engine {str(self.manifest.folder)!r}"
        for s, st in enumerate(self.block["stages"], 1):
            files = {"tower": (self.towers[s - 1], f"precisions.int8.cascade.towers[{s - 1}]" if self.precision == "int8"
                               else f"cascade.stages[{s - 1}].tower"),
                     "combine": (st["combine"], f"cascade.stages[{s - 1}].combine")}
            for kind, (name, label) in files.items():
                path = confined_path(self.manifest.folder, name, label)
                self.sessions[f"{kind}_{s}"] = open_session(path, so, hint=f"rebuild it: {rebuild_hint(self.manifest)}")
            check_stage_io(self.sessions, s, self.block["stages"], self.manifest, where)
        self.is_open = True
        return self

    def _infer(self, feed: dict) -> dict:
        stages = self.block["stages"]
        S, C = len(stages), len(self.manifest.classes)
        N = next(iter(feed.values())).shape[0]
        dims = [int(st["embed_dim"]) for st in stages]
        out = {iospec.LOGITS: np.full((N, C), np.nan, np.float32), iospec.PROBS: np.full((N, C), np.nan, np.float32),
               iospec.TEMPERATURES: np.full((N, S), np.nan, np.float32),
               iospec.BACKBONE_LOGITS: np.full((N, S, C), np.nan, np.float32),
               iospec.FEATURES: np.full((N, sum(dims)), np.nan, np.float32)}
        stage = np.zeros(N, np.int64)            # 1-based stage that answered each image
        rows = np.arange(N)                      # images still undecided, into the batch
        feats, zs = [], []                       # per stage reached: (n_s, D_k), (n_s, C), rows of `rows`
        for s in range(1, S + 1):
            image = feed[stages[s - 1]["input"]][rows]
            f, z = self.sessions[f"tower_{s}"].run([iospec.tower_features(s), iospec.tower_logits(s)],
                                                   {stages[s - 1]["input"]: image})
            self.calls[f"tower_{s}"] += len(rows)
            feats.append(f)
            zs.append(z)
            X, Z = np.concatenate(feats, axis=1), np.stack(zs, axis=1)
            logits, probs, t = self.sessions[f"combine_{s}"].run(list(iospec.COMBINE_OUTPUTS),
                                                                 {iospec.FEATURES: X, iospec.BACKBONE_LOGITS: Z})
            self.calls[f"combine_{s}"] += len(rows)
            if s < S:       # routing.route's rule, stage by stage: leave at the first s with conf >= t_s
                decided = confidence(logits, self.score) >= self._limits[s - 1]
            else:
                decided = np.ones(len(rows), bool)
            rows = record_exits(out, stage, rows, decided, s, sum(dims[:s]), (logits, probs, t, Z, X))
            feats, zs = [a[~decided] for a in feats], [a[~decided] for a in zs]
            if not len(rows):
                break
        out[iospec.STAGE] = stage
        return out

    def close(self) -> None:
        self.sessions = {}
        super().close()


def _io(tensors) -> dict:
    return {t.name: list(t.shape) for t in tensors}


def check_stage_io(sessions: dict, s: int, stages: list[dict], manifest: Manifest, where: str) -> None:
    """Stage s's tower and combine graphs take and give what stage s needs (names, and every fixed axis):
    both are hashed, so only this check tells stage graphs swapped between stages (or a tower of another
    engine) before a run fails inside ONNX Runtime."""
    C = len(manifest.classes)
    st, dims = stages[s - 1], [st["embed_dim"] for st in stages]
    side = {i["name"]: i["shape"][2] for i in manifest.inputs}[st["input"]]
    want = {"tower": ({st["input"]: [None, 3, side, side]},
                      {iospec.tower_features(s): [None, dims[s - 1]], iospec.tower_logits(s): [None, C]}),
            "combine": ({iospec.FEATURES: [None, sum(dims[:s])], iospec.BACKBONE_LOGITS: [None, s, C]},
                        {iospec.LOGITS: [None, C], iospec.PROBS: [None, C], iospec.TEMPERATURES: [None, s]})}
    for kind, (ins, outs) in want.items():
        sess = sessions[f"{kind}_{s}"]
        for what, expected, got in (("inputs", ins, _io(sess.get_inputs())), ("outputs", outs, _io(sess.get_outputs()))):
            names_ok = set(got) == set(expected) if what == "inputs" else set(expected) <= set(got)
            bad = names_ok and next((n for n, shape in expected.items() if len(got[n]) != len(shape) or any(
                isinstance(g, int) and w is not None and g != w for g, w in zip(got[n], shape))), None)
            if not names_ok or bad:
                shown = {n: [d if isinstance(d, int) else "N" for d in v] for n, v in got.items()}
                need = {n: ["N" if d is None else d for d in v] for n, v in expected.items()}
                raise EngineMismatch(f"{where}: the {kind} graph of stage {s} has {what} {shown}, stage {s} needs "
                                    f"{need} (stage graphs swapped or replaced); {_REFIT}")


def record_exits(out: dict, stage: np.ndarray, rows: np.ndarray, decided: np.ndarray, s: int, width: int,
                 stage_outputs) -> np.ndarray:
    """Write the answers of the images that leave at stage s (1-based) into `out` (the five outputs, NaN where
    a later stage's part was never computed), mark their stage, and return the rows still undecided.
    stage_outputs: (logits, probs, temperatures, backbone logits, features) of stage s for `rows`; width: the
    features' width up to stage s."""
    logits, probs, t, Z, X = stage_outputs
    leave = rows[decided]
    stage[leave] = s
    out[iospec.LOGITS][leave], out[iospec.PROBS][leave] = logits[decided], probs[decided]
    out[iospec.TEMPERATURES][leave, :s] = t[decided]
    out[iospec.BACKBONE_LOGITS][leave, :s] = Z[decided]
    out[iospec.FEATURES][leave, :width] = X[decided]
    return rows[~decided]


def int8_stages(manifest: Manifest) -> dict:
    """The manifest's precisions["int8"]["cascade"] record, checked: the int8 tower files and the thresholds
    certified on them (export/precision/int8_stages.py). One line naming the reason when there is none."""

    precision_onnx_path(manifest, "int8")             # the int8 graph they were cut from exists and is current
    return check_int8_cascade(manifest.data, len(manifest.backbones), f"engine {str(manifest.folder)!r}", _REFIT,
                              f"`clipfuse export {manifest.folder} --precision int8 --calibration DIR`")


def run_stage_graphs(sessions: dict, feed: dict, inputs: list[str], S: int) -> list[dict]:
    """Every image through every stage: -> S dicts of the five iospec outputs (stage s: first s backbones).

    sessions: {"tower_k" / "combine_s": ONNX Runtime session or a callable with the same run()}.
    inputs: the graph input (image_<R>) of each backbone, in stage order."""
    feats, zs, out = [], [], []
    for s in range(1, S + 1):
        f, z = sessions[f"tower_{s}"].run([iospec.tower_features(s), iospec.tower_logits(s)],
                                          {inputs[s - 1]: feed[inputs[s - 1]]})
        feats.append(f)
        zs.append(z)
        X, Z = np.concatenate(feats, axis=1), np.stack(zs, axis=1)
        logits, probs, t = sessions[f"combine_{s}"].run(list(iospec.COMBINE_OUTPUTS),
                                                         {iospec.FEATURES: X, iospec.BACKBONE_LOGITS: Z})
        out.append({iospec.LOGITS: logits, iospec.PROBS: probs, iospec.TEMPERATURES: t,
                    iospec.BACKBONE_LOGITS: Z, iospec.FEATURES: X})
    return out


def check_cascade_precision(manifest: Manifest, cascade: bool | None, precision: str | None) -> None:
    """A cascade runs fp32 stages, or int8 stages when the int8 export certified them; fp16 has none. One line
    instead of silently serving fp32 stages to a caller who asked for another precision."""
    if precision in (None, "fp32") or cascade is False or not is_cascade(manifest):
        return
    if precision == "int8":
        int8_stages(manifest)                 # raises, naming why, when there are none
        return
    raise ClipfuseError(f"the cascade stages of engine {str(manifest.folder)!r} are fp32 (int8 ones come with "
                        f"`--precision int8`); precision {precision} runs the full graph only: pass --no-cascade "
                        f"(cascade=False) with --precision {precision}")


def open_cascade(manifest: Manifest, backend: str = "auto", cascade: bool | None = None,
                 precision: str | None = None, **options):
    """An opened CascadeBackend when the engine is a cascade and the caller wants it, else None.

    cascade None (default) or True on a cascade engine: the stage graphs, on ONNX Runtime CPU (the
    backend they were validated on): backend must be "auto" or "onnxruntime". cascade False: None,
    so the caller opens the full graph on any backend. cascade True on an engine without stages:
    one line saying how to make one."""
    if cascade is False:
        return None
    if not is_cascade(manifest):
        if cascade:
            cascade_block(manifest)              # raises: not a cascade engine
        return None
    if backend == "torch-cuda":       # towers as CUDA graphs (clipfuse.export.gpu.cascade), found through the registry
        opened = make_backend(manifest, "torch-cuda", cascade=True, **options).open()
        log(f"backend -> {opened.describe()}")
        return opened
    if backend not in ("auto", "onnxruntime"):
        raise ClipfuseError(f"the cascade of engine {str(manifest.folder)!r} runs its stage graphs on ONNX Runtime "
                            f"(CPU) or torch-cuda; backend {backend!r} runs only the full graph: pass --no-cascade "
                            "(cascade=False)")

    opened = CascadeBackend(manifest, threads=options.get("threads"), precision=precision).open()
    log(f"backend -> {opened.describe()}")
    return opened


def compare_cascade(manifest: Manifest, feeds: list[dict], norms, threads: int | None = None,
                    precision: str | None = None) -> dict:
    """The cascade against the full graph (model.onnx, ONNX Runtime CPU) on the same batches; with precision
    "int8", the int8 stages against model.int8.onnx (the graph they were cut from).

    Where an image leaves early the cascade may answer differently by design: that is reported
    (agreement, stage counts), not failed. Images that reach the last stage have run every tower and
    the shipped controller, so their five outputs must match model.onnx within the fp32 tolerance
    (the one comparator): that is the pass/fail check."""

    precision = precision or "fp32"
    with CascadeBackend(manifest, threads=threads, precision=precision) as cas:
        got = [cas.infer(f) for f in feeds]

    graph = with_precision(manifest, precision)         # fp32: the manifest itself
    with make_backend(graph, "onnxruntime", **({"threads": threads} if threads else {})) as full:
        ref = [full.infer(f) for f in feeds]
    got = {k: np.concatenate([o[k] for o in got]) for k in (*iospec.OUTPUT_NAMES, iospec.STAGE)}
    ref = {k: np.concatenate([o[k] for o in ref]) for k in iospec.OUTPUT_NAMES}
    S = len(manifest.backbones)
    stage = got[iospec.STAGE]
    last = stage == S
    same = got[iospec.LOGITS].argmax(1) == ref[iospec.LOGITS].argmax(1)
    tol = tolerance("fp32")
    dims = [(n, int(b["embed_dim"])) for n, b in zip(manifest.backbone_names, manifest.backbones)]
    c = (compare_outputs({k: v[last] for k, v in ref.items()}, {k: got[k][last] for k in iospec.OUTPUT_NAMES},
                         dims, tol, norms) if last.any() else None)
    return {"images": int(len(stage)), "stage_counts": {str(s): int((stage == s).sum()) for s in range(1, S + 1)},
            "top1_agreement": float(same.mean()), "top1_agreement_early": float(same[~last].mean()) if (~last).any() else None,
            "last_stage": c, "tolerance_set": "fp32", "precision": precision, "full_graph": graph.onnx_path.name,
            "ok": c is None or bool(c["ok"]),
            "note": "images that leave early may differ from the full graph by design (bounded at fit); images "
                    "reaching the last stage must match it within the fp32 tolerance"}


def model_py(precision: str | None = None) -> str:
    """model.py for `clipfuse triton` on a cascade engine, its stages in `precision` (fp32 or int8)."""
    return MODEL_PY.replace("PRECISION = None ", f"PRECISION = {precision if precision != 'fp32' else None!r} ", 1)


# The Python-backend model `clipfuse triton` writes for a cascade engine (runtime/serving/repository.py says why).
MODEL_PY = '''"""clipfuse cascade for Triton's Python backend (written by `clipfuse triton`; needs clipfuse installed
in the server's Python). Requests batched by Triton are routed together: each image runs only the
stages it reaches (clipfuse.runtime.cascade)."""
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from clipfuse.core import iospec
from clipfuse.runtime.cascade import CascadeBackend
from clipfuse.runtime.manifest import read_manifest

PRECISION = None        # the stages' precision, written by `clipfuse triton --precision` (None: fp32)

class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"], "engine")
        self.manifest = read_manifest(folder)
        self.backend = CascadeBackend(self.manifest, precision=PRECISION).open()
        self.inputs = [i["name"] for i in self.manifest.inputs]
        self.outputs = [o["name"] for o in self.manifest.outputs] + [iospec.STAGE]

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        sizes = [len(f[self.inputs[0]]) for f in feeds]
        out = self.backend.infer({n: np.concatenate([f[n] for f in feeds]) for n in self.inputs})
        out[iospec.STAGE] = out[iospec.STAGE].reshape(-1, 1)
        responses, lo = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(k, np.ascontiguousarray(out[k][lo:lo + n])) for k in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            lo += n
        return responses

    def finalize(self):
        self.backend.close()
'''
