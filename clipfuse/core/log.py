"""The one voice: progress and notes go to the `clipfuse` logger hierarchy, one line each on stderr.

Core layer (imports nothing of clipfuse). The library (runtime/, export/, the bench) only logs, through
`log` and `step`; a `tag` picks the child logger `clipfuse.<tag>` ("bench", "demo", "int8"), and a line
reads `[tag] msg` (`[clipfuse] msg` untagged). stdout stays free for results (tables, JSON lines).

Who sees the lines (the rule):
- The CLI configures the hierarchy once (`configure`, from clipfuse/cli/group.py): INFO by default,
  WARNING with -q/--quiet, DEBUG with -v/--verbose.
- A program using the Python API gets the same lines on stderr without doing anything: at the first
  record, clipfuse installs its stderr handler on the "clipfuse" logger (level INFO unless the
  application set one; no propagation, so no line shows twice) UNLESS the application has given that
  logger a handler of its own before the first call: then clipfuse leaves it alone (a
  `logging.NullHandler()` silences clipfuse; the application's handler gets every record).
  `logging.getLogger("clipfuse").setLevel(logging.WARNING)` keeps the stderr lines of warnings only.
- `detail()`: a caller that runs another step as a detail of its own (the bench exporting a single
  backbone, the demo opening its predictor) demotes that step's lines to DEBUG: seen with -v only.
- Progress bars (tqdm) are shown only when `progress_shown()`: INFO passes and no `detail()` is open.
"""
from __future__ import annotations

import contextvars
import logging
import sys
import time
from contextlib import contextmanager

ROOT = "clipfuse"

_detail: contextvars.ContextVar[bool] = contextvars.ContextVar("clipfuse_log_detail", default=False)
_ready = False


class _Stderr(logging.StreamHandler):
    """A stream handler on whatever sys.stderr is at each record (pytest's and click's captures swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):      # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


class _Tagged(logging.Formatter):
    """`[tag] msg`: the tag is the child logger's last name (`clipfuse.bench` -> bench)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.name.rpartition('.')[2]}] {record.getMessage()}"


def _install(logger: logging.Logger) -> None:
    for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(_Tagged())
    logger.addHandler(handler)
    logger.propagate = False


def _root() -> logging.Logger:
    """The "clipfuse" logger, with the stderr handler installed at first use unless the application
    configured it (see the module docstring)."""
    global _ready
    logger = logging.getLogger(ROOT)
    if not _ready:
        _ready = True
        if not logger.handlers:
            _install(logger)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
    return logger


def get_logger(tag: str = ROOT) -> logging.Logger:
    """`clipfuse` or its child `clipfuse.<tag>`."""
    root = _root()
    return root if tag == ROOT else root.getChild(tag)


def configure(level: int = logging.INFO) -> int:
    """The CLI's one call: clipfuse's stderr handler on the "clipfuse" logger at `level`. Returns the
    previous level (the CLI restores it when its command ends, so one process can run several)."""
    logger = _root()
    previous = logger.level
    _install(logger)
    logger.setLevel(level)
    return previous


def set_level(level: int) -> None:
    """What passes from now on: logging.WARNING silences progress, logging.DEBUG adds details."""
    _root().setLevel(level)


@contextmanager
def at_level(level: int):
    """set_level inside, the previous level restored after (a script's --quiet run in-process)."""
    logger = _root()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def log(msg: str, tag: str = ROOT, level: int = logging.INFO) -> None:
    """One line: `[tag] msg` (INFO; DEBUG inside `detail()`)."""
    if level == logging.INFO and _detail.get():
        level = logging.DEBUG
    get_logger(tag).log(level, msg)


def warn(msg: str, tag: str = ROOT) -> None:
    """A line that -q does not silence: `[tag] msg` at WARNING."""
    get_logger(tag).warning(msg)


@contextmanager
def step(msg: str, tag: str = ROOT):
    """Progress for a long step: announce it, then say how long it took."""
    t0 = time.perf_counter()
    log(f"{msg} ...", tag)
    yield
    log(f"{msg}: done in {time.perf_counter() - t0:.1f} s", tag)


@contextmanager
def detail():
    """Inside, INFO lines become DEBUG: a step run as a detail of another one's (shown with -v)."""
    token = _detail.set(True)
    try:
        yield
    finally:
        _detail.reset(token)


def progress_shown() -> bool:
    """Whether a progress bar belongs on stderr now: INFO passes and no detail() is open."""
    return not _detail.get() and _root().isEnabledFor(logging.INFO)
