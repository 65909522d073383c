"""The `clipfuse` command line (entry point `clipfuse.cli.main:main`): the group with every command registered.

The group and its error handling live in clipfuse/cli/group.py; the commands, by what they do, in
clipfuse/cli/build.py (make and examine engines) and clipfuse/cli/run.py (run and serve them).
Errors a user can cause (ClipfuseError) print one line, `error: ...`, and exit 1.
"""
from __future__ import annotations

import sys

import click

from . import build, run  # noqa: F401  (importing them registers their commands on `cli`)
from .group import cli

__all__ = ["cli", "main"]


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="clipfuse")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
