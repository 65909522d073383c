"""One voice: every line goes through the `clipfuse` logger. The CLI's -q silences progress and -v adds the
details; a library call outside the CLI still reports on stderr, unless the program configured the logger."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys

from click.testing import CliRunner

from clipfuse.cli.main import cli
from clipfuse.core import log


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_group_quiet_silences_progress_and_verbose_shows_details(tiny_engine, photo_paths):
    loud = run("predict", tiny_engine, photo_paths[0])
    assert loud.exit_code == 0 and "[clipfuse] backend auto -> onnxruntime" in loud.stderr
    quiet = run("-q", "predict", tiny_engine, photo_paths[0])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout
    named = run("predict", tiny_engine, photo_paths[0], "--backend", "onnxruntime")
    assert "backend onnxruntime ->" not in named.stderr               # a detail: not at the default level
    verbose = run("-v", "predict", tiny_engine, photo_paths[0], "--backend", "onnxruntime")
    assert "[clipfuse] backend onnxruntime -> onnxruntime (CPUExecutionProvider" in verbose.stderr
    assert verbose.stdout == loud.stdout
    both = run("-q", "-v", "predict", tiny_engine, photo_paths[0])
    assert both.exit_code == 2 and "exclude each other" in both.stderr
    assert logging.getLogger("clipfuse").level == logging.INFO        # each command's level ends with it


def test_a_commands_own_quiet_still_silences_progress(tiny_engine, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(tiny_engine, folder)
    r = run("export", folder, "--precision", "fp16", "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and "fp16" in r.stdout
    assert logging.getLogger("clipfuse").level == logging.INFO


def test_detail_lines_show_at_debug_only(capsys, caplog):
    with log.detail():
        log.log("inner step", tag="bench")
    assert capsys.readouterr().err == ""
    caplog.set_level(logging.DEBUG, logger="clipfuse")
    with log.detail():
        log.log("inner step", tag="bench")
        assert not log.progress_shown()
    log.warn("warning: kept", tag="int8")
    assert capsys.readouterr().err == "[bench] inner step\n[int8] warning: kept\n"


def _library_call(tiny_engine, setup: str = "") -> subprocess.CompletedProcess:
    code = (f"import logging, clipfuse\n{setup}\n"
            f"clipfuse.load({str(tiny_engine)!r}).close()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_library_call_outside_the_cli_reports_on_stderr(tiny_engine):
    r = _library_call(tiny_engine)
    assert r.returncode == 0, r.stderr
    assert "[clipfuse] backend auto -> onnxruntime (CPUExecutionProvider" in r.stderr
    # the program configured the logger itself: clipfuse adds no handler of its own
    r = _library_call(tiny_engine, "logging.getLogger('clipfuse').addHandler(logging.NullHandler())")
    assert r.returncode == 0 and "backend auto" not in r.stderr, r.stderr


def test_no_library_function_takes_quiet():
    """The library (all but the CLI) only logs: whether a line is seen is the logger's business."""
    import ast
    from pathlib import Path

    import importlib

    roots = [Path(importlib.import_module(m).__file__).parent for m in ("clipfuse", "clipfuse.export", "clipfuse.runtime")]
    cli = roots[0] / "cli"                  # the CLI's -q/--quiet options set the logger's level
    sources = {p for d in roots for p in d.rglob("*.py") if cli not in p.parents}
    takers = [f"{p.name}:{f.name}" for p in sorted(sources) for f in ast.walk(ast.parse(p.read_text()))
              if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              and "quiet" in [a.arg for a in f.args.args + f.args.kwonlyargs]]
    assert takers == [] and len(sources) > 50
