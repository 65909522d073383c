"""Compare an engine's per-backbone logits with open_clip alone, on real photographs.

    python benchmarks/check_reference.py RN50x16:random:0 ViT-B-32:random:1 [--out engines/check]

Exports the given backbones (random:SEED weights, so this runs offline) with
clipfuse, runs the ONNX graph on clipfuse's host preprocessing, and compares
`backbone_logits` with a reference that uses nothing of clipfuse: open_clip's
model (same seed), its eval `preprocess`, `encode_image`, normalisation, and a
zero-shot head from its tokenizer and text tower. Prints the max relative
error and top-1 agreement per backbone.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = ["astronaut", "cat", "cup of coffee", "rocket", "dog"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of the {}."]


def open_clip_reference(arch, seed, images, classes=CLASSES, templates=TEMPLATES):
    """(N, C) logits from open_clip alone: seed, create, preprocess, encode, normalise, zero-shot head."""
    import open_clip

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        f = model.encode_image(torch.stack([preprocess(im) for im in images]))
        f = f / f.norm(dim=-1, keepdim=True)
        rows = []
        for c in classes:
            t = model.encode_text(tokenizer([tpl.format(c) for tpl in templates]))
            t = t / t.norm(dim=-1, keepdim=True)
            t = t.mean(0)
            rows.append(t / t.norm())
        return (model.logit_scale.exp() * f @ torch.stack(rows).T).numpy()


def engine_backbone_logits(folder, images):
    import onnxruntime as ort

    from clipfuse.runtime.manifest import read_manifest
    from clipfuse.runtime.preprocess import preprocess_image

    m = read_manifest(folder)
    feed = {n: np.stack([preprocess_image(im, s) for im in images]) for n, s in m.preprocess_specs().items()}
    sess = ort.InferenceSession(str(m.onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(["backbone_logits"], feed)[0]


def compare(backbones, out, images):
    from clipfuse.export.graph.backbones import parse_backbone
    from clipfuse.export.graph.engine import export_engine

    specs = [parse_backbone(b) for b in backbones]
    if any(s.kind != "random" for s in specs):
        raise SystemExit("check_reference needs random:SEED weights (the reference rebuilds them by seed)")
    export_engine(backbones, CLASSES, out, templates=TEMPLATES, force=True)
    bb = engine_backbone_logits(out, images)
    rows = []
    for k, s in enumerate(specs):
        ref = open_clip_reference(s.arch, s.seed, images)
        rows.append({
            "backbone": str(s),
            "max_rel": float(np.abs(bb[:, k] - ref).max() / np.abs(ref).max()),
            "max_abs": float(np.abs(bb[:, k] - ref).max()),
            "top1_agree": float((bb[:, k].argmax(-1) == ref.argmax(-1)).mean()),
        })
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backbones", nargs="+")
    ap.add_argument("--out", default="engines/check-reference")
    args = ap.parse_args()
    from PIL import Image

    import clipfuse

    images = [Image.open(p) for p in sorted((Path(clipfuse.__file__).parent / "assets").glob("*.jpg"))]
    t0 = time.perf_counter()
    for r in compare(args.backbones, Path(args.out), images):
        print(f"{r['backbone']:<28} max rel err {r['max_rel']:.2e}  max abs err {r['max_abs']:.2e}  top-1 agreement {r['top1_agree']:.0%}")
    print(f"({len(images)} photographs, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
