"""The fp16 graph's fp32 islands, defined once for both places that compute in fp16.

model.fp16.onnx (export/precision/fp16.py) keeps these in fp32 by Cast islands, and the
torch-cuda backend at fp16 (export/gpu/) keeps the same ones in fp32 under torch.autocast:

    ops kept fp32 wherever they occur in the towers   (ONNX op type -> the torch function)
        LayerNormalization  layer_norm   overflows in fp16 after attention
        Softmax             softmax      exp() overflows at 11.1
        ReduceMean          mean         the RN attention pool's token mean
    the feature L2 norm and everything downstream of it
        feature_norm, heads, controller, combination (and the final softmax)

Light at import (no torch, no onnx): the names are data.
"""
from __future__ import annotations

# ONNX op type -> the torch function that exports as it (what autocast must leave in fp32).
FP32_OPS = {"LayerNormalization": "layer_norm", "Softmax": "softmax", "ReduceMean": "mean"}
# The feature normalisation: F.normalize exports as ReduceL2 -> Clip -> Expand -> Div.
FEATURE_NORM_OP = "ReduceL2"
# Everything from the raw embeddings on, in the order the fused forward runs it: all fp32.
DOWNSTREAM_FP32 = ("feature_norm", "heads", "controller", "combination")
