"""Is this ensemble worth running? Diversity figures and the controller's failure signatures (numpy only).

On held-out labelled images, from each backbone's logits Z (N, K, C) and the labels y (N,):

- per pair of backbones (K x K): disagreement rate (top-1 differs), the share of
  images exactly one of the two gets right, Cohen's kappa of their predictions;
- per backbone: images only it gets right (its unique contribution), and the
  ORACLE (right if any backbone is right) with and without it;
- per class with enough images: which backbone is best there (specialisation);
- the controller's failure signatures (the paper's own list): temperatures that
  barely vary across images (the NLC collapsed to a static ensemble), NLC no
  better than C-LOG-AVG or the best single backbone, a training loss that
  stopped falling early.

Every threshold that raises a signature is a module constant, printed with it.
The heat map is the only part that needs matplotlib (a dev extra), imported lazily.
"""
from __future__ import annotations

import numpy as np

from clipfuse.core.errors import ClipfuseError

# A class needs this many images before its best backbone is named: with fewer, one image
# moves a backbone's accuracy there by more than 20 points, and the "winner" is a coin toss.
MIN_CLASS_IMAGES = 5
# Collapse: every backbone's temperature varies across images by less than this coefficient of
# variation (std / mean over the images). At 5% a temperature of 1.0 stays within about
# 0.95-1.05 on most images: too little to change which backbone leads, so the NLC acts as one
# static mix. Reported beside the share of images whose top-1 the variation actually changes.
COLLAPSE_CV = 0.05
# Loss plateau: the loss is "done" at the first step where it is within PLATEAU_FRACTION of its total
# drop from its final value; reaching that within the first EARLY_FRACTION of the steps is early.
PLATEAU_FRACTION = 0.05
EARLY_FRACTION = 0.2
# What the images are, in the reports' words: fit's eval split is held out; eval's folder may not be.
HELD_OUT = "the held-out images"


