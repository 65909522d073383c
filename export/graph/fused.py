"""The fused ensemble: K image towers, their heads, the controller and the combination, as one module.

For uint8 images at each distinct resolution and backbones k = 1..K:

    x_k = (image_{R_k} / 255 - mean_k) / std_k          # (N, 3, R_k, R_k)
    f_k = normalize(visual_k(x_k))                      # (N, D_k)  unit norm
    z_k = f_k @ W_k.T + b_k                             # (N, C)    class logits
    t   = controller(concat_k f_k)                      # (N, K)    temperatures > 0
    z   = sum_k t_k * z_k                               # (N, C)    fused logits

Until a controller is fitted, it is the constant 1/K: z is then the mean of
the backbones' logits (LOG-AVG). The module's outputs follow clipfuse.core.iospec.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from clipfuse.core.errors import ClipfuseError


class ConstantController(nn.Module):
    """t_k = 1/K for every image: the fused logits are the mean logits (LOG-AVG)."""

    kind = "constant"

    def __init__(self, num_backbones: int):
        super().__init__()
        self.num_backbones = num_backbones
        self.register_buffer("value", torch.full((1, num_backbones), 1.0 / num_backbones))

    def forward(self, features: torch.Tensor) -> torch.Tensor:   # (N, sum D) -> (N, K)
        return self.value.expand(features.shape[0], -1)


class StaticController(nn.Module):
    """One fitted temperature per backbone, the same for every image (C-LOG-AVG)."""

    kind = "static"

    def __init__(self, temperatures: torch.Tensor):
        super().__init__()
        self.register_buffer("value", temperatures.reshape(1, -1).float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.value.expand(features.shape[0], -1)


class NLCController(nn.Module):
    """The Neural Logit Controller: MLP over all backbones' features -> K positive temperatures.

    Input standardisation (in_mean, in_std) is part of the module so that the
    graph applies exactly what fitting used.
    """

    kind = "nlc"

    def __init__(self, in_dim: int, num_backbones: int, hidden: int = 128, eps: float = 1e-3):
        super().__init__()
        self.in_dim, self.num_backbones, self.hidden, self.eps = in_dim, num_backbones, hidden, eps
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_backbones)

    def forward(self, features: torch.Tensor) -> torch.Tensor:   # (N, sum D) -> (N, K)
        h = torch.relu(self.fc1((features - self.in_mean) / self.in_std))
        return F.softplus(self.fc2(h)) + self.eps

    def config(self) -> dict:
        return dict(in_dim=self.in_dim, num_backbones=self.num_backbones, hidden=self.hidden, eps=self.eps)


def save_controller(controller: nn.Module, path) -> None:
    from safetensors.torch import save_file

    meta = {"kind": controller.kind}
    if isinstance(controller, NLCController):
        meta["config"] = json.dumps(controller.config())
    else:
        meta["config"] = json.dumps({"num_backbones": int(controller.value.shape[1])})
    save_file({k: v.contiguous() for k, v in controller.state_dict().items()}, str(path), metadata=meta)


def load_controller(path) -> nn.Module:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        kind, cfg = meta["kind"], json.loads(meta["config"])
    except Exception as e:
        raise ClipfuseError(f"controller file {str(path)!r} could not be read ({type(e).__name__}: {e})") from None
    if kind == "nlc":
        c = NLCController(**cfg)
    elif kind == "static":
        c = StaticController(sd["value"])
    elif kind == "constant":
        c = ConstantController(cfg["num_backbones"])
    else:
        raise ClipfuseError(f"controller file {str(path)!r} has unknown kind {kind!r}")
    c.load_state_dict(sd)
    return c.eval()


class InputNormalize(nn.Module):
    """uint8 (N,3,R,R) -> float (x/255 - mean)/std, the same ops as torchvision's ToTensor + Normalize."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class FusedEnsemble(nn.Module):
    """All backbones + heads + controller + combination; forward(*images) -> 5 outputs (iospec order)."""

    def __init__(self, visuals, heads, image_sizes, means, stds, controller: nn.Module | None = None):
        super().__init__()
        K = len(visuals)
        if not (K == len(heads) == len(image_sizes) == len(means) == len(stds)) or K == 0:
            raise ClipfuseError("fused ensemble needs one head, size, mean and std per backbone")
        classes = {h.weight.shape[0] for h in heads}
        if len(classes) != 1:
            raise ClipfuseError(f"heads disagree on the number of classes: {sorted(classes)}")
        self.resolutions = sorted(set(int(r) for r in image_sizes))
        self.visuals = nn.ModuleList(visuals)
        self.input_index = [self.resolutions.index(int(r)) for r in image_sizes]
        # One normaliser per distinct (resolution, mean, std): backbones that share them share the work.
        keys, self.norm_index = [], []
        for r, m, s in zip(image_sizes, means, stds):
            key = (int(r), tuple(float(v) for v in m), tuple(float(v) for v in s))
            if key not in keys:
                keys.append(key)
            self.norm_index.append(keys.index(key))
        self.norm_input = [self.resolutions.index(k[0]) for k in keys]
        self.normalizers = nn.ModuleList(InputNormalize(k[1], k[2]) for k in keys)
        for k, h in enumerate(heads):
            self.register_buffer(f"head_weight_{k}", h.weight.float().contiguous())   # (C, D_k)
            self.register_buffer(f"head_bias_{k}", h.bias.float().contiguous())       # (C,)
        self.controller = controller if controller is not None else ConstantController(K)
        self.num_backbones, self.num_classes = K, next(iter(classes))

    def forward(self, *images: torch.Tensor):
        if len(images) != len(self.resolutions):
            raise ClipfuseError(f"expected {len(self.resolutions)} image inputs for resolutions {self.resolutions}, got {len(images)}")
        normed = [norm(images[i]) for norm, i in zip(self.normalizers, self.norm_input)]
        feats, zs = [], []
        for k, visual in enumerate(self.visuals):
            f = F.normalize(visual(normed[self.norm_index[k]]), dim=-1)                   # (N, D_k)
            feats.append(f)
            zs.append(F.linear(f, getattr(self, f"head_weight_{k}"), getattr(self, f"head_bias_{k}")))  # (N, C)
        features = torch.cat(feats, dim=-1)                                                # (N, sum D)
        backbone_logits = torch.stack(zs, dim=1)                                           # (N, K, C)
        temperatures = self.controller(features)                                           # (N, K)
        logits = (temperatures.unsqueeze(-1) * backbone_logits).sum(dim=1)                 # (N, C)
        probs = torch.softmax(logits, dim=-1)
        return logits, probs, temperatures, backbone_logits, features
