"""Read and check an engine folder's manifest.json: the contract between export/ and runtime/.

`read_manifest(folder)` refuses, with one line that says what to rebuild:
a folder without a manifest (an export that never finished), another schema
version, a field of the wrong type or shape, a missing artefact, or an artefact
whose sha256 or size differs from what the export recorded (tampered with, or
half-copied), and an engine made by another major version of clipfuse. Backends
add their own check before loading the graph (`backends.sessions.check_onnxruntime_can_run`: the
installed onnxruntime must implement the graph's opset). Every refusal ends with
the command that rebuilds the engine (`rebuild_hint`).

Files stay inside the folder. Every file the runtime opens is named in the
manifest relative to the engine folder and must be one of `artefacts` (so it
carries a recorded sha256): the graph (`onnx.file`, `onnx.external_data`), the
heads (`heads_file`), the controller (`controller.file`), fp16 graphs
(`precisions.*.file`, `.external_data`), TensorRT plans (`plans.*.file`,
`.layers`), a cascade's stage graphs (`cascade.stages[*].tower`, `.combine`) and what `fit` adds (`fit.static_file`, `fit.report`, `fit.images_file`). A name that is
absolute, climbs out (`..`), holds a control character, or is not listed, is
refused from the manifest's text alone: nothing is opened and the message does
not say whether such a file exists. Symbolic links are followed only where they
stay inside: an artefact whose resolved path leaves the folder's resolved path
is refused (a link between files of the folder, or a folder reached through a
link, e.g. engines/ on another disk, is fine).

Class names are bound to the hashed heads file: the export writes the sha256 of the class list (and of
the prompt templates) into heads.safetensors as two small uint8 tensors (`label_binding`; tensors, not
metadata, whose key order safetensors randomises), and `read_manifest` refuses a manifest whose classes
or templates differ (an edited `cat` -> `tiger` would otherwise be answered with exit 0). Engines
exported before the binding existed are refused with the command that rebuilds them. The nesting depth,
the cascade and int8-stage blocks and their bindings are checked in runtime/manifest_checks.py.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import clipfuse
from clipfuse.core.errors import ClipfuseError

from .manifest_checks import check_depth
from .precisions import set_aside
from .preprocess import _RESAMPLE, PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
HEADS_DEFAULT = "heads.safetensors"
CONTROLLER_DEFAULT = "controller.safetensors"
CLASSES_KEY, TEMPLATES_KEY = "clipfuse.classes_sha256", "clipfuse.templates_sha256"   # tensors in the heads file
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 << 20      # a safetensors header over 100 MB is not a heads file


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _digest(value) -> bytes:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()).digest()


def label_binding(classes: list[str], templates: list[str] | None) -> dict[str, bytes]:
    """{tensor name: 32-byte sha256}: what the heads file stores to bind the manifest's `classes` and
    `templates` to it."""
    return {CLASSES_KEY: _digest(list(classes)), TEMPLATES_KEY: _digest(templates)}


@dataclass
class Manifest:
    folder: Path
    data: dict
    broken: dict = field(default_factory=dict)     # precisions set aside: {precision: why} (precisions.set_aside)

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def backbones(self) -> list[dict]:
        return list(self.data["backbones"])

    @property
    def backbone_names(self) -> list[str]:
        return [f"{b['arch']}:{b['weights']}" for b in self.backbones]

    @property
    def inputs(self) -> list[dict]:
        return list(self.data["inputs"])

    @property
    def outputs(self) -> list[dict]:
        return list(self.data["outputs"])

    def preprocess_specs(self) -> dict:
        """{input_name: PreprocessSpec} in graph-input order."""

        return {i["name"]: PreprocessSpec.from_json(i["preprocess"]) for i in self.inputs}

    def path(self, artefact: str) -> Path:
        """The path of an artefact of this folder; refuses a name that would leave it."""
        return confined_path(self.folder, artefact, "artefact")

    @property
    def onnx_path(self) -> Path:
        return self.path(self.data["onnx"]["file"])


def _refuse(where, what: str) -> ClipfuseError:
    return ClipfuseError(f"{where}: {what}; re-run `clipfuse export`")


def check_name(name, label: str, where) -> str:
    """A file name from the manifest, judged from its text alone (nothing is opened)."""
    if not isinstance(name, str) or not name:
        raise _refuse(where, f"{label} must be a file name (a non-empty string), got {type(name).__name__}")
    if any(not c.isprintable() for c in name):
        raise _refuse(where, f"{label} {name!r} holds a control character")
    parts = name.replace("\\", "/").split("/")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in parts):
        raise _refuse(where, f"{label} {name!r} is not a name inside the engine folder (absolute, or climbing out "
                             "with '..'); refused without opening it")
    return name


def confined_path(folder: Path, name, label: str, where=None) -> Path:
    """folder / name, refused (without opening it) when the name, or a symbolic link on its way,
    leads outside the folder."""
    where = where if where is not None else f"engine {str(folder)!r}"
    check_name(name, label, where)
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):          # a symlink loop
        inside = False
    if not inside:
        raise _refuse(where, f"{label} {name!r} is a symbolic link that leads outside the engine folder; "
                             "refused without opening it (copy the file into the folder instead)")
    return path


def file_fields(data: dict) -> list[tuple[str, object]]:
    """(label, name) of every file the runtime may open, as the manifest names them."""
    out = [("onnx.file", data["onnx"].get("file"))]
    if data["onnx"].get("external_data") is not None:
        out.append(("onnx.external_data", data["onnx"]["external_data"]))
    out.append(("heads_file", data.get("heads_file", HEADS_DEFAULT)))
    controller = data.get("controller", {})
    if not isinstance(controller, dict):
        raise ClipfuseError(f"'controller' must be an object, got {type(controller).__name__}")
    out.append(("controller.file", controller.get("file", CONTROLLER_DEFAULT)))
    for group, keys in (("precisions", ("file", "external_data")), ("plans", ("file", "layers"))):
        entries = data.get(group, {})
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise ClipfuseError(f"{group!r} must be an object of objects")
        out += [(f"{group}.{p}.{k}", e[k]) for p, e in entries.items() for k in keys if e.get(k) is not None]
    # The optional cascade blocks list their files only where well-formed: a malformed block is refused when it
    # is used (runtime/manifest_checks.py), without stopping the fp32 graph; a name that is listed is checked.
    rec = (data.get("precisions") or {}).get("int8")
    rec = rec.get("cascade") if isinstance(rec, dict) else None
    if isinstance(rec, dict) and isinstance(rec.get("towers"), list):    # int8 stage towers (cascade.int8_stages)
        out += [(f"precisions.int8.cascade.towers[{i}]", t) for i, t in enumerate(rec["towers"]) if isinstance(t, str)]
    cascade = data.get("cascade")
    stages = cascade.get("stages") if isinstance(cascade, dict) else None
    if isinstance(stages, list):     # a cascade engine's stage graphs (runtime/cascade.py opens them)
        out += [(f"cascade.stages[{i}].{k}", e[k]) for i, e in enumerate(stages) if isinstance(e, dict)
                for k in ("tower", "combine") if isinstance(e.get(k), str)]
    fit = data.get("fit")
    if fit is not None:
        if not isinstance(fit, dict):
            raise ClipfuseError(f"'fit' must be an object, got {type(fit).__name__}")
        out += [(f"fit.{k}", fit[k]) for k in ("static_file", "report", "images_file") if fit.get(k) is not None]
    return out


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_types(data: dict, where: str) -> None:
    """Each field the runtime reads has the type it will be used as; one line names the first that is not."""
    def need(cond, what):
        if not cond:
            raise _refuse(where, what)

    bb = data["backbones"]
    need(isinstance(bb, list) and bb and all(isinstance(b, dict) for b in bb),
         f"'backbones' must be a non-empty list of objects, got {_kind(bb)}")
    for i, b in enumerate(bb):
        need(isinstance(b.get("arch"), str) and isinstance(b.get("weights"), str),
             f"backbones[{i}] needs string 'arch' and 'weights'")
        dim = b.get("embed_dim")
        need(type(dim) is int and 0 < dim <= 1 << 20,
             f"backbones[{i}].embed_dim must be a positive integer, got {dim!r}")
    classes = data["classes"]
    need(isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes),
         f"'classes' must be a non-empty list of names, got {_kind(classes)}")
    need(len(set(classes)) == len(classes), "'classes' lists a name twice")
    templates = data.get("templates")
    need(templates is None or (isinstance(templates, list) and all(isinstance(t, str) for t in templates)),
         f"'templates' must be a list of strings or null, got {_kind(templates)}")
    for key in ("inputs", "outputs"):
        v = data[key]
        need(isinstance(v, list) and v and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in v),
             f"{key!r} must be a non-empty list of objects with a 'name', got {_kind(v)}")

    for i, t in enumerate(data["inputs"]):
        shape, pre = t.get("shape"), t.get("preprocess")
        need(isinstance(shape, list) and len(shape) == 4, f"inputs[{i}].shape must be a list of 4 axes")
        need(isinstance(pre, dict), f"inputs[{i}].preprocess must be an object, got {_kind(pre)}")
        size = pre.get("size")
        need(isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 8192,
             f"inputs[{i}].preprocess.size must be an integer side in 1..8192, got {size!r}")
        need(isinstance(pre.get("interpolation", "bicubic"), str) and pre.get("interpolation", "bicubic") in _RESAMPLE,
             f"inputs[{i}].preprocess.interpolation must be one of {sorted(_RESAMPLE)}")
        need(pre.get("resize_mode", "shortest") == "shortest", f"inputs[{i}].preprocess.resize_mode must be 'shortest'")
        need(shape[2] == shape[3] == size, f"inputs[{i}].shape {shape} disagrees with its preprocess size {size}")
    need(isinstance(data["onnx"], dict), f"'onnx' must be an object, got {_kind(data['onnx'])}")
    need(isinstance(data.get("heads_file", HEADS_DEFAULT), str), "'heads_file' must be a file name")
    versions = data.get("versions")
    need(versions is None or isinstance(versions, dict), f"'versions' must be an object, got {_kind(versions)}")
    arts = data["artefacts"]
    need(isinstance(arts, dict), f"'artefacts' must be an object {{name: {{sha256, bytes}}}}, got {_kind(arts)}")
    need(bool(arts), "'artefacts' is empty: nothing could be verified")
    for name, meta in arts.items():
        check_name(name, "artefact", where)
        need(isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])
             and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool) and meta["bytes"] >= 0,
             f"artefact {name!r} needs a 64-hex 'sha256' and an integer 'bytes'")


def read_manifest(folder, verify: bool = True) -> Manifest:
    """Load engines/<name>/manifest.json; with verify, check every artefact's size and sha256.
    Fields, file names and the class binding are checked either way."""
    folder = Path(folder).expanduser()
    if "\0" in str(folder):
        raise ClipfuseError(f"engine folder {str(folder)!r} holds a NUL character")
    if not folder.is_dir():
        aside = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
        if aside:               # a writer killed mid-swap: the engine is there under its old name (kept, never removed)
            raise ClipfuseError(f"engine folder {str(folder)!r} is missing, but {str(aside[-1])!r} holds it: a clipfuse "
                                "writer was interrupted while replacing it; rename it back, or export to it again")
        raise ClipfuseError(f"engine folder {str(folder)!r} does not exist; make it with `clipfuse export ... --out {folder}`")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ClipfuseError(f"{str(folder)!r} has no {MANIFEST}: not an engine folder, or an export that did not finish; "
                            "run `clipfuse export` again")
    where = repr(str(mpath))
    confined_path(folder, MANIFEST, "the manifest", where)
    try:
        text = mpath.read_text(encoding="utf-8")
        check_depth(text, where)        # before parsing: deep nesting ends in RecursionError anywhere after
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipfuseError(f"{where} is not valid JSON ({e}); re-run `clipfuse export`") from None
    except OSError as e:
        raise ClipfuseError(f"cannot read {where} ({e.strerror or e})") from None
    if not isinstance(data, dict) or data.get("format") != "clipfuse-engine":
        raise ClipfuseError(f"{where} is not a clipfuse engine manifest")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        shown = f"{version!r} (a {_kind(version)})" if type(version) is not int else str(version)
        raise ClipfuseError(f"{where} has schema version {shown}, this clipfuse reads version {SCHEMA_VERSION} "
                            "(an integer); re-export the engine with this clipfuse (`clipfuse export`)")
    for key in ("backbones", "classes", "inputs", "outputs", "onnx", "heads_file", "controller", "artefacts"):
        if key not in data:
            raise ClipfuseError(f"{where} lacks the {key!r} entry; re-run `clipfuse export`")
    _check_types(data, where)
    manifest = Manifest(folder, data)
    check_clipfuse_version(manifest)
    check_files_listed(manifest, where)
    if verify:
        verify_artefacts(manifest)
    check_label_binding(manifest)
    return manifest


def check_files_listed(manifest: Manifest, where=None) -> None:
    """Every file field names a hashed artefact inside the folder; artefact names stay inside too."""
    where = where or repr(str(manifest.folder / MANIFEST))
    try:
        fields = file_fields(manifest.data)
    except ClipfuseError as e:
        raise _refuse(where, str(e)) from None
    arts = manifest.data["artefacts"]
    for label, name in fields:
        check_name(name, label, where)
        if name not in arts:
            raise _refuse(where, f"{label} {name!r} is not among 'artefacts', so it carries no recorded sha256")
    for name in arts:
        confined_path(manifest.folder, name, "artefact", where)


def verify_artefacts(manifest: Manifest, names=None) -> None:
    """Every artefact's size and sha256; a precision's own file that fails only sets that precision aside."""
    bad = {}
    for name, meta in manifest.data["artefacts"].items():
        if names is not None and name not in names:
            continue
        p = confined_path(manifest.folder, name, "artefact")
        if not p.is_file():
            what = f"artefact {name} is a folder, not a file" if p.is_dir() else f"is missing {name}"
            bad[name] = (f"engine {str(manifest.folder)!r}{':' if p.is_dir() else ''} {what}; "
                         "re-run `clipfuse export`")
        elif p.stat().st_size != meta["bytes"]:
            bad[name] = (f"{str(p)!r} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}: "
                         "the file was changed or half-copied; re-run `clipfuse export`")
        elif sha256_file(p) != meta["sha256"]:
            bad[name] = (f"{str(p)!r} does not match the sha256 in the manifest: the file was changed; "
                         "re-run `clipfuse export`")
    if bad:
        set_aside(manifest, bad)


def read_safetensors_bytes(path: Path, names) -> dict[str, bytes]:
    """The raw bytes of the uint8 tensors `names` that a safetensors file holds (absent ones left out),
    from its JSON header and offsets: no torch, no safetensors package."""
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= _MAX_HEADER:
            raise ValueError(f"header length {n} is not that of a safetensors file")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for name in names:
            entry = header.get(name)
            if not isinstance(entry, dict) or entry.get("dtype") != "U8":
                continue
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= start + 1024:
                raise ValueError(f"tensor {name} has offsets {start}..{end}")
            f.seek(8 + n + start)
            out[name] = f.read(end - start)
    return out


def check_label_binding(manifest: Manifest) -> None:
    """Refuse a manifest whose classes or templates are not those the heads file was exported with."""
    name = manifest.data.get("heads_file", HEADS_DEFAULT)
    path = confined_path(manifest.folder, name, "heads_file")
    where = f"engine {str(manifest.folder)!r}"
    try:
        meta = read_safetensors_bytes(path, (CLASSES_KEY, TEMPLATES_KEY))
    except FileNotFoundError:
        raise ClipfuseError(f"{where}: heads file {name} is missing; re-run `clipfuse export`") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ClipfuseError(f"{where}: heads file {name} is not a safetensors file ({e}); re-run `clipfuse export`") from None
    if CLASSES_KEY not in meta:
        raise ClipfuseError(f"{where} was exported before class names were bound to its heads file, so an edited "
                            f"class list could not be detected; rebuild it with {rebuild_hint(manifest)}")
    want = label_binding(manifest.data["classes"], manifest.data.get("templates"))
    for key, field in ((CLASSES_KEY, "classes"), (TEMPLATES_KEY, "templates")):
        if meta.get(key) != want[key]:
            raise ClipfuseError(f"{where}: the {field} in {MANIFEST} are not those {name} was exported with (the "
                                f"manifest was edited); restore them, or rebuild with {rebuild_hint(manifest)}")


# ----------------------------------------------------------------------------- versions

def rebuild_hint(manifest: Manifest) -> str:
    """The export command that rebuilds this engine in place (classes: the user's own file or list)."""
    backbones = " ".join(f"-b {b['arch']}:{b['weights']}" for b in manifest.data.get("backbones", []))
    return f"`clipfuse export {backbones} -c CLASSES --out {manifest.folder} --force`"


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def check_clipfuse_version(manifest: Manifest, installed: str | None = None) -> None:
    """An engine made by another major version of clipfuse may use conventions this one does not know
    (the schema version covers the manifest's layout, not the graph's meaning)."""
    if installed is None:
        installed = clipfuse.__version__
    made_by = (manifest.data.get("versions") or {}).get("clipfuse")
    if made_by and _major(made_by) != _major(installed):
        raise ClipfuseError(f"engine {str(manifest.folder)!r} was made by clipfuse {made_by}; this is clipfuse "
                            f"{installed} (another major version): rebuild it with {rebuild_hint(manifest)}")

