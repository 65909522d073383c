"""Backbones: parse `ARCH[:WEIGHTS]`, build the open_clip model, identify its weights.

A backbone is written `ARCH[:WEIGHTS]`:
    ARCH     any open_clip model name (the nine OpenAI CLIP backbones are the
             documented ones, see OPENAI_BACKBONES)
    WEIGHTS  an open_clip pretrained tag (`openai`, the default), a path to a
             local checkpoint (.safetensors, or a torch file loaded with
             weights_only=True), or `random:SEED`.

`random:SEED` means exactly `torch.manual_seed(SEED)` immediately followed by
`open_clip.create_model(ARCH, pretrained=None)`. Other tools rely on this
convention to rebuild the same tower, so it must not change.

Architectures open_clip does not ship are added by the user, never by this
code: CLIPFUSE_MODEL_CONFIGS lists folders or .json files of open_clip model
configs (os.pathsep-separated), registered with open_clip before a name is
looked up, in this process and in every child process that inherits the
variable. The test suite adds its tiny towers this way (tests/helpers/towers/).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipfuse.core.errors import ClipfuseError

DEFAULT_WEIGHTS = "openai"
MODEL_CONFIGS_ENV = "CLIPFUSE_MODEL_CONFIGS"

# The nine OpenAI CLIP backbones (open_clip names). Figures are for the image
# tower only, measured with torch.utils.flop_counter at batch 1 on the model
# open_clip builds (`clipfuse backbones --measure` recomputes them).
# GFLOPs count a multiply-add as 2 FLOPs.
OPENAI_BACKBONES: dict[str, dict] = {
    "RN50": dict(image_size=224, embed_dim=1024, visual_params=38_316_896, gflops=12.20),
    "RN101": dict(image_size=224, embed_dim=512, visual_params=56_259_936, gflops=19.52),
    "RN50x4": dict(image_size=288, embed_dim=640, visual_params=87_137_080, gflops=42.49),
    "RN50x16": dict(image_size=384, embed_dim=768, visual_params=167_328_912, gflops=149.13),
    "RN50x64": dict(image_size=448, embed_dim=1024, visual_params=420_380_352, gflops=528.47),
    "ViT-B-32": dict(image_size=224, embed_dim=512, visual_params=87_849_216, gflops=8.73),
    "ViT-B-16": dict(image_size=224, embed_dim=512, visual_params=86_192_640, gflops=33.70),
    "ViT-L-14": dict(image_size=224, embed_dim=768, visual_params=303_966_208, gflops=155.53),
    "ViT-L-14-336": dict(image_size=336, embed_dim=768, visual_params=304_293_888, gflops=349.19),
}

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class BackboneSpec:
    """One parsed `ARCH[:WEIGHTS]` string."""

    arch: str                 # open_clip model name
    kind: str                 # "pretrained" | "file" | "random"
    tag: str | None = None    # open_clip pretrained tag, for kind == "pretrained"
    path: str | None = None   # checkpoint path, for kind == "file"
    seed: int | None = None   # for kind == "random"

    @property
    def weights(self) -> str:
        if self.kind == "random":
            return f"random:{self.seed}"
        if self.kind == "file":
            return str(self.path)
        return str(self.tag)

    def __str__(self) -> str:
        return f"{self.arch}:{self.weights}"


@dataclass
class Backbone:
    """A built open_clip model plus what the manifest needs to know about it."""

    spec: BackboneSpec
    model: torch.nn.Module                      # the whole CLIP model (text tower needed for heads)
    preprocess: dict                            # open_clip's preprocess_cfg (size, mean, std, ...)
    weights_sha256: str                         # identity of the image tower's weights
    info: dict = field(default_factory=dict)    # params, gflops, embed_dim, image_size

    @property
    def image_size(self) -> int:
        return int(self.preprocess["size"][0])

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])


_added_configs: set[str] = set()   # CLIPFUSE_MODEL_CONFIGS entries already given to open_clip


def _open_clip():
    import open_clip  # heavy; only the export side needs it

    _add_user_model_configs(open_clip)
    return open_clip


def _add_user_model_configs(open_clip) -> None:
    """Register the model configs CLIPFUSE_MODEL_CONFIGS names (each entry once per process)."""
    for entry in os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep):
        if not entry or entry in _added_configs:
            continue
        path = Path(entry).expanduser()
        if not (path.is_dir() or path.suffix == ".json" and path.is_file()):
            raise ClipfuseError(f"{MODEL_CONFIGS_ENV} names {entry!r}, which is neither a folder nor a .json file; "
                                "list folders of open_clip model configs (or .json files), or unset it")
        open_clip.add_model_config(path)
        _added_configs.add(entry)


def known_architectures() -> list[str]:
    """open_clip's model names, with those added through CLIPFUSE_MODEL_CONFIGS."""
    return list(_open_clip().list_models())


