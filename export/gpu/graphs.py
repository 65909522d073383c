"""The fused ensemble captured as CUDA graphs: one per batch bucket, each tower on its own stream.

    runner = GraphedEnsemble(fused, device="cuda", precision="fp16", max_batch=8, concurrent=True)
    outputs = runner.infer([uint8 (n, 3, R, R) per resolution])     # {iospec output: float32 (n, ...)}

What it does, and why (benchmarks/gpu_check.py measures each lever; DESIGN.md "The GPU"):
- CUDA graphs: at batch 1 the eager forward is launch-bound; a graph per bucket (plan.buckets) replays all
  kernels at once. A batch is padded to its bucket (plan.pad_to) and the padding dropped (plan.unpad).
- Streams (plan.stream_plan): tower k and its feature norm run on side stream k, forked from the capturing
  stream (side.wait_stream(main)) and joined (main.wait_stream(side)) before the heads and the controller,
  so small towers fill the SMs a lone tower leaves idle.
- fp16: torch.autocast(float16, cache_enabled=False: a cache of fp16 weight copies must not outlive a
  capture) over the towers, with model.fp16.onnx's islands (export/graph/islands.py) kept fp32 by Fp32Islands;
  the feature norm, heads, controller and combination run outside autocast, in fp32.
- Inputs: uint8 copied from pinned host buffers into the graph's static inputs with non_blocking=True.
- compile: each tower through torch.compile (inductor, dynamic=False); the seconds it took are logged. Across
  runs, inductor's own on-disk caches (TORCHINDUCTOR_CACHE_DIR) are what keeps compiled code; nothing here
  adds to them, and how much they save on a second run is unmeasured.

On device="cpu" the same forward runs eagerly (no graphs, no streams, fp32 only): what the dry run and the
CPU tests exercise. Never run on a GPU yet (see README "The GPU path").
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from clipfuse.core import iospec
from clipfuse.core.log import log

from .plan import MAIN, bucket_for, buckets, check_options, pad_to, stream_plan, torch_fp32_ops, unpad

LOW = (torch.float16, torch.bfloat16)


class Fp32Islands(TorchFunctionMode):
    """Under autocast, run model.fp16.onnx's fp32 ops (layer_norm, softmax, mean) in fp32 and hand the result
    back in the input's dtype, as the ONNX graph's Cast islands do. `seen` counts the calls it caught."""

    def __init__(self, names=None):
        super().__init__()
        self.names = frozenset(names or torch_fp32_ops())
        self.seen: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name not in self.names:
            return func(*args, **kwargs)
        self.seen[name] = self.seen.get(name, 0) + 1
        low = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in LOW), None)
        if low is None:
            return func(*args, **kwargs)
        up = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW else t, (args, kwargs))
        with torch.autocast(args[0].device.type, enabled=False):
            out = func(*up[0], **up[1])
        return out.to(low) if isinstance(out, torch.Tensor) else out


class GraphedEnsemble:
    """A FusedEnsemble run as plan.stream_plan says, captured per bucket on CUDA. See the module docstring."""

    def __init__(self, model, device: str = "cuda", precision: str = "fp32", max_batch: int = 8,
                 concurrent: bool = True, compile: bool = False, compile_backend: str = "inductor", sizes=None):
        """sizes: the buckets to capture (default plan.buckets(max_batch)); a benchmark captures only what it times."""
        check_options(device, precision, max_batch, compile and compile_backend == "inductor")
        self.model, self.device, self.precision = model, torch.device(device), precision
        self.sizes = tuple(sorted(sizes)) if sizes else buckets(max_batch)
        self.plan = stream_plan(model.num_backbones, concurrent)
        self.islands = Fp32Islands()
        self.towers = list(model.visuals)
        # torch.compile only wraps; the compile happens at each bucket's first call (its warm-up), timed there
        self.compile_s = 0.0 if compile else None
        if compile:
            self.towers = [torch.compile(v, backend=compile_backend, dynamic=False) for v in self.towers]
        self.cuda = self.device.type == "cuda"
        self.streams = {s: torch.cuda.Stream(self.device) for s in self.plan.side_streams} if self.cuda else {}
        self.graphs: dict = {}
        self.trace: list = []             # the last forward's steps, in order (what capture recorded on CUDA)
        if self.cuda:
            for b in self.sizes:
                self._capture(b)
        elif compile:
            t = time.perf_counter()
            for b in self.sizes:
                self._forward(self._static_inputs(b))
            self.compile_s = time.perf_counter() - t
        if compile:
            log(f"torch-cuda: torch.compile ({compile_backend}) of {len(self.towers)} towers at buckets "
                f"{list(self.sizes)} took {self.compile_s:.1f} s")

    # ------------------------------------------------------------------ the forward the graphs capture
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16",
                              cache_enabled=False)

    def _stream(self, s):
        return torch.cuda.stream(self.streams[s]) if self.cuda and s != MAIN else contextlib.nullcontext()

    def _forward(self, images):
        """The plan's steps in order (self.trace records them: plan.StreamPlan.steps() is what they must be);
        on the CPU the stream operations are no-ops but the order is the same."""
        m, plan, trace = self.model, self.plan, []
        with torch.inference_mode():
            normed = [norm(images[i]) for norm, i in zip(m.normalizers, m.norm_input)]
            trace.append(("normalise", MAIN))
            main = torch.cuda.current_stream(self.device) if self.cuda else None
            for s in plan.side_streams:                                      # fork
                if self.cuda:
                    self.streams[s].wait_stream(main)
                trace.append(("fork", s))
            feats = [None] * m.num_backbones
            for k, tower in enumerate(self.towers):
                with self._stream(plan.tower_stream[k]):
                    with self._autocast(), (self.islands if self.precision == "fp16" else contextlib.nullcontext()):
                        emb = tower(normed[m.norm_index[k]])
                    feats[k] = F.normalize(emb.float(), dim=-1)                  # (N, D_k) fp32 island
                trace.append(("tower", k, plan.tower_stream[k]))
            for s in plan.side_streams:                                      # join before the controller
                if self.cuda:
                    main.wait_stream(self.streams[s])
                trace.append(("join", s))
            zs = [F.linear(f, getattr(m, f"head_weight_{k}"), getattr(m, f"head_bias_{k}")) for k, f in enumerate(feats)]
            trace.append(("heads", MAIN))
            features = torch.cat(feats, dim=-1)                              # (N, sum D)
            backbone_logits = torch.stack(zs, dim=1)                         # (N, K, C)
            temperatures = m.controller(features)                            # (N, K)
            trace.append(("controller", MAIN))
            logits = (temperatures.unsqueeze(-1) * backbone_logits).sum(dim=1)
            trace.append(("combination", MAIN))
            self.trace = trace
            return logits, torch.softmax(logits, dim=-1), temperatures, backbone_logits, features

    # ------------------------------------------------------------------ capture and replay
    def _static_inputs(self, b):
        return [torch.zeros((b, 3, r, r), dtype=torch.uint8, device=self.device) for r in self.model.resolutions]

    def _capture(self, b):
        static = self._static_inputs(b)
        pinned = [torch.empty(t.shape, dtype=torch.uint8, pin_memory=True) for t in static]
        t = time.perf_counter()
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm):                 # warm-up (and any compile) on a side stream first
            for _ in range(3):
                self._forward(static)
        torch.cuda.current_stream(self.device).wait_stream(warm)
        torch.cuda.synchronize(self.device)
        if self.compile_s is not None:
            self.compile_s += time.perf_counter() - t
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(static)
        self.graphs[b] = (graph, static, pinned, out)

    def run_bucket(self, b: int):
        """Replay bucket b's graph on whatever its static inputs hold (benchmarks time this); on the CPU,
        the same forward on zero images of that bucket's size."""
        if not self.cuda:
            if b not in self.graphs:
                self.graphs[b] = (None, self._static_inputs(b), None, None)
            return self._forward(self.graphs[b][1])
        graph, _, _, out = self.graphs[b]
        graph.replay()
        return out

    def infer(self, images: list) -> dict:
        """uint8 numpy (n, 3, R, R) per resolution -> {output name: float32 numpy (n, ...)}."""
        n = images[0].shape[0]
        b = bucket_for(n, self.sizes)
        padded = [pad_to(a, b) for a in images]
        if not self.cuda:
            outs = self._forward([torch.from_numpy(np.ascontiguousarray(a)) for a in padded])
        else:
            graph, static, pinned, outs = self.graphs[b]
            for src, host, dev in zip(padded, pinned, static):
                np.copyto(host.numpy(), src)
                dev.copy_(host, non_blocking=True)
            graph.replay()
        result = {name: o.float().cpu().numpy() for name, o in zip(iospec.OUTPUT_NAMES, outs)}
        return unpad(result, n)
