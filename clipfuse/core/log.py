"""The one logger: progress and notes on stderr, prefixed with who speaks.

Core layer (imports nothing of clipfuse): export/, runtime/ and the application
all report through `log` and `step`, so quiet=True silences every one of them
the same way and stdout stays free for results (tables, JSON lines).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def log(msg: str, quiet: bool = False, tag: str = "clipfuse") -> None:
    """One line on stderr: `[tag] msg`."""
    if not quiet:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def step(msg: str, quiet: bool = False, tag: str = "clipfuse"):
    """Progress for a long step: announce it, then say how long it took."""
    t0 = time.perf_counter()
    log(f"{msg} ...", quiet, tag)
    yield
    log(f"{msg}: done in {time.perf_counter() - t0:.1f} s", quiet, tag)