def _looks_like_path(weights: str) -> bool:
    return (
        os.sep in weights
        or "/" in weights
        or weights.lower().endswith(CHECKPOINT_SUFFIXES)
        or Path(weights).exists()
    )


def parse_backbone(text: str) -> BackboneSpec:
    """Parse `ARCH[:WEIGHTS]`, checking the architecture and tag exist (no download)."""
    text = (text or "").strip()
    if not text:
        raise ClipfuseError("empty backbone: write ARCH[:WEIGHTS], e.g. RN50:openai or ViT-B-32:random:0")
    arch, _, weights = text.partition(":")
    weights = weights or DEFAULT_WEIGHTS
    archs = known_architectures()
    if arch not in archs:
        raise ClipfuseError(
            f"unknown backbone architecture {arch!r} in {text!r}; the OpenAI CLIP backbones are "
            f"{', '.join(OPENAI_BACKBONES)} (any of open_clip's {len(archs)} model names works; "
            f"`clipfuse backbones --all` lists them)"
        )
    if weights.startswith("random:") or weights == "random":
        seed_text = weights.partition(":")[2]
        try:
            seed = int(seed_text)
        except ValueError:
            raise ClipfuseError(f"backbone {text!r}: random weights need an integer seed, e.g. {arch}:random:0") from None
        return BackboneSpec(arch, "random", seed=seed)
    if _looks_like_path(weights):
        path = Path(weights).expanduser()
        if path.is_dir():
            raise ClipfuseError(f"backbone {text!r}: checkpoint {str(path)!r} is a folder; pass the checkpoint "
                                "file in it (.safetensors, .pt or .bin)")
        if not path.is_file():
            raise ClipfuseError(f"backbone {text!r}: checkpoint file {str(path)!r} does not exist")
        return BackboneSpec(arch, "file", path=str(path))
    tags = list(_open_clip().list_pretrained_tags_by_model(arch))
    if weights not in tags:
        valid = ", ".join(tags) if tags else "none (use a checkpoint file or random:SEED)"
        raise ClipfuseError(
            f"backbone {text!r}: unknown pretrained tag {weights!r} for {arch}; valid tags: {valid}; "
            f"or give a checkpoint path or random:SEED"
        )
    return BackboneSpec(arch, "pretrained", tag=weights)


