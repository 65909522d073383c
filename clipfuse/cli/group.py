"""The `clipfuse` click group, shared by the command modules: the group itself, its error handling, option helpers.

Errors a user can cause (ClipfuseError) print one line, `error: ...`, and exit 1. The commands are
registered on `cli` by clipfuse/cli/build.py and clipfuse/cli/run.py; clipfuse/cli/main.py imports both.
The group configures the one logger (clipfuse/core/log.py) once: progress on stderr at INFO, WARNING with
-q/--quiet (on the group or on a command that has it), DEBUG with -v/--verbose.
"""
from __future__ import annotations

import logging

import click

from clipfuse.core import log
from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.backends.sessions import check_threads


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClipfuseError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clipfuse")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (warnings and errors only).")
@click.option("--verbose", "-v", is_flag=True, help="Also the details on stderr (debug lines).")
@click.pass_context
def cli(ctx, quiet, verbose):
    """Fuse several CLIP backbones into one ONNX graph / TensorRT engine, and measure what it costs."""

    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
    previous = log.configure(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    ctx.call_on_close(lambda: log.set_level(previous))   # a process running several commands (tests): each afresh


def _quiet(ctx, param, value):
    if value:
        log.set_level(logging.WARNING)


def quiet_option(help: str | None = None):
    """A command's own -q/--quiet (as `clipfuse -q COMMAND`): only warnings and errors on stderr."""
    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet, help=help)


def int_list(ctx, param, value):
    """click callback: '1,8,32' -> (1, 8, 32); None stays None."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def threads_option(ctx, param, value):
    """click callback for --threads: refused in one line above 4x the CPUs (each thread is made up front)."""
    return check_threads(value, "--threads")
