"""`clipfuse demo`: the whole flow, offline, on real handwritten digits shipped with scikit-learn:
fit (linear probes + NLC) -> export (validated) -> predict -> bench. Application layer."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from clipfuse.bench.run import run_bench
from clipfuse.core.log import detail, log
from clipfuse.runtime.predict import load_predictor

DEMO_BACKBONES = ("RN50:random:0", "ViT-B-32:random:1")


def write_digits(folder: Path, per_class: int, skip: int = 0) -> int:
    """scikit-learn's digits (real 8x8 handwritten digits, shipped inside the package: offline) as a
    labelled folder: images skip .. skip+per_class-1 of each class, in the dataset's order, as PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    seen: dict[int, int] = {}
    n = 0
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        j = seen.get(int(label), 0)
        seen[int(label)] = j + 1
        if skip <= j < skip + per_class:
            cls = Path(folder) / f"digit_{label}"
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L").save(cls / f"{i:04d}.png")
            n += 1
    return n


def run_demo(out="engines/demo", backbones=DEMO_BACKBONES, train_per_class: int = 30, eval_per_class: int = 10,
             batches=(1, 8), runs: int = 5, results=None, stem: str = "bench", command: str | None = None) -> dict:
    """The whole flow, offline: fit (linear probes + NLC on a digits subset) -> export -> predict -> bench.

    Seeded random towers stand in for `ARCH:openai` weights (no download here): the accuracies show the
    machinery, not CLIP. Returns {"fit": the fit report, "predictions": four held-out digits' Predictions,
    "backbone_names": [...], "bench": the bench result, "seconds": wall time}; the CLI shows them."""
    from threadpoolctl import threadpool_limits

    from clipfuse.export.fit.pipeline import fit_engine

    t0 = time.perf_counter()
    out = Path(out)
    data = out.parent / f".{out.name}-digits"
    shutil.rmtree(data, ignore_errors=True)
    n_train = write_digits(data / "train", train_per_class)
    n_eval = write_digits(data / "eval", eval_per_class, skip=train_per_class)   # disjoint from training
    log(f"1/4 fit: {' + '.join(backbones)} (seeded random weights: offline), scikit-learn digits: "
        f"{n_train} training and {n_eval} held-out images", tag="demo")
    # One BLAS thread for the probes' solver: next to torch's OpenMP pool (and any busy neighbour) two
    # OpenBLAS threads spin against each other on 2 cores; measured 2x faster with one.
    with threadpool_limits(1, user_api="blas"):
        _, report = fit_engine(list(backbones), data / "train", out, eval_data=data / "eval", head="linear-probe",
                               probe_fraction=0.5, shots=8, seed=0, study_shots=(1, 2, 4, 8), study_seeds=(0, 1, 2),
                               force=True)
    log("2/4 export: done by fit (validated against PyTorch on real photographs)", tag="demo")
    log("3/4 predict: four held-out digits", tag="demo")
    shown = sorted((data / "eval").glob("*/*.png"))[::max(1, n_eval // 4)][:4]
    with detail(), load_predictor(out, backend="onnxruntime") as predictor:
        preds = predictor.predict(shown, top_k=3)
        names = list(predictor.backbone_names)
    log("4/4 bench: fused vs single backbones vs naive vs PyTorch eager", tag="demo")
    result = run_bench(out, data=data / "eval", batches=batches, runs=runs, out=results or out / "bench",
                       stem=stem, command=command)
    return {"fit": report, "predictions": preds, "backbone_names": names, "bench": result,
            "seconds": time.perf_counter() - t0}
