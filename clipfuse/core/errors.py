"""The one exception type for mistakes a user can make.

Every error a user can cause (a bad argument, a missing or tampered file, an
unknown backbone) raises ClipfuseError with a message that names the culprit
and says what to do. The CLI prints it on one line, without a traceback, and
exits non-zero. Anything else escaping is a bug in clipfuse.
"""


class ClipfuseError(Exception):
    """A problem with the user's input, files or environment (not a bug)."""


class EngineMismatch(ClipfuseError):
    """An engine folder that fails its own consistency checks (a graph from another export, an edited
    manifest, stage graphs swapped): every backend would serve a wrong answer, so backend="auto" refuses it
    instead of trying the next backend."""
