"""Backbone strings, weights loading (tags, checkpoint files, random:SEED) and their errors."""
from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
from click.testing import CliRunner

from clipfuse.cli.main import cli
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.graph import backbones as bbmod
from clipfuse.export.graph.backbones import (
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
    # the command it names really lists every name (the plain listing has only the nine)
    assert "`clipfuse backbones --all` lists them" in str(e.value)
    listed = CliRunner().invoke(cli, ["backbones", "--all"]).output
    assert "RN50-quickgelu" in listed.split()


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
    """The hub answers but the download fails: open_clip's reason whole (not cut mid-word), and the
    checkpoint form the README gives for OpenAI weights (QuickGELU)."""
    reason = "Failed to download file (open_clip_pytorch_model.bin) for timm/resnet50_clip.openai. " * 4

    def fail(*a, **k):
        raise RuntimeError(reason)

    monkeypatch.setattr(bbmod, "_hub_reachable", lambda: True)     # never the network: simulated
    monkeypatch.setattr(bbmod, "_in_local_cache", lambda cfg: False)
    monkeypatch.setattr(open_clip, "create_model", fail)
    with pytest.raises(ClipfuseError) as e:
        load_backbone("RN50:openai")
    assert f"(RuntimeError: {reason.strip()})" in str(e.value)
    assert str(e.value).endswith("pass its path: RN50-quickgelu:/path/to/checkpoint.safetensors")


def test_offline_without_a_cached_file_fails_at_once(monkeypatch):
    """No network and nothing cached: refused before open_clip tries (it would retry for most of a minute)."""
    def never(*a, **k):
        raise AssertionError("open_clip was asked to download")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bbmod, "_in_local_cache", lambda cfg: False)
    monkeypatch.setattr(open_clip, "create_model", never)
    with pytest.raises(ClipfuseError, match=r"not in the local cache and the model hub cannot be reached .* "
                                            r"RN50-quickgelu:/path/to/checkpoint.safetensors$"):
        load_backbone("RN50:openai")
    assert bbmod._hub_reachable() is False       # HF_HUB_OFFLINE answers without opening a socket


def test_a_cached_pretrained_file_is_found_without_the_network(tmp_path, monkeypatch):
    """The local-cache check reads huggingface_hub's cache layout (a file laid out by hand, nothing fetched)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    assert not bbmod._in_local_cache(cfg)
    model_id = cfg["hf_hub"].rstrip("/")
    repo = tmp_path / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    assert bbmod._in_local_cache(cfg)


def test_flop_counter_and_params_on_tiny_vit_match_hand_count():
    """The GFLOPs and parameter columns, exactly, for clipfuse-test-vit (tests/helpers/towers/): 32 px, patch 8
    -> N = 16 patches + 1 class token, width W = 64, L = 2 layers, MLP 4W, projection to E = 32.

    torch's flop counter sees the convolution and every matrix product with a weight (qkv, out,
    MLP, projection); it does not see the attention core (q k^T and attn v, 2 * 2 * N^2 * W per
    layer: its CPU SDPA kernel has no FLOP formula), so neither does the GFLOPs column."""
    b = load_backbone("clipfuse-test-vit:random:0")
    N, W, L, E, P = 17, 64, 2, 32, 8
    patch = 2 * (3 * P * P) * W * 16                                       # conv1, stride P, no bias
    per_layer = 2 * N * W * 3 * W + 2 * N * W * W + 2 * (2 * N * W * 4 * W)   # qkv, out, MLP up + down
    proj = 2 * W * E                                                       # class token only
    assert count_image_gflops(b.model.visual, 32) * 1e9 == patch + L * per_layer + proj
    # without the fast path (count_image_gflops turns it off) the qkv products would be invisible
    assert per_layer > 2 * N * W * 3 * W > 0
    params = (3 * P * P * W + W + N * W + 2 * W                              # conv1, class emb, pos emb, ln_pre
              + L * (2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (W * 4 * W + 4 * W) + (4 * W * W + W))
              + 2 * W + W * E)                                             # ln_post, proj
    assert b.info["visual_params"] == params == sum(v.numel() for v in b.model.visual.state_dict().values())


def test_tiny_towers_are_not_production_architectures():
    """Production code registers no test tower: with CLIPFUSE_MODEL_CONFIGS unset, `clipfuse
    backbones --all` does not list them and a backbone string naming one is refused."""
    import os
    import subprocess
    import sys

    code = ("from click.testing import CliRunner; from clipfuse.cli.main import cli; "
            "from clipfuse.core.errors import ClipfuseError; from clipfuse.export.graph.backbones import parse_backbone\n"
            "r = CliRunner().invoke(cli, ['backbones', '--all']); print(r.exit_code); print(r.output)\n"
            "try:\n    parse_backbone('clipfuse-test-vit:random:0')\nexcept ClipfuseError as e:\n    print(e)")
    env = {k: v for k, v in os.environ.items() if k != "CLIPFUSE_MODEL_CONFIGS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("0\n") and "all open_clip architectures:" in r.stdout and " ViT-B-32 " in r.stdout
    assert "clipfuse-test" not in r.stdout.split("all open_clip architectures:")[1].split("\n\n")[0]
    assert "unknown backbone architecture 'clipfuse-test-vit'" in r.stdout


def test_model_configs_variable_adds_architectures_and_names_a_bad_entry(tmp_path, monkeypatch):
    from clipfuse.export.graph import backbones
    assert "clipfuse-test-rn" in backbones.known_architectures()     # conftest set it for this process
    monkeypatch.setenv(backbones.MODEL_CONFIGS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ClipfuseError, match=r"CLIPFUSE_MODEL_CONFIGS names '.*nowhere', which is neither a folder"):
        parse_backbone("RN50")
