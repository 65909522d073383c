"""Checks of a manifest beyond its plain fields: its nesting depth, the cascade block, the int8 stages'
record, and the bindings that make an edit of their decisions detectable.

- Depth: a manifest nested deeper than MAX_DEPTH is refused from its text, before it is parsed (1500 nested
  lists made every command end in a RecursionError).
- The cascade block (`cascade`) and the int8 stages' record (`precisions.int8.cascade`) are checked when
  they are used (`check_cascade_block`, `check_int8_cascade`), not when the manifest is read: a malformed
  optional block stops the cascade or the int8 stages, with one line naming the field, never the fp32
  graph, `inspect` or another precision.
- Bindings: thresholds, score, stage order and stage files decide which graph answers an image, yet they
  live in the manifest's text, which no artefact hash covers. Every clipfuse writer records the sha256 of
  each block in `bindings` (`bind_blocks`, next to the artefacts' hashes), and a block whose hash differs
  is refused: a hand edit of a threshold is detected as an edited class name is (runtime/manifest.py).

Imports nothing of runtime/manifest.py (which imports check_depth from here): callers pass `where` (the
engine, as messages name it) and `hint` (the command that rebuilds it).
"""
from __future__ import annotations

import hashlib
import json
import math
import re

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError

from .routing import SCORES

MAX_DEPTH = 32                      # real manifests nest 6 deep; json and deepcopy recurse per level
BINDINGS = "bindings"
CASCADE, INT8_CASCADE = "cascade", "precisions.int8.cascade"
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


def check_depth(text: str, where: str) -> None:
    """Refuse JSON text whose arrays/objects nest deeper than MAX_DEPTH (counted outside strings)."""
    depth = deepest = 0
    for c in _STRINGS.sub("", text):
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    raise ClipfuseError(f"{where} nests lists or objects deeper than {MAX_DEPTH} levels: not a "
                                        "manifest clipfuse wrote; re-run `clipfuse export`")
        elif c in "]}":
            depth -= 1


# ----------------------------------------------------------------------------- bindings

def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()).hexdigest()


def cascade_decisions(block: dict) -> dict:
    """What a cascade block decides (stage order and files, score, thresholds): the bound part."""
    return {k: block.get(k) for k in ("order", "score", "thresholds", "stages")}


def int8_decisions(rec: dict) -> dict:
    return {k: rec.get(k) for k in ("written", "towers", "thresholds", "score")}


def bind_blocks(data: dict) -> dict:
    """Record in data["bindings"] the sha256 of the cascade's and the int8 stages' decisions (each writer of
    a manifest calls this just before writing it). Returns data."""
    bindings = {}
    if isinstance(data.get("cascade"), dict):
        bindings[CASCADE] = _sha(cascade_decisions(data["cascade"]))
    rec = ((data.get("precisions") or {}).get("int8") or {}) if isinstance(data.get("precisions"), dict) else {}
    if isinstance(rec, dict) and isinstance(rec.get("cascade"), dict):
        bindings[INT8_CASCADE] = _sha(int8_decisions(rec["cascade"]))
    if bindings:
        data[BINDINGS] = bindings
    else:
        data.pop(BINDINGS, None)
    return data


def _check_binding(data: dict, key: str, decisions: dict, where: str, hint: str) -> None:
    recorded = (data.get(BINDINGS) or {}).get(key) if isinstance(data.get(BINDINGS), dict) else None
    if recorded is None:
        raise ClipfuseError(f"{where}: its {key!r} block carries no recorded sha256 (made before clipfuse bound it, "
                            f"or added by hand), so an edited threshold could not be detected; {hint}")
    if recorded != _sha(decisions):
        raise ClipfuseError(f"{where}: the {key!r} block of manifest.json is not the one clipfuse wrote (its "
                            f"thresholds, score, order or stage files were edited); restore it, or {hint}")


# ----------------------------------------------------------------------------- field checks

