"""Train image towers here, where no pretrained weights can be downloaded: the stand-in for CLIP's weights.

    python benchmarks/train_towers.py              # RN50, ViT-B-32, RN101 (~30 min on 2 cores, once; then cached)
    python benchmarks/train_towers.py --print      # the three `ARCH:/path/file.safetensors` specs, one per line

Each tower starts from its seeded init (`ARCH:random:SEED`, the convention of export/graph/backbones.py), gets
a linear layer on its embedding (behind a batch norm without parameters: a random tower embeds every image
at nearly the same point, and the norm lets the layer see the differences from the first step), and is
trained as a classifier (cross-entropy, AdamW, warm-up then cosine decay, 150 steps of batch 16) at its real
architecture and input size on the `pretrain` split of benchmarks/tower_digits.py (scikit-learn's digits at
224x224, drawn from the half of the source digits no committed figure uses; a fresh image every step).
The linear layer is then dropped: the whole open_clip model (the trained image tower, the
seeded text tower untouched) is saved as an open_clip state-dict checkpoint (.safetensors) that clipfuse
loads as it loads any user checkpoint (`RN50:/path/RN50-....safetensors`), its image tower's sha256 going
into every manifest built on it.

Cache: $CLIPFUSE_CACHE/towers (default ~/.cache/clipfuse/towers), outside git; a file's name carries the
hash of everything that made it (architecture, seed, steps, batch, learning rate, data), so a second run with
the same options is free, and a changed option trains anew. Files are written atomically (temporary name,
then rename): a killed run leaves no checkpoint that looks finished. Beside each checkpoint, a .json records
its loss curve, training accuracy, seconds and the image tower's sha256.

`--data DIR` trains on your own labelled folder (DIR/<class>/<image>) instead of the generated set.

What differs from CLIP's weights (README): a few thousand images of one synthetic task against 400 million
image-text pairs, no text tower trained, none of the outlier channels that training at scale learns.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import tower_digits  # noqa: E402

# (arch, seed, learning rate): the three towers of the committed figures on trained towers
TOWERS = [("RN50", 0, 5e-4), ("ViT-B-32", 1, 3e-4), ("RN101", 2, 5e-4)]
STEPS, BATCH, WARMUP = 150, 16, 15
HEAD_LR = 1.0        # the new head learns faster than the tower under it
VERSION = 2          # bump when the training procedure changes: old checkpoints stop matching


class TrainError(Exception):
    """Bad input to training, reported in one line."""


def cache_root() -> Path:
    env = os.environ.get("CLIPFUSE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "clipfuse") / "towers"


def _key(arch: str, seed: int, steps: int, batch: int, lr: float, data: str) -> str:
    text = json.dumps([VERSION, arch, seed, steps, batch, lr, data], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_path(arch, seed, steps=STEPS, batch=BATCH, lr=1e-3, data="cluttered:0", root=None) -> Path:
    root = Path(root) if root else cache_root()
    return root / f"{arch}-seed{seed}-{_key(arch, seed, steps, batch, lr, data)}.safetensors"


class Source:
    """Training images: the generated pretrain split (fresh images) or a user's labelled folder (cycled)."""

    def __init__(self, data: str | None, seed: int = 0):
        self.data, self.seed = data, seed
        if data is None:
            # "cluttered": the cache key's prefix from this script's first draft, kept so the towers stay cached
            self.num_classes, self.name = 10, f"cluttered:{seed}:{tower_digits.fingerprint()}"
            self.paths = None
            return
        from clipfuse.export.data import scan_labelled_folder
        from clipfuse.core.errors import ClipfuseError

        try:
            paths, labels, classes = scan_labelled_folder(data)
        except ClipfuseError as e:
            raise TrainError(str(e)) from None
        if len(set(labels.tolist())) < 2:
            raise TrainError(f"training set {data!r} has one class; a classifier needs at least two")
        self.paths, self.labels, self.num_classes = paths, labels, len(classes)
        digest = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in paths).encode()).hexdigest()[:12]
        self.name = f"folder:{digest}"

    def batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 224, 224, 3) images and their labels for one step."""
        from PIL import Image

        idx = range(step * size, (step + 1) * size)
        if self.paths is None:
            pairs = [tower_digits.render("pretrain", i, self.seed) for i in idx]
        else:
            order = np.random.default_rng(self.seed).permutation(len(self.paths))
            pairs = []
            for i in idx:
                j = int(order[i % len(order)])
                with Image.open(self.paths[j]) as im:
                    img = im.convert("RGB").resize((tower_digits.SIZE, tower_digits.SIZE), Image.BICUBIC)
                pairs.append((np.asarray(img), int(self.labels[j])))
        return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], dtype=np.int64)


def _to_input(images: np.ndarray, size: int, mean, std):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_tower(arch: str, seed: int, lr: float, steps: int = STEPS, batch: int = BATCH, data: str | None = None,
                root=None, progress: bool = True, log=print) -> Path:
    """Train one tower (or find it in the cache) and return its checkpoint's path."""
    import torch
    from safetensors.torch import save_file

    from clipfuse.export.graph import backbones as bb

    if steps < 1 or batch < 1:
        raise TrainError(f"--steps and --batch must be positive (got {steps}, {batch})")
    source = Source(data)
    out = checkpoint_path(arch, seed, steps, batch, lr, source.name, root)
    if out.is_file() and out.with_suffix(".json").is_file():
        log(f"{arch}: cached {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    built = bb.load_backbone(f"{arch}:random:{seed}")
    model, size = built.model, built.info["image_size"]
    mean, std = built.preprocess["mean"], built.preprocess["std"]
    visual = model.visual
    torch.manual_seed(seed)
    # A random tower embeds every image at nearly the same point (cosine ~0.9999); a batch norm in front of the
    # classifier removes that common part so the head sees the differences from the first step.  Head is dropped.
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(built.info["embed_dim"], affine=False),
                               torch.nn.Linear(built.info["embed_dim"], source.num_classes))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW([{"params": list(visual.parameters())},
                             {"params": list(head.parameters()), "lr": lr * HEAD_LR}], lr=lr, weight_decay=0.05)
    warm = max(1, min(WARMUP, steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    visual.train()
    head.train()
    losses, correct, seen = [], 0, 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"train {arch}", unit="step", file=sys.stderr, leave=False)
    for s in range(steps):
        images, labels = source.batch(s, batch)
        x, y = _to_input(images, size, mean, std), torch.from_numpy(labels)
        logits = head(visual(x))
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if s >= steps - max(1, steps // 5):          # training accuracy over the last fifth of the steps
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out)
    first, last = float(np.mean(losses[: max(1, steps // 10)])), float(np.mean(losses[-max(1, steps // 10):]))
    record = {"arch": arch, "seed": seed, "init": f"{arch}:random:{seed}", "steps": steps, "batch": batch, "lr": lr,
              "data": source.name, "seconds": round(seconds, 1), "loss_first_tenth": first, "loss_last_tenth": last,
              "losses": [round(v, 4) for v in losses], "train_accuracy_last_fifth": correct / max(1, seen),
              "visual_sha256": bb.tensor_dict_sha256(visual.state_dict()), "version": VERSION}
    tmp_json = out.with_name(f".{out.stem}.{os.getpid()}.json.tmp")
    tmp_json.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_json, out.with_suffix(".json"))
    log(f"{arch}: {steps} steps in {seconds:.0f} s, loss {first:.3f} -> {last:.3f}, "
        f"training accuracy (last fifth) {100 * record['train_accuracy_last_fifth']:.1f}% -> {out}")
    return out


def display_name(name: str) -> str:
    """'RN50:/cache/RN50-seed0-<hash>.safetensors' -> 'RN50 (trained, seed 0)'; other backbone names unchanged."""
    arch, _, rest = name.partition(":")
    stem = Path(rest).name
    if Path(rest).is_absolute() and stem.startswith(f"{arch}-seed"):
        return f"{arch} (trained, seed {stem[len(arch) + 5:].split('-')[0]})"
    return name


def shorten(text: str, names) -> str:
    """Every trained tower's full spec in `text` replaced by its display name (results files stay readable)."""
    for n in sorted(names, key=len, reverse=True):
        text = text.replace(n, display_name(n))
    return text


def specs(root=None) -> list[str]:
    """The three trained towers as backbone specs (`ARCH:/path`), training any not in the cache yet."""
    return [f"{arch}:{train_tower(arch, seed, lr, root=root)}" for arch, seed, lr in TOWERS]


def write_report(paths, out, command: str) -> None:
    """The training record of each checkpoint (its .json), as a Markdown table."""
    recs = [json.loads(Path(p).with_suffix(".json").read_text()) for p in paths]
    L = [f"<!-- made by: {command} -->", "", "# The towers trained here", "",
         "Trained from their seeded init (`ARCH:random:SEED`) as classifiers on the `pretrain` split of "
         f"benchmarks/tower_digits.py (generator {tower_digits.fingerprint()}), a fresh image every step; the "
         "linear layer is dropped and the whole open_clip state dict saved as .safetensors. Seconds: wall time on "
         "this 2-core machine. Training accuracy: the classifier's own, over the last fifth of the steps (images "
         "seen once, so it is held-out-like, but not a figure: every committed accuracy is measured on the "
         "`figures` split).", "",
         "| tower | init | steps x batch | lr | seconds | loss, first tenth -> last tenth | training accuracy % "
         "| image tower sha256 |", "|---|---|---:|---:|---:|---|---:|---|"]
    for p, r in zip(paths, recs):
        L.append(f"| {r['arch']} | {r['init']} | {r['steps']} x {r['batch']} | {r['lr']:g} | {r['seconds']:.0f} | "
                 f"{r['loss_first_tenth']:.3f} -> {r['loss_last_tenth']:.3f} | "
                 f"{100 * r['train_accuracy_last_fifth']:.1f} | `{r['visual_sha256'][:16]}...` |")
    L += ["", f"Total: {sum(r['seconds'] for r in recs) / 60:.1f} minutes of training for {len(recs)} towers "
              "(the budget: 45)."]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(L) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", action="append", metavar="ARCH:SEED:LR",
                    help="train these instead of the three (e.g. RN50:0:0.001); any open_clip architecture")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--data", default=None,
                    help="a labelled folder DIR/<class>/<image> (default: tower_digits.py, pretrain split)")
    ap.add_argument("--cache", default=None, help="default: $CLIPFUSE_CACHE/towers or ~/.cache/clipfuse/towers")
    ap.add_argument("--print", action="store_true", help="print the backbone specs, one per line")
    ap.add_argument("--report", default=None, metavar="MD", help="write the towers' training record here (Markdown; "
                    "benchmarks/results/trained_towers.md is the committed one)")
    args = ap.parse_args(argv)
    towers = TOWERS
    if args.tower:
        towers = []
        for t in args.tower:
            parts = t.split(":")
            try:
                towers.append((parts[0], int(parts[1]), float(parts[2])))
            except (IndexError, ValueError):
                ap.error(f"--tower {t!r}: write ARCH:SEED:LR, e.g. RN50:0:0.001")
    from clipfuse.core.errors import ClipfuseError

    t0 = time.perf_counter()
    try:
        paths = [train_tower(a, s, lr, args.steps, args.batch, args.data, args.cache) for a, s, lr in towers]
    except (TrainError, ClipfuseError) as e:
        print(f"train_towers: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(paths)} towers ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.report:
        write_report(paths, args.report, "python benchmarks/train_towers.py "
                     + " ".join(a for a in (argv if argv is not None else sys.argv[1:])))
    if args.print:
        for (arch, _, _), p in zip(towers, paths):
            print(f"{arch}:{p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
