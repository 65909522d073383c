"""Graph input/output names and shapes, defined once.

This is the contract between export/ (which writes the graph) and runtime/
(which feeds it): every tensor name used anywhere comes from here.

Inputs: one uint8 tensor per distinct input resolution R, named image_<R>,
shape (N, 3, R, R), in ascending R. Normalisation happens inside the graph.

Outputs, in this order:
    logits           (N, C)       fused logits, sum_k t_k * z_k
    probs            (N, C)       softmax(logits)
    temperatures     (N, K)       the controller's temperature per backbone
    backbone_logits  (N, K, C)    each backbone's head output z_k
    features         (N, sum D_k) the concatenated unit-norm embeddings
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LOGITS = "logits"
PROBS = "probs"
TEMPERATURES = "temperatures"
BACKBONE_LOGITS = "backbone_logits"
FEATURES = "features"
OUTPUT_NAMES = (LOGITS, PROBS, TEMPERATURES, BACKBONE_LOGITS, FEATURES)

BATCH_DIM = "batch"


def input_name(resolution: int) -> str:
    """Graph input name for images of side `resolution`."""
    return f"image_{int(resolution)}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str          # numpy dtype name: "uint8", "float32", "float16"
    shape: tuple        # symbolic batch dim as the string BATCH_DIM

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def io_spec(resolutions, num_backbones: int, num_classes: int, feature_dim: int):
    """(inputs, outputs) TensorSpecs for a fused graph."""
    inputs = [TensorSpec(input_name(r), "uint8", (BATCH_DIM, 3, r, r)) for r in sorted(set(resolutions))]
    N, K, C = BATCH_DIM, num_backbones, num_classes
    outputs = [
        TensorSpec(LOGITS, "float32", (N, C)),
        TensorSpec(PROBS, "float32", (N, C)),
        TensorSpec(TEMPERATURES, "float32", (N, K)),
        TensorSpec(BACKBONE_LOGITS, "float32", (N, K, C)),
        TensorSpec(FEATURES, "float32", (N, feature_dim)),
    ]
    return inputs, outputs
