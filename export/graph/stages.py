"""The stage graphs of a cascade engine: one ONNX graph per backbone tower and one per combine step.

A cascade engine is a normal engine folder (model.onnx = the full ensemble, backbones in the
cascade's stage order) plus, under stages/ (names in clipfuse.core.iospec):

    tower_<k>.onnx    image_<R_k> -> features_<k> (N, D_k), logits_<k> (N, C)
                      exactly the fused graph's path for backbone k: normalise, tower, L2 norm, head
    combine_<s>.onnx  features (N, sum_{j<=s} D_j), backbone_logits (N, s, C)
                      -> logits, probs, temperatures (N, s): the controller fitted for exactly the
                      first s backbones, and the temperature-weighted sum

The runtime (clipfuse.runtime.cascade) routes images between them; why per-stage graphs rather
than ONNX `If` is in its docstring. Every stage file is validated after export: the stage pipeline
(towers 1..s then combine_s) on ONNX Runtime against the same pipeline in PyTorch, for every s, and
the last stage against model.onnx itself, all with the one comparator and the fp32 tolerance row.

    export_stages(folder, fused, stage_controllers, feeds, names, where) -> manifest "stages" entries
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.agreement import compare_outputs
from clipfuse.runtime.backends.sessions import open_session
from clipfuse.runtime.cascade import run_stage_graphs

from .onnx_export import head_norms


class TowerStage(nn.Module):
    """Backbone k of a FusedEnsemble alone: uint8 image -> (unit-norm features, class logits)."""

    def __init__(self, fused, k: int):
        super().__init__()
        self.normalize = fused.normalizers[fused.norm_index[k]]
        self.visual = fused.visuals[k]
        self.register_buffer("weight", getattr(fused, f"head_weight_{k}"))     # (C, D_k)
        self.register_buffer("bias", getattr(fused, f"head_bias_{k}"))         # (C,)

    def forward(self, image: torch.Tensor):
        f = F.normalize(self.visual(self.normalize(image)), dim=-1)            # (N, D_k)
        return f, F.linear(f, self.weight, self.bias)                           # (N, D_k), (N, C)


class CombineStage(nn.Module):
    """The controller for the first s backbones and the temperature-weighted sum."""

    def __init__(self, controller: nn.Module):
        super().__init__()
        self.controller = controller

    def forward(self, features: torch.Tensor, backbone_logits: torch.Tensor):
        t = self.controller(features)                                           # (N, s)
        # + 0 * features.sum: a static controller ignores its input, and the exporter would drop an
        # unused input; every combine graph keeps the same two inputs (iospec.COMBINE_INPUTS)
        t = t + 0.0 * features[:, :1]
        logits = (t.unsqueeze(-1) * backbone_logits).sum(dim=1)                # (N, C)
        return logits, torch.softmax(logits, dim=-1), t


def _export(module: nn.Module, example: tuple, input_names, output_names, path: Path, opset: int) -> None:
    batch = torch.export.Dim(iospec.BATCH_DIM, min=1, max=65536)
    dynamic = tuple({0: batch} for _ in example)
    chatter = io.StringIO()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*")
            program = torch.onnx.export(module.eval(), example, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic, optimize=True, verbose=False)
            program.save(str(path))
    except Exception as e:
        raise RuntimeError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}\n"
                           f"{chatter.getvalue()[-2000:]}") from e


class _TorchSession:
    """A PyTorch module behind ONNX Runtime's run(names, feed) surface (the validation reference)."""

    def __init__(self, module, input_names, output_names):
        self.module, self.input_names, self.output_names = module, input_names, output_names

    def run(self, names, feed):
        with torch.no_grad():
            outs = self.module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names])
        got = dict(zip(self.output_names, (o.numpy() for o in outs)))
        return [got[n] for n in names]


