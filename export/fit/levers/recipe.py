"""Levers: what `clipfuse fit` does beyond the full ensemble, as one recipe checked once (export/fit/levers).

Torch-free, so the API (clipfuse.fit_levers) and the CLI build and check it without loading export's torch side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from clipfuse.core.errors import ClipfuseError

from ...thresholds import CascadeConfig

MS, GFLOPS = "ms", "GFLOPs"


@dataclass
class Levers:
    """What `fit` does beyond the full ensemble (validated once, written into the report and manifest)."""

    budget: float | None = None        # --budget-ms / --budget-gflops: choose the best subset within it
    budget_unit: str = MS              # "ms" (measured at batch 1) or "GFLOPs" (counted)
    cascade: bool = False              # --cascade: a confidence cascade over the backbones
    max_drop: float = 0.5              # --max-drop: accuracy points the cascade may lose vs the full ensemble
    score: str = "auto"                # --cascade-score: auto | max-prob | margin
    cascade_cost: str = GFLOPS         # --cascade-cost: how stages are priced (order, expected cost)
    certify_on: str | None = None      # --certify-on: unlabelled images that also certify the exits (fit/certify.py)

    def check(self, num_backbones: int) -> "Levers":
        if self.budget is not None and self.cascade:
            raise ClipfuseError("--budget-ms/--budget-gflops and --cascade cannot be combined yet: choose a subset "
                                "first (fit --budget-...), then fit a cascade over its backbones")
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
                raise ClipfuseError(f"--budget-{'ms' if self.budget_unit == MS else 'gflops'} must be a positive "
                                    f"number, got {b!r}")
        if self.certify_on is not None and not self.cascade:
            raise ClipfuseError("--certify-on applies to --cascade only: it certifies the cascade's exit thresholds")
        for unit, what in ((self.budget_unit, "budget unit"), (self.cascade_cost, "--cascade-cost")):
            if unit not in (MS, GFLOPS):
                raise ClipfuseError(f"{what} {unit!r} is not one of {MS}, {GFLOPS}")
        if self.cascade:
            CascadeConfig(max_drop=self.max_drop, score=self.score).check()
            if num_backbones < 2:
                raise ClipfuseError(f"--cascade needs at least 2 backbones (stages), got {num_backbones}: "
                                    "add backbones with -b")
        return self

    @property
    def active(self) -> bool:
        return self.budget is not None or self.cascade
