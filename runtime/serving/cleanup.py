"""Leaving nothing behind when a `clipfuse serve` server stops (runtime/serving/server.py calls these).

- tritonserver and its Python-backend stubs: waited for, SIGKILLed after a grace period (a stub ignores
  SIGTERM), waited for again (`server_processes`, `reap`);
- shared memory: the /dev/shm regions named with this server's prefix, and pytriton's tensor store (psm_*)
  that appeared while it ran (`free_shared_memory`);
- the model store: tritonserver copies a model loaded through its API into /tmp/folderXXXXXX and removes
  it only when it unloads the model, not when it crashes or is killed; each holds a config.pbtxt naming the
  pytriton workspace it serves, which tells this server's stores from any other's (`remove_model_stores`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

SHM_DIR = Path("/dev/shm")
MODEL_STORE_DIR = Path("/tmp")      # where tritonserver makes its model stores (fixed in Triton, not $TMPDIR)


def server_processes(triton) -> list:
    """tritonserver and its descendants (the Python-backend stubs), as psutil processes."""
    try:
        import psutil

        pid = triton._triton_server._tritonserver_running_cmd.pid
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except Exception:       # not started, already gone, or no psutil: nothing of ours to wait for
        return []


def reap(processes: list, grace_s: float) -> None:
    """Wait for `processes` to exit; SIGKILL what is left after grace_s (stubs ignore SIGTERM), wait again."""
    if not processes:
        return
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def workspace_of(triton) -> str | None:
    try:
        return str(triton._workspace.path)
    except Exception:       # another pytriton: its stores cannot be told from others'
        return None


def model_stores(workspace: str) -> list[Path]:
    """The model stores tritonserver made for the pytriton workspace `workspace`: the temporary folders
    (MODEL_STORE_DIR/folderXXXXXX) it copies a model loaded through its API into, each holding a
    config.pbtxt naming that workspace. tritonserver removes one when it unloads the model, never when it
    dies or is killed."""
    needle = f'"{workspace}"'
    found = []
    for d in MODEL_STORE_DIR.glob("folder*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            with open(d / "config.pbtxt", encoding="utf-8", errors="replace") as f:
                if needle in f.read(1 << 20):
                    found.append(d)
        except OSError:
            continue
    return found


def remove_model_stores(workspace: str | None) -> None:
    if workspace:
        for d in model_stores(workspace):
            shutil.rmtree(d, ignore_errors=True)


def shm_entries() -> frozenset:
    try:
        return frozenset(os.listdir(SHM_DIR))
    except OSError:
        return frozenset()


def free_shared_memory(prefix: str | None, before: frozenset) -> None:
    """Remove the /dev/shm regions this server made: the Python backend's (named with our prefix) and
    pytriton's tensor store (psm_*) that appeared while it ran and outlived it."""
    try:        # a region still mapped here belongs to another live server of this process: kept
        with open("/proc/self/maps") as f:
            mapped = {line.rsplit("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line}
    except OSError:
        mapped = set()
    for name in shm_entries() - before - mapped:
        if (prefix and name.startswith(prefix)) or name.startswith("psm_"):
            try:
                st = (SHM_DIR / name).stat()
                if st.st_uid == os.getuid():
                    (SHM_DIR / name).unlink()
            except OSError:
                pass


def python_backend_shm_prefix(triton) -> str | None:
    try:
        return str(triton._python_backend_config["shm-region-prefix-name"])
    except Exception:       # another pytriton: fall back to the psm_ regions only
        return None
