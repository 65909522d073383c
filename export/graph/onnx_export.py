"""ONNX export of the fused module, and its validation against PyTorch.

Exporter: torch.onnx's dynamo exporter (`dynamo=True`, the default since torch
2.9; the TorchScript exporter is deprecated). It handles open_clip's
batch-first attention and scaled_dot_product_attention, keeps one symbolic
batch dimension shared by every image input, and writes external data
(`model.onnx.data`) when the weights pass 2 GB, the protobuf limit.

Every export is followed by `validate_onnx`: onnx.checker's full check, then
ONNX Runtime (CPU) against the PyTorch module at batch 1 and 4 on real
photographs, every output compared.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.agreement import compare_outputs
from clipfuse.runtime.backends.sessions import open_session

DEFAULT_OPSET = 18
# Protobuf cannot hold a message past 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000

# fp32 tolerance, per output: |onnx - torch| <= ATOL + RTOL * max|torch| (+ for logits, the
# part the head's conditioning propagates from the features' own error: clipfuse.runtime.agreement).
# Both runtimes compute in fp32 but order reductions differently (conv
# algorithms, GEMM blocking, fused attention); measured errors are 1e-6 to
# 1e-5 of the output's scale (see the manifest's validation block). 1e-4
# relative leaves 10x headroom yet is 100x below the error an actual bug
# (a wrong constant, a dropped normalisation, swapped inputs) produces.
RTOL = iospec.TOLERANCES["fp32"]["rtol"]
ATOL = iospec.TOLERANCES["fp32"]["atol"]


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_onnx(module: torch.nn.Module, path: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None) -> dict:
    """Export `module` (a FusedEnsemble) to `path`; returns facts for the manifest."""
    if opset < 17:
        raise ClipfuseError(f"opset {opset} is too old: clipfuse needs opset >= 17 (LayerNormalization)")
    path = Path(path)
    module = module.eval()
    resolutions = module.resolutions
    # Batch 2 as the example: torch.export specialises dimensions of size 0 and 1.
    example = tuple(torch.zeros(2, 3, r, r, dtype=torch.uint8) for r in resolutions)
    batch = torch.export.Dim(iospec.BATCH_DIM, min=1, max=65536)
    # forward(*images): the varargs are one argument, "images", to torch.export
    dynamic_shapes = {"images": tuple({0: batch} for _ in resolutions)}
    if external_data is None:
        external_data = _param_bytes(module) > EXTERNAL_DATA_BYTES
    # The exporter narrates every pass on stdout; keep the user's terminal for our own progress.
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            # one shared batch Dim across inputs makes the exporter note the duplicate axis name
            warnings.filterwarnings("ignore", message=".*axis name.*")
            program = torch.onnx.export(
                module, example, dynamo=True, opset_version=opset,
                input_names=[iospec.input_name(r) for r in resolutions],
                output_names=list(iospec.OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
            program.save(str(path), external_data=external_data)
    except Exception as e:
        raise RuntimeError(f"ONNX export failed: {type(e).__name__}: {e}\n--- exporter log ---\n{chatter.getvalue()[-4000:]}") from e
    data = Path(str(path) + ".data")
    return {
        "file": path.name,
        "opset": opset,
        "external_data": data.name if external_data and data.exists() else None,
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
    }


def head_norms(module: torch.nn.Module) -> list[float]:
    """max_c ||W_k[c]|| per head of a FusedEnsemble: how far a logit moves per unit of feature error."""
    return [float(getattr(module, f"head_weight_{k}").double().norm(dim=1).max()) for k in range(module.num_backbones)]


def torch_outputs(module: torch.nn.Module, feed: dict, resolutions) -> dict:
    with torch.no_grad():
        outs = module(*[torch.from_numpy(feed[iospec.input_name(r)]) for r in resolutions])
    return {n: o.numpy() for n, o in zip(iospec.OUTPUT_NAMES, outs)}


def validate_onnx(module: torch.nn.Module, path: Path, feeds: dict[int, dict], names=None, where=None) -> dict:
    """Full checker + ORT CPU vs PyTorch on the given feeds ({batch_size: {input: uint8}}), compared by
    the one comparator (clipfuse.runtime.agreement) with the fp32 tolerance row.

    names: backbone names in graph order (for the messages); where: the folder to name in messages
    (the final output folder, not the temporary one the graph is written to).
    Raises ClipfuseError when any bound fails. Returns the figures for the manifest.
    """
    import onnx

    where = str(where) if where is not None else str(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)   # path form: works past 2 GB
    except Exception as e:
        raise ClipfuseError(f"exported graph {where!r} fails onnx.checker: {e}") from None
    names = list(names) if names is not None else [f"backbone {k}" for k in range(module.num_backbones)]
    dims = [getattr(module, f"head_weight_{k}").shape[1] for k in range(module.num_backbones)]
    norms = head_norms(module)
    bad = [names[k] for k, x in enumerate(norms) if not np.isfinite(x)]
    if bad:
        raise ClipfuseError(f"non-finite outputs/weights in backbone {bad[0]} of {where!r}: its head holds NaN "
                            "or inf (check the features it was fitted on); nothing written")
    # PyTorch first, then the session: the two copies of the weights need not coexist with activations.
    refs = {bs: torch_outputs(module, feed, module.resolutions) for bs, feed in feeds.items()}
    tol = iospec.tolerance("fp32")
    session = open_session(path)
    report = {"checker": "ok (full_check)", "rtol": tol["rtol"], "atol": tol["atol"],
              "min_cosine": tol["min_cosine"], "max_top1_changed": tol["max_top1_changed"], "batches": {}}
    failures = []
    for bs, feed in feeds.items():
        ref = refs[bs]
        got = dict(zip(iospec.OUTPUT_NAMES, session.run(list(iospec.OUTPUT_NAMES), feed)))
        non_finite = _non_finite_backbones(ref, names) or _non_finite_backbones(got, names)
        if non_finite:
            raise ClipfuseError(f"non-finite outputs/weights in backbone {non_finite[0]} of {where!r}: its tower "
                                "or head produces NaN or inf; check its weights (nothing written)")
        c = compare_outputs(ref, got, list(zip(names, dims)), tol, norms)
        report["batches"][str(bs)] = {
            "outputs": {o["output"]: {k: o[k] for k in ("max_abs", "max_rel", "tolerance", "ok")} for o in c["outputs"]},
            "top1_identical": c["fused"]["top1_changed"] == 0,
            "backbone_top1_identical": all(b["top1_changed"] == 0 for b in c["backbones"]),
            "backbones": c["backbones"],
        }
        failures += [f"batch {bs}: {f}" for f in c["failures"]]
    del session
    if failures:
        raise ClipfuseError(f"exported graph {where!r} disagrees with PyTorch: " + "; ".join(failures))
    return report


def _non_finite_backbones(outputs: dict, names) -> list[str]:
    """Backbones whose logits or features hold NaN/inf (the controller and fusion spread it to all)."""
    z = np.asarray(outputs[iospec.BACKBONE_LOGITS])
    return [n for k, n in enumerate(names) if not np.isfinite(z[:, k]).all()]
