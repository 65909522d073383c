"""clipfuse.export.graph: from backbones to a validated engine folder.

backbones and heads (open_clip), the fused PyTorch module, its ONNX export and validation,
the cascade's stage graphs, the engine-folder writer, and the PyTorch backend that rebuilds
the module from a manifest. fit/ and precision/ build on this; it imports neither.
"""
