"""Packaging: every folder that installs under clipfuse is declared, so setuptools neither warns
nor silently leaves files out of a wheel."""
from pathlib import Path

try:
    import tomllib
except ImportError:          # Python 3.10
    import tomli as tomllib  # type: ignore

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    dirs = {name: ROOT / folder for name, folder in cfg["package-dir"].items()}
    found = set()
    for name, folder in dirs.items():
        for sub in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            if sub.name == "__pycache__" or not any(f.is_file() for f in sub.iterdir()):
                continue
            found.add(".".join([name, *sub.relative_to(folder).parts]))
    assert found - declared == set(), f"folders that would install but are not in packages: {found - declared}"
    # the shipped photographs travel as package data of the package they live in
    assert "*.jpg" in cfg["package-data"]["clipfuse.assets"]
