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

Choices the paper (Appendix A: width 128, Adam, lr 2e-4, weight decay 0.01) leaves
open, as FitConfig's defaults: start NLC as the fitted C-LOG-AVG, a fixed budget of 300
steps (few-shot data has no validation set), Adam with coupled L2 on the weights only,
softplus + eps, full batch up to 256, features centred and scaled by one pooled std,
C-LOG-AVG at lr 1e-2 for 1000 steps, one CPU thread per fit. Why each, with the study's
figures (benchmarks/nlc_choices.py): docs/decisions.md, "NLC fit choices".
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
    weight_decay: float = 0.01     # L2 on fc1/fc2 weights, not biases (paper's value; docs/decisions.md)
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
