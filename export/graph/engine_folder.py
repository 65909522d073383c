"""The one engine-folder writer: a new folder swapped in atomically, or files added to an existing one.

Everything that writes an engine folder goes through here (export/graph/engine.py, the fp16 converter,
the TensorRT builder), so the guarantees are the same for all of them:

- Atomic: a new folder is assembled under a hidden sibling name (`.NAME.tmp-XXXX`) and renamed
  into place once written and flushed; added files are staged inside the folder, flushed, hashed
  and renamed in, and manifest.json is replaced last. A crash leaves the old engine or the new.
- One writer at a time: the writer holds an exclusive lock (fcntl.flock) on `.NAME.lock` beside
  the folder for the whole job; a second writer is refused at once with one line, never wins
  silently. The lock file is removed on release (after checking it is still the one locked).
- Nothing lost: a re-export keeps what it did not make (bench/, singles/, a user's notes: files the
  old manifest does not list), and an interrupted swap is restored or settled by the next writer, never
  removed before the new engine is in place (folder_swap.py).
- Leftovers: temporary folders and staged files of writers killed mid-job are removed by the next
  writer of the same folder, which holds the lock, so their writer is known to be dead.
- An output that is a symbolic link is written through: the link stays, its target is replaced.
- `--force` replaces only an engine folder (a clipfuse manifest.json) or an empty folder; never
  the current folder or one that holds it. Anything else is refused naming a file in it.
- Disk full, read-only folders and permission errors become one ClipfuseError line naming the
  folder; nothing half-written is left.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.manifest import MANIFEST, sha256_file
from clipfuse.runtime.manifest_checks import bind_blocks

from .folder_swap import (
    BACKUP,
    JOURNAL,
    STAGE_PREFIX,
    check_foreign,
    clean_leftovers,
    is_engine_folder,
    swap_in,
    temp_prefix,
)

SUBFOLDERS = (iospec.STAGE_DIR,)           # subfolders whose files an update may add (a cascade's stages/)
# errors that say "this folder cannot take the write", as opposed to a bug: one line, not a traceback
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def folder_lock(folder: Path, inside_ok: bool = False):
    """Hold the exclusive writer lock of `folder` (flock on `.NAME.lock` beside it), or refuse at once.

    inside_ok: when the parent cannot take the lock file, lock `folder/.clipfuse.lock` instead. Safe
    for writers that only add files: a writer that replaces the folder needs a writable parent anyway
    (its temporary sibling goes there), so none can run while the parent refuses the lock file."""
    path = lock_path(folder)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if inside_ok and e.errno in WRITE_ERRNOS and path.parent == Path(folder).parent:
                path = Path(folder) / ".clipfuse.lock"
                continue
            raise ClipfuseError(f"cannot create the lock file {str(path)!r} for {str(folder)!r}: "
                                f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ClipfuseError(f"another clipfuse process is writing {str(folder)!r} (it holds {str(path)!r}); "
                                "wait for it to finish, or write to another --out") from None
        # the holder before us may have removed the file after we opened it: lock the live one
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        Path(path).unlink(missing_ok=True)      # while still locked: a waiter re-checks the inode
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_locked(folder: Path) -> bool:
    """Whether a live writer holds `folder`'s lock (used before removing what looks left over)."""
    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _first_file(folder: Path) -> str:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            return os.path.relpath(os.path.join(root, f), folder)
    for root, dirs, _ in os.walk(folder):
        for d in sorted(dirs):
            return os.path.relpath(os.path.join(root, d), folder) + "/"
    return "?"


