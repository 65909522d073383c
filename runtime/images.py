"""Finding, loading and batching the images a user asks clipfuse to classify.

Three steps, each usable on its own:

    collect_images(sources)       files, folders, globs, "-" (stdin)  -> [Path]
    load_image(path)              one file -> decoded PIL image, or ImageError
    iter_batches(paths, specs)    [Path] -> Batch(paths, {input_name: uint8 (n, 3, R, R)}, failures)

Loading does what open_clip's users do, `Image.open(path)` and nothing else
(frame 0 of an animated file, no EXIF transposition, the file's own mode), so
that runtime/preprocess.py can reproduce open_clip's eval transform bit for bit.
It also refuses, with a reason, what would crash or stall a long run: empty,
truncated or non-image files, tiny images and decompression bombs (checked from
the header, before decoding), files that are not regular files (a FIFO or a
device would block the reader: named and skipped without being opened), and
files whose read fails (EIO). A bad image never stops a batch: it is reported
as an ImageFailure and the rest of the batch goes on (a MemoryError included).

Bounded work: neither the decoded file nor its copy resized to an input's size may exceed the pixel
limit (a thin strip grows by R / short side: runtime/preprocess.check_resize), both checked from the
header. The limit is PIL's `Image.MAX_IMAGE_PIXELS`; `clipfuse predict --max-image-pixels N` or
CLIPFUSE_MAX_IMAGE_PIXELS=N (any command) changes it (`set_pixel_limit`).

Batches are decoded and resized by a small thread pool (PIL releases the GIL
while decoding and resizing) with a bounded number of batches in flight, so
the engine is kept fed and memory stays flat on folders of any size.
"""
from __future__ import annotations

import codecs
import glob
import itertools
import os
import stat
import sys
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipfuse.core.errors import ClipfuseError

from .preprocess import PreprocessSpec, ResizeTooLarge, check_resize, preprocess_for_inputs

PIXEL_LIMIT_ENV = "CLIPFUSE_MAX_IMAGE_PIXELS"
RAISE_LIMIT = (f"if you trust the file, raise the limit: `clipfuse predict --max-image-pixels N`, "
               f"or {PIXEL_LIMIT_ENV}=N for any command")
LOWER_LIMIT = (f"free memory, use fewer --workers, or lower the pixel limit (`--max-image-pixels N`, "
               f"{PIXEL_LIMIT_ENV}=N) so such images are refused up front")
# The one list of image extensions (matched in any case); export/data.py scans labelled folders with it too.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_BATCHES_IN_FLIGHT = 2        # decoded ahead of the consumer; bounds memory to ~3 batches


class ImageError(ClipfuseError):
    """One image file that cannot be used, and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ImageFailure:
    path: Path
    reason: str


@dataclass
class Batch:
    paths: list[Path]                                            # images that loaded, in input order
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # input_name -> uint8 (n, 3, R, R)
    failures: list[ImageFailure] = field(default_factory=list)   # this batch's slice that failed


# ----------------------------------------------------------------------------- the pixel limit

def set_pixel_limit(max_pixels: int) -> None:
    """Set the process-wide pixel limit (PIL.Image.MAX_IMAGE_PIXELS, which PIL's own open-time
    refusal at twice the limit follows too)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ClipfuseError(f"the image pixel limit must be a positive integer, got {max_pixels!r}")
    Image.MAX_IMAGE_PIXELS = max_pixels


def _pixel_limit_from_environment() -> None:
    value = os.environ.get(PIXEL_LIMIT_ENV)
    if value is None or not value.strip():
        return
    try:
        limit = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ClipfuseError(f"{PIXEL_LIMIT_ENV}={value!r} is not a positive integer (pixels, e.g. 200000000)")
    set_pixel_limit(limit)


_pixel_limit_from_environment()
# Between the limit and twice it PIL only warns on open; load_image refuses that range itself, by name,
# so the warning would only repeat it (and a per-call catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# ----------------------------------------------------------------------------- collecting

