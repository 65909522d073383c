"""clipfuse.export: everything that builds an engine folder.

Backbones and heads (open_clip), the fused PyTorch module, the ONNX export and
its validation. Imports open_clip and torch; the runtime never imports this.
"""
