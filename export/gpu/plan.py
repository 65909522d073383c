"""The pure planning of the GPU path: batch buckets, padding, which tower runs on which stream, option checks.

Nothing here needs CUDA or imports torch, so every decision the GPU path takes is tested on CPU:

    buckets(8)                 -> (1, 2, 4, 8)       one CUDA graph per bucket
    bucket_for(3, (1, 2, 4, 8)) -> 4                 a batch of 3 runs in the 4-graph, padded
    pad_to(array, 4)                                 repeats the last image; the answers drop the padding
    stream_plan(K, concurrent) -> StreamPlan         tower k on stream k (or all on the main stream), joined
                                                     on the main stream before the controller
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import numpy as np

from clipfuse.core.errors import ClipfuseError

from ..graph.islands import DOWNSTREAM_FP32, FP32_OPS

PRECISIONS = ("fp32", "fp16")
MAIN = 0          # the capturing (current) stream; side streams are 1..K


def buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, then max_batch itself: every batch up to it has a bucket at most 2x it."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ClipfuseError(f"max batch must be a positive integer, got {max_batch!r}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return tuple(out + [max_batch])


def bucket_for(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket that holds n images; a batch above the largest is refused, naming both."""
    if n < 1:
        raise ClipfuseError("empty batch: no images to run")
    for b in sizes:
        if n <= b:
            return b
    raise ClipfuseError(f"batch of {n} images is above the largest CUDA-graph bucket ({sizes[-1]}): open the "
                        f"torch-cuda backend with max_batch >= {n} (predict/serve: --batch {n}), or send smaller batches")


def pad_to(images: np.ndarray, bucket: int) -> np.ndarray:
    """(n, ...) -> (bucket, ...) by repeating the last image (real pixels: no NaN or denormal path in padding)."""
    n = images.shape[0]
    if n > bucket:
        raise ClipfuseError(f"cannot pad {n} images down to a bucket of {bucket}")
    if n == bucket:
        return images
    return np.concatenate([images, np.repeat(images[-1:], bucket - n, axis=0)], axis=0)


def unpad(outputs: dict, n: int) -> dict:
    """Drop the padding rows: the answers for the n real images only."""
    return {k: v[:n] for k, v in outputs.items()}


@dataclass(frozen=True)
class StreamPlan:
    """Where each tower runs inside one captured graph, and where the streams join.

    tower_stream[k]: the stream of tower k (MAIN = the capturing stream, 1.. = side streams)
    fork: side streams wait on MAIN before their towers (side.wait_stream(main))
    join_before: "controller": MAIN waits on every side stream before the controller runs
    """

    tower_stream: tuple[int, ...]
    join_before: str = "controller"

    @property
    def side_streams(self) -> tuple[int, ...]:
        return tuple(sorted(set(s for s in self.tower_stream if s != MAIN)))

    def steps(self) -> list[tuple]:
        """The plan as the order of operations the capture performs (what the tests read)."""
        out = [("normalise", MAIN)]
        out += [("fork", s) for s in self.side_streams]
        out += [("tower", k, s) for k, s in enumerate(self.tower_stream)]
        out += [("join", s) for s in self.side_streams]
        out += [(part, MAIN) for part in DOWNSTREAM_FP32[1:]]      # heads .. combination (norm runs per tower)
        return out


def stream_plan(num_towers: int, concurrent: bool = True) -> StreamPlan:
    """Concurrent: tower k on side stream k+1 (the feature norm with it); serial: every tower on MAIN."""
    if num_towers < 1:
        raise ClipfuseError("a stream plan needs at least one tower")
    if not concurrent or num_towers == 1:       # one tower: a side stream would only add a fork and a join
        return StreamPlan(tuple([MAIN] * num_towers))
    return StreamPlan(tuple(range(1, num_towers + 1)))


def torch_fp32_ops() -> tuple[str, ...]:
    """The torch functions autocast must leave in fp32: model.fp16.onnx's FP32_OPS, by their torch names."""
    return tuple(FP32_OPS.values())


def compiler_missing(device: str) -> str | None:
    """Why torch.compile (inductor) cannot compile for `device` here, or None. Cheap: imports nothing."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if device == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor needs triton for CUDA and it is not installed (pip install triton)"
        return None
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"inductor needs a C++ compiler for CPU and {cxx!r} is not on PATH"
    return None


def check_options(device: str, precision: str, max_batch: int, compile: bool, backend: str = "torch-cuda") -> None:
    """Refuse bad options with one line each, before anything is loaded."""
    if device not in ("cuda", "cpu"):
        raise ClipfuseError(f"backend {backend}: unknown device {device!r}; valid: cuda, cpu")
    if precision not in PRECISIONS:
        raise ClipfuseError(f"backend {backend} runs fp32 or fp16, not {precision!r} (int8: onnxruntime, openvino "
                            "or tensorrt)")
    if precision == "fp16" and device != "cuda":
        raise ClipfuseError(f"backend {backend}: fp16 needs a CUDA GPU; PyTorch on the CPU runs fp32 only "
                            "(for fp16 on the CPU use --backend onnxruntime --precision fp16)")
    buckets(max_batch)
    if compile:
        reason = compiler_missing(device)
        if reason is not None:
            raise ClipfuseError(f"backend {backend}: --compile cannot work here: {reason}; run without --compile")
