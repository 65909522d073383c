"""The layers of issue 11, enforced: core <- clipfuse.runtime <- clipfuse.export <- application.

The contract is pyproject.toml's [tool.importlinter] (import-linter, checked with grimp, which
reads every import statement, those inside functions included). grimp finds a package in one
folder, while this repository keeps export/ and runtime/ beside clipfuse/ and installs them as
clipfuse.export and clipfuse.runtime (setuptools package-dir), so the check runs on a copy of the
sources laid out as installed. By hand: `python tests/test_layers.py` prints import-linter's report.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:        # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def stage_package(dest: Path) -> Path:
    """Copy the sources into dest/ as they install (package-dir mapping); returns dest."""
    mapping = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):          # "clipfuse" before "clipfuse.export"
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))
    return dest


def lint_imports(staged: Path) -> subprocess.CompletedProcess:
    """import-linter on the staged copy, in a child process so that it sees that copy (this process
    has the installed clipfuse imported already)."""
    env = dict(os.environ, PYTHONPATH=str(staged))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(PYPROJECT), "--no-cache", "--no-logo"],
                          cwd=staged, env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_contract_holds(tmp_path):
    r = lint_imports(stage_package(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clipfuse layers: application > export > runtime > core KEPT" in r.stdout
    assert "Contracts: 1 kept, 0 broken." in r.stdout


def test_the_contract_fails_on_a_runtime_import_of_export_inside_a_function(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "runtime" / "predict.py"
    module.write_text(module.read_text() + "\n\ndef _sneaky():\n    import clipfuse.export.engine  # noqa: F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "clipfuse layers: application > export > runtime > core BROKEN" in r.stdout
    assert "clipfuse.runtime.predict -> clipfuse.export.engine" in r.stdout


def test_the_contract_fails_when_the_core_imports_the_runtime(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "log.py"
    module.write_text(module.read_text() + "\nfrom clipfuse.runtime import manifest  # noqa: E402,F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1 and "clipfuse.log -> clipfuse.runtime.manifest" in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = lint_imports(stage_package(Path(tmp)))
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
