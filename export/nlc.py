"""Fit the Neural Logit Controller and its baselines on precomputed arrays, and compare them.

Everything here works on arrays another step computed with the fused model:

    features        (N, sum D)  concat of the K backbones' unit-norm image features
    backbone_logits (N, K, C)   z_k(x), each backbone's class logits
    labels          (N,)        class indices

and fits the two controllers of clipfuse.export.fused:

    NLC        t(x) = softplus(fc2(relu(fc1((f - mean) / std)))) + eps    # (N, K), per image
    C-LOG-AVG  t    = softplus(p) + eps                                   # (K,),  one per backbone
    fused      z(x) = sum_k t_k(x) * z_k(x)                               # (N, C)

by cross-entropy of the fused logits. fit_nlc trains the NLCController module
itself, so the exported graph computes exactly what was fitted.

Choices the paper (Appendix A: width 128, Adam, lr 2e-4, weight decay 0.01)
leaves open. `study_fit_choices` (`python -m clipfuse.export.nlc`, ~5 min on
2 cores) gives the numbers below: accuracy %, mean over 3 seeds, 10 classes,
K = 3, at 1/4/16 shots, in two synthetic worlds: "complementary" (each
backbone reliable in its own region; best single 47.9, LOG-AVG 58.1, ORACLE
93.8) and "one-good" (backbone 0 right everywhere: 89.1; LOG-AVG 58.1).

- Start as the fitted static ensemble (init "static"): fit C-LOG-AVG first,
  then zero fc2's weight and set its bias to softplus^-1(t_static - eps), so
  NLC begins as C-LOG-AVG for every image and moves away only where the
  shots say so. At 300 steps, one-good: 81.4/89.5/90.4 against 78.7/88.6/90.0
  starting at LOG-AVG (t = 1/K) and 77.0/88.4/89.9 from PyTorch's random fc2;
  complementary: 76.5/86.1/90.5 against 76.3/86.8/90.1 and 75.7/85.9/90.1.
- A fixed budget of 300 optimiser steps, no early stopping: few-shot data
  has no validation set (k = 1 leaves nothing to hold out) and leave-one-out
  costs N fits. 100/300/1000/3000 steps score, complementary,
  79.8/84.4/84.1/82.8 and, one-good, 89.2/87.1/86.2/85.8 (mean over k):
  300 is the best over both worlds; longer runs overfit (one-good 1-shot
  falls from 87.2 at 100 steps to 80.1 at 3000). Known cost: at 1 shot in
  the one-good world NLC (81.4) ends below its own start (C-LOG-AVG 87.2) and
  the good backbone (89.1); from 4 shots it is within 0.5 of C-LOG-AVG.
- Adam with coupled L2 (torch.optim.Adam(weight_decay=0.01)), the literal
  reading of "Adam with weight decay". AdamW's decoupled decay shrinks a
  weight by lr * wd = 2e-6 a step, i.e. not at all in 300 steps, whereas
  coupled L2 drives weights the data does not use towards zero at up to lr
  a step. Measured at 300 steps: AdamW 76.3/86.3/90.3 (complementary) and
  80.1/88.9/89.9 (one-good): from 0.2 above to 1.3 points below Adam.
- Decay on fc1/fc2 weights only, not biases: decay then pulls towards an
  input-independent ensemble set by fc2's bias (where NLC started), not
  towards t = softplus(0) = 0.69 for every backbone.
- softplus + eps: exp scores the same within noise (300 steps: 76.8/85.9/90.4
  and 81.9/89.7/90.2) and softplus grows linearly, so one large
  pre-activation cannot blow a temperature up; it is also what
  NLCController exports.
- Batch: full batch up to 256 examples, shuffled mini-batches beyond (one
  fresh permutation per epoch). Batch 32 scores the same at 300 steps
  (86.5/90.5 and 89.6/90.9 at 4/16 shots, where it differs from full batch);
  full batch is simpler and independent of the shuffling.
- Features centred per dimension, divided by one pooled std ("global"). The
  synthetic worlds cannot tell it from per-dimension std (76.5/85.7/90.2 and
  82.4/89.7/90.5); the reason is structural: with 10-160 examples a
  per-dimension std is noise, and one scale keeps each backbone's unit-norm
  block at equal weight (per-dimension scaling favours the widest embedding).
- C-LOG-AVG uses Adam at lr 1e-2 for 1000 steps (no decay): at the paper's
  2e-4 its K numbers barely leave 1/K (one-good: 66-68 against 87-91).
- One CPU thread per fit (restored after): the MLP is too small for threads
  to pay, and on a busy 2-core machine a second thread stalled steps ~25 ms.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipfuse.errors import ClipfuseError

from .data import sample_k_shot
from .fused import NLCController, StaticController

METHODS_AFTER_SINGLES = ("LOG-AVG", "PROB-AVG", "VOTE", "C-LOG-AVG", "NLC", "ORACLE")


@dataclass
class FitConfig:
    """How fit_nlc and fit_static train. Defaults: paper where it speaks, study_fit_choices where not."""

    hidden: int = 128              # MLP width (paper, Appendix A)
    lr: float = 2e-4               # Adam learning rate for NLC (paper)
    weight_decay: float = 0.01     # L2 on fc1/fc2 weights, not biases (paper's value; see module doc)
    optimizer: str = "adam"        # "adam": coupled L2 (paper's wording); "adamw": decoupled
    steps: int = 300               # fixed optimisation budget; no validation set in few-shot
    batch_size: int = 256          # full batch when N <= batch_size, else shuffled mini-batches
    seed: int = 0                  # MLP init and batch order
    positivity: str = "softplus"   # "softplus" (exported); "exp" only for the study, not loadable
    eps: float = 1e-3              # temperature floor: t = map(.) + eps > 0
    init: str = "static"           # start input-independent: "static" at C-LOG-AVG's t, "log-avg" at 1/K;
                                   # "random": PyTorch's default init of fc2
    standardize: str = "global"    # "global": per-dim mean, one pooled std; "per-dim"; "none"
    static_lr: float = 1e-2        # Adam lr for C-LOG-AVG's K parameters (2e-4 barely moves them)
    static_steps: int = 1000       # C-LOG-AVG's budget (also the start of NLC with init "static")
    num_threads: int | None = 1    # torch CPU threads during a fit (restored after); None: leave as is

    def check(self) -> "FitConfig":
        choices = {"optimizer": ("adam", "adamw"), "positivity": ("softplus", "exp"),
                   "init": ("static", "log-avg", "random"), "standardize": ("global", "per-dim", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ClipfuseError(f"FitConfig.{name} is {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ClipfuseError(f"FitConfig.num_threads must be None or a positive integer, got {self.num_threads!r}")
        for name in ("hidden", "steps", "static_steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ClipfuseError(f"FitConfig.{name} must be a positive integer, got {v!r}")
        for name in ("lr", "static_lr", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ClipfuseError(f"FitConfig.{name} must be a positive number, got {v!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ClipfuseError(f"FitConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        return self


class ExpNLCController(NLCController):
    """NLC with t = exp(.) + eps: a study-only variant (kind 'nlc-exp' is not loadable by load_controller)."""

    kind = "nlc-exp"

    def forward(self, features: torch.Tensor) -> torch.Tensor:   # (N, sum D) -> (N, K)
        h = torch.relu(self.fc1((features - self.in_mean) / self.in_std))
        return torch.exp(self.fc2(h)) + self.eps


# ---------------------------------------------------------------- input checks

def _check_arrays(features, backbone_logits, labels, need_features=True):
    """-> float32 tensors X (N, D) or None, Z (N, K, C) and int64 y (N,) or None, with named errors."""
    Z = torch.as_tensor(np.asarray(backbone_logits, dtype=np.float32))
    if Z.ndim != 3:
        raise ClipfuseError(f"backbone_logits must have shape (N, K, C), got {tuple(Z.shape)}")
    N, K, C = Z.shape
    if N == 0:
        raise ClipfuseError("backbone_logits has no rows (N = 0)")
    if not torch.isfinite(Z).all():
        raise ClipfuseError("backbone_logits holds NaN or infinite values")
    X = None
    if need_features:
        X = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if X.ndim != 2 or X.shape[0] != N:
            raise ClipfuseError(f"features must have shape (N={N}, sum D) like backbone_logits, got {tuple(X.shape)}")
        if not torch.isfinite(X).all():
            raise ClipfuseError("features hold NaN or infinite values")
    y = None
    if labels is not None:
        y_np = np.asarray(labels)
        if y_np.shape != (N,):
            raise ClipfuseError(f"labels must have shape (N={N},), got {y_np.shape}")
        if not np.issubdtype(y_np.dtype, np.integer):
            raise ClipfuseError(f"labels must be integer class indices, got dtype {y_np.dtype}")
        if y_np.min() < 0 or y_np.max() >= C:
            raise ClipfuseError(f"labels must lie in 0..{C - 1} (C = {C} classes in backbone_logits), found {int(y_np.min())}..{int(y_np.max())}")
        y = torch.as_tensor(y_np.astype(np.int64))
    return X, Z, y


# ---------------------------------------------------------------- fitting

def fuse(temperatures: torch.Tensor, backbone_logits: torch.Tensor) -> torch.Tensor:
    """sum_k t_k * z_k, the same op as FusedEnsemble: (N, K), (N, K, C) -> (N, C)."""
    return (temperatures.unsqueeze(-1) * backbone_logits).sum(dim=1)


def _inverse_positivity(t: float, positivity: str) -> float:
    """The pre-activation a with map(a) = t (t > 0)."""
    return math.log(t) if positivity == "exp" else math.log(math.expm1(t))   # softplus^-1(t) = log(e^t - 1)


def _start_value(K: int, cfg: FitConfig) -> float:
    target = 1.0 / K - cfg.eps
    if target <= 0:
        raise ClipfuseError(f"FitConfig.eps={cfg.eps} is not below 1/K = 1/{K}: lower eps so t can start at LOG-AVG")
    return _inverse_positivity(target, cfg.positivity)


def _standardisation(X: torch.Tensor, mode: str):
    """(mean, std) buffers for the controller input, fitted on the training features X (N, D)."""
    D = X.shape[1]
    if mode == "none":
        return torch.zeros(D), torch.ones(D)
    mean = X.mean(dim=0)                                        # (D,)
    var = X.var(dim=0, unbiased=False)                          # (D,)
    pooled = float(var.mean().sqrt())
    if not pooled > 1e-8:                                       # one example, or identical features
        pooled = 1.0
    if mode == "global":
        return mean, torch.full((D,), pooled)
    # Per dimension, floored at a tenth of the pooled std so dimensions that happen to be
    # constant on the few training shots are not blown up on new images.
    return mean, var.sqrt().clamp_min(0.1 * pooled)


def _batches(N: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield `steps` index tensors: the whole set when N <= batch_size, else reshuffled epochs (last partial batch dropped)."""
    if N <= batch_size:
        full = torch.arange(N)
        for _ in range(steps):
            yield full
        return
    perm, pos = None, N
    for _ in range(steps):
        if pos + batch_size > N:
            perm, pos = torch.randperm(N, generator=generator), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


