"""Backbone strings, weights loading (tags, checkpoint files, random:SEED) and their errors."""
from __future__ import annotations

import pickle

import open_clip
import pytest
import torch

from clipfuse.errors import ClipfuseError
from clipfuse.export.backbones import (
    OPENAI_BACKBONES,
    count_image_gflops,
    load_backbone,
    parse_backbone,
    tensor_dict_sha256,
)


def test_parse_default_tag_is_openai():
    s = parse_backbone("RN50")
    assert (s.arch, s.kind, s.tag) == ("RN50", "pretrained", "openai")
    assert str(s) == "RN50:openai"


def test_parse_random_and_file(tmp_path):
    s = parse_backbone("ViT-B-32:random:7")
    assert (s.kind, s.seed, s.weights) == ("random", 7, "random:7")
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"x")
    s = parse_backbone(f"ViT-B-32:{ckpt}")
    assert (s.kind, s.path) == ("file", str(ckpt))


def test_nine_openai_backbones_known_to_open_clip():
    assert len(OPENAI_BACKBONES) == 9
    for arch in OPENAI_BACKBONES:
        assert "openai" in open_clip.list_pretrained_tags_by_model(arch)


@pytest.mark.parametrize("text, expect", [
    ("ResNet9000:openai", "unknown backbone architecture 'ResNet9000'"),
    ("RN50:laion9b", "unknown pretrained tag 'laion9b' for RN50; valid tags: openai"),
    ("RN50:random:abc", "integer seed"),
    ("RN50:/nowhere/w.safetensors", "does not exist"),
    ("", "empty backbone"),
])
def test_parse_errors_name_the_culprit(text, expect):
    with pytest.raises(ClipfuseError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        parse_backbone(text)


def test_unknown_arch_lists_the_nine():
    with pytest.raises(ClipfuseError) as e:
        parse_backbone("VIT-B-32")
    for arch in OPENAI_BACKBONES:
        assert arch in str(e.value)


def test_random_seed_convention_is_exact():
    """random:SEED == torch.manual_seed(SEED) immediately followed by create_model(ARCH, pretrained=None)."""
    b = load_backbone("clipfuse-test-vit:random:3")
    torch.manual_seed(3)
    ref = open_clip.create_model("clipfuse-test-vit", pretrained=None)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert b.weights_sha256 == tensor_dict_sha256(ref.visual.state_dict())
    assert load_backbone("clipfuse-test-vit:random:4").weights_sha256 != b.weights_sha256


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_file_round_trip(tmp_path, suffix):
    src = load_backbone("clipfuse-test-rn:random:5")
    path = tmp_path / f"rn{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)   # wrapped + DDP prefix
    b = load_backbone(f"clipfuse-test-rn:{path}")
    assert b.spec.kind == "file"
    assert b.weights_sha256 == src.weights_sha256


def test_checkpoint_for_another_architecture(tmp_path):
    from safetensors.torch import save_file

    other = load_backbone("clipfuse-test-vit:random:0")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(ClipfuseError, match=r"is not a clipfuse-test-rn checkpoint"):
        load_backbone(f"clipfuse-test-rn:{path}")


def test_corrupt_and_empty_checkpoints(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ClipfuseError, match="could not be read"):
        load_backbone(f"clipfuse-test-vit:{bad}")
    pt = tmp_path / "notdict.pt"
    torch.save([1, 2, 3], pt)
    with pytest.raises(ClipfuseError, match="does not hold a state dict"):
        load_backbone(f"clipfuse-test-vit:{pt}")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_pickle_is_refused(tmp_path):
    """weights_only=True: a torch file carrying arbitrary objects is not unpickled."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(ClipfuseError) as e:
        load_backbone(f"clipfuse-test-vit:{path}")
    msg = str(e.value)
    assert "contains pickled Python code (it calls print), which clipfuse will not run" in msg
    assert "weights_only" not in msg and "\n" not in msg          # PyTorch's advice to turn it off is not relayed


def test_checkpoint_that_is_a_folder_is_named_as_such(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ClipfuseError, match="checkpoint .*ckpt' is a folder; pass the checkpoint file in it"):
        parse_backbone(f"clipfuse-test-vit:{tmp_path / 'ckpt'}")


def test_pretrained_download_failure_says_what_to_do(monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(open_clip, "create_model", fail)
    with pytest.raises(ClipfuseError, match="checkpoint.safetensors"):
        load_backbone("RN50:openai")


def test_flop_counter_on_tiny_vit_matches_hand_count():
    """Sanity of the GFLOPs column: the patch embedding alone is 2 * (3*8*8) * 64 * 16 FLOPs."""
    b = load_backbone("clipfuse-test-vit:random:0")
    total = count_image_gflops(b.model.visual, 32) * 1e9
    patch = 2 * (3 * 8 * 8) * 64 * 16
    assert total > patch
    # and it counts attention: with the MHA fast path it would be invisible
    per_layer_qkv = 2 * 17 * 64 * 3 * 64
    assert total > patch + 2 * per_layer_qkv
