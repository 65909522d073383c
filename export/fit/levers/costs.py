"""What each backbone costs, to price budget subsets and cascade stages (export/fit/levers).

GFLOPs as `clipfuse backbones` counts them, or ms at batch 1 on ONNX Runtime CPU: every backbone's own tower
graph, timed interleaved in rotated rounds (a busy neighbour slows every tower of a round alike), and a
ranking the rounds do not agree on is named as unreliable (`contested_ranking`), never trusted silently.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipfuse.core.log import step
from clipfuse.runtime.backends.sessions import open_session
from clipfuse.runtime.cpu_load import LoadProbe

from ...graph.fused import FusedEnsemble
from ...graph.stages import TowerStage, _export
from .recipe import GFLOPS, MS

TIMING_WARMUP, TIMING_RUNS = 3, 7
# a ranking of measured costs is trusted when every pair more than 10% apart is ordered the same way in >= 75%
# of the interleaved rounds (a busy neighbour slows every tower of a round alike; noise reorders rounds)
RANK_MIN_GAP, RANK_MIN_AGREE = 0.10, 0.75


def _visual(b):
    return b.model.visual if hasattr(b.model, "visual") else b.model


def measure_costs(built, heads, unit: str) -> tuple[list[float], dict]:
    """Per-backbone cost in `unit`: GFLOPs as counted, or ms at batch 1 on ONNX Runtime CPU (the
    backbone's own tower graph: normalise, tower, norm, head; median of TIMING_RUNS interleaved rounds
    after TIMING_WARMUP). -> (costs, {unit, method, per_backbone, load[, unreliable: why the ranking of
    the ms cannot be trusted]})."""
    names = [str(b.spec) for b in built]
    if unit == GFLOPS:
        costs = [float(b.info["gflops"]) for b in built]
        return costs, {"unit": GFLOPS, "method": "image tower GFLOPs at batch 1 (as `clipfuse backbones` counts them)",
                       "per_backbone": dict(zip(names, costs))}

    probe = LoadProbe()
    with tempfile.TemporaryDirectory(prefix="clipfuse-cost-") as tmp:
        sessions, feeds = [], []
        for i, (b, h) in enumerate(zip(built, heads)):
            with step(f"cost {i + 1}/{len(built)} {b.spec}: tower graph at batch 1, ONNX Runtime CPU"):
                fused = FusedEnsemble([_visual(b)], [h], [b.image_size], [b.preprocess["mean"]], [b.preprocess["std"]]).eval()
                path = Path(tmp) / f"tower_{i}.onnx"
                _export(TowerStage(fused, 0), (torch.zeros(2, 3, b.image_size, b.image_size, dtype=torch.uint8),),
                        ["image"], ["f", "z"], path, 18)
                sessions.append(open_session(path))
                feeds.append({"image": np.random.default_rng(0).integers(0, 256, (1, 3, b.image_size, b.image_size),
                                                                        dtype=np.uint8)})
        with step(f"timing {len(built)} towers interleaved: {TIMING_RUNS} rounds after {TIMING_WARMUP} warm-up"):
            runs = time_interleaved(sessions, feeds)
        del sessions
    costs = [float(statistics.median(r)) for r in runs]
    rows = {n: {"median_ms": c, "runs_ms": [round(t, 3) for t in r]} for n, c, r in zip(names, costs, runs)}
    info = {"unit": MS, "method": f"ONNX Runtime CPU, batch 1, median of {TIMING_RUNS} rounds after {TIMING_WARMUP} "
                                  "warm-up rounds; each round times every backbone's tower graph once, in a rotated "
                                  "order (a neighbour's load falls on all of them alike)",
            "per_backbone": rows, "load": probe.stop()}
    contested = contested_ranking(names, runs)
    if contested:
        info["unreliable"] = (f"{contested}, with other processes using {info['load']['other_processes_cores']} "
                              "cores meanwhile: the measured ranking is not reliable")
    return costs, info


def time_interleaved(sessions, feeds) -> list[list[float]]:
    """ms per run, per session: TIMING_WARMUP untimed rounds, then TIMING_RUNS rounds that each run every
    session once, round r starting at session r mod K, so no tower is always timed first or last."""
    K = len(sessions)
    runs = [[] for _ in range(K)]
    for r in range(TIMING_WARMUP + TIMING_RUNS):
        for k in [(r + j) % K for j in range(K)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            if r >= TIMING_WARMUP:
                runs[k].append(1e3 * (time.perf_counter() - t0))
    return runs


def contested_ranking(names, runs, min_gap: float = RANK_MIN_GAP, min_agree: float = RANK_MIN_AGREE) -> str | None:
    """Why the ranking of the medians cannot be trusted, or None: a pair whose medians differ by more than
    min_gap (relative; closer pairs may come either way without changing what is cheap) while fewer than
    min_agree of the rounds order them as the medians do."""
    med = [statistics.median(r) for r in runs]
    for i in range(len(runs)):
        for j in range(len(runs)):
            if med[i] < med[j] and med[j] > med[i] * (1 + min_gap):
                agree = float(np.mean([a < b for a, b in zip(runs[i], runs[j])]))
                if agree < min_agree:
                    return (f"{names[i]} (median {med[i]:.3g} ms) was timed faster than {names[j]} (median "
                            f"{med[j]:.3g} ms) in only {agree:.0%} of the rounds (bound >= {min_agree:.0%})")
    return None
