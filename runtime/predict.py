"""Classify images with an engine folder: the Predictor behind `clipfuse.load` and `clipfuse predict`.

    predictor = clipfuse.load("engines/demo")                   # manifest checked, backend opened
    preds = predictor.predict(["a.jpg", pil_image, "b.png"])      # one Prediction per input, in order
    for preds in predictor.predict_batches(huge_list_of_paths):  # streaming, flat memory
        ...
    outputs = predictor.predict_arrays({"image_224": uint8 (N, 3, 224, 224)})   # raw outputs

A Prediction carries the top-k labels and probabilities, the controller's
temperature per backbone, and, for an input that could not be used, the
reason instead: inputs are never dropped silently.

The pipeline is kept thin: runtime/images.iter_batches decodes and resizes the
next batches in a thread pool (PIL releases the GIL) while the backend runs
the current one (ONNX Runtime releases the GIL too), so on a folder of photos
the engine stays busy. benchmarks/runtime_thin.py measures how close to the
engine's own throughput on ready-made tensors this gets.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from clipfuse.core import iospec
from clipfuse.core.errors import ClipfuseError

from .backends.base import Backend
from .backends.registry import BACKEND_NAMES, open_backend
from .cascade import check_cascade_precision, open_cascade
from .images import LOWER_LIMIT, RAISE_LIMIT, iter_batches
from .manifest import Manifest, read_manifest
from .precisions import check_precision
from .preprocess import ResizeTooLarge, preprocess_for_inputs


@dataclass
class Prediction:
    """The result for one input image."""

    index: int                      # position of the image in the input sequence
    path: str | None                # the path as given; None for an in-memory (PIL) image
    labels: list[str] = field(default_factory=list)            # top-k class names, most probable first
    probs: list[float] = field(default_factory=list)           # their probabilities (softmax of fused logits)
    temperatures: dict[str, float] = field(default_factory=dict)   # {backbone "ARCH:WEIGHTS": t_k}
    error: str | None = None        # why this input could not be classified; None when it was
    stage: int | None = None        # cascade engines: the stage that answered (1-based); None otherwise

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"<image {self.index}>"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Stats:
    """Where predict's time went (for benchmarks): engine busy vs waiting for decoded images."""

    images: int = 0
    failed: int = 0
    infer_s: float = 0.0
    wait_s: float = 0.0


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


