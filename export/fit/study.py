"""The few-shot study of `clipfuse fit`'s report: for each k and seed, fit C-LOG-AVG and NLC on k
shots per class and score every method on the eval split; mean and spread over seeds, as Markdown."""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Sequence

import numpy as np
import torch

from clipfuse.core.errors import ClipfuseError

from ..data import sample_k_shot
from .baselines import _check_names, evaluate, method_names
from .nlc import FitConfig, _check_arrays, fit_nlc, fit_static


def run_study(train_features, train_logits, train_labels, eval_features, eval_logits, eval_labels,
              backbone_names, shots=(1, 2, 4, 8, 16), seeds=(0, 1, 2), config: FitConfig | None = None,
              class_names: Sequence[str] | None = None) -> dict:
    """For each k and seed: draw k examples per class from the training pool (sample_k_shot, seeded,
    nested over k), fit C-LOG-AVG and NLC on them (config with seed = that seed), score every method
    on the eval split. Returns a JSON-serialisable dict:

        methods, shots, seeds, config, num_eval,
        mean[method][str(k)], std[method][str(k)]   (percent; std over seeds, ddof=0)
        runs: [{shots, seed, accuracy: {method: %}, static_temperatures: [K]}]
    """
    cfg = (config or FitConfig()).check()
    Xtr, Ztr, ytr = _check_arrays(train_features, train_logits, train_labels)
    Xev, Zev, yev = _check_arrays(eval_features, eval_logits, eval_labels)
    if Ztr.shape[1:] != Zev.shape[1:] or Xtr.shape[1] != Xev.shape[1]:
        raise ClipfuseError(
            f"train and eval arrays disagree: logits {tuple(Ztr.shape[1:])} vs {tuple(Zev.shape[1:])}, "
            f"features width {Xtr.shape[1]} vs {Xev.shape[1]}"
        )
    names = _check_names(backbone_names, Ztr.shape[1])
    C = Ztr.shape[2]
    shots, seeds = [int(k) for k in shots], [int(s) for s in seeds]
    if not shots or not seeds:
        raise ClipfuseError("run_study needs at least one value in shots and in seeds")
    methods = method_names(names)
    runs = []
    for k in shots:
        for seed in seeds:
            idx = torch.as_tensor(sample_k_shot(ytr.numpy(), k, seed, num_classes=C, class_names=class_names))
            run_cfg = replace(cfg, seed=seed)
            static = fit_static(Ztr[idx], ytr[idx], run_cfg)
            nlc = fit_nlc(Xtr[idx], Ztr[idx], ytr[idx], run_cfg)
            acc = evaluate(Xev, Zev, yev, names, static=static, nlc=nlc)
            runs.append({"shots": k, "seed": seed, "accuracy": acc,
                         "static_temperatures": [float(v) for v in static.value.reshape(-1)]})
    mean = {m: {} for m in methods}
    std = {m: {} for m in methods}
    for k in shots:
        for m in methods:
            vals = np.array([r["accuracy"][m] for r in runs if r["shots"] == k])
            mean[m][str(k)], std[m][str(k)] = float(vals.mean()), float(vals.std())
    return {"methods": methods, "shots": shots, "seeds": seeds, "config": asdict(cfg),
            "num_eval": int(len(yev)), "mean": mean, "std": std, "runs": runs}


def study_to_markdown(result: dict, digits: int = 1) -> str:
    """Rows = methods, columns = shots per class, cells 'mean ± std' (accuracy, percent)."""
    shots = [str(k) for k in result["shots"]]
    lines = ["| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for m in result["methods"]:
        cells = [f"{result['mean'][m][k]:.{digits}f} ± {result['std'][m][k]:.{digits}f}" for k in shots]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
