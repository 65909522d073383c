"""The layers, enforced: core <- clipfuse.runtime <- clipfuse.export <- application, and inside export:
fit and precision independent of each other, both above graph.

The contract is pyproject.toml's [tool.importlinter] (import-linter, checked with grimp, which
reads every import statement, those inside functions included). grimp finds a package in one
folder, while this repository keeps export/ and runtime/ beside clipfuse/ and installs them as
clipfuse.export and clipfuse.runtime (setuptools package-dir), so the check runs on a copy of the
sources laid out as installed. By hand: `python tests/app/test_layers.py` prints import-linter's report.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:        # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
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
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_the_contract_fails_on_a_runtime_import_of_export_inside_a_function(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "runtime" / "predict.py"
    module.write_text(module.read_text() + "\n\ndef _sneaky():\n    import clipfuse.export.graph.engine  # noqa: F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "clipfuse layers: application > export > runtime > core BROKEN" in r.stdout
    assert "clipfuse.runtime.predict -> clipfuse.export.graph.engine" in r.stdout


def test_the_contract_fails_when_the_core_imports_the_runtime(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "core" / "log.py"
    module.write_text(module.read_text() + "\nfrom clipfuse.runtime import manifest  # noqa: E402,F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1 and "clipfuse.core.log -> clipfuse.runtime.manifest" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------- imports a reader can follow

HEAVY = ("torch", "open_clip", "tensorrt", "openvino", "pytriton", "tritonclient", "modelopt", "matplotlib")

# The only imports of the project's own modules that sit inside functions: the application reaches
# export/ lazily because export/ imports torch and open_clip at its top (so `clipfuse --help`, the
# ONNX Runtime path and the bench's timing workers never load them). Each target is checked heavy below.
ALLOWED_INNER = {
    ("clipfuse.api", "clipfuse.export.fit.evaluate"),
    ("clipfuse.api", "clipfuse.export.graph.backbones"),
    ("clipfuse.bench.configs", "clipfuse.export.graph.rebuild"),
    ("clipfuse.bench.run", "clipfuse.export.fit.evaluate"),
    ("clipfuse.bench.run", "clipfuse.bench.gpu"),
    ("clipfuse.cli.build", "clipfuse.export.fit.evaluate"),
    ("clipfuse.cli.build", "clipfuse.export.fit.pipeline"),
    ("clipfuse.cli.build", "clipfuse.export.fit.report"),
    ("clipfuse.cli.build", "clipfuse.export.graph.engine"),
    ("clipfuse.cli.build", "clipfuse.export.graph.backbones"),
    ("clipfuse.demo", "clipfuse.export.fit.pipeline"),
    # the PyTorch backend is loaded by the registry to ask whether it can run: it imports torch when opened
    ("clipfuse.export.graph.torch_backend", "clipfuse.export.graph.rebuild"),
    # the same for torch-cuda: its runner (CUDA graphs, the cascade's stages) imports torch at its top
    ("clipfuse.export.gpu.backend", "clipfuse.export.gpu.runner"),
}


def _modules(staged: Path) -> dict:
    """{dotted name: (path, is_package)} of the staged copy."""
    out = {}
    for p in sorted((staged / "clipfuse").rglob("*.py")):
        parts = list(p.relative_to(staged).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(modules: dict, mod: str, names) -> list[str]:
    return [f"{mod}.{n}" if f"{mod}.{n}" in modules else mod for n in names if f"{mod}.{n}" in modules or mod in modules]


def import_graph(staged: Path):
    """-> (top: {module: set of project modules imported at module level},
           heavy_top: {module: True if it imports a heavy dependency at module level},
           inner: set of (module, project module imported inside a function))."""
    modules = _modules(staged)
    top, heavy_top, inner = {}, {}, set()
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_function = {id(x) for f in functions for x in ast.walk(f)}
        top[name], heavy_top[name] = set(), False
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod, names = _resolve(name, is_pkg, node), [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                mod, names = None, [a.name for a in node.names]
            else:
                continue
            found = _targets(modules, mod, names) if mod else [n for n in names if n in modules]
            roots = [mod.split(".")[0]] if mod else [n.split(".")[0] for n in names]
            if id(node) in in_function:
                inner.update((name, t) for t in found)
            else:
                top[name].update(found)
                heavy_top[name] |= any(r in HEAVY for r in roots)
    return top, heavy_top, inner


def is_heavy(module: str, top: dict, heavy_top: dict, seen=None) -> bool:
    """Does importing `module` load a heavy dependency (through imports at module level)?"""
    seen = set() if seen is None else seen
    if module in seen:
        return False
    seen.add(module)
    parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
    return heavy_top.get(module, False) or any(is_heavy(m, top, heavy_top, seen)
                                               for m in top.get(module, set()) | {p for p in parents if p in top})


def check_inner_imports(staged: Path) -> list[str]:
    """Every problem with the project's in-function imports, as lines (none: the rule holds)."""
    top, heavy_top, inner = import_graph(staged)
    problems = [f"{m} imports {t} inside a function (not in ALLOWED_INNER: import it at module top)"
                for m, t in sorted(inner - ALLOWED_INNER)]
    problems += [f"ALLOWED_INNER lists {m} -> {t}, but {t} loads no heavy dependency: import it at module top"
                 for m, t in sorted(ALLOWED_INNER) if not is_heavy(t, top, heavy_top)]
    problems += [f"{m} is light by design but loads a heavy dependency at import"
                 for m in ("clipfuse.cli.main", "clipfuse.api", "clipfuse.bench.worker", "clipfuse.runtime.predict",
                           "clipfuse.runtime.serving.server", "clipfuse.export.precision.int8_export",
                           "clipfuse.export.graph.torch_backend")
                 if is_heavy(m, top, heavy_top)]
    return problems