def export_stages(folder: Path, fused, stage_controllers, feeds: dict, names, where, opset: int) -> dict:
    """Write stages/tower_k.onnx and stages/combine_s.onnx into `folder` (beside model.onnx), validate
    them, and return the manifest's {"stages": [...], "validation": {...}}.

    fused: the FusedEnsemble that model.onnx was exported from (backbones in stage order);
    stage_controllers: S controller modules, the s-th for the first s backbones (the last is
    fused.controller); feeds: {batch: {input: uint8}} as the export validation uses.
    """

    folder = Path(folder)
    S = fused.num_backbones
    if len(stage_controllers) != S or S < 2:
        raise ClipfuseError(f"a cascade needs one controller per stage and >= 2 stages, got {len(stage_controllers)} "
                            f"for {S} backbones")
    dims = [getattr(fused, f"head_weight_{k}").shape[1] for k in range(S)]
    C = fused.num_classes
    inputs = [iospec.input_name(fused.resolutions[fused.input_index[k]]) for k in range(S)]
    torch_sessions, stages = {}, []
    for s in range(1, S + 1):
        tower = TowerStage(fused, s - 1).eval()
        R = fused.resolutions[fused.input_index[s - 1]]
        outs = [iospec.tower_features(s), iospec.tower_logits(s)]
        _export(tower, (torch.zeros(2, 3, R, R, dtype=torch.uint8),), [inputs[s - 1]], outs,
                folder / iospec.tower_file(s), opset)
        torch_sessions[f"tower_{s}"] = _TorchSession(tower, [inputs[s - 1]], outs)
        combine = CombineStage(stage_controllers[s - 1]).eval()
        example = (torch.zeros(2, sum(dims[:s])), torch.zeros(2, s, C))
        _export(combine, example, iospec.COMBINE_INPUTS, iospec.COMBINE_OUTPUTS, folder / iospec.combine_file(s), opset)
        torch_sessions[f"combine_{s}"] = _TorchSession(combine, list(iospec.COMBINE_INPUTS), list(iospec.COMBINE_OUTPUTS))
        stages.append({"backbone": str(names[s - 1]), "input": inputs[s - 1], "embed_dim": int(dims[s - 1]),
                       "tower": iospec.tower_file(s), "combine": iospec.combine_file(s),
                       "controller": getattr(stage_controllers[s - 1], "kind", "unknown")})

    tol = iospec.tolerance("fp32")
    norms = head_norms(fused)
    ort_sessions = {key: open_session(folder / (iospec.tower_file(key[6:]) if key.startswith("tower") else
                                                iospec.combine_file(key[8:]))) for key in torch_sessions}
    full = open_session(folder / "model.onnx")
    report, failures = {"rtol": tol["rtol"], "atol": tol["atol"], "min_cosine": tol["min_cosine"],
                        "max_top1_changed": tol["max_top1_changed"], "batches": {}}, []
    for bs, feed in feeds.items():
        ref = run_stage_graphs(torch_sessions, feed, inputs, S)
        got = run_stage_graphs(ort_sessions, feed, inputs, S)
        rows = {}
        for s in range(1, S + 1):
            c = compare_outputs(ref[s - 1], got[s - 1], list(zip(names[:s], dims[:s])), tol, norms[:s])
            rows[f"stage {s} vs PyTorch"] = {o["output"]: o["max_rel"] for o in c["outputs"]}
            failures += [f"batch {bs}, stage {s} vs PyTorch: {f}" for f in c["failures"]]
        model = dict(zip(iospec.OUTPUT_NAMES, full.run(list(iospec.OUTPUT_NAMES), feed)))
        c = compare_outputs(model, got[-1], list(zip(names, dims)), tol, norms)
        rows[f"stage {S} vs model.onnx"] = {o["output"]: o["max_rel"] for o in c["outputs"]}
        failures += [f"batch {bs}, stage {S} (all stages) vs model.onnx: {f}" for f in c["failures"]]
        report["batches"][str(bs)] = rows
    del ort_sessions, full
    if failures:
        raise ClipfuseError(f"cascade stage graphs of {str(where)!r} disagree beyond the fp32 tolerance: "
                            + "; ".join(failures[:3]))
    return {"stages": stages, "validation": report}
