"""The README's quick tour runs as written: its commands, read from the README itself (so they cannot drift),
on tiny random towers in place of the OpenAI backbones, in a fresh folder."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY
from imagefactory import make_labelled_folder

from clipfuse.cli.main import cli

README = Path(__file__).resolve().parents[2] / "README.md"
# the OpenAI backbones cannot be downloaded here: tiny towers stand in, name for name
STAND_INS = {"RN50:openai": TINY[1], "ViT-B-32:openai": TINY[0]}
CLASSES = ["astronaut", "cat", "coffee", "rocket"]        # make_labelled_folder's class folders


def tour_commands() -> list[str]:
    """The indented `clipfuse ...` lines of the README's "## Quick tour" block, continuations joined, comments cut."""
    text = README.read_text(encoding="utf-8")
    block = text.split("\n## Quick tour\n", 1)[1].split("\nThe same from Python:", 1)[0]
    lines = [ln[4:] for ln in block.splitlines() if ln.startswith("    ")]
    commands, current = [], ""
    for ln in lines:
        code = re.split(r"\s+#\s", ln, maxsplit=1)[0].rstrip()
        if current:
            current += " " + code.strip()
        elif code.startswith("clipfuse "):
            current = code
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = ""
    return commands


def test_the_tour_parses_to_the_commands_it_shows():
    names = [shlex.split(c)[1] for c in tour_commands()]
    assert names == ["backbones", "export", "inspect", "fit", "eval", "predict"], names


def test_the_readme_tour_runs_as_written(tmp_path, photo_paths, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPFUSE_CACHE", str(tmp_path / "cache"))       # the feature cache stays in tmp_path
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    make_labelled_folder(tmp_path / "photos", photo_paths, per_class=8)
    make_labelled_folder(tmp_path / "holdout", photo_paths, per_class=3, seed=1)
    for command in tour_commands():
        args = [STAND_INS.get(a, a) for a in shlex.split(command)[1:]]
        if args[0] == "fit":      # a short study: the tour's point is that the commands run, not the study
            args += ["--study-shots", "1,4", "--study-seeds", "0"]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (command, r.output)
    assert (tmp_path / "engines" / "pets" / "manifest.json").is_file()
    assert (tmp_path / "engines" / "pets-nlc" / "report.md").is_file()
