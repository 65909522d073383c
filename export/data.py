"""Labelled image folders and seeded sampling: which files, which labels, which few shots.

A labelled folder is `root/<class folder>/<any depth>/<image>`. This module only
lists files and draws index sets; which files are images and how a folder is
scanned is the runtime's (runtime/images.py: one scan for predict and export),
and so is reading images (and skipping unreadable ones); a FIFO, socket or device among a class's
files is named and left out here, before anything hashes or opens it. Everything here is deterministic: the
same folder and seed give the same lists on every machine (paths are sorted,
never taken in file-system order).

    scan_labelled_folder(root, classes=None) -> (paths, labels, class_names)
    read_class_map(path)                     -> {folder name: class name}
    seeded_split(labels, eval_fraction, seed) -> (train_idx, eval_idx)   stratified
    sample_k_shot(labels, k, seed)           -> indices                  k per class
    check_shots(labels, shots, ...)          -> refuses k above a class's pool, before any feature
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipfuse.core.errors import ClipfuseError
from clipfuse.core.log import log
from clipfuse.runtime.images import IMAGE_EXTENSIONS, image_files, is_image_file, not_a_regular_file


def read_class_map(path) -> dict[str, str]:
    """Read `folder_name<TAB>class name` (or `folder_name,class name`) lines, in file order.

    The order of the lines is the order of the labels. Blank lines and lines
    starting with '#' are ignored. A line is split at its first tab if it has
    one, else at its first comma, so class names may contain commas when the
    file is tab-separated.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClipfuseError(f"class map file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ClipfuseError(f"class map file {str(path)!r} is not UTF-8 text") from None
    mapping: dict[str, str] = {}
    seen_names: dict[str, str] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = "\t" if "\t" in line else ","
        if sep not in line:
            raise ClipfuseError(
                f"class map file {str(path)!r}, line {n}: {line.strip()!r} has no tab or comma; "
                "write `folder_name<TAB>class name` or `folder_name,class name`"
            )
        folder, name = (part.strip() for part in line.split(sep, 1))
        if not folder or not name:
            raise ClipfuseError(f"class map file {str(path)!r}, line {n}: empty folder or class name in {line.strip()!r}")
        if folder in mapping:
            raise ClipfuseError(f"class map file {str(path)!r}, line {n}: folder {folder!r} is mapped twice")
        if name in seen_names:
            raise ClipfuseError(
                f"class map file {str(path)!r}, line {n}: class name {name!r} is already used by folder "
                f"{seen_names[name]!r}; give each folder its own class name"
            )
        mapping[folder] = name
        seen_names[name] = folder
    if not mapping:
        raise ClipfuseError(f"class map file {str(path)!r} maps no folders")
    return mapping


def scan_labelled_folder(root, classes: Mapping[str, str] | str | os.PathLike | None = None):
    """List the images of `root/<class folder>/...` with their labels.

    classes: None -> every visible sub-folder is a class, named after the
    folder, labels in sorted folder order; a mapping {folder: class name} (or
    the path of a class map file, see read_class_map) -> exactly those folders,
    labels in the mapping's order. A folder of root that the mapping does not
    name is an error rather than silently dropped.

    Returns (paths: list[Path], labels: int64 array (N,), class_names: list[str]),
    paths sorted within each class, classes in label order.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ClipfuseError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ClipfuseError(f"image folder {str(root)!r} is not a folder; pass the folder that holds one sub-folder per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if any(is_image_file(p.name) for p in root.iterdir()):
            raise ClipfuseError(
                f"image folder {str(root)!r} holds images but no class folders; "
                "put each class's images in its own sub-folder (root/<class>/<image>)"
            )
        raise ClipfuseError(f"image folder {str(root)!r} is empty: it needs one sub-folder of images per class")

    if classes is None:
        mapping = {f: f for f in folders}
    else:
        if isinstance(classes, (str, os.PathLike)):
            mapping = read_class_map(classes)
        elif isinstance(classes, Mapping):
            mapping = {str(k): str(v) for k, v in classes.items()}
        else:
            raise ClipfuseError(f"classes must be None, a {{folder: class name}} mapping or a class map file, not {type(classes).__name__}")
        missing = [f for f in mapping if f not in folders]
        if missing:
            raise ClipfuseError(
                f"class map names folder(s) {', '.join(map(repr, missing[:5]))} that {str(root)!r} does not have"
            )
        unmapped = [f for f in folders if f not in mapping]
        if unmapped:
            raise ClipfuseError(
                f"folder(s) {', '.join(map(repr, unmapped[:5]))} of {str(root)!r} are not in the class map; "
                "add them to the map or move them out of the image folder"
            )

    if len(mapping) < 2:        # one class: every image "right", 100% reported, nothing learned
        raise ClipfuseError(f"image folder {str(root)!r} has {len(mapping)} class folder ({next(iter(mapping))!r}); "
                            "a classifier needs at least two classes: add a sub-folder of images per class")
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(mapping):
        images = _regular_files(image_files(root / folder))
        if not images:
            raise ClipfuseError(
                f"class folder {str(root / folder)!r} has no image files "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)}, any case); add images or remove the folder"
            )
        paths.extend(images)
        labels.extend([label] * len(images))
    return paths, np.asarray(labels, dtype=np.int64), list(mapping.values())


def check_same_classes(names_a, names_b, what_a: str, what_b: str) -> None:
    """Refuse, in one line naming the differences, two class lists that are not the same in the same order."""
    if list(names_a) != list(names_b):
        only_a = sorted(set(names_a) - set(names_b))
        only_b = sorted(set(names_b) - set(names_a))
        detail = []
        if only_a:
            detail.append(f"only in {what_a}: {', '.join(only_a[:5])}")
        if only_b:
            detail.append(f"only in {what_b}: {', '.join(only_b[:5])}")
        if not detail:
            detail.append("same names in another order")
        raise ClipfuseError(f"classes of {what_a} do not match {what_b} ({'; '.join(detail)})")


def _regular_files(paths: list[Path]) -> list[Path]:
    """paths without FIFOs, sockets and devices, each named on stderr: hashing or decoding one would block
    (a FIFO waits for a writer), so they are skipped without being opened."""
    kept = []
    for p in paths:
        kind = not_a_regular_file(p)
        if kind is None:
            kept.append(p)
        else:
            log(f"skipped {p}: {kind}, not a regular file (not opened)")
    return kept


def _check_labels(labels, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ClipfuseError(f"{name} must be a 1-D array of class indices, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ClipfuseError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ClipfuseError(f"{name} has a negative class index ({int(y.min())})")
    return y


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
    return f"class {class_names[c]!r} (label {c})" if class_names is not None and c < len(class_names) else f"class {c}"


def seeded_split(labels, eval_fraction: float, seed: int):
    """Stratified split of indices into (train, eval), both sorted int64 arrays.

    Each class sends round(n_c * eval_fraction) of its n_c examples to eval,
    but at least one and at most n_c - 1 when it has two or more (so every
    class is seen on both sides); a class with a single example stays in train.
    """
    y = _check_labels(labels)
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ClipfuseError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction}")
    rng = np.random.default_rng(seed)
    train, evals = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        n_eval = 0 if n < 2 else min(max(int(round(n * eval_fraction)), 1), n - 1)
        evals.append(idx[:n_eval])
        train.append(idx[n_eval:])
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    return cat(train), cat(evals)


def sample_k_shot(labels, k: int, seed: int, num_classes: int | None = None, class_names: Sequence[str] | None = None):
    """k indices per class 0..num_classes-1 (default: max label + 1), drawn without replacement.

    Returns an int64 array of length k * num_classes, grouped by class in label
    order. Nested by construction: for a fixed seed, the k-shot set is a
    subset of the (k+1)-shot set (each class takes the first k of one seeded
    permutation), so curves over k compare growing training sets, not
    different draws. A class with fewer than k examples raises ClipfuseError
    naming it (pass class_names for readable names).
    """
    y = _check_labels(labels)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ClipfuseError(f"k (shots per class) must be a positive integer, got {k!r}")
    k = int(k)
    C = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    if C < 1:
        raise ClipfuseError("labels are empty: there is nothing to sample shots from")
    if y.size and y.max() >= C:
        raise ClipfuseError(f"labels hold class index {int(y.max())} but num_classes is {C}")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(C):
        idx = np.flatnonzero(y == c)
        if len(idx) < k:
            raise ClipfuseError(
                f"{_class_label(c, class_names)} has {len(idx)} example(s), fewer than k={k} shots; "
                "lower k or add examples of that class"
            )
        out.append(rng.permutation(idx)[:k])
    return np.concatenate(out).astype(np.int64)


def pool_counts(labels, num_classes: int, eval_fraction: float | None, probe_fraction: float | None) -> np.ndarray:
    """Images per class left in fit's controller pool: the training side of the eval split (none when
    eval_fraction is None: a separate eval folder), less the linear probes' share (probe_fraction, None
    for zero-shot heads). The splits are stratified, so the counts follow from the labels alone."""
    y = _check_labels(labels)
    if eval_fraction is not None:
        y = y[seeded_split(y, eval_fraction, 0)[0]]
    if probe_fraction is not None:
        y = y[seeded_split(y, 1.0 - probe_fraction, 0)[1]]
    return np.bincount(y, minlength=num_classes)


def check_shots(labels, shots: int, class_names: Sequence[str], eval_fraction: float | None = None,
                probe_fraction: float | None = None) -> None:
    """Refuse --shots k above what the fewest class has in the controller's pool, in one line that says what
    passes: fewer shots, or (linear probes) a --probe-fraction that leaves k images per class."""
    C = len(class_names)
    counts = pool_counts(labels, C, eval_fraction, probe_fraction)
    if shots <= counts.min():
        return
    fewest = int(counts.argmin())
    fixes = [f"--shots {int(counts.min())}"] if counts.min() >= 1 else []
    if probe_fraction is not None:
        passing = [f for f in np.arange(0.85, 0.04, -0.05).round(2)
                   if f < probe_fraction and pool_counts(labels, C, eval_fraction, float(f)).min() >= shots]
        if passing:
            fixes.append(f"--probe-fraction {passing[0]:g} (the probes then train on fewer images)")
    where = (f" (linear probes take --probe-fraction {probe_fraction:g} of the training images)"
             if probe_fraction is not None else "")
    raise ClipfuseError(f"--shots {shots} is more than class {class_names[fewest]!r} has in the controller's pool "
                        f"({int(counts[fewest])} images){where}; "
                        + (f"use {' or '.join(fixes)}" if fixes else "label more images"))
