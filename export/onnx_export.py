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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipfuse import iospec
from clipfuse.errors import ClipfuseError

DEFAULT_OPSET = 18
# Protobuf cannot hold a message past 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000

# fp32 tolerance, per output: |onnx - torch| <= ATOL + RTOL * max|torch| (+ for logits, the
# part the head's conditioning propagates from the features' own error: propagated_error).
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


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float          # max_abs / max|torch|
    tolerance: float        # ATOL + RTOL * max|torch|
    ok: bool


def compare_outputs(ref: dict, got: dict, rtol: float = RTOL, atol: float = ATOL, extra: dict | None = None) -> list[OutputCheck]:
    """Per output: max |got - ref| against atol + rtol * max|ref| + extra[name]."""
    extra = extra or {}
    checks = []
    for name in iospec.OUTPUT_NAMES:
        a, b = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
        if a.shape != b.shape:
            checks.append(OutputCheck(name, float("inf"), float("inf"), 0.0, False))
            continue
        scale = float(np.abs(a).max()) if a.size else 0.0
        err = float(np.abs(a - b).max()) if a.size else 0.0
        tol = atol + rtol * scale + extra.get(name, 0.0)
        checks.append(OutputCheck(name, err, err / scale if scale else err, tol, bool(err <= tol)))
    return checks


def propagated_error(module: torch.nn.Module, ref: dict, got: dict) -> dict:
    """How far the logits may move because the features did: the head's conditioning times the feature error.

    z_k = f_k @ W_k.T + b_k, so |dz_k| <= max_c ||W_k[c]|| * ||df_k|| (Cauchy-Schwarz). A zero-shot head
    has unit rows times the logit scale (~100), so this adds ~1e-4 at most. A linear probe fitted on
    standardised features has rows of norm 1/std: on random towers, whose features barely vary, that
    is 1e3-1e4, and fp32 differences of 1e-7 in the features legitimately move its logits by 1e-4
    relative. The features themselves are held to the plain relative tolerance.
    """
    f_ref, f_got = np.asarray(ref[iospec.FEATURES], np.float64), np.asarray(got[iospec.FEATURES], np.float64)
    t_ref = np.asarray(ref[iospec.TEMPERATURES], np.float64)
    dt = np.abs(t_ref - np.asarray(got[iospec.TEMPERATURES], np.float64)).max(0)          # (K,)
    z_max = np.abs(np.asarray(ref[iospec.BACKBONE_LOGITS], np.float64)).max(axis=(0, 2))   # (K,)
    dz, lo = [], 0
    for k in range(module.num_backbones):
        w = getattr(module, f"head_weight_{k}").double()
        hi = lo + w.shape[1]
        df = float(np.linalg.norm(f_ref[:, lo:hi] - f_got[:, lo:hi], axis=1).max()) if len(f_ref) else 0.0
        dz.append(float(w.norm(dim=1).max()) * df)
        lo = hi
    dz = np.array(dz)
    d_logits = float((t_ref.max(0) * dz + dt * z_max).sum())
    return {iospec.BACKBONE_LOGITS: float(dz.max()), iospec.LOGITS: d_logits, iospec.PROBS: d_logits}


def torch_outputs(module: torch.nn.Module, feed: dict, resolutions) -> dict:
    with torch.no_grad():
        outs = module(*[torch.from_numpy(feed[iospec.input_name(r)]) for r in resolutions])
    return {n: o.numpy() for n, o in zip(iospec.OUTPUT_NAMES, outs)}


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate_onnx(module: torch.nn.Module, path: Path, feeds: dict[int, dict]) -> dict:
    """Full checker + ORT CPU vs PyTorch on the given feeds ({batch_size: {input: uint8}}).

    Raises ClipfuseError when any output is out of tolerance or any top-1 differs.
    Returns the figures for the manifest.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)   # path form: works past 2 GB
    except Exception as e:
        raise ClipfuseError(f"exported graph {str(path)!r} fails onnx.checker: {e}") from None
    # PyTorch first, then the session: the two copies of the weights need not coexist with activations.
    refs = {bs: torch_outputs(module, feed, module.resolutions) for bs, feed in feeds.items()}
    session = ort_session(path)
    report = {"checker": "ok (full_check)", "rtol": RTOL, "atol": ATOL, "batches": {}}
    failures = []
    for bs, feed in feeds.items():
        ref = refs[bs]
        got = dict(zip(iospec.OUTPUT_NAMES, session.run(list(iospec.OUTPUT_NAMES), feed)))
        extra = propagated_error(module, ref, got)
        checks = compare_outputs(ref, got, extra=extra)
        top1_same = bool((ref[iospec.LOGITS].argmax(-1) == got[iospec.LOGITS].argmax(-1)).all())
        bb_same = bool((ref[iospec.BACKBONE_LOGITS].argmax(-1) == got[iospec.BACKBONE_LOGITS].argmax(-1)).all())
        report["batches"][str(bs)] = {
            "outputs": {c.name: {"max_abs": c.max_abs, "max_rel": c.max_rel, "tolerance": c.tolerance, "ok": c.ok}
                        for c in checks},
            "top1_identical": top1_same,
            "backbone_top1_identical": bb_same,
        }
        failures += [f"batch {bs}: {c.name} max |err| {c.max_abs:.3g} > tolerance {c.tolerance:.3g}" for c in checks if not c.ok]
        if not top1_same or not bb_same:
            failures.append(f"batch {bs}: top-1 differs between ONNX Runtime and PyTorch")
    del session
    if failures:
        raise ClipfuseError(f"exported graph {str(path)!r} disagrees with PyTorch: " + "; ".join(failures))
    return report
