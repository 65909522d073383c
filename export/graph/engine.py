"""Build an engine folder: backbones -> heads -> fused module -> model.onnx -> validated -> manifest.

engines/<name>/ holds everything the runtime needs and nothing else:

    manifest.json           the contract with runtime/ (written last)
    model.onnx (+ .data)    the fused graph
    heads.safetensors       the K heads (weights with logit scale folded in, biases)
    controller.safetensors  the controller inside the graph

The folder is assembled under a hidden temporary name beside the target and
renamed into place only once everything is written, validated and flushed, by
the one engine-folder writer (export/graph/engine_folder.py: lock, leftovers, --force
rules): a crash never leaves a folder that looks complete, and two exports to
the same folder never both win.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import clipfuse
from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log, progress_shown, step
from clipfuse.runtime.manifest import MANIFEST, SCHEMA_VERSION, label_binding, read_manifest
from clipfuse.runtime.manifest_checks import bind_blocks
from clipfuse.runtime.preprocess import preprocess_image, preprocess_spec

from . import backbones as bb, heads as hd
from .engine_folder import check_output_folder, hash_artefacts, new_engine_folder
from .fused import ConstantController, FusedEnsemble, load_controller, save_controller
from .heads import load_heads
from .onnx_export import DEFAULT_OPSET, export_onnx, validate_onnx
from .stages import export_stages

MODEL_ONNX = "model.onnx"
HEADS = "heads.safetensors"
CONTROLLER = "controller.safetensors"


def package_versions() -> dict:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for dist in ("clipfuse", "torch", "open_clip_torch", "onnx", "onnxruntime", "numpy", "pillow"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions


def shipped_photos() -> list:
    """The real photographs shipped with clipfuse (see clipfuse/assets/README.md)."""
    from PIL import Image
    folder = Path(clipfuse.__file__).parent / "assets"
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise ClipfuseError(f"validation photographs are missing from {str(folder)!r}: reinstall clipfuse")
    return [Image.open(f) for f in files]


def input_specs(backbones) -> dict:
    """{input_name: PreprocessSpec} for the distinct resolutions, ascending."""

    specs: dict = {}
    for b in backbones:
        spec = preprocess_spec(b.preprocess)
        name = iospec.input_name(b.image_size)
        if name in specs and specs[name] != spec:
            raise ClipfuseError(f"backbones at {b.image_size} px disagree on host preprocessing ({specs[name]} vs {spec}); "
                                "they cannot share one graph input")
        specs[name] = spec
    return dict(sorted(specs.items(), key=lambda kv: kv[1].size))


def feeds_by_batch(images, specs: dict, batch_sizes=(1, 4)) -> dict:
    import numpy as np

    feeds = {}
    for bs in batch_sizes:
        chosen = [images[i % len(images)] for i in range(bs)]
        feeds[bs] = {name: np.stack([preprocess_image(im, s) for im in chosen]) for name, s in specs.items()}
    return feeds


@dataclass
class ExportResult:
    folder: Path
    manifest: dict


def export_engine(backbones, classes, out, templates=None, force: bool = False, opset: int | None = None,
                  heads=None, controller=None, extra_files: dict | None = None,
                  extra_manifest: dict | None = None, cascade: dict | None = None) -> ExportResult:
    """Build and validate engines/<name>/ for the given backbone strings and classes.

    backbones: list of `ARCH[:WEIGHTS]` strings (or BackboneSpec); classes: list of names or the
    --classes string; templates: list of prompt templates, a file path, or None for open_clip's 80.
    heads: optional list of Head (e.g. linear probes) replacing the zero-shot heads.
    controller: optional fitted controller module (default: constant 1/K = LOG-AVG).
    extra_files: {file name: bytes | str | callable(path)} written into the folder (and hashed).
    extra_manifest: entries added to the manifest (e.g. how the controller was fitted).
    cascade: {"controllers": S stage controllers (the last = `controller`), "block": the manifest's
    cascade entry (export/fit/cascade.py CascadeFit.to_manifest() and more)}: also writes and validates
    the stage graphs (export/graph/stages.py); backbones must be given in stage order.
    Backbones may also be already built `Backbone` objects (their text tower is dropped).
    """

    t_start = time.perf_counter()
    # Everything a user can get wrong is checked before the long work starts.
    if not backbones:
        raise ClipfuseError("no backbones given: pass --backbone ARCH[:WEIGHTS] at least once")
    prebuilt = {i: b for i, b in enumerate(backbones) if isinstance(b, bb.Backbone)}
    specs = [b.spec if isinstance(b, bb.Backbone) else b if isinstance(b, bb.BackboneSpec) else bb.parse_backbone(b)
             for b in backbones]
    dup = {str(s) for s in specs if [str(x) for x in specs].count(str(s)) > 1}
    if dup:
        raise ClipfuseError(f"backbone {sorted(dup)[0]!r} is given twice")
    classes = hd.parse_classes(classes) if isinstance(classes, str) else hd.check_classes(list(classes))
    if len(classes) < 2:    # softmax over one class is 1.0 whatever the image: a meaningless engine
        raise ClipfuseError(f"only one class given ({classes[0]!r}): a classifier needs at least two classes")
    if templates is None or isinstance(templates, (str, Path)):
        templates = hd.parse_templates(templates)
    out = check_output_folder(Path(out), force)
    if heads is not None and len(heads) != len(specs):
        raise ClipfuseError(f"{len(heads)} heads given for {len(specs)} backbones")
    opset = opset or DEFAULT_OPSET

    # The writer's lock is held from here to the swap: a second export to `out` is refused at once.
    with new_engine_folder(out, force) as tmp:
        manifest = _build_into(tmp, out, specs, prebuilt, classes, templates, heads, controller, opset,
                               extra_files, extra_manifest, t_start, cascade)
    log(f"wrote {out} in {time.perf_counter() - t_start:.1f} s")
    return ExportResult(out, manifest)


def _build_into(tmp: Path, out: Path, specs, prebuilt, classes, templates, heads, controller, opset,
                extra_files, extra_manifest, t_start, cascade=None) -> dict:
    """Build, export, validate and write everything into the temporary folder `tmp`; returns the manifest."""

    # steps, counted so a user sees how far the 1-2 minutes have got: the backbones still to build (+ K
    # heads), then export, validation, writing; only shown steps count, so the first is [1/n]
    K = len(specs)
    total = (K - len(prebuilt)) + K * (heads is None) + 3
    done = iter(range(1, total + 1))
    built, head_list = [], []
    for i, spec in enumerate(specs):
        if i in prebuilt:
            b = prebuilt[i]
        else:
            with step(f"[{next(done)}/{total}] backbone {i + 1}/{K} {spec}: building"):
                b = bb.load_backbone(spec)
        if heads is None:
            with step(f"[{next(done)}/{total}] backbone {i + 1}/{K} {spec}: zero-shot head, {len(classes)} classes x "
                      f"{len(templates)} templates"):
                head_list.append(hd.zero_shot_head(b.model, spec.arch, classes, templates, progress=progress_shown()))
        else:
            head_list.append(heads[i])
        if head_list[-1].weight.shape != (len(classes), b.embed_dim):
            raise ClipfuseError(f"head {i} for {spec} has shape {tuple(head_list[-1].weight.shape)}, "
                                f"expected ({len(classes)}, {b.embed_dim})")
        if hasattr(b.model, "visual"):
            b.model = b.model.visual     # the text tower is no longer needed: free it now
        built.append(b)

    fused = FusedEnsemble(
        [b.model for b in built], head_list, [b.image_size for b in built],
        [b.preprocess["mean"] for b in built], [b.preprocess["std"] for b in built],
        controller if controller is not None else ConstantController(len(built)),
    ).eval()
    in_specs = input_specs(built)
    feature_dim = sum(b.embed_dim for b in built)
    inputs, outputs = iospec.io_spec([b.image_size for b in built], len(built), len(classes), feature_dim)

    with step(f"[{next(done)}/{total}] exporting the fused graph ({len(built)} backbone{'s' if len(built) != 1 else ''}, opset {opset})"):
        onnx_info = export_onnx(fused, tmp / MODEL_ONNX, opset=opset)
    with step(f"[{next(done)}/{total}] validating: onnx.checker + ONNX Runtime vs PyTorch at batch 1 and 4 on "
              "real photographs"):
        validation = validate_onnx(fused, tmp / MODEL_ONNX, feeds_by_batch(shipped_photos(), in_specs),
                                   names=[str(b.spec) for b in built], where=out)
    if cascade is not None:

        with step(f"cascade: exporting and validating {2 * len(built)} stage graphs (towers, combine steps)"):
            stage_info = export_stages(tmp, fused, cascade["controllers"], feeds_by_batch(shipped_photos(), in_specs),
                                       [str(b.spec) for b in built], out, opset)
        extra_manifest = dict(extra_manifest or {}, cascade=dict(cascade["block"], **stage_info))
    hd.save_heads(head_list, tmp / HEADS, extra=label_binding(
        classes, templates if head_list[0].kind == hd.ZERO_SHOT else None))   # as the manifest records them
    save_controller(fused.controller, tmp / CONTROLLER)
    for name, content in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)     # e.g. a carried stages/ file
        if callable(content):
            content(tmp / name)
        elif isinstance(content, bytes):
            (tmp / name).write_bytes(content)
        else:
            (tmp / name).write_text(content)
    with step(f"[{next(done)}/{total}] writing and hashing artefacts"):
        artefacts = hash_artefacts(tmp)
    manifest = {
        "format": "clipfuse-engine",
        "schema_version": SCHEMA_VERSION,
        "name": out.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backbones": [
            {
                "arch": b.spec.arch,
                "weights": b.spec.weights,
                "weights_kind": b.spec.kind,
                "weights_sha256": b.weights_sha256,
                "input": iospec.input_name(b.image_size),
                "image_size": b.image_size,
                "mean": list(b.preprocess["mean"]),
                "std": list(b.preprocess["std"]),
                "embed_dim": b.embed_dim,
                "visual_params": b.info["visual_params"],
                "gflops": b.info["gflops"],
                "logit_scale": b.info["logit_scale"],
            }
            for b in built
        ],
        "classes": classes,
        "templates": templates if head_list[0].kind == hd.ZERO_SHOT else None,
        "head_kind": head_list[0].kind,
        "controller": {"kind": fused.controller.kind, "file": CONTROLLER,
                       "note": "constant 1/K until fitted: fused logits = mean of backbone logits (LOG-AVG)"
                       if fused.controller.kind == "constant" else None},
        "heads_file": HEADS,
        "inputs": [dict(t.to_json(), preprocess=in_specs[t.name].to_json()) for t in inputs],
        "outputs": [t.to_json() for t in outputs],
        "onnx": onnx_info,
        "validation": validation,
        "versions": package_versions(),
        "artefacts": artefacts,
        "export_seconds": round(time.perf_counter() - t_start, 1),
        **(extra_manifest or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(bind_blocks(manifest), indent=2) + "\n")
    return manifest


def reexport_engine(folder, opset: int | None = None) -> ExportResult:
    """Rebuild model.onnx of an existing engine folder from its manifest, heads and controller.

    Used after `clipfuse fit` or to change the opset: backbones are rebuilt from their recorded
    `ARCH:WEIGHTS` and must hash to the recorded weights; the heads and the (fitted) controller
    come from the folder; every other artefact (reports, static controller) is carried over.
    """

    m = read_manifest(folder)
    built = []
    for i, rec in enumerate(m.backbones):
        spec = f"{rec['arch']}:{rec['weights']}"
        with step(f"backbone {i + 1}/{len(m.backbones)} {spec}: rebuilding"):
            b = bb.load_backbone(spec)
        if b.weights_sha256 != rec["weights_sha256"]:
            raise ClipfuseError(f"backbone {spec} no longer has the weights engine {str(m.folder)!r} was built with "
                                "(weights sha256 differs); export a new engine instead")
        built.append(b)
    heads = load_heads(m.folder / m.data.get("heads_file", HEADS), num_backbones=len(built))
    controller = load_controller(m.folder / m.data["controller"]["file"])
    own = {MANIFEST, MODEL_ONNX, MODEL_ONNX + ".data", m.data.get("heads_file", HEADS), m.data["controller"]["file"]}
    carried = {name: (m.folder / name).read_bytes() for name in m.data["artefacts"] if name not in own}
    known = {"format", "schema_version", "name", "created", "backbones", "classes", "templates", "head_kind",
             "controller", "heads_file", "inputs", "outputs", "onnx", "validation", "versions", "artefacts",
             "export_seconds"}
    extra_manifest = {k: v for k, v in m.data.items() if k not in known}
    return export_engine(built, m.classes, m.folder, templates=m.data.get("templates"), force=True,
                         opset=opset or m.data["onnx"]["opset"], heads=heads, controller=controller,
                         extra_files=carried, extra_manifest=extra_manifest)
