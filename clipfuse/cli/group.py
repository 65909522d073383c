"""The `clipfuse` click group, shared by the command modules: the group itself, its error handling, option helpers.

Errors a user can cause (ClipfuseError) print one line, `error: ...`, and exit 1. The commands are
registered on `cli` by clipfuse/cli/build.py and clipfuse/cli/run.py; clipfuse/cli/main.py imports both.
"""
from __future__ import annotations

import click

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
def cli():
    """Fuse several CLIP backbones into one ONNX graph / TensorRT engine, and measure what it costs."""


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
