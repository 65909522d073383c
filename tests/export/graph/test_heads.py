"""Classes, templates and zero-shot heads: computed as the paper and open_clip define them."""
from __future__ import annotations

import open_clip
import pytest
import torch

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph.backbones import load_backbone
from clipfuse.export.graph.heads import (
    LINEAR_PROBE,
    Head,
    default_templates,
    load_heads,
    parse_classes,
    parse_templates,
    save_heads,
    zero_shot_head,
)


def test_classes_from_list_and_file(tmp_path):
    assert parse_classes("cat, dog ,bird") == ["cat", "dog", "bird"]
    f = tmp_path / "classes.txt"
    f.write_text("# comment\ncat\n\nsea lion\n")
    assert parse_classes(str(f)) == ["cat", "sea lion"]
    assert parse_classes("single") == ["single"]


@pytest.mark.parametrize("value, expect", [
    ("cat,,dog", "empty class name"),
    ("cat,dog,cat", "duplicate class names: 'cat'"),
    ("missing/classes.txt", "does not exist"),
    ("nofile.txt", "does not exist"),
])
def test_bad_classes(value, expect):
    with pytest.raises(ClipfuseError, match=expect):
        parse_classes(value)


def test_empty_and_duplicate_class_files(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n")
    with pytest.raises(ClipfuseError, match="names no classes"):
        parse_classes(str(f))
    f.write_text("a\nb\na\n")
    with pytest.raises(ClipfuseError, match=r"classes file .*c\.txt.* duplicate"):
        parse_classes(str(f))


def test_templates(tmp_path):
    assert len(default_templates()) == 80 and all("{}" in t for t in default_templates())
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}.\n{} in the wild\n")
    assert parse_templates(str(f)) == ["a photo of a {}.", "{} in the wild"]
    f.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ClipfuseError, match=r"line 2: 'a photo' has no '\{\}'"):
        parse_templates(str(f))
    f.write_text("")
    with pytest.raises(ClipfuseError, match="is empty"):
        parse_templates(str(f))
    f.write_text("a {} of {}\n")
    with pytest.raises(ClipfuseError, match="not a valid format string"):
        parse_templates(str(f))
    with pytest.raises(ClipfuseError, match="does not exist"):
        parse_templates(str(tmp_path / "none.txt"))


def test_zero_shot_head_is_the_papers_recipe():
    """Each template embedding normalised, averaged, normalised again, times logit_scale.exp()."""
    b = load_backbone("clipfuse-test-vit:random:0")
    classes, templates = ["cat", "dog", "sea lion"], ["a photo of a {}.", "a {} drawing", "{}"]
    head = zero_shot_head(b.model, "clipfuse-test-vit", classes, templates)
    tok = open_clip.get_tokenizer("clipfuse-test-vit")
    rows = []
    with torch.no_grad():
        for c in classes:
            e = b.model.encode_text(tok([t.format(c) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            rows.append(m / m.norm())
        ref = torch.stack(rows) * b.model.logit_scale.exp()
    assert head.weight.shape == (3, b.embed_dim)
    torch.testing.assert_close(head.weight, ref, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(head.bias) == 0


def test_zero_shot_head_progress_and_chunking(capsys):
    """A bar over classes on stderr when asked, nothing otherwise; chunking the classes (the bar's steps)
    gives the same head as one pass."""
    b = load_backbone("clipfuse-test-vit:random:0")
    classes = [f"class {i}" for i in range(300)]          # more than one chunk of 256 // 2 classes
    templates = ["a photo of a {}.", "{}"]
    quiet = zero_shot_head(b.model, "clipfuse-test-vit", classes, templates)
    assert capsys.readouterr().err == ""
    loud = zero_shot_head(b.model, "clipfuse-test-vit", classes, templates, progress=True)
    err = capsys.readouterr().err
    assert "zero-shot head clipfuse-test-vit" in err and "/300 [" in err and "class/s" in err
    torch.testing.assert_close(loud.weight, quiet.weight)
    tok = open_clip.get_tokenizer("clipfuse-test-vit")
    with torch.no_grad():
        whole = open_clip.build_zero_shot_classifier(b.model, tok, classes, templates, num_classes_per_batch=None)
    torch.testing.assert_close(quiet.weight, (b.model.logit_scale.exp() * whole.T).float(), rtol=1e-5, atol=1e-5)


def test_heads_file_round_trip_including_linear_probe(tmp_path):
    heads = [Head(torch.randn(4, 32), torch.zeros(4)), Head(torch.randn(4, 24), torch.randn(4), kind=LINEAR_PROBE)]
    save_heads(heads, tmp_path / "h.safetensors")
    back = load_heads(tmp_path / "h.safetensors", num_backbones=2)
    assert [h.kind for h in back] == ["zero-shot", LINEAR_PROBE]
    for a, b in zip(heads, back):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ClipfuseError, match="holds 2 heads for 3 backbones"):
        load_heads(tmp_path / "h.safetensors", num_backbones=3)


def test_head_shape_is_checked():
    with pytest.raises(ClipfuseError, match="expected"):
        Head(torch.zeros(4, 8), torch.zeros(5))
