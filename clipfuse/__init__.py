"""clipfuse: one deployable classifier from several CLIP backbones.

Public API (imports are lazy: `import clipfuse` pulls in neither torch nor open_clip):

    clipfuse.export_engine(backbones, classes, out, ...)   build + validate engines/<name>/
    clipfuse.inspect_engine(folder) -> dict                what an engine folder holds
    clipfuse.list_backbones() -> list[dict]                the nine OpenAI CLIP backbones
    clipfuse.ClipfuseError                                 every error a user can cause
"""
from clipfuse.errors import ClipfuseError

__version__ = "0.1.0"

_LAZY = {
    "export_engine": ("clipfuse.api", "export_engine"),
    "inspect_engine": ("clipfuse.api", "inspect_engine"),
    "list_backbones": ("clipfuse.api", "list_backbones"),
    "parse_backbone": ("clipfuse.export.backbones", "parse_backbone"),
}

__all__ = ["ClipfuseError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'clipfuse' has no attribute {name!r}")
