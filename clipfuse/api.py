"""The public API's own functions: the ones that add something to a library call (clipfuse/__init__.py
points every other public name straight at its home, e.g. clipfuse.export_engine at
clipfuse.export.graph.engine.export_engine). They return data; the CLI shows it through clipfuse.cli.present."""
from __future__ import annotations

from pathlib import Path

from clipfuse.cli.present import format_inspect
from clipfuse.export.fit.levers.recipe import Levers
from clipfuse.export.thresholds import CascadeConfig
from clipfuse.runtime.manifest import read_manifest


def fit_levers(**kwargs):
    """fit's levers (budget-chosen subset, cascade) as one recipe, checked by fit (export/fit/levers/recipe.py)."""

    if not kwargs.get("cascade"):       # a bad value (negative, nan, inf) is refused even unused
        CascadeConfig(max_drop=kwargs.get("max_drop", 0.5)).check()
    return Levers(**kwargs)


def list_backbones(measure: bool = False) -> list[dict]:
    """The nine OpenAI CLIP backbones.

    Args:
        measure: rebuild each at random weights and count its parameters and GFLOPs here.

    Returns:
        list of dicts, one per backbone: arch, input size, image-tower parameters, GFLOPs, embedding width.
    """

    from clipfuse.export.graph.backbones import OPENAI_BACKBONES, load_backbone

    rows = []
    for arch, info in OPENAI_BACKBONES.items():
        row = dict(arch=arch, **info)
        if measure:   # rebuild at random weights and count: FLOPs do not depend on weight values
            b = load_backbone(f"{arch}:random:0", measure_flops=True)
            row.update(visual_params=b.info["visual_params"], gflops=b.info["gflops"], embed_dim=b.embed_dim)
            del b
        rows.append(row)
    return rows


class EngineInfo(dict):
    """What inspect_engine returns: a plain dict of data (keys, JSON, ==) whose str() is the table
    `clipfuse inspect` prints, so `print(clipfuse.inspect_engine(folder))` reads as text."""

    def __str__(self) -> str:
        return format_inspect(self)


def inspect_engine(folder, verify: bool = True) -> EngineInfo:
    """What an engine folder holds: backbones, classes, IO, files, parameters, GFLOPs, validation.

    Args:
        folder: an engine folder.
        verify: check every artefact's sha256 first.

    Returns:
        EngineInfo: a plain dict; print() it for the table `clipfuse inspect` shows.
    """

    m = read_manifest(folder, verify=verify)
    d = m.data
    files = {}
    for p in sorted(Path(m.folder).iterdir()):
        if p.is_file():
            files[p.name] = p.stat().st_size
    val = d.get("validation", {})
    worst = {}
    for batch in val.get("batches", {}).values():
        for name, o in batch["outputs"].items():
            worst[name] = max(worst.get(name, 0.0), o["max_rel"])
    return EngineInfo({
        "folder": str(m.folder),
        "name": d.get("name"),
        "created": d.get("created"),
        "backbones": d["backbones"],
        "classes": d["classes"],
        "head_kind": d.get("head_kind"),
        "controller": d.get("controller", {}).get("kind"),
        "inputs": d["inputs"],
        "outputs": d["outputs"],
        "files": files,
        "total_visual_params": sum(b["visual_params"] for b in d["backbones"]),
        "total_gflops": round(sum(b["gflops"] for b in d["backbones"]), 3),
        "validation_max_rel": worst,
        "onnx": d["onnx"],
        "versions": d.get("versions", {}),
    })
