"""Do the backends agree? Identical inputs through each, every output compared with the first backend.

    clipfuse compare engines/NAME --backends onnxruntime,torch[,tensorrt] [--images ...] [--precision fp16]

Backend names are the runtime's (onnxruntime, torch, tensorrt, onnxruntime-cuda, ...)
with an optional precision suffix, e.g. `onnxruntime-fp16` runs model.fp16.onnx.
`--precision fp16` applies the suffix to every backend that has an fp16 form
(ONNX Runtime: model.fp16.onnx; TensorRT: the fp16 plan); torch stays the fp32
reference (it rebuilds the network from open_clip, not from a graph).

Per output: max |got - ref| against a tolerance of atol + rtol * max|ref|, plus,
for logits, what the head propagates from the features' own error (the idea of
export/onnx_export.propagated_error, here from heads.safetensors); per backbone:
embedding cosine and top-1 agreement; fused top-1 agreement. A top-1 flip fails
only where the reference's top-2 margin exceeds twice the logit error (an exact
tie cannot be called either way).

Tolerances:
    fp32   RTOL 1e-4, ATOL 1e-6: export/onnx_export.py's, measured ~2e-6 relative between
           ORT CPU and PyTorch on the default ensemble
    fp16   RTOL 1e-2, ATOL 1e-3, and embedding cosine >= 0.999 per backbone: fp16 keeps 11
           bits (eps 9.8e-4) and errors grow over ~12-24 layers; measured 1.3e-3 to 2.3e-3
           relative on the logits of RN50 + ViT-B-32 (benchmarks/results/fp16_validation.md),
           so 1e-2 leaves ~4x headroom and a 1% perturbation of one head still fails

Polygraphy's comparator was considered: its per-element atol/rtol check
(CompareFunc.simple) is the easy part; what this needs on top (output-scale
tolerances, head-propagated logit bounds, per-backbone cosine on slices of the
features output, margin-aware top-1) would be custom code around it anyway, and
it would add a dependency (and its TensorRT-oriented runners) to every install
for ~40 lines of comparison. Not added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipfuse import iospec
from clipfuse.errors import ClipfuseError

MODEL_FP16 = "model.fp16.onnx"
# The one tolerance table lives in the core (clipfuse.iospec.TOLERANCES).
def tolerance(precision: str) -> dict:
    return iospec.tolerance(precision)


def precision_onnx_path(manifest, precision: str) -> Path:
    """The ONNX file for a precision, or ClipfuseError naming the command that makes it."""
    if precision == "fp32":
        return manifest.onnx_path
    if precision != "fp16":
        raise ClipfuseError(f"unknown precision {precision!r}; valid: fp32, fp16")
    entry = manifest.data.get("precisions", {}).get("fp16")
    path = manifest.folder / MODEL_FP16
    if entry is None or not path.is_file():
        raise ClipfuseError(f"engine {str(manifest.folder)!r} has no {MODEL_FP16}: make it with "
                            f"`clipfuse export {manifest.folder} --precision fp16`")
    source = manifest.data["artefacts"].get(manifest.data["onnx"]["file"], {}).get("sha256")
    if entry.get("source_sha256") not in (None, source):
        # a re-export (e.g. after `clipfuse fit`) replaced model.onnx and carried the old fp16 file over
        raise ClipfuseError(f"{MODEL_FP16} in {str(manifest.folder)!r} was converted from an earlier model.onnx; "
                            f"convert it again: `clipfuse export {manifest.folder} --precision fp16`")
    return path


def photo_variants() -> list:
    """The photographs shipped in clipfuse/assets, each whole and at three crops (centre 60%, top-left
    70%, bottom-right 70%), each also mirrored: 4 x 8 = 32 images from real photographs."""
    from PIL import Image, ImageOps

    import clipfuse

    files = sorted((Path(clipfuse.__file__).parent / "assets").glob("*.jpg"))
    if not files:
        raise ClipfuseError("the photographs in clipfuse/assets are missing: reinstall clipfuse")
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
        w, h = im.size
        crops = [im, im.crop((int(w * .2), int(h * .2), int(w * .8), int(h * .8))),
                 im.crop((0, 0, int(w * .7), int(h * .7))), im.crop((int(w * .3), int(h * .3), w, h))]
        out += crops + [ImageOps.mirror(c) for c in crops]
    return out


def head_row_norms(folder, num_backbones: int) -> list[float]:
    """max_c ||W_k[c]|| per head, from heads.safetensors (export/heads.py's naming): how far a logit
    moves per unit of feature error."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(folder) / "heads.safetensors"))
    return [float(np.linalg.norm(tensors[f"head.{k}.weight"].astype(np.float64), axis=1).max())
            for k in range(num_backbones)]
PRECISION_SUFFIXES = ("-fp16", "-fp32")


@dataclass
class BackendResult:
    name: str                   # as asked, e.g. "onnxruntime-fp16"
    describe: str               # what ran, e.g. "onnxruntime (CPUExecutionProvider; ...)"
    precision: str
    outputs: dict = field(repr=False, default_factory=dict)


def parse_backends(spec, precision: str | None) -> list[tuple[str, str]]:
    """'onnxruntime,torch-fp16' -> [(runtime backend name, precision)]."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(names) < 2:
        raise ClipfuseError(f"--backends needs at least two backends to compare, got {names}")
    if precision not in (None, "fp32", "fp16"):
        raise ClipfuseError(f"unknown precision {precision!r}; valid: fp32, fp16")
    out = []
    for n in names:
        prec = None
        for suf in PRECISION_SUFFIXES:
            if n.endswith(suf):
                n, prec = n[: -len(suf)], suf[1:]
        if prec is None:
            prec = "fp32" if n.startswith("torch") else (precision or "fp32")
        if n.startswith("torch") and prec == "fp16":
            raise ClipfuseError(f"backend {n}-fp16: the torch backend is the fp32 reference; compare "
                                "onnxruntime-fp16 or tensorrt-fp16 against it")
        out.append((n, prec))
    if len(set(out)) != len(out):
        raise ClipfuseError(f"--backends names the same backend twice: {names}")
    return out


def open_one(manifest, name: str, precision: str, **options):
    """An opened runtime backend for (name, precision)."""
    from clipfuse.runtime.backends import make_backend
    from clipfuse.runtime.manifest import Manifest

    if precision == "fp16" and name.startswith("onnxruntime"):
        precision_onnx_path(manifest, "fp16")               # ClipfuseError naming the command if absent
        data = dict(manifest.data, onnx=dict(manifest.data["onnx"], file=MODEL_FP16))
        manifest = Manifest(manifest.folder, data)          # the same backend, pointed at the fp16 graph
    if name == "tensorrt":
        options = dict(options, precision=precision)
    return make_backend(manifest, name, **options).open()


def default_images() -> list:
    """The shipped photographs, whole and centre-cropped: 8 real images."""
    v = photo_variants()
    return v[::8] + v[1::8]


def load_images(paths) -> list:
    from clipfuse.runtime.images import collect_images

    from PIL import Image

    files = collect_images(paths)
    if not files:
        raise ClipfuseError(f"no images found in {list(paths)}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise ClipfuseError(f"cannot read image {str(f)!r}: {e}") from None
    return out


def compare_outputs(ref: dict, got: dict, manifest, tol: dict, norms: list[float]) -> dict:
    """Figures and failures for one backend against the reference outputs."""
    rows, fails = [], []
    f_ref = np.asarray(ref[iospec.FEATURES], np.float64)
    f_got = np.asarray(got[iospec.FEATURES], np.float64)
    t_ref = np.asarray(ref[iospec.TEMPERATURES], np.float64)
    # what the logits may move because the features did (fp32 heads: Cauchy-Schwarz), per backbone
    dz, lo, backbones = [], 0, []
    for k, b in enumerate(manifest.backbones):
        hi = lo + b["embed_dim"]
        a, g = f_ref[:, lo:hi], f_got[:, lo:hi]
        df = np.linalg.norm(a - g, axis=1).max()
        dz.append(norms[k] * float(df))
        cos = (a * g).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(g, axis=1), 1e-30)
        zr = np.asarray(ref[iospec.BACKBONE_LOGITS])[:, k]
        zg = np.asarray(got[iospec.BACKBONE_LOGITS])[:, k]
        backbones.append({"backbone": f"{b['arch']}:{b['weights']}", "cosine_min": float(cos.min()),
                          "top1_agreement": float((zr.argmax(-1) == zg.argmax(-1)).mean())})
        if cos.min() < tol["min_cosine"]:
            fails.append(f"{b['arch']}:{b['weights']}: embedding cosine {cos.min():.6f} < {tol['min_cosine']}")
        lo = hi
    dt = np.abs(t_ref - np.asarray(got[iospec.TEMPERATURES], np.float64)).max(0)
    z_max = np.abs(np.asarray(ref[iospec.BACKBONE_LOGITS], np.float64)).max(axis=(0, 2))
    d_logits = float((t_ref.max(0) * np.array(dz) + dt * z_max).sum())
    extra = {iospec.BACKBONE_LOGITS: max(dz), iospec.LOGITS: d_logits, iospec.PROBS: d_logits}
    for name in iospec.OUTPUT_NAMES:
        a, g = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
        if a.shape != g.shape:
            rows.append({"output": name, "max_abs": float("inf"), "max_rel": float("inf"), "tolerance": 0.0, "ok": False})
            fails.append(f"{name}: shape {g.shape} != {a.shape}")
            continue
        scale = float(np.abs(a).max())
        err = float(np.abs(a - g).max())
        t = tol["atol"] + tol["rtol"] * scale + extra.get(name, 0.0)
        ok = err <= t
        rows.append({"output": name, "max_abs": err, "max_rel": err / scale if scale else err, "tolerance": t, "ok": ok})
        if not ok:
            fails.append(f"{name}: max |err| {err:.3g} > tolerance {t:.3g}")
    l_ref, l_got = np.asarray(ref[iospec.LOGITS]), np.asarray(got[iospec.LOGITS])
    agree = l_ref.argmax(-1) == l_got.argmax(-1)
    srt = np.sort(l_ref, axis=-1)
    margin = srt[:, -1] - srt[:, -2] if l_ref.shape[1] > 1 else np.full(len(l_ref), np.inf)
    err = float(np.abs(l_ref - l_got).max())
    bad = int((~agree & (margin > 2 * err)).sum())
    if bad:
        fails.append(f"fused top-1 differs on {bad} image(s) whose reference margin exceeds twice the logit error")
    return {"outputs": rows, "backbones": backbones, "top1_agreement": float(agree.mean()),
            "top1_flips_unexplained": bad, "ok": not fails, "failures": fails}


def compare_backends(engine_dir, backends="onnxruntime,torch", images=None, precision: str | None = None,
                     batch: int = 8, quiet: bool = True, verify: bool = True) -> dict:
    """Run the same images through every backend; compare each with the first. Returns the report
    (report["ok"] False when any backend is out of tolerance)."""
    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.preprocess import preprocess_image

    m = read_manifest(engine_dir, verify=verify)
    pairs = parse_backends(backends, precision)
    pil = default_images() if not images else load_images(images)
    specs = m.preprocess_specs()
    arrays = {name: np.stack([preprocess_image(im, s) for im in pil]) for name, s in specs.items()}
    feeds = [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, len(pil), batch)]
    results = []
    for name, prec in pairs:
        backend = open_one(m, name, prec)
        try:
            outs = [backend.infer(f) for f in feeds]
            desc = backend.describe()
        finally:
            backend.close()
        merged = {k: np.concatenate([o[k] for o in outs]) for k in iospec.OUTPUT_NAMES}
        results.append(BackendResult(f"{name}-{prec}" if prec == "fp16" else name, desc, prec, merged))
    ref = results[0]
    norms = head_row_norms(m.folder, len(m.backbones))
    report = {"engine": str(m.folder), "images": len(pil), "reference": ref.name, "comparisons": []}
    for r in results[1:]:
        prec = "fp16" if "fp16" in (r.precision, ref.precision) else "fp32"
        tol = tolerance(prec)
        c = compare_outputs(ref.outputs, r.outputs, m, tol, norms)
        c.update(backend=r.name, describe=r.describe, tolerance_set=prec, rtol=tol["rtol"], atol=tol["atol"])
        report["comparisons"].append(c)
    report["backends"] = [{"name": r.name, "describe": r.describe, "precision": r.precision} for r in results]
    report["ok"] = all(c["ok"] for c in report["comparisons"])
    return report


def format_report(report: dict) -> str:
    lines = [f"engine {report['engine']}: {report['images']} images, reference {report['reference']}"]
    for b in report["backends"]:
        lines.append(f"  {b['name']}: {b['describe']}")
    for c in report["comparisons"]:
        lines += ["", f"{c['backend']} vs {report['reference']} ({c['tolerance_set']} tolerances: "
                  f"atol {c['atol']:g} + rtol {c['rtol']:g} x max|ref| (+ head-propagated, logits))",
                  f"  {'output':<16} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  ok"]
        for o in c["outputs"]:
            lines.append(f"  {o['output']:<16} {o['max_abs']:>10.3g} {o['max_rel']:>10.3g} {o['tolerance']:>10.3g}  "
                         f"{'yes' if o['ok'] else 'NO'}")
        for b in c["backbones"]:
            lines.append(f"  {b['backbone']}: embedding cosine min {b['cosine_min']:.7f}, "
                         f"top-1 agreement {b['top1_agreement'] * 100:.1f}%")
        lines.append(f"  fused top-1 agreement {c['top1_agreement'] * 100:.1f}%")
        lines += [f"  FAIL: {f}" for f in c["failures"]]
    lines += ["", "agree: all within tolerance" if report["ok"] else "DISAGREE: out of tolerance (see FAIL lines)"]
    return "\n".join(lines)
