"""Class heads: one linear map from a backbone's unit-norm embedding to class logits.

    z_k = f_k @ weight_k.T + bias_k          # (N, C)

Zero-shot head (the default): class names x prompt templates through the
backbone's own tokenizer and text tower; each template embedding L2-normalised,
averaged over templates, normalised again (open_clip's
build_zero_shot_classifier), then scaled by that model's logit_scale.exp().
The scale is folded into the weight, the bias is zero.

Linear-probe head: a fitted weight and bias per backbone. Both kinds are the
same tensors to the fused graph and load through the same file
(heads.safetensors: `head.<k>.weight`, `head.<k>.bias`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clipfuse.core.errors import ClipfuseError

ZERO_SHOT = "zero-shot"
LINEAR_PROBE = "linear-probe"
HEAD_KINDS = (ZERO_SHOT, LINEAR_PROBE)


@dataclass
class Head:
    weight: torch.Tensor   # (C, D) float32, logit scale folded in
    bias: torch.Tensor     # (C,)   float32
    kind: str = ZERO_SHOT

    def __post_init__(self):
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ClipfuseError(
                f"head has weight {tuple(self.weight.shape)} and bias {tuple(self.bias.shape)}; "
                "expected (C, D) and (C,)"
            )


def parse_classes(value: str) -> list[str]:
    """Class names from a file (one per line) or a comma-separated list."""
    if value is None:
        raise ClipfuseError("no classes given: pass --classes FILE (one name per line) or --classes 'cat,dog'")
    path = Path(value).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ClipfuseError(f"classes file {str(path)!r} is not UTF-8 text") from None
        names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        source = f"classes file {str(path)!r}"
    elif value.endswith(".txt") or ("," not in value and any(c in value for c in "/\\")):
        raise ClipfuseError(f"classes file {value!r} does not exist")
    else:
        names = [n.strip() for n in value.split(",")]
        source = "--classes"
        if any(not n for n in names):
            raise ClipfuseError(f"--classes {value!r} has an empty class name (check for doubled or trailing commas)")
    return check_classes(names, source)


def check_classes(names: list[str], source: str = "classes") -> list[str]:
    if not names:
        raise ClipfuseError(f"{source} names no classes")
    seen, dups = set(), []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ClipfuseError(f"{source} has duplicate class names: {', '.join(map(repr, dups[:5]))}")
    return list(names)


def default_templates() -> list[str]:
    import open_clip

    # open_clip stores them as lambdas; the manifest wants format strings
    return [t("{}") if callable(t) else str(t) for t in open_clip.OPENAI_IMAGENET_TEMPLATES]


def simple_templates() -> list[str]:
    """open_clip's 7 short ImageNet templates: a cheaper default for demos and tests."""
    import open_clip

    return [t("{}") if callable(t) else str(t) for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]


def parse_templates(path: str | None) -> list[str]:
    """Prompt templates from a file (one per line, each containing `{}`), or open_clip's 80 defaults."""
    if path is None:
        return default_templates()
    p = Path(path).expanduser()
    if p.is_dir():
        raise ClipfuseError(f"templates file {path!r} is a folder")
    try:        # read once: a pipe (/dev/stdin, <(...)) is not a regular file but is fine to read
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipfuseError(f"templates file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClipfuseError(f"templates file {path!r} cannot be read as UTF-8 text ({e})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ClipfuseError(f"templates file {path!r} is empty")
    bad = [(i + 1, ln) for i, ln in enumerate(lines) if "{}" not in ln]
    if bad:
        i, ln = bad[0]
        raise ClipfuseError(f"templates file {path!r}, line {i}: {ln!r} has no '{{}}' where the class name goes")
    for i, ln in enumerate(lines):
        try:
            ln.format("x")
        except (IndexError, KeyError, ValueError):
            raise ClipfuseError(f"templates file {path!r}, line {i + 1}: {ln!r} is not a valid format string "
                                "(use exactly one '{}', double other braces)") from None
    return lines


def zero_shot_head(model: torch.nn.Module, arch: str, classes: list[str], templates: list[str],
                   progress: bool = False) -> Head:
    """Build a zero-shot head with the backbone's own tokenizer and text tower.

    progress: a tqdm bar over classes on stderr (a real text tower takes about a minute for 1000
    classes x 80 templates). Classes go through open_clip's build_zero_shot_classifier in chunks;
    each class's column depends on that class alone, so chunking changes nothing but the bar.
    """
    import open_clip
    from tqdm import tqdm

    tokenizer = open_clip.get_tokenizer(arch)
    per_batch = max(1, 256 // len(templates))
    columns = []
    with torch.no_grad(), tqdm(total=len(classes), unit="class", desc=f"zero-shot head {arch}", leave=False,
                               disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(classes), per_batch):
            chunk = classes[i:i + per_batch]
            # (D, c): per class, templates normalised, averaged, normalised again
            columns.append(open_clip.build_zero_shot_classifier(
                model, tokenizer, chunk, templates, num_classes_per_batch=per_batch, device="cpu"))
            bar.update(len(chunk))
        scale = model.logit_scale.exp().float()
    classifier = torch.cat(columns, dim=1)
    weight = (scale * classifier.T).float().contiguous()            # (C, D)
    return Head(weight=weight, bias=torch.zeros(weight.shape[0]), kind=ZERO_SHOT)


def save_heads(heads: list[Head], path: Path, extra: dict[str, bytes] | None = None) -> None:
    """extra: named byte strings stored as uint8 tensors, e.g. runtime.manifest.label_binding, which ties the
    manifest's class list to this hashed file (tensors, not metadata: safetensors writes metadata keys in a
    random order, and the file must be byte-identical when re-exported)."""
    from safetensors.torch import save_file

    tensors = {}
    for k, h in enumerate(heads):
        tensors[f"head.{k}.weight"] = h.weight.contiguous()
        tensors[f"head.{k}.bias"] = h.bias.contiguous()
    for name, value in (extra or {}).items():
        tensors[name] = torch.frombuffer(bytearray(value), dtype=torch.uint8).clone()
    save_file(tensors, str(path), metadata={"kinds": ",".join(h.kind for h in heads)})


def load_heads(path: Path, num_backbones: int | None = None) -> list[Head]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ClipfuseError(f"heads file {str(path)!r} could not be read ({type(e).__name__}: {e})") from None
    kinds = meta.get("kinds", "").split(",")
    heads = []
    k = 0
    while f"head.{k}.weight" in tensors:
        kind = kinds[k] if k < len(kinds) and kinds[k] in HEAD_KINDS else ZERO_SHOT
        heads.append(Head(tensors[f"head.{k}.weight"].float(), tensors[f"head.{k}.bias"].float(), kind))
        k += 1
    if num_backbones is not None and len(heads) != num_backbones:
        raise ClipfuseError(f"heads file {str(path)!r} holds {len(heads)} heads for {num_backbones} backbones")
    return heads