@contextmanager
def _threads(n: int | None):
    # A (B<=256, D) x (D, 128) MLP step takes ~0.1 ms on one thread; a second thread only adds
    # synchronisation, and on a busy 2-core machine we measured steps stalling ~25 ms waiting for it.
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(temperatures_of, params_decay, params_plain, Z, y, cfg: FitConfig, lr: float, X=None, on_step=None):
    """Minimise cross-entropy of fuse(temperatures_of(X[idx]), Z[idx]) for cfg.steps steps."""
    with _threads(cfg.num_threads):
        _train_loop(temperatures_of, params_decay, params_plain, Z, y, cfg, lr, X, on_step)


def _train_loop(temperatures_of, params_decay, params_plain, Z, y, cfg, lr, X, on_step):
    groups = [{"params": params_decay, "weight_decay": cfg.weight_decay},
              {"params": params_plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(groups, lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step, idx in enumerate(_batches(len(y), cfg.batch_size, cfg.steps, gen), start=1):
        t = temperatures_of(None if X is None else X[idx])       # (B, K)
        loss = F.cross_entropy(fuse(t, Z[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)


def new_nlc(features, num_backbones: int, config: FitConfig | None = None, start=None) -> NLCController:
    """An unfitted controller for these training features: standardisation fitted, fc2 set by config.init.

    Unless config.init is "random", fc2's weight is zero, so the output does
    not depend on the image: t = start (K positive temperatures, default 1/K,
    i.e. LOG-AVG), through fc2's bias = map^-1(start - eps).
    """
    cfg = (config or FitConfig()).check()
    X = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if X.ndim != 2:
        raise ClipfuseError(f"features must have shape (N, sum D), got {tuple(X.shape)}")
    K = int(num_backbones)
    cls = ExpNLCController if cfg.positivity == "exp" else NLCController
    with torch.random.fork_rng(devices=[]):                     # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        module = cls(X.shape[1], K, hidden=cfg.hidden, eps=cfg.eps)
    mean, std = _standardisation(X, cfg.standardize)
    with torch.no_grad():
        module.in_mean.copy_(mean)
        module.in_std.copy_(std)
        if cfg.init != "random":
            if start is None:
                bias = torch.full((K,), _start_value(K, cfg))
            else:
                start = torch.as_tensor(start, dtype=torch.float64).reshape(-1)
                if start.shape != (K,) or not bool((start > 0).all()):
                    raise ClipfuseError(f"start temperatures must be {K} positive values, got {start.tolist()}")
                bias = torch.tensor([_inverse_positivity(max(float(t) - cfg.eps, 1e-6), cfg.positivity) for t in start])
            module.fc2.weight.zero_()
            module.fc2.bias.copy_(bias)
    return module


def fit_nlc(features, backbone_logits, labels, config: FitConfig | None = None, on_step=None) -> NLCController:
    """Fit an NLCController: features (N, sum D), backbone_logits (N, K, C), labels (N,).

    Deterministic for a given config.seed (CPU). on_step(step, module), if
    given, is called after every optimiser step (the study uses it to read the
    controller at several budgets from one run).
    """
    cfg = (config or FitConfig()).check()
    X, Z, y = _check_arrays(features, backbone_logits, labels)
    start = fit_static(Z, y, cfg).value.reshape(-1) if cfg.init == "static" else None
    module = new_nlc(X, Z.shape[1], cfg, start=start).train()
    decay = [module.fc1.weight, module.fc2.weight]
    plain = [module.fc1.bias, module.fc2.bias]
    probe = None if on_step is None else (lambda step: on_step(step, module))
    _train(module, decay, plain, Z, y, cfg, cfg.lr, X=X, on_step=probe)
    module.eval()
    with torch.no_grad():
        if not torch.isfinite(module(X)).all():
            raise ClipfuseError("NLC fit diverged (non-finite temperatures); lower FitConfig.lr or steps")
    return module


def fit_static(backbone_logits, labels, config: FitConfig | None = None) -> StaticController:
    """Fit C-LOG-AVG: one temperature per backbone, t = softplus(p) + eps, started at 1/K.

    Same loss, batches and optimiser as NLC; lr and budget are config.static_lr
    and config.static_steps, and there is no weight decay (K numbers cannot
    overfit the way an MLP can, and decay would pull them to softplus(0)
    rather than to LOG-AVG).
    """
    cfg = (config or FitConfig()).check()
    _, Z, y = _check_arrays(None, backbone_logits, labels, need_features=False)
    K = Z.shape[1]
    static_cfg = replace(cfg, positivity="softplus")
    p = nn.Parameter(torch.full((K,), _start_value(K, static_cfg)))

    def temperatures_of(_):                                     # (1, K), broadcast over the batch
        return (F.softplus(p) + cfg.eps).unsqueeze(0)

    _train(temperatures_of, [], [p], Z, y, replace(cfg, steps=cfg.static_steps), cfg.static_lr)
    with torch.no_grad():
        return StaticController((F.softplus(p) + cfg.eps).detach().clone()).eval()


# ---------------------------------------------------------------- baselines and evaluation

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _logits_np(backbone_logits) -> np.ndarray:
    Z = np.asarray(backbone_logits, dtype=np.float64)
    if Z.ndim != 3:
        raise ClipfuseError(f"backbone_logits must have shape (N, K, C), got {Z.shape}")
    return Z


def predict_single(backbone_logits, k: int) -> np.ndarray:
    """Backbone k's predictions: argmax_c z_k (N,)."""
    Z = _logits_np(backbone_logits)
    if not 0 <= k < Z.shape[1]:
        raise ClipfuseError(f"backbone index {k} is out of range: there are {Z.shape[1]} backbones")
    return Z[:, k].argmax(axis=-1)


def predict_log_avg(backbone_logits) -> np.ndarray:
    """LOG-AVG: argmax of the mean logits (N,)."""
    return _logits_np(backbone_logits).mean(axis=1).argmax(axis=-1)


def predict_prob_avg(backbone_logits) -> np.ndarray:
    """PROB-AVG: argmax of the mean softmax (N,)."""
    return _softmax(_logits_np(backbone_logits)).mean(axis=1).argmax(axis=-1)


def predict_vote(backbone_logits) -> np.ndarray:
    """VOTE: the class most backbones predict; ties go to the tied class with the largest summed
    probability, then to the lowest class index (N,)."""
    Z = _logits_np(backbone_logits)
    N, K, C = Z.shape
    votes = np.zeros((N, C))
    np.add.at(votes, (np.repeat(np.arange(N), K), Z.argmax(axis=-1).reshape(-1)), 1.0)   # (N, C)
    prob_sum = _softmax(Z).sum(axis=1)                           # (N, C), each in [0, K]
    # Lexicographic (votes, prob_sum): one vote outweighs any difference in prob_sum (< K + 1).
    return (votes * (K + 1) + prob_sum).argmax(axis=-1)


def oracle_correct(backbone_logits, labels) -> np.ndarray:
    """ORACLE: True where at least one backbone's argmax is the label (N,)."""
    Z = _logits_np(backbone_logits)
    return (Z.argmax(axis=-1) == np.asarray(labels)[:, None]).any(axis=1)


@torch.no_grad()
def controller_temperatures(controller: nn.Module, features, chunk: int = 8192) -> np.ndarray:
    """The controller's temperatures (N, K) for features (N, sum D), in float32 like the graph."""
    X = torch.as_tensor(np.asarray(features, dtype=np.float32))
    return torch.cat([controller(X[i:i + chunk]) for i in range(0, len(X), chunk)]).numpy()


def predict_controller(controller: nn.Module, features, backbone_logits) -> np.ndarray:
    """argmax of sum_k t_k(x) z_k(x) with the controller's temperatures (N,)."""
    t = torch.as_tensor(controller_temperatures(controller, features))           # (N, K)
    Z = torch.as_tensor(np.asarray(backbone_logits, dtype=np.float32))           # (N, K, C)
    return fuse(t, Z).argmax(dim=-1).numpy()


def method_names(backbone_names: Sequence[str]) -> list[str]:
    return list(backbone_names) + list(METHODS_AFTER_SINGLES)


def _check_names(backbone_names, K: int) -> list[str]:
    names = [str(n) for n in backbone_names]
    if len(names) != K:
        raise ClipfuseError(f"backbone_names has {len(names)} names for K = {K} backbones in backbone_logits")
    clash = [n for n in names if n in METHODS_AFTER_SINGLES]
    if clash or len(set(names)) != K:
        raise ClipfuseError(f"backbone_names must be distinct and not a method name {METHODS_AFTER_SINGLES}: got {names}")
    return names


def evaluate(features, backbone_logits, labels, backbone_names, static: nn.Module | None = None,
             nlc: nn.Module | None = None) -> dict[str, float]:
    """Accuracy in percent of every method, by name, in the order of method_names().

    C-LOG-AVG and NLC appear only when their controller is given.
    """
    _, Zt, yt = _check_arrays(None, backbone_logits, labels, need_features=False)
    Z, y = Zt.double().numpy(), yt.numpy()
    names = _check_names(backbone_names, Z.shape[1])
    acc = lambda pred: float(100.0 * np.mean(pred == y))
    out = {name: acc(predict_single(Z, k)) for k, name in enumerate(names)}
    out["LOG-AVG"] = acc(predict_log_avg(Z))
    out["PROB-AVG"] = acc(predict_prob_avg(Z))
    out["VOTE"] = acc(predict_vote(Z))
    if static is not None:
        out["C-LOG-AVG"] = acc(predict_controller(static, np.zeros((len(y), 1), np.float32), backbone_logits))
    if nlc is not None:
        if features is None:
            raise ClipfuseError("evaluate needs features to score an NLC controller")
        out["NLC"] = acc(predict_controller(nlc, features, backbone_logits))
    out["ORACLE"] = float(100.0 * np.mean(oracle_correct(Z, y)))
    return out


# ---------------------------------------------------------------- few-shot study

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


# ---------------------------------------------------------------- synthetic data and the choice study

def synthetic_ensemble(n_per_class: int, num_classes: int = 10, num_backbones: int = 3, dim: int = 16,
                       scenario: str = "complementary", seed: int = 0, margin: float = 3.0,
                       wrong_rate: float = 0.7, region_strength: float = 3.0, noise: float = 1.0):
    """Arrays (features (N, K*dim), backbone_logits (N, K, C), labels (N,), regions (N,)) built so the
    ensemble's behaviour is known by construction.

    Every image lies in one of K regions; each backbone's feature block is
    normalize(region_strength * centre_k[region] + gaussian noise), so the region
    is readable from the features (less so as region_strength drops).

    "complementary": in region r, backbone r puts `margin` on the true class;
    every other backbone puts `margin` on a random wrong class with probability
    wrong_rate (else on the true class). A per-image choice of backbone is right
    almost always; a single backbone or any static mix is not.
    "one-good": backbone 0 puts `margin` on the true class everywhere, the others
    put it on a random wrong class with probability wrong_rate.
    Logits also get N(0, noise^2) per class.
    """
    if scenario not in ("complementary", "one-good"):
        raise ClipfuseError(f"scenario must be 'complementary' or 'one-good', got {scenario!r}")
    rng = np.random.default_rng(seed)
    K, C = num_backbones, num_classes
    N = n_per_class * C
    labels = rng.permutation(np.repeat(np.arange(C), n_per_class))          # (N,)
    regions = rng.integers(K, size=N)                                        # (N,)
    centres = rng.normal(size=(K, K, dim)) / math.sqrt(dim)                  # (backbone, region, dim), unit-ish
    blocks = []
    for k in range(K):
        f = region_strength * centres[k][regions] + rng.normal(size=(N, dim)) / math.sqrt(dim)
        blocks.append(f / np.linalg.norm(f, axis=1, keepdims=True))
    features = np.concatenate(blocks, axis=1).astype(np.float32)           # (N, K*dim)

    logits = noise * rng.normal(size=(N, K, C))                              # (N, K, C)
    wrong = (labels[:, None] + rng.integers(1, C, size=(N, K))) % C          # (N, K), never the label
    is_wrong = rng.random((N, K)) < wrong_rate                               # (N, K)
    reliable = regions if scenario == "complementary" else np.zeros(N, dtype=np.int64)
    is_wrong[np.arange(N), reliable] = False
    target = np.where(is_wrong, wrong, labels[:, None])                      # (N, K)
    np.put_along_axis(logits, target[..., None], np.take_along_axis(logits, target[..., None], -1) + margin, -1)
    return features, logits.astype(np.float32), labels.astype(np.int64), regions


def study_fit_choices(shots=(1, 4, 16), seeds=(0, 1, 2), budgets=(100, 300, 1000, 3000),
                      pool_per_class: int = 64, n_eval_per_class: int = 100, num_classes: int = 10, region_strength: float = 1.5,
                      variants: Sequence[str] | None = None) -> dict:
    """The numbers behind FitConfig's defaults, on two synthetic worlds (see synthetic_ensemble):

    - "complementary": NLC should climb well above LOG-AVG and the best backbone;
    - "one-good": NLC should not fall below the one good backbone (overfitting).

    For each world, k and seed one NLC run per variant is read at every step
    budget (constant lr, so a 300-step fit is the first 300 steps of the
    3000-step run). Variants change one choice from the default each. Returns
    {"rows": [{world, variant, steps, shots, mean, std}], "reference": {world: {shots: {method: mean}}}}.
    """
    base = FitConfig()
    all_variants = {
        "default": base,
        "adamw": replace(base, optimizer="adamw"),
        "exp": replace(base, positivity="exp"),
        "log-avg-init": replace(base, init="log-avg"),
        "random-init": replace(base, init="random"),
        "per-dim-std": replace(base, standardize="per-dim"),
        "batch-32": replace(base, batch_size=32),
    }
    chosen = list(all_variants) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in all_variants]
    if unknown:
        raise ClipfuseError(f"unknown study variant(s) {unknown}; choose from {list(all_variants)}")
    variants = {v: all_variants[v] for v in chosen}
    budgets = sorted(int(b) for b in budgets)
    rows, reference = [], {}
    for world in ("complementary", "one-good"):
        X, Z, y, _ = synthetic_ensemble(pool_per_class + n_eval_per_class, num_classes=num_classes, scenario=world,
                                        seed=1234, region_strength=region_strength)
        # Eval: the last n_eval_per_class of each class; train pool: the rest.
        order = np.argsort(y, kind="stable")
        per_class = order.reshape(num_classes, -1)
        ev = per_class[:, -n_eval_per_class:].reshape(-1)
        pool = per_class[:, :-n_eval_per_class].reshape(-1)
        names = [f"backbone-{k}" for k in range(Z.shape[1])]
        reference[world] = {}
        for k in shots:
            acc_runs = {}
            for seed in seeds:
                idx = pool[sample_k_shot(y[pool], k, seed, num_classes=num_classes)]
                static = fit_static(Z[idx], y[idx], replace(base, seed=seed))
                ref = evaluate(X[ev], Z[ev], y[ev], names, static=static)
                slow = fit_static(Z[idx], y[idx], replace(base, seed=seed, static_lr=base.lr))
                ref["C-LOG-AVG @ lr 2e-4"] = evaluate(X[ev], Z[ev], y[ev], names, static=slow)["C-LOG-AVG"]
                for m, v in ref.items():
                    acc_runs.setdefault(m, []).append(v)
                for vname, vcfg in variants.items():
                    cfg = replace(vcfg, seed=seed, steps=max(budgets))
                    at_budget = {}

                    def record(step, module, at_budget=at_budget):
                        if step in budgets:
                            pred = predict_controller(module, X[ev], Z[ev])
                            at_budget[step] = float(100.0 * np.mean(pred == y[ev]))

                    fit_nlc(X[idx], Z[idx], y[idx], cfg, on_step=record)
                    for b in budgets:
                        acc_runs.setdefault((vname, b), []).append(at_budget[b])
            reference[world][str(k)] = {m: float(np.mean(v)) for m, v in acc_runs.items() if isinstance(m, str)}
            for (vname, b), vals in ((key, v) for key, v in acc_runs.items() if isinstance(key, tuple)):
                rows.append({"world": world, "variant": vname, "steps": b, "shots": k,
                             "mean": float(np.mean(vals)), "std": float(np.std(vals))})
    return {"rows": rows, "reference": reference, "shots": list(shots), "seeds": list(seeds),
            "budgets": budgets, "variants": list(variants), "region_strength": region_strength}


def choices_to_markdown(result: dict) -> str:
    """One table per world: rows = variant @ steps, columns = shots; reference methods first."""
    out = []
    shots = [str(k) for k in result["shots"]]
    for world, ref in result["reference"].items():
        out.append(f"\n### {world} (region_strength {result['region_strength']}, seeds {result['seeds']})\n")
        out.append("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
        out.append("|---|" + "---:|" * len(shots))
        for m in ref[shots[0]]:
            out.append(f"| {m} | " + " | ".join(f"{ref[k][m]:.1f}" for k in shots) + " |")
        for v in result["variants"]:
            for b in result["budgets"]:
                cells = []
                for k in shots:
                    r = next(r for r in result["rows"] if r["world"] == world and r["variant"] == v
                             and r["steps"] == b and str(r["shots"]) == k)
                    cells.append(f"{r['mean']:.1f} ± {r['std']:.1f}")
                out.append(f"| NLC {v} @ {b} steps | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":   # python -m clipfuse.export.nlc  -> the choice study as Markdown
    print(choices_to_markdown(study_fit_choices()))