def _number_or_null(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def check_thresholds(t, count: int, label: str, where: str, hint: str) -> list:
    if not isinstance(t, list) or len(t) != count or not all(_number_or_null(v) for v in t):
        raise ClipfuseError(f"{where}: {label!r} must be a list of {count} finite number(s) or null (null = never "
                            f"leave there), got {json.dumps(t, allow_nan=True)[:200]}; {hint}")
    return t


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20


def check_cascade_block(data: dict, backbone_names: list[str], where: str, hint: str) -> dict:
    """The manifest's cascade block, every field the router reads checked, and its binding. One line naming
    the first field that is wrong."""
    c = data.get("cascade")
    if not isinstance(c, dict):
        raise ClipfuseError(f"{where}: 'cascade' must be an object, got {type(c).__name__}; {hint}")
    K = len(backbone_names)
    stages = c.get("stages")
    if not isinstance(stages, list) or len(stages) != K or not all(isinstance(s, dict) for s in stages):
        raise ClipfuseError(f"{where}: 'cascade.stages' must list one object per backbone ({K}); {hint}")
    if c.get("score") not in SCORES:
        raise ClipfuseError(f"{where}: 'cascade.score' must be one of {', '.join(SCORES)}, got {c.get('score')!r}")
    check_thresholds(c.get("thresholds"), K - 1, "cascade.thresholds", where, hint)
    order = c.get("order")
    if order != backbone_names:
        unknown = [o for o in order if o not in backbone_names] if isinstance(order, list) else None
        what = f"names unknown backbone(s) {unknown}" if unknown else f"is {order!r}"
        raise ClipfuseError(f"{where}: 'cascade.order' {what}, not the engine's backbones in order "
                            f"{backbone_names}; {hint}")
    inputs = [i.get("name") for i in data.get("inputs", [])]
    backbones = data.get("backbones", [])
    for k, st in enumerate(stages):
        label = f"cascade.stages[{k}]"
        if st.get("backbone") != backbone_names[k]:
            raise ClipfuseError(f"{where}: '{label}.backbone' is {st.get('backbone')!r}, the engine's backbone {k + 1} "
                                f"is {backbone_names[k]!r}; {hint}")
        if st.get("input") not in inputs:
            raise ClipfuseError(f"{where}: '{label}.input' must name one of the graph inputs {inputs}, got "
                                f"{st.get('input')!r}; {hint}")
        for f in ("tower", "combine"):
            if not isinstance(st.get(f), str):
                raise ClipfuseError(f"{where}: '{label}.{f}' must be a file name, got {st.get(f)!r}; {hint}")
        dim, want = st.get("embed_dim"), backbones[k].get("embed_dim") if k < len(backbones) else None
        if not _positive_int(dim) or (_positive_int(want) and dim != want):
            raise ClipfuseError(f"{where}: '{label}.embed_dim' must be backbone {k + 1}'s embedding width "
                                f"({want!r}), got {dim!r}; {hint}")
    _check_binding(data, CASCADE, cascade_decisions(c), where, hint)
    return c


def check_int8_cascade(data: dict, K: int, where: str, hint: str, rerun: str) -> dict:
    """precisions.int8.cascade, checked (its binding too): {"written": True, "towers": [K names], "thresholds":
    [K - 1]}, the towers being the int8 files (stages/tower_<k>.int8.onnx), never the fp32 ones.
    rerun: the command that rewrites the record."""
    rec = ((data.get("precisions") or {}).get("int8") or {}).get("cascade")
    if rec is None:
        raise ClipfuseError(f"{where} has no int8 cascade stages (its int8 graph was made before they existed, or "
                            f"from a plain engine): run {rerun} again, or pass --no-cascade (cascade=False) to run "
                            "model.int8.onnx")
    if not isinstance(rec, dict):
        raise ClipfuseError(f"{where}: 'precisions.int8.cascade' must be an object, got {type(rec).__name__}: "
                            f"run {rerun} again, or pass --no-cascade (cascade=False) to run model.int8.onnx")
    _check_binding(data, INT8_CASCADE, int8_decisions(rec), where, f"run {rerun} again")
    if not rec.get("written"):
        raise ClipfuseError(f"{where}: its int8 cascade stages were not written ({rec.get('reason', 'no reason recorded')}); "
                            "pass --no-cascade (cascade=False) to run model.int8.onnx for every image")
    towers = rec.get("towers")
    want = [iospec.tower_file(k, "int8") for k in range(1, K + 1)]
    if towers != want:
        raise ClipfuseError(f"{where}: 'precisions.int8.cascade.towers' must be the int8 stage towers {want}, got "
                            f"{json.dumps(towers)[:200]}; run {rerun} again")
    check_thresholds(rec.get("thresholds"), K - 1, "precisions.int8.cascade.thresholds", where, hint)
    return rec