def _check_torch_file(path: str) -> None:
    """A torch checkpoint is a zip archive (torch.save) or a pickle (protocol 2+ starts with 0x80); anything
    else is named for what it is, not reported as pickled code by torch's weights-only unpickler."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ClipfuseError(f"checkpoint {path!r} cannot be read ({e.strerror or e})") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return
    try:
        text = head.decode("utf-8")
        what = "text" if text.isprintable() or "\n" in text else None
    except UnicodeDecodeError:
        what = None
    raise ClipfuseError(f"checkpoint {path!r} is not a PyTorch or safetensors file (it looks like "
                        f"{what or 'data starting with ' + head[:8].hex(' ')}); pass a .safetensors, .pt or .bin "
                        "checkpoint of the backbone")


def _read_checkpoint(path: str) -> dict:
    """Read a state dict from safetensors or a torch file (weights_only=True: untrusted input)."""
    if not path.lower().endswith(".safetensors"):
        _check_torch_file(path)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, pickled code, not a checkpoint at all
        text = str(e)
        if "Weights only load failed" in text:
            # PyTorch's own text ends by suggesting weights_only=False, i.e. running the file's code: not ours.
            calls = re.search(r"GLOBAL (\S+)", text)
            what = f" (it calls {calls.group(1)})" if calls else ""
            raise ClipfuseError(
                f"checkpoint {path!r} contains pickled Python code{what}, which clipfuse will not run: it loads "
                "only tensors from a checkpoint. Where you trust the file, save its state dict as .safetensors "
                "and pass that") from None
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise ClipfuseError(f"checkpoint {path!r} could not be read ({type(e).__name__}: {first})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ClipfuseError(f"checkpoint {path!r} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_checkpoint_into(model: torch.nn.Module, spec: BackboneSpec) -> None:
    sd = _read_checkpoint(spec.path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
        raise ClipfuseError(
            f"checkpoint {spec.path!r} is not a {spec.arch} checkpoint: {'; '.join(parts)}. "
            f"Name the architecture it was saved from."
        )
    model.load_state_dict(sd, strict=True)


def tensor_dict_sha256(tensors: dict) -> str:
    """sha256 over (name, dtype, shape, bytes) in name order: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_image_gflops(visual: torch.nn.Module, image_size: int) -> float:
    """GFLOPs of one image through the image tower (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    # PyTorch's fused MHA fast path is invisible to the counter: count the plain ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            visual(torch.zeros(1, 3, image_size, image_size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 1e9


def load_backbone(spec: BackboneSpec | str, measure_flops: bool = False) -> Backbone:
    """Build the open_clip model for a spec, with its weights, in eval mode on CPU."""
    if isinstance(spec, str):
        spec = parse_backbone(spec)
    open_clip = _open_clip()
    # open_clip logs a warning for every random init; the manifest records it instead.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    if spec.kind == "random":
        torch.manual_seed(spec.seed)
        model = open_clip.create_model(spec.arch, pretrained=None)
    elif spec.kind == "file":
        model = open_clip.create_model(spec.arch, pretrained=None)
        _load_checkpoint_into(model, spec)
    else:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag) or {}
        # OpenAI's weights need QuickGELU: a checkpoint of them loads as ARCH-quickgelu (README, WEIGHTS)
        as_file = f"{spec.arch}-quickgelu" if cfg.get("quick_gelu") and not spec.arch.endswith("-quickgelu") \
            else spec.arch
        offline = (f"Without network access, download the checkpoint elsewhere and pass its path: "
                   f"{as_file}:/path/to/checkpoint.safetensors")
        if not _in_local_cache(cfg) and not _hub_reachable():
            # fail at once: open_clip's download would retry for most of a minute before giving up
            raise ClipfuseError(f"backbone {spec}: pretrained weights {spec.tag!r} are not in the local cache and "
                                f"the model hub cannot be reached (offline). {offline}")
        try:
            model = open_clip.create_model(spec.arch, pretrained=spec.tag)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]     # whole, never cut mid-word
            raise ClipfuseError(f"backbone {spec}: could not load pretrained weights {spec.tag!r} through "
                                f"open_clip ({type(e).__name__}: {first}). {offline}") from None
    model.eval()
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    size = preprocess.get("size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise ClipfuseError(f"backbone {spec}: non-square input size {size} is not supported")
    if preprocess.get("resize_mode", "shortest") != "shortest":
        raise ClipfuseError(f"backbone {spec}: resize_mode {preprocess.get('resize_mode')!r} is not supported (only 'shortest')")
    preprocess["size"] = size
    visual_sd = model.visual.state_dict()
    info = dict(
        image_size=size[0],
        embed_dim=int(getattr(model.visual, "output_dim", 0) or _probe_embed_dim(model.visual, size[0])),
        visual_params=sum(p.numel() for p in model.visual.parameters()),
        logit_scale=float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0,
    )
    known = OPENAI_BACKBONES.get(spec.arch)
    if measure_flops or known is None:
        info["gflops"] = round(count_image_gflops(model.visual, size[0]), 3)
    else:
        info["gflops"] = known["gflops"]
    return Backbone(spec=spec, model=model, preprocess=preprocess,
                    weights_sha256=tensor_dict_sha256(visual_sd), info=info)


def _in_local_cache(cfg: dict) -> bool:
    """Whether open_clip would find the pretrained file without the network (its HF hub file, or the
    file of its download URL in open_clip's cache folder)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        model_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        if any(isinstance(try_to_load_from_cache(model_id, f), str) for f in [*_get_safe_alternatives(filename), filename]):
            return True
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """False at once under HF_HUB_OFFLINE=1; otherwise whether a TCP connection to the hub opens within
    timeout_s (name lookup included: it runs in a thread that is abandoned if it hangs)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    import socket
    import threading

    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(ok)


def _probe_embed_dim(visual: torch.nn.Module, image_size: int) -> int:
    with torch.no_grad():
        return int(visual(torch.zeros(1, 3, image_size, image_size)).shape[-1])
