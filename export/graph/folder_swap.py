"""Replacing a whole engine folder without losing anything: the swap, foreign files, and recovery.

The one engine-folder writer (engine_folder.py) assembles a new folder under `.NAME.tmp-XXXX` and swaps
it in with two renames: `NAME -> .NAME.old-PID`, then `.NAME.tmp-XXXX -> NAME`. This module owns that
swap and what an interrupted one leaves:

- Foreign files: what the old folder holds that its manifest does not list (bench/, singles/, a user's
  NOTES.md) was not made by an export, so a re-export keeps it: it is moved from the old folder into the
  new one after the swap. One that the new folder also holds is refused before the swap, named.
- Interrupted swaps: a leftover `.NAME.old-PID` is the old engine. When NAME is missing (killed between
  the two renames) it is renamed back; when NAME is in place, its foreign files are moved over and the
  rest removed; when it cannot be settled (NAME is not an engine, or a foreign name is taken) it is kept
  and reported, never removed.
- Only `.NAME.tmp-*` folders (never-swapped new folders) and staged files inside are removed outright.

Every function here runs with the folder's writer lock held (engine_folder.folder_lock), so whoever
left these items is dead.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.runtime.manifest import MANIFEST, sha256_file

STAGE_PREFIX = ".clipfuse.tmp-"          # staging folder inside an engine folder (added files)
JOURNAL, BACKUP = ".commit.json", ".old"     # in a stage: what a commit moves in, and the files it replaces


def temp_prefix(folder: Path) -> str:
    return f".{Path(folder).name}.tmp-"


def old_prefix(folder: Path) -> str:
    return f".{Path(folder).name}.old-"


def _manifest(folder: Path):
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):      # RecursionError: nested past json's limit
        return None
    return data if isinstance(data, dict) and data.get("format") == "clipfuse-engine" else None


def is_engine_folder(folder: Path) -> bool:
    """A folder with a clipfuse manifest.json (readable, format clipfuse-engine)."""
    return _manifest(folder) is not None


def _is_staged(name: str) -> bool:
    """What a killed writer leaves inside a folder: staging folders, write_file_atomic's temp files."""
    return name.startswith((STAGE_PREFIX, ".fp16.tmp-")) or (name.startswith(".") and name.endswith(".tmp"))


def foreign_entries(folder: Path) -> list[str]:
    """Top-level names in an engine folder that its manifest does not account for (neither manifest.json,
    nor an artefact or the subfolder holding one, nor a killed writer's staged item): made by someone
    else (bench/, singles/, a user's notes), so a writer replacing the folder must keep them."""
    data = _manifest(folder)
    arts = data.get("artefacts") if data else None
    own = {MANIFEST} | ({n.split("/", 1)[0] for n in arts} if isinstance(arts, dict) else set())
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name not in own and not _is_staged(p.name) and p.name != ".clipfuse.lock")


def check_foreign(out: Path, new: Path) -> list[str]:
    """Foreign names of `out` that the new folder keeps; refuses (nothing changed) when the new folder
    holds the same name. When `out`'s manifest cannot say what it made, its names are the writer's."""
    if not out.is_dir():
        return []
    foreign = foreign_entries(out)
    clash = [n for n in foreign if (new / n).exists() or (new / n).is_symlink()]
    if clash and isinstance((_manifest(out) or {}).get("artefacts"), dict):
        raise ClipfuseError(f"engine folder {str(out)!r} holds {', '.join(repr(n) for n in clash)}, which its manifest "
                            "does not list and this export would overwrite; move it out of the folder and run again "
                            "(nothing was changed)")
    return [n for n in foreign if n not in clash]


def settle_old(old: Path, folder: Path) -> bool:
    """After `folder` (the new engine) is in place: move the old folder's foreign entries into it, then
    remove the old folder. Kept (and reported) when something cannot be moved. Returns whether removed."""
    moved, stuck = [], []
    names = foreign_entries(old) if is_engine_folder(old) else [p.name for p in old.iterdir() if not _is_staged(p.name)]
    for name in names:
        if (folder / name).exists() or (folder / name).is_symlink():
            stuck.append(name)
            continue
        os.replace(old / name, folder / name)
        moved.append(name)
    if moved:
        log(f"kept {', '.join(moved)} (not made by an export) in {folder}")
    if stuck:
        log(f"kept {old}: it holds {', '.join(stuck)}, not made by an export, and {folder} already has the same "
            "name(s); move what you need out of it, then remove it")
        return False
    shutil.rmtree(old, ignore_errors=True)
    return True