def _check(backbone_logits, labels):
    Z = np.asarray(backbone_logits, dtype=np.float64)
    if Z.ndim != 3 or Z.shape[0] == 0:
        raise ClipfuseError(f"diversity needs backbone logits of shape (N > 0, K, C), got {Z.shape}")
    y = np.asarray(labels)
    if y.shape != (Z.shape[0],):
        raise ClipfuseError(f"diversity: labels must have shape ({Z.shape[0]},), got {y.shape}")
    return Z, y


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two label sequences: (p_o - p_e) / (1 - p_e); 1.0 when they are identical."""
    a, b = np.asarray(a), np.asarray(b)
    po = float(np.mean(a == b))
    cats = np.union1d(a, b)
    pe = float(sum(np.mean(a == c) * np.mean(b == c) for c in cats))
    if pe >= 1.0:                 # both always give the same single class: agreement is total, not chance
        return 1.0 if po == 1.0 else 0.0
    return (po - pe) / (1.0 - pe)


def pairwise(backbone_logits, labels) -> dict:
    """K x K matrices (lists of lists): disagreement, exactly_one_right (shares in [0, 1]), kappa."""
    Z, y = _check(backbone_logits, labels)
    P = Z.argmax(-1)                                   # (N, K)
    R = P == y[:, None]                                # (N, K)
    K = Z.shape[1]
    dis, one, kap = (np.zeros((K, K)) for _ in range(3))
    for i in range(K):
        for j in range(K):
            dis[i, j] = np.mean(P[:, i] != P[:, j])
            one[i, j] = np.mean(R[:, i] ^ R[:, j])
            kap[i, j] = cohen_kappa(P[:, i], P[:, j])
    return {"disagreement": dis.tolist(), "exactly_one_right": one.tolist(), "kappa": kap.tolist()}


def per_backbone(backbone_logits, labels, names) -> dict:
    """Accuracy, unique contribution and leave-one-out ORACLE per backbone (percent unless a count)."""
    Z, y = _check(backbone_logits, labels)
    R = Z.argmax(-1) == y[:, None]                     # (N, K)
    N, K = R.shape
    pct = lambda v: float(100.0 * v)
    acc = R.mean(0)
    oracle = R.any(1).mean()
    rows = []
    for k in range(K):
        others = [j for j in range(K) if j != k]
        only = R[:, k] & ~R[:, others].any(1) if others else R[:, k]
        row = {"backbone": names[k], "accuracy": pct(acc[k]), "unique_images": int(only.sum()),
               "unique_share": pct(only.mean())}
        if others:
            o = R[:, others].any(1).mean()
            best = R[:, others].mean(0).max()
            row.update(oracle_without=pct(o), oracle_loss_without=pct(oracle - o),
                       best_single_without=pct(best), oracle_gain_without=pct(o - best))
        rows.append(row)
    best_k = int(np.argmax(acc))
    return {"num_images": int(N), "oracle": pct(oracle), "best_single": names[best_k],
            "best_single_accuracy": pct(acc[best_k]), "oracle_gain": pct(oracle - acc[best_k]),
            "no_backbone_right": int((~R.any(1)).sum()), "backbones": rows}


def per_class(backbone_logits, labels, names, class_names, min_images: int = MIN_CLASS_IMAGES) -> dict:
    """Best backbone per class with at least min_images images (others are listed as skipped)."""
    Z, y = _check(backbone_logits, labels)
    R = Z.argmax(-1) == y[:, None]
    rows, skipped = [], []
    for c, cname in enumerate(class_names):
        m = y == c
        n = int(m.sum())
        if n < min_images:
            skipped.append({"class": cname, "images": n})
            continue
        acc = R[m].mean(0) * 100.0                     # (K,)
        order = np.argsort(-acc, kind="stable")
        best = [names[k] for k in range(len(names)) if acc[k] == acc[order[0]]]
        margin = float(acc[order[0]] - acc[order[1]]) if len(names) > 1 else 0.0
        rows.append({"class": cname, "images": n, "best": best, "accuracy": {names[k]: float(acc[k]) for k in range(len(names))},
                     "margin": margin})
    winners = {r["best"][0] for r in rows if len(r["best"]) == 1}
    return {"min_images": int(min_images), "classes": rows, "skipped": skipped,
            "distinct_winners": sorted(winners)}


def temperature_spread(temperatures, backbone_logits=None, names=None) -> dict:
    """Spread of each backbone's temperature over the images, and whether the controller collapsed.

    changed_share: percent of images whose top-1 differs from the static ensemble at the mean
    temperatures (only with backbone_logits) -- what the per-image variation actually does.
    """
    T = np.asarray(temperatures, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] == 0:
        raise ClipfuseError(f"temperatures must have shape (N > 0, K), got {T.shape}")
    mean, std = T.mean(0), T.std(0)
    cv = std / np.maximum(np.abs(mean), 1e-12)
    names = names or [f"backbone {k}" for k in range(T.shape[1])]
    out = {"threshold_cv": COLLAPSE_CV, "collapsed": bool(cv.max() < COLLAPSE_CV),
           "backbones": [{"backbone": n, "mean": float(m), "std": float(s), "min": float(lo), "max": float(hi), "cv": float(v)}
                         for n, m, s, lo, hi, v in zip(names, mean, std, T.min(0), T.max(0), cv)]}
    if backbone_logits is not None:
        Z = np.asarray(backbone_logits, dtype=np.float64)
        per_image = (T[:, :, None] * Z).sum(1).argmax(-1)
        static = (mean[None, :, None] * Z).sum(1).argmax(-1)
        out["changed_share"] = float(100.0 * np.mean(per_image != static))
    return out


def loss_plateau(losses, plateau_fraction: float = PLATEAU_FRACTION, early_fraction: float = EARLY_FRACTION) -> dict:
    """Where a training loss curve (one value per step) stopped falling, and whether that was early."""
    L = np.asarray(losses, dtype=np.float64)
    if L.ndim != 1 or L.size < 2:
        raise ClipfuseError(f"a loss curve needs at least 2 steps, got {L.size}")
    first, final = float(L[0]), float(L[-1])
    drop = first - final
    if drop <= 0:
        step = 1
    else:
        step = int(np.flatnonzero(L <= final + plateau_fraction * drop)[0]) + 1
    return {"steps": int(L.size), "first": first, "final": final, "min": float(L.min()), "plateau_step": step,
            "early": bool(step <= early_fraction * L.size), "plateau_fraction": plateau_fraction,
            "early_fraction": early_fraction}


def signatures(accuracy: dict | None = None, spread: dict | None = None, plateau: dict | None = None,
               single_names=(), images: str = HELD_OUT) -> list[str]:
    """The controller's failure signatures found, in plain words with their thresholds (empty: none);
    images: what the images are, in words ("held-out images" only where they are)."""
    out = []
    if spread is not None and spread["collapsed"]:
        worst = max(b["cv"] for b in spread["backbones"])
        changed = f"; the variation changes the top-1 of {spread['changed_share']:.1f}% of images" if "changed_share" in spread else ""
        out.append(f"NLC collapsed to a static ensemble: every backbone's temperature varies across images by at most "
                   f"{100 * worst:.2f}% (std/mean; threshold {100 * spread['threshold_cv']:.0f}%){changed}")
    if accuracy is not None and "NLC" in accuracy:
        rivals = {m: accuracy[m] for m in ("C-LOG-AVG", *single_names) if m in accuracy}
        if rivals:
            best = max(rivals, key=rivals.get)
            if accuracy["NLC"] <= rivals[best]:
                out.append(f"NLC ({accuracy['NLC']:.1f}%) is no better than {best} ({rivals[best]:.1f}%) on {images}")
    if plateau is not None and plateau["early"]:
        out.append(f"NLC's training loss stopped falling early: within {100 * plateau['plateau_fraction']:.0f}% of its final "
                   f"value ({plateau['final']:.4f}, from {plateau['first']:.4f}) by step {plateau['plateau_step']} of "
                   f"{plateau['steps']} (early: within the first {100 * plateau['early_fraction']:.0f}%)")
    return out


def diversity_report(backbone_logits, labels, names, class_names, temperatures=None, accuracy=None,
                     losses=None, images: str = HELD_OUT) -> dict:
    """All figures and signatures as one JSON-serialisable dict (temperatures: the NLC's, on these images;
    images: what they are, in words: HELD_OUT for fit's eval split, eval says what its images are)."""
    names = [str(n) for n in names]
    Z, y = _check(backbone_logits, labels)
    if Z.shape[1] != len(names):
        raise ClipfuseError(f"diversity: {len(names)} names for K = {Z.shape[1]} backbones")
    spread = None if temperatures is None else temperature_spread(temperatures, Z, names)
    plateau = None if losses is None or len(losses) < 2 else loss_plateau(losses)
    return {"num_images": int(len(y)), "images": images, "names": names, "pairwise": pairwise(Z, y),
            "per_backbone": per_backbone(Z, y, names), "per_class": per_class(Z, y, names, class_names),
            "temperature_spread": spread, "loss": plateau,
            "signatures": signatures(accuracy, spread, plateau, names, images)}


# ---------------------------------------------------------------- rendering

def _short(names):
    """Row/column labels for K x K tables: B1..BK (the legend names them)."""
    return [f"B{k + 1}" for k in range(len(names))]


def to_markdown(rep: dict, heatmap: str | None = None) -> str:
    """The figures as Markdown (also readable as plain text in a terminal)."""
    names, short = rep["names"], _short(rep["names"])
    pb = rep["per_backbone"]
    lines = [f"Images: {rep['num_images']}. Backbones: "
             + "; ".join(f"{s} = {n}" for s, n in zip(short, names)) + ".", ""]
    for key, title, fmt in (("disagreement", "disagreement (top-1 differs, %)", "{:.1f}"),
                            ("exactly_one_right", "exactly one of the two right (%)", "{:.1f}"),
                            ("kappa", "Cohen's kappa of the predictions (1 = identical)", "{:.2f}")):
        M = rep["pairwise"][key]
        scale = 1.0 if key == "kappa" else 100.0
        lines += [f"Pairs: {title}", "", "| | " + " | ".join(short) + " |", "|---|" + "---:|" * len(short)]
        lines += [f"| {s} | " + " | ".join(fmt.format(scale * v) for v in row) + " |" for s, row in zip(short, M)]
        lines.append("")
    if heatmap:
        lines += [heatmap, ""]
    lines += [f"ORACLE (right if any backbone is right): {pb['oracle']:.1f}%, {pb['oracle_gain']:+.1f} points over the best "
              f"single ({pb['best_single']}, {pb['best_single_accuracy']:.1f}%); no backbone right on "
              f"{pb['no_backbone_right']} image(s).", "",
              "| backbone | accuracy % | only it right (images) | ORACLE without it % | ORACLE loses | "
              "ORACLE gain over best single without it |", "|---|---:|---:|---:|---:|---:|"]
    for r in pb["backbones"]:
        if "oracle_without" in r:
            lines.append(f"| {r['backbone']} | {r['accuracy']:.1f} | {r['unique_images']} ({r['unique_share']:.1f}%) | "
                         f"{r['oracle_without']:.1f} | {r['oracle_loss_without']:.1f} | {r['oracle_gain_without']:+.1f} |")
        else:
            lines.append(f"| {r['backbone']} | {r['accuracy']:.1f} | {r['unique_images']} | - | - | - |")
    pc = rep["per_class"]
    images = rep.get("images", "these images")
    lines += ["", f"Per class (classes with at least {pc['min_images']} of {images}; with fewer, one image moves "
              "a backbone's accuracy there by more than 20 points):", ""]
    if pc["classes"]:
        lines += ["| class | images | best backbone | its accuracy % | margin over the next |", "|---|---:|---|---:|---:|"]
        for r in pc["classes"]:
            lines.append(f"| {r['class']} | {r['images']} | {', '.join(r['best'])} | "
                         f"{r['accuracy'][r['best'][0]]:.1f} | {r['margin']:.1f} |")
        lines.append("")
        lines.append(f"Distinct sole winners across classes: {len(pc['distinct_winners'])} "
                     f"({', '.join(pc['distinct_winners']) or 'none'}).")
    else:
        lines.append(f"No class has enough of {images}.")
    if pc["skipped"]:
        skipped = ", ".join(f"{s['class']} ({s['images']})" for s in pc["skipped"])
        lines.append(f"Skipped (too few images): {skipped}.")
    lines.append("")
    sp = rep.get("temperature_spread")
    if sp is not None:
        lines += [f"NLC temperatures over {images} (collapse threshold: std/mean < {100 * sp['threshold_cv']:.0f}% "
                  "for every backbone):", "", "| backbone | mean | std | min | max | std/mean % |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {b['backbone']} | {b['mean']:.4f} | {b['std']:.4f} | {b['min']:.4f} | {b['max']:.4f} | {100 * b['cv']:.2f} |"
                  for b in sp["backbones"]]
        if "changed_share" in sp:
            lines += ["", f"Per-image temperatures change the top-1 of {sp['changed_share']:.1f}% of images against the "
                      "static ensemble at their mean."]
        lines.append("")
    lo = rep.get("loss")
    if lo is not None:
        lines += [f"NLC training loss: {lo['first']:.4f} after step 1, {lo['final']:.4f} after step {lo['steps']}; within "
                  f"{100 * lo['plateau_fraction']:.0f}% of its final value from step {lo['plateau_step']} "
                  f"(early if by step {int(lo['early_fraction'] * lo['steps'])}).", ""]
    lines.append("Failure signatures: " + ("none found." if not rep["signatures"] else ""))
    lines += [f"- {s}" for s in rep["signatures"]]
    return "\n".join(lines) + "\n"


def save_heatmap(rep: dict, path) -> str | None:
    """K x K heat maps (disagreement, exactly one right, kappa) as one PNG, written atomically.

    Returns None when it wrote the file, else one line saying why not (matplotlib is a dev extra).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "heat map skipped: matplotlib is not installed (pip install 'clipfuse[dev]' or matplotlib)"
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    short = _short(rep["names"])
    K = len(short)
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3, 3.6 + 0.1 * K))
    for ax, key, title, scale, vmin, vmax in zip(
            axes, ("disagreement", "exactly_one_right", "kappa"),
            ("disagreement %", "exactly one right %", "Cohen's kappa"), (100, 100, 1), (0, 0, -1), (100, 100, 1)):
        M = np.asarray(rep["pairwise"][key]) * scale
        im = ax.imshow(M, vmin=vmin, vmax=vmax, cmap="viridis" if key != "kappa" else "coolwarm")
        ax.set_xticks(range(K), short)
        ax.set_yticks(range(K), short)
        ax.set_title(title)
        if K <= 12:
            for i in range(K):
                for j in range(K):
                    v = M[i, j]
                    # white on dark tiles, black on light ones (viridis is light at the top, coolwarm at 0)
                    light = abs(v) < 0.6 if key == "kappa" else (v - vmin) / (vmax - vmin) > 0.6
                    ax.text(j, i, f"{v:.0f}" if scale == 100 else f"{v:.2f}", ha="center", va="center",
                            fontsize=7, color="k" if light else "w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("; ".join(f"{s} = {n}" for s, n in zip(short, rep["names"])), fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return None