def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_image_file(name: str | os.PathLike) -> bool:
    """True for a visible file whose extension is an image one, in any case. Names starting with "."
    are hidden: macOS writes "._IMG_0001.jpg" resource forks next to images."""
    name = Path(name).name
    return not name.startswith(".") and _is_image_name(Path(name))


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted (never file-system order); hidden files and
    folders (".*": "._IMG_0001.jpg", ".thumbnails/", ".git/") are skipped. The one folder scan:
    predict's folders and export's labelled class folders both list images here."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if is_image_file(f)]
    return sorted(found)


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def not_a_regular_file(path: str | os.PathLike, mode: int | None = None) -> str | None:
    """Why `path` is not a regular file (e.g. "a FIFO (named pipe)"), from its stat alone, or None when it
    is one (or cannot be stat-ed: opening it then names the error). Reading a FIFO or a device blocks
    until something writes, so these are named and skipped, never opened."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):
            return None
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _has_magic(source: str) -> bool:
    return any(c in source for c in "*?[")


def _expand(source: str, where: str = "", globbing: bool = True, missing_ok: bool = False) -> list[Path]:
    """One source -> its image paths; raises ClipfuseError naming it when it yields nothing
    (with missing_ok, a path that does not exist is kept: loading it reports "no such file")."""
    path = Path(source)
    if path.is_dir():
        images = image_files(path)
        if not images:
            raise ClipfuseError(f"folder {source}{where} contains no images "
                                f"({' '.join(sorted(IMAGE_EXTENSIONS))}); check the path")
        return images
    if path.exists():                       # named explicitly: kept whatever its extension
        return [path]
    if globbing and _has_magic(source):
        images = []
        for match in sorted(glob.glob(source, recursive=True)):
            m = Path(match)
            images += image_files(m) if m.is_dir() else [m] if _is_image_name(m) else []
        if not images:
            raise ClipfuseError(f"pattern {source!r}{where} matches no image files; check the pattern")
        return images
    if missing_ok:
        return [path]
    raise ClipfuseError(f"no such file or folder: {source}{where}")


def collect_images(sources: Iterable[str | os.PathLike], stdin: IO[str] | None = None,
                   missing_ok: bool = False) -> list[Path]:
    """Image paths named by `sources`: files (kept whatever their extension), folders (recursive,
    sorted, image extensions only), glob patterns (`*`, `?`, `**`) and "-" (one path per line
    from `stdin`, default sys.stdin). Duplicates are dropped, first occurrence wins.
    missing_ok: a named path that does not exist is kept (its load fails per image, "no such file",
    so `clipfuse predict` classifies the rest) instead of refusing the whole list."""
    out: dict[str, Path] = {}               # abspath -> path as the user spelled it
    for source in sources:
        source = os.fspath(source)
        if source == "-":
            lines = (stdin if stdin is not None else sys.stdin).read().splitlines()
            # Listed paths are taken literally (no glob): file names may contain "[" or "*".
            expanded = [p for n, line in enumerate(lines, 1) if line.strip()
                        for p in _expand(line.strip(), f" (stdin line {n})", globbing=False, missing_ok=missing_ok)]
        else:
            expanded = _expand(source, missing_ok=missing_ok)
        for p in expanded:
            out.setdefault(os.path.abspath(p), p)
    return list(out.values())


# ----------------------------------------------------------------------------- loading

_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP",
          b"II*\0": "TIFF", b"MM\0*": "TIFF"}


def _is_text(head: bytes) -> bool:
    try:                                 # incremental: the 512-byte cut may split a UTF-8 sequence
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


def _unidentified(head: bytes) -> str:
    """Why PIL could not identify a file, with a cheap guess at what it is (from its first bytes)."""
    fmt = next((f for magic, f in _MAGIC.items() if head.startswith(magic)), None)
    if fmt is None and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        fmt = "WebP"
    if fmt:                              # e.g. skimage's planar multipage_rgb.tif: a real TIFF PIL cannot read
        return (f"unreadable image (cannot identify image file; looks like a {fmt} file in a variant "
                "this Pillow cannot read, or with a corrupt header); convert it to PNG or JPEG")
    if head.startswith(b"%PDF"):
        what = "a PDF document"
    elif head.startswith(b"PK\x03\x04"):
        what = "a ZIP archive"
    elif head[4:8] == b"ftyp":
        what = "an ISO media file (HEIC, AVIF or video) that this Pillow cannot read"
    elif _is_text(head):
        what = "text"
    else:
        what = f"unknown data starting with {head[:8].hex(' ')}"
    return f"not an image (cannot identify image file; looks like {what})"


def _open_for_reading(path) -> IO[bytes]:
    """open(path, "rb"), but O_NONBLOCK: a FIFO swapped in after the stat check opens at once instead of
    blocking (load_image then refuses it from fstat)."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)), "rb")