def test_project_imports_sit_at_module_top_unless_their_target_is_heavy(tmp_path):
    assert check_inner_imports(stage_package(tmp_path)) == []


def test_the_inner_import_check_fails_on_a_sibling_imported_inside_a_function(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "runtime" / "predict.py"
    module.write_text(module.read_text() + "\n\ndef _late():\n    from clipfuse.runtime.manifest import read_manifest  # noqa\n")
    assert check_inner_imports(staged) == [
        "clipfuse.runtime.predict imports clipfuse.runtime.manifest inside a function (not in ALLOWED_INNER: "
        "import it at module top)"]


def test_the_inner_import_check_fails_when_a_light_module_turns_heavy(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "api.py"
    module.write_text(module.read_text().replace("from __future__ import annotations\n",
                                                "from __future__ import annotations\nimport torch  # noqa\n", 1))
    assert "clipfuse.api is light by design but loads a heavy dependency at import" in check_inner_imports(staged)


def test_the_export_split_fails_when_fit_imports_precision(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "export" / "fit" / "select.py"
    module.write_text(module.read_text() + "\nfrom clipfuse.export.precision import fp16  # noqa: E402,F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "fit and precision independent" in r.stdout and "BROKEN" in r.stdout
    assert "clipfuse.export.fit.select -> clipfuse.export.precision.fp16" in r.stdout


def test_the_export_split_fails_when_gpu_imports_precision(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "export" / "gpu" / "plan.py"
    module.write_text(module.read_text() + "\nfrom clipfuse.export.precision import fp16  # noqa: E402,F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1 and "clipfuse.export.gpu.plan -> clipfuse.export.precision.fp16" in r.stdout, r.stdout + r.stderr


def test_the_export_split_fails_when_graph_imports_fit(tmp_path):
    staged = stage_package(tmp_path)
    module = staged / "clipfuse" / "export" / "graph" / "heads.py"
    module.write_text(module.read_text() + "\nfrom clipfuse.export.fit import nlc  # noqa: E402,F401\n")
    r = lint_imports(staged)
    assert r.returncode == 1 and "clipfuse.export.graph.heads -> clipfuse.export.fit.nlc" in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = lint_imports(stage_package(Path(tmp)))
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
