"""Export inputs that are easy to refuse wrongly or accept wrongly."""
from __future__ import annotations

import os

import pytest
from conftest import TINY

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph.heads import parse_templates


def test_templates_from_a_pipe_are_read(tmp_path):
    """`--templates /dev/stdin` or `<(...)`: not a regular file, readable once; not 'does not exist'."""
    r, w = os.pipe()
    os.write(w, b"a photo of a {}.\n\na sketch of a {}.\n")
    os.close(w)
    try:
        assert parse_templates(f"/dev/fd/{r}") == ["a photo of a {}.", "a sketch of a {}."]
    finally:
        os.close(r)
    with pytest.raises(ClipfuseError, match="is a folder"):
        parse_templates(str(tmp_path))
    with pytest.raises(ClipfuseError, match="does not exist"):
        parse_templates(str(tmp_path / "none.txt"))


def test_one_class_engine_is_refused_before_building(tmp_path):
    with pytest.raises(ClipfuseError, match=r"only one class given \('cat'\): a classifier needs at least two"):
        export_engine_quiet(TINY[:1], ["cat"], tmp_path / "one")
    assert not (tmp_path / "one").exists()


def export_engine_quiet(*args):
    from clipfuse.export.graph.engine import export_engine

    return export_engine(*args, templates=["a {}."])