def _not_regular_reason(kind: str) -> str:
    return (f"is {kind}, not a regular file: skipped without reading it"
            if kind != "a folder" else "is a folder, not an image file")


def load_image(path: str | os.PathLike, min_side: int = 8, max_pixels: int | None = None,
               sizes: Iterable[int] = ()) -> Image.Image:
    """Open and fully decode one image, exactly as `Image.open(path)` gives it (frame 0, own mode,
    no EXIF transposition). width*height, and the image resized to each of `sizes` (shortest side),
    are checked against max_pixels (None: PIL's Image.MAX_IMAGE_PIXELS, read at call time) from the
    header, before decoding, and each side against min_side. Raises ImageError(path, reason) for any
    file that cannot be used."""
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    kind = not_a_regular_file(path)
    if kind is not None:
        raise ImageError(path, _not_regular_reason(kind))
    try:
        f = _open_for_reading(path)
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except PermissionError:
        raise ImageError(path, "cannot read the file: permission denied; check its permissions") from None
    except OSError as e:
        raise ImageError(path, f"cannot read the file ({e.strerror or e})") from None
    with f:
        kind = not_a_regular_file(path, os.fstat(f.fileno()).st_mode)
        if kind is not None:
            raise ImageError(path, _not_regular_reason(kind))
        try:
            head = f.read(512)
        except OSError as e:            # EIO from a failing disk, or a file like /proc/self/mem
            raise ImageError(path, f"cannot read the file ({e.strerror or e})") from None
        if not head:
            raise ImageError(path, "empty file (0 bytes)")
        f.seek(0)
        try:
            img = Image.open(f)                 # parses the header only
        except UnidentifiedImageError:
            raise ImageError(path, _unidentified(head)) from None
        except Image.DecompressionBombError as e:   # PIL refuses > 2 * MAX_IMAGE_PIXELS while opening
            raise ImageError(path, f"too many pixels, possible decompression bomb ({e}); {RAISE_LIMIT}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(path, f"corrupt image header ({e})") from None
        w, h = img.size
        if max_pixels and w * h > max_pixels:
            raise ImageError(path, f"image is {w}x{h} = {w * h:,} px, over the limit of {max_pixels:,} px "
                                   f"(possible decompression bomb); {RAISE_LIMIT}")
        if min(w, h) < min_side:
            raise ImageError(path, f"image is {w}x{h} px, smaller than the minimum {min_side} px per side")
        for size in sizes:
            try:
                check_resize(w, h, size, max_pixels)
            except ResizeTooLarge as e:
                raise ImageError(path, f"{e}; {RAISE_LIMIT}") from None
        try:
            img.load()                          # decode now, while the file is open
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(path, f"truncated or corrupt image data ({e})") from None
        except MemoryError:
            raise ImageError(path, f"out of memory while decoding this {w}x{h} image; {LOWER_LIMIT}") from None
    return img


# ----------------------------------------------------------------------------- batching

def _empty(spec: PreprocessSpec | int) -> np.ndarray:
    R = spec if isinstance(spec, int) else spec.size
    return np.zeros((0, 3, R, R), np.uint8)                       # (0, 3, R, R)


def _load_and_preprocess(path: Path, specs: dict, min_side: int, max_pixels: int | None):
    """-> {input_name: (3, R, R) uint8}, or an ImageFailure. Runs in a worker thread. Nothing one
    image does (a MemoryError included) escapes: the rest of the batch goes on."""
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    sizes = sorted({s if isinstance(s, int) else s.size for s in specs.values()})
    try:
        img = load_image(path, min_side, max_pixels, sizes)
    except ImageError as e:
        return ImageFailure(path, e.reason)
    except MemoryError:
        return ImageFailure(path, f"out of memory while loading this image; {LOWER_LIMIT}")
    try:
        return preprocess_for_inputs(img, specs, max_pixels)
    except ResizeTooLarge as e:
        return ImageFailure(path, f"{e}; {RAISE_LIMIT}")
    except MemoryError:
        return ImageFailure(path, f"out of memory while resizing this {img.size[0]}x{img.size[1]} image; "
                                  f"{LOWER_LIMIT}")
    except (OSError, ValueError) as e:          # e.g. a PIL mode that cannot be converted to RGB
        return ImageFailure(path, f"cannot preprocess this {img.mode} image ({e})")


def _assemble(paths: list[Path], results: list, specs: dict) -> Batch:
    ok = [(p, r) for p, r in zip(paths, results) if not isinstance(r, ImageFailure)]
    inputs = {name: np.stack([r[name] for _, r in ok]) if ok else _empty(spec)   # (n, 3, R, R)
              for name, spec in specs.items()}
    return Batch([p for p, _ in ok], inputs, [r for r in results if isinstance(r, ImageFailure)])


def _chunks(paths: Iterable, size: int) -> Iterator[list[Path]]:
    it = iter(paths)
    while chunk := [Path(p) for p in itertools.islice(it, size)]:
        yield chunk


def iter_batches(paths: Iterable[str | os.PathLike], specs: dict[str, PreprocessSpec | int],
                 batch_size: int = 8, workers: int | None = None, min_side: int = 8,
                 max_pixels: int | None = None) -> Iterator[Batch]:
    """Load and preprocess `paths` in a thread pool; yield one Batch per `batch_size` input paths,
    in order. An image that fails makes its batch shorter and is listed in Batch.failures.
    workers defaults to min(4, cpu count); `paths` may be a lazy iterable."""
    if batch_size < 1:
        raise ClipfuseError(f"batch_size must be at least 1, got {batch_size}")
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ClipfuseError(f"workers must be at least 1, got {workers}")
    return _run_batches(_chunks(paths, batch_size), dict(specs), workers, min_side, max_pixels)


def _run_batches(chunks: Iterator[list[Path]], specs: dict, workers: int, min_side: int,
                 max_pixels: int | None) -> Iterator[Batch]:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="clipfuse-images")
    in_flight: deque[tuple[list[Path], list[Future]]] = deque()

    def submit(chunk: list[Path]) -> None:
        in_flight.append((chunk, [pool.submit(_load_and_preprocess, p, specs, min_side, max_pixels)
                                  for p in chunk]))
    try:
        for chunk in itertools.islice(chunks, _BATCHES_IN_FLIGHT):
            submit(chunk)
        while in_flight:
            chunk, futures = in_flight.popleft()
            for nxt in itertools.islice(chunks, 1):     # refill before waiting: workers never idle
                submit(nxt)
            yield _assemble(chunk, [f.result() for f in futures], specs)
    finally:                                            # also when the caller stops early
        pool.shutdown(wait=True, cancel_futures=True)


def preprocess_paths(paths: Iterable[str | os.PathLike], specs: dict[str, PreprocessSpec | int],
                     batch_size: int = 8, workers: int | None = None, min_side: int = 8,
                     max_pixels: int | None = None) -> tuple[list[Path], dict[str, np.ndarray], list[ImageFailure]]:
    """All of `paths` at once: (paths that loaded, {input_name: (N, 3, R, R) uint8}, failures)."""
    ok: list[Path] = []
    parts: dict[str, list[np.ndarray]] = {name: [_empty(spec)] for name, spec in specs.items()}
    failures: list[ImageFailure] = []
    for batch in iter_batches(paths, specs, batch_size, workers, min_side, max_pixels):
        ok += batch.paths
        failures += batch.failures
        for name, arr in batch.inputs.items():
            parts[name].append(arr)
    return ok, {name: np.concatenate(arrs) for name, arrs in parts.items()}, failures   # (N, 3, R, R)