class Predictor:
    """An engine folder with an opened backend; use as a context manager or call close()."""

    def __init__(self, manifest: Manifest, backend: Backend, batch_size: int = 8, workers: int | None = None,
                 min_side: int = 8, max_pixels: int | None = None):
        self.manifest, self.backend = manifest, backend
        self.batch_size, self.workers = batch_size, workers
        self.min_side, self.max_pixels = min_side, max_pixels
        self.specs = manifest.preprocess_specs()
        self.classes = manifest.classes
        self.backbone_names = manifest.backbone_names
        self.stats = Stats()

    # -- raw

    def predict_arrays(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ready-made uint8 tensors {input_name: (N, 3, R, R)} -> all five outputs {name: array}."""
        return self.backend.infer(feed)

    # -- images

    def predict(self, images, top_k: int = 5) -> list[Prediction]:
        """Paths (str/Path), PIL images, or a mix -> one Prediction per input, in input order."""
        top_k = self._check_top_k(top_k)
        if _is_path(images) or isinstance(images, Image.Image):
            images = [images]
        items = list(images)
        for i, x in enumerate(items):
            if not (_is_path(x) or isinstance(x, Image.Image)):
                raise ClipfuseError(f"images[{i}] is a {type(x).__name__}: pass image file paths (str or Path) "
                                    "or PIL images")
        out: list[Prediction | None] = [None] * len(items)
        path_index = [i for i, x in enumerate(items) if _is_path(x)]
        pil_index = [i for i, x in enumerate(items) if not _is_path(x)]
        where = iter(path_index)
        for batch in self._stream_paths([items[i] for i in path_index], top_k):
            for p in batch:
                p.index = next(where)
                out[p.index] = p
        for batch in self._stream_pil([items[i] for i in pil_index], top_k):
            for p in batch:
                p.index = pil_index[p.index]
                out[p.index] = p
        return out

    def predict_batches(self, paths: Iterable[str | os.PathLike], top_k: int = 5) -> Iterator[list[Prediction]]:
        """Stream: image paths (any iterable, consumed lazily) -> one list of Predictions per batch_size
        inputs, in order, failures included. Memory stays flat on folders of any size."""
        top_k = self._check_top_k(top_k)
        return self._stream_paths(paths, top_k)

    # -- internals

    def _check_top_k(self, top_k: int) -> int:
        if not isinstance(top_k, int) or top_k < 1:
            raise ClipfuseError(f"top_k must be a positive integer, got {top_k!r}")
        return min(top_k, len(self.classes))      # asking for more classes than exist is not an error

    def _decode(self, outputs: dict, rows: int, top_k: int) -> list[tuple[list[str], list[float], dict]]:
        probs = outputs[iospec.PROBS][:rows]                                 # (n, C)
        temps = outputs[iospec.TEMPERATURES][:rows]                          # (n, K)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]          # ties: lower class index first
        stage = outputs.get(iospec.STAGE)                                    # (n,) or (n, 1) served: cascade only
        stage = None if stage is None else np.asarray(stage).reshape(-1)
        # a cascade leaves NaN for backbones an image never reached: they are not shown
        return [([self.classes[c] for c in order[r]], [float(probs[r, c]) for c in order[r]],
                 {name: float(t) for name, t in zip(self.backbone_names, temps[r]) if not np.isnan(t)},
                 *([] if stage is None else [None, int(stage[r])])) for r in range(rows)]

    def _infer(self, feed: dict, top_k: int):
        t0 = time.perf_counter()
        outputs = self.backend.infer(feed)
        self.stats.infer_s += time.perf_counter() - t0
        return self._decode(outputs, next(iter(feed.values())).shape[0], top_k)

    def _stream_paths(self, paths: Iterable, top_k: int) -> Iterator[list[Prediction]]:
        pending: deque = deque()        # paths handed to the loader, as the user gave them

        def remember(it):
            for p in it:
                pending.append(p)
                yield p

        batches = iter_batches(remember(paths), self.specs, self.batch_size, self.workers,
                               self.min_side, self.max_pixels)
        index = 0
        t_wait = time.perf_counter()
        for batch in batches:
            self.stats.wait_s += time.perf_counter() - t_wait
            # Batches are consecutive batch_size slices of the input: the current one is pending's head.
            chunk = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
            rows = iter(self._infer(batch.inputs, top_k) if batch.paths else [])
            ok, failed = deque(batch.paths), deque(batch.failures)
            preds = []
            for given in chunk:
                p = Path(given)
                if ok and ok[0] == p:
                    ok.popleft()
                    preds.append(Prediction(index, str(given), *next(rows)))
                elif failed and failed[0].path == p:
                    preds.append(Prediction(index, str(given), error=failed.popleft().reason))
                else:   # iter_batches keeps order and drops nothing; reaching this is a clipfuse bug
                    raise RuntimeError(f"internal error: batch does not account for {given!r}")
                index += 1
            self.stats.images += len(preds)
            self.stats.failed += sum(not p.ok for p in preds)
            yield preds
            t_wait = time.perf_counter()

    def _prepare_pil(self, img: Image.Image):
        w, h = img.size
        if min(w, h) < self.min_side:
            return f"image is {w}x{h} px, smaller than the minimum {self.min_side} px per side"
        try:       # the resized copy is bounded like a file's (runtime/images.py), before allocating
            return preprocess_for_inputs(img, self.specs, self.max_pixels or Image.MAX_IMAGE_PIXELS)
        except ResizeTooLarge as e:
            return f"{e}; {RAISE_LIMIT}"
        except MemoryError:
            return f"out of memory while resizing this {w}x{h} image; {LOWER_LIMIT}"
        except (OSError, ValueError) as e:
            return f"cannot preprocess this {img.mode} image ({e})"

    def _stream_pil(self, images: list, top_k: int) -> Iterator[list[Prediction]]:
        if not images:
            return
        chunks = [images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        workers = self.workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers, thread_name_prefix="clipfuse-pil") as pool:
            nxt = [pool.submit(self._prepare_pil, im) for im in chunks[0]]
            for k, chunk in enumerate(chunks):
                results = [f.result() for f in nxt]
                if k + 1 < len(chunks):      # resize the next batch while the engine runs this one
                    nxt = [pool.submit(self._prepare_pil, im) for im in chunks[k + 1]]
                good = [r for r in results if isinstance(r, dict)]
                rows = iter(self._infer({name: np.stack([r[name] for r in good]) for name in self.specs}, top_k)
                            if good else [])
                base = k * self.batch_size
                preds = [Prediction(base + j, None, *next(rows)) if isinstance(r, dict)
                         else Prediction(base + j, None, error=r) for j, r in enumerate(results)]
                self.stats.images += len(preds)
                self.stats.failed += sum(not p.ok for p in preds)
                yield preds

    # -- lifetime

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_predictor(engine_dir, backend: str = "auto", batch_size: int = 8, workers: int | None = None,
                   threads: int | None = None, verify: bool = True,
                   precision: str | None = None, cascade: bool | None = None, compile: bool = False) -> Predictor:
    """Open an engine folder for prediction -> Predictor (predict, predict_batches, predict_arrays);
    `clipfuse.load`. The folder and the arguments are checked before the (slow) backend opens, so a typo
    fails at once.

    backend: "auto" (the fastest that runs here, logged on stderr), "onnxruntime", "onnxruntime-cuda",
    "onnxruntime-tensorrt", "openvino", "torch", "torch-cuda", "torch-cuda-eager" or "tensorrt". batch_size:
    images per engine call (on torch-cuda also its largest CUDA-graph bucket; torch-cuda runs fp32 or fp16,
    and compile=True passes its towers through torch.compile). workers: image-decoding threads (default min(4, CPUs)). threads: the backend's intra-op threads
    (default: the measured best, see benchmarks/results/runtime_thin.md). Needs neither torch nor
    open_clip unless a torch backend is asked for. precision: "fp32", "fp16" or "int8" runs that graph
    (model.fp16.onnx, model.int8.onnx; TensorRT: its plan); made by `clipfuse export ENGINE --precision`.
    cascade: on a cascade engine, None or True routes each image through the stages it needs
    (Prediction.stage says which answered; fp32 stages, or with precision="int8" the int8 ones that
    `export --precision int8` cut and certified; fp16 has none; runtime/cascade.py); False runs the full
    graph (model.onnx).
    """
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ClipfuseError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKEND_NAMES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ClipfuseError(f"batch size must be a positive integer, got {batch_size!r}")
    if workers is not None and workers < 1:
        raise ClipfuseError(f"workers must be at least 1, got {workers}")
    if precision is not None:

        check_precision(precision)
    manifest = read_manifest(engine_dir, verify=verify)
    options = {"threads": threads} if threads else {}
    if compile:
        options["compile"] = True
    options["max_batch"] = batch_size           # torch-cuda's largest CUDA-graph bucket; other backends ignore it
    check_cascade_precision(manifest, cascade, precision)
    routed = open_cascade(manifest, backend, cascade, precision=precision, **options)
    if routed is not None:
        return Predictor(manifest, routed, batch_size, workers)
    return Predictor(manifest, open_backend(manifest, backend, precision=precision, **options),
                     batch_size, workers)
