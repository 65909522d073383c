"""Fit the Neural Logit Controller (NLC) and the static one (C-LOG-AVG) on precomputed arrays.

Everything here works on arrays another step computed with the fused model:

    features        (N, sum D)  concat of the K backbones' unit-norm image features
    backbone_logits (N, K, C)   z_k(x), each backbone's class logits
    labels          (N,)        class indices

and fits the two controllers of clipfuse.export.graph.fused:

    NLC        t(x) = softplus(fc2(relu(fc1((f - mean) / std)))) + eps    # (N, K), per image
    C-LOG-AVG  t    = softplus(p) + eps                                   # (K,),  one per backbone
    fused      z(x) = sum_k t_k(x) * z_k(x)                               # (N, C)

by cross-entropy of the fused logits. fit_nlc trains the NLCController module
itself, so the exported graph computes exactly what was fitted. The other methods
(singles, LOG-AVG, PROB-AVG, VOTE, ORACLE) and evaluate() are in export/fit/baselines.py; the
k-shot x seeds study of fit's report in export/fit/study.py.

Choices the paper (Appendix A: width 128, Adam, lr 2e-4, weight decay 0.01)
leaves open. The study in benchmarks/nlc_choices.py (`python
benchmarks/nlc_choices.py`, ~5 min on 2 cores; output committed in benchmarks/results/nlc_choices.md) gives the numbers below: accuracy %, mean over 3 seeds, 10 classes,
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
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipfuse.core.errors import ClipfuseError

from ..graph.fused import NLCController, StaticController


@dataclass
class FitConfig:
    """How fit_nlc and fit_static train. Defaults: paper where it speaks, benchmarks/nlc_choices.py where not."""

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


# ---------------------------------------------------------------- applying a fitted controller

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
