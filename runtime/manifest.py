"""Read and check an engine folder's manifest.json: the contract between export/ and runtime/.

`read_manifest(folder)` refuses, with a message that says what to rebuild:
a folder without a manifest (an export that never finished), another schema
version, a missing artefact, or an artefact whose sha256 or size differs from
what the export recorded (tampered with, or half-copied), and an engine made
by another major version of clipfuse. Backends add their own check before
loading the graph (`check_onnxruntime_can_run`: the installed onnxruntime must
implement the graph's opset). Every refusal ends with the command that rebuilds
the engine (`rebuild_hint`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from clipfuse.errors import ClipfuseError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    folder: Path
    data: dict

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
        from clipfuse.runtime.preprocess import PreprocessSpec

        return {i["name"]: PreprocessSpec.from_json(i["preprocess"]) for i in self.inputs}

    def path(self, artefact: str) -> Path:
        return self.folder / artefact

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.data["onnx"]["file"]


def read_manifest(folder, verify: bool = True) -> Manifest:
    """Load engines/<name>/manifest.json; with verify, check every artefact's size and sha256."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ClipfuseError(f"engine folder {str(folder)!r} does not exist; make it with `clipfuse export ... --out {folder}`")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ClipfuseError(f"{str(folder)!r} has no {MANIFEST}: not an engine folder, or an export that did not finish; "
                            "run `clipfuse export` again")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipfuseError(f"{str(mpath)!r} is not valid JSON ({e}); re-run `clipfuse export`") from None
    if not isinstance(data, dict) or data.get("format") != "clipfuse-engine":
        raise ClipfuseError(f"{str(mpath)!r} is not a clipfuse engine manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ClipfuseError(f"{str(mpath)!r} has schema version {version}, this clipfuse reads version {SCHEMA_VERSION}; "
                            "re-export the engine with this clipfuse (`clipfuse export`)")
    for key in ("backbones", "classes", "inputs", "outputs", "onnx", "artefacts"):
        if key not in data:
            raise ClipfuseError(f"{str(mpath)!r} lacks the {key!r} entry; re-run `clipfuse export`")
    manifest = Manifest(folder, data)
    check_clipfuse_version(manifest)
    if verify:
        verify_artefacts(manifest)
    return manifest


def verify_artefacts(manifest: Manifest, names=None) -> None:
    for name, meta in manifest.data["artefacts"].items():
        if names is not None and name not in names:
            continue
        p = manifest.folder / name
        if not p.is_file():
            raise ClipfuseError(f"engine {str(manifest.folder)!r} is missing {name}; re-run `clipfuse export`")
        if p.stat().st_size != meta["bytes"]:
            raise ClipfuseError(f"{str(p)!r} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}: "
                                "the file was changed or half-copied; re-run `clipfuse export`")
        if sha256_file(p) != meta["sha256"]:
            raise ClipfuseError(f"{str(p)!r} does not match the sha256 in the manifest: the file was changed; "
                                "re-run `clipfuse export`")


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
        import clipfuse

        installed = clipfuse.__version__
    made_by = (manifest.data.get("versions") or {}).get("clipfuse")
    if made_by and _major(made_by) != _major(installed):
        raise ClipfuseError(f"engine {str(manifest.folder)!r} was made by clipfuse {made_by}; this is clipfuse "
                            f"{installed} (another major version): rebuild it with {rebuild_hint(manifest)}")


def onnxruntime_max_opset() -> int | None:
    """The highest ai.onnx opset the installed onnxruntime implements, from its operator schemas;
    None where this build does not expose them (then loading the graph is the test)."""
    try:
        from onnxruntime.capi import _pybind_state as C

        return max(s.since_version for s in C.get_all_operator_schema() if s.domain in ("", "ai.onnx"))
    except Exception:       # a minimal build without schemas, or a renamed private module
        return None


def check_onnxruntime_can_run(manifest: Manifest, max_opset: int | None = None) -> None:
    """Refuse, before loading, a graph whose opset the installed onnxruntime does not implement."""
    opset = manifest.data.get("onnx", {}).get("opset")
    if max_opset is None:
        max_opset = onnxruntime_max_opset()
    if opset is None or max_opset is None or int(opset) <= max_opset:
        return
    import onnxruntime

    raise ClipfuseError(f"engine {str(manifest.folder)!r} is an opset {opset} graph; the installed onnxruntime "
                        f"{onnxruntime.__version__} implements opsets up to {max_opset}. Upgrade onnxruntime "
                        f"(pip install -U onnxruntime), or rebuild the engine for it: "
                        f"{rebuild_hint(manifest)[:-1]} --opset {max(17, min(max_opset, 18))}`")
