"""The public API is thin: `clipfuse.<name>` is the library function itself (one home per name), api.py
holds only what adds logic, and no public function takes `quiet` (the logger decides what is shown)."""
from __future__ import annotations

import importlib
import inspect

import clipfuse
from clipfuse import api


def test_public_names_are_the_functions_at_their_home():
    from clipfuse.export.graph.engine import export_engine
    from clipfuse.runtime.predict import load_predictor

    assert clipfuse.load is load_predictor and clipfuse.export_engine is export_engine
    for name, (module, attr) in clipfuse._LAZY.items():
        f = getattr(clipfuse, name)
        assert f is getattr(importlib.import_module(module), attr) and f.__module__ == module, name
        assert "quiet" not in inspect.signature(f).parameters, name


def test_api_keeps_only_what_adds_logic():
    own = {n for n, v in vars(api).items() if (inspect.isfunction(v) or inspect.isclass(v))
           and v.__module__ == api.__name__}
    assert own == {"EngineInfo", "inspect_engine", "list_backbones", "fit_levers"}