def swap_in(tmp: Path, out: Path, keep: list[str], before_new=None) -> None:
    """Replace `out` by the finished folder `tmp` (two renames), then carry `keep` over and drop the old
    folder. A failure before the new folder is in place puts the old one back. before_new: called between
    the two renames (tests stop the writer there, as a kill would)."""
    old = None
    if out.exists():
        old = out.parent / f"{old_prefix(out)}{os.getpid()}"
        os.replace(out, old)
    try:
        if before_new is not None:
            before_new()
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)            # the old engine back where it was
        raise
    if old is not None:
        settle_old(old, out)


def _matches(path: Path, record) -> bool:
    return (isinstance(record, dict) and path.is_file() and path.stat().st_size == record.get("bytes")
            and sha256_file(path) == record.get("sha256"))


def roll_back(stage: Path, folder: Path) -> None:
    """Undo what a killed update's commit moved in before its manifest (the journal in its stage): a
    file the manifest does not list goes; a listed one that no longer matches its record gets its old
    copy back. After this the folder holds the old pair (file + record) or the new one."""
    try:
        journal = json.loads((stage / JOURNAL).read_text())
        names = [n for n in journal["names"] + journal["removed"] if isinstance(n, str)]
    except (OSError, ValueError, KeyError, TypeError):
        return                           # killed before the commit began: nothing was moved in
    arts = (_manifest(folder) or {}).get("artefacts") or {}
    restored = []
    for name in names:
        if "/.." in f"/{name}" or name.startswith("/"):
            continue
        record, current, backup = arts.get(name), folder / name, stage / BACKUP / name
        if record is None:
            current.unlink(missing_ok=True)
        elif not _matches(current, record) and _matches(backup, record):
            os.replace(backup, current)
            restored.append(name)
    if restored:
        log(f"put back {', '.join(restored)} in {folder}: a clipfuse writer was interrupted before recording "
            "its new files, so the manifest still describes these")


def clean_leftovers(folder: Path) -> list[str]:
    """Settle what killed writers of `folder` left, with its lock held: restore an old engine that an
    interrupted swap left as `.NAME.old-PID`, settle the others (settle_old), remove never-swapped
    `.NAME.tmp-*` folders and staged files. Returns what was removed."""
    folder = Path(folder)
    removed, kept = [], []
    if folder.parent.is_dir():
        siblings = list(folder.parent.iterdir())
        for p in siblings:
            if p.name.startswith(temp_prefix(folder)) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p))
        olds = sorted((p for p in siblings if p.name.startswith(old_prefix(folder))), key=lambda p: p.lstat().st_mtime)
        for p in [p for p in olds if p.is_symlink()]:
            # an older clipfuse moved a symlinked output aside as a link: the link alone, its target is untouched
            p.unlink()
            removed.append(str(p))
        olds = [p for p in olds if p.is_dir() and not p.is_symlink()]
        if olds and not folder.exists() and not folder.is_symlink():
            restored = olds.pop()
            os.replace(restored, folder)
            log(f"restored {folder} from {restored.name}: a clipfuse writer was interrupted while replacing it")
        for p in olds:
            if is_engine_folder(folder) and settle_old(p, folder):
                removed.append(str(p))
            elif p.exists():
                kept.append(str(p))
        if kept and not is_engine_folder(folder):
            log(f"kept {', '.join(kept)}: an earlier engine {folder} that an interrupted writer moved aside; "
                f"{folder} is not an engine folder now, so nothing was removed")
    if folder.is_dir() and is_engine_folder(folder):
        for p in folder.iterdir():
            if p.name.startswith((STAGE_PREFIX, ".fp16.tmp-")) and p.is_dir() and not p.is_symlink():
                roll_back(p, folder)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p))
            elif _is_staged(p.name) and p.is_file() and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed.append(str(p))
    if removed:
        log(f"removed {len(removed)} leftover temporary item(s) of an interrupted writer of {folder}: "
            + ", ".join(removed))
    return removed