def check_output_folder(out: Path, force: bool) -> Path:
    """Refuse, before any long work, an output that cannot or must not be written; returns the path."""
    out = Path(out).expanduser()
    if out.is_symlink():      # write through the link (engines/current -> engines/v3): the link stays a link
        if not out.exists():
            raise ClipfuseError(f"output {str(out)!r} is a symbolic link to {os.readlink(out)!r}, which does not "
                                "exist; remove the link or point it at a folder")
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ClipfuseError(f"output {str(out)!r} exists and is not a folder")
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:           # the current folder was deleted: nothing to protect
        cwd = None
    resolved = out.resolve()
    if cwd is not None and (resolved == cwd or resolved in cwd.parents):
        raise ClipfuseError(f"output folder {str(out)!r} is the current folder or holds it: clipfuse replaces its "
                            "output folder whole, so it will not replace the folder you are in; pick another --out")
    if out.exists() and any(out.iterdir()):
        engine = is_engine_folder(out)
        if not engine:
            raise ClipfuseError(f"output folder {str(out)!r} already exists and is not a clipfuse engine (it holds "
                                f"{_first_file(out)!r}): clipfuse replaces only an engine folder or an empty one, "
                                "even with --force; pick another --out")
        if not force:
            raise ClipfuseError(f"output folder {str(out)!r} already exists; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipfuseError(f"cannot create the output's parent folder {str(parent)!r}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipfuseError(f"output folder {str(out)!r} cannot be written: no write permission on {str(parent)!r}")
    return out


def check_writable_folder(folder: Path, what: str) -> Path:
    """Make `folder` (and its parents) and check that files can be written in it, before any long work:
    one ClipfuseError line naming it otherwise (a file in the way, read-only, no permission)."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ClipfuseError(f"{what} {str(folder)!r} is a file, not a folder; pick another folder") from None
    except NotADirectoryError:
        raise ClipfuseError(f"{what} {str(folder)!r} cannot be made: a part of its path is a file, not a "
                            "folder; pick another folder") from None
    except OSError as e:
        raise ClipfuseError(f"{what} {str(folder)!r} cannot be made: {WRITE_ERRNOS.get(e.errno, e.strerror)}; "
                            "pick another folder") from None
    reason = None if os.access(folder, os.W_OK | os.X_OK) else "no write permission"
    if reason is None:
        try:            # the real test (a read-only file system refuses even root)
            fd, probe = tempfile.mkstemp(prefix=".clipfuse-write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            reason = WRITE_ERRNOS.get(e.errno, e.strerror)
    if reason is not None:
        raise ClipfuseError(f"{what} {str(folder)!r} cannot be written: {reason}; pick another folder")
    return folder


def write_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or in its cause/context chain) that says the folder cannot take
    the write (disk full, read-only, permissions), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _refuse_write(exc: BaseException, folder: Path, what: str) -> None:
    e = write_error(exc)
    if e is not None:
        raise ClipfuseError(f"cannot write {what} {str(folder)!r}: {WRITE_ERRNOS[e.errno]}"
                            f"{' (' + str(e.filename) + ')' if e.filename else ''}; nothing was changed") from None


def fsync_file(path: Path) -> None:
    """Flush one file to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes | str) -> None:
    """Write `path` via a temp file in the same folder, fsync, os.replace: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest_atomic(folder: Path, data: dict) -> None:
    """manifest.json of an existing engine folder, replaced atomically; the cascade blocks' bindings are
    recorded as written (runtime/manifest_checks.py)."""
    write_file_atomic(Path(folder) / MANIFEST, json.dumps(bind_blocks(data), indent=2) + "\n")


def hash_artefacts(folder: Path, names=None) -> dict:
    """{name: {"sha256", "bytes"}} for the named files (default: every file) of `folder`."""
    folder = Path(folder)
    # files in subfolders (a cascade's stages/) are named by their posix path inside the folder
    paths = [folder / n for n in names] if names is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}


# tests set these callables to stop a writer where a kill would land: between the swap's two renames,
# and between an update's file renames and its manifest
_before_swap = None
_before_manifest = None


@contextmanager
def new_engine_folder(out: Path, force: bool = False):
    """Yield a temporary folder to fill; on success it replaces `out` in one rename, on failure it vanishes.

    Holds `out`'s writer lock throughout; re-checks the output under the lock (another writer may have
    finished meanwhile); removes what killed writers left. Write errors become one ClipfuseError line.
    """
    out = check_output_folder(Path(out), force)
    with folder_lock(out):
        clean_leftovers(out)
        check_output_folder(out, force)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
        except OSError as e:
            _refuse_write(e, out, "engine folder")
            raise
        try:
            yield tmp
            for p in tmp.rglob("*"):
                if p.is_file():
                    fsync_file(p)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)        # mkdtemp makes it private; an engine folder is not
            for p in tmp.rglob("*"):
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
            swap_in(tmp, out, check_foreign(out, tmp), before_new=_before_swap)
        except BaseException as e:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            _refuse_write(e, out, "engine folder")
            raise


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class EngineUpdate:
    """Files staged for an existing engine folder, and the manifest edits that go with them."""

    def __init__(self, folder: Path, stage: Path):
        self.folder, self.stage = folder, stage
        self.edits, self.removed = [], []

    def path(self, name: str) -> Path:
        """Where to write the new artefact `name` (moved into the folder on commit)."""
        return self.stage / name

    def remove(self, name: str) -> None:
        """Drop artefact `name` (file and manifest entry) on commit."""
        self.removed.append(name)

    def edit_manifest(self, fn) -> None:
        """fn(data) edits the manifest dict in place, on commit, after the artefacts are recorded."""
        self.edits.append(fn)

    def commit(self) -> dict:
        # top-level files, and files under the subfolders engines hold (a cascade's stages/); a helper's
        # temporary folder elsewhere in the stage is not an artefact
        names = sorted([p.name for p in self.stage.iterdir() if p.is_file()]
                       + [p.relative_to(self.stage).as_posix() for sub in SUBFOLDERS if (self.stage / sub).is_dir()
                          for p in (self.stage / sub).rglob("*") if p.is_file()])
        for name in names:
            fsync_file(self.stage / name)
        artefacts = hash_artefacts(self.stage, names)
        # A kill from here to the manifest leaves new files under old records: keep the old files (hard
        # links) and a journal in the stage, so the next writer puts the old pair back (folder_swap.py
        # roll_back); readers meanwhile set that precision aside (runtime/precisions.py set_aside).
        for name in names:
            if (self.folder / name).is_file():
                (self.stage / BACKUP / name).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self.folder / name, self.stage / BACKUP / name)
        write_file_atomic(self.stage / JOURNAL, json.dumps({"names": names, "removed": self.removed}))
        # data files first, graphs next, the manifest last: until the manifest names them, read_manifest
        # ignores the new files, and the old manifest still verifies the old ones
        for name in sorted(names, key=lambda n: (not n.endswith(".data"), n)):
            os.chmod(self.stage / name, 0o644)
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.stage / name, self.folder / name)
        if _before_manifest is not None:
            _before_manifest()
        data = json.loads((self.folder / MANIFEST).read_text())
        data["artefacts"].update(artefacts)
        for name in self.removed:
            if name not in artefacts:
                data["artefacts"].pop(name, None)
        for fn in self.edits:
            fn(data)
        write_manifest_atomic(self.folder, data)
        for name in self.removed:
            if name not in artefacts:
                (self.folder / name).unlink(missing_ok=True)
        return data


@contextmanager
def update_engine_folder(folder: Path, what: str = "files"):
    """Yield an EngineUpdate for the engine folder; on success its files go in and the manifest is
    updated (artefact hashes included), under the folder's writer lock; on failure nothing changes."""
    folder = Path(folder)
    if not is_engine_folder(folder):
        raise ClipfuseError(f"{str(folder)!r} is not an engine folder (no clipfuse manifest.json)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ClipfuseError(f"engine folder {str(folder)!r} is read-only: cannot add {what}; make it writable "
                            "or copy the engine somewhere writable")
    # the lock of the real folder: a writer through a symbolic link and one by the real path exclude each other
    with folder_lock(folder.resolve(), inside_ok=True):
        clean_leftovers(folder)
        try:
            stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))
        except OSError as e:
            _refuse_write(e, folder, f"{what} into engine folder")
            raise
        try:
            update = EngineUpdate(folder, stage)
            yield update
            update.commit()
        except BaseException as e:
            _refuse_write(e, folder, f"{what} into engine folder")
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
