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

# ----------------------------------------------------------------------------- cascade stage graphs
# A cascade engine (clipfuse fit --cascade) also holds one graph per stage under stages/, so the
# runtime runs only the stages an image reaches (runtime/cascade.py says why not `If` nodes).
#   stages/tower_<k>.onnx    image_<R_k> uint8 (N, 3, R, R) -> features_<k> (N, D_k) unit norm,
#                            logits_<k> (N, C): backbone k's normalise + tower + L2 norm + head
#   stages/combine_<s>.onnx  features (N, sum_{j<=s} D_j), backbone_logits (N, s, C)
#                            -> logits (N, C), probs (N, C), temperatures (N, s)
# k and s count from 1 in the cascade's stage order (= the backbones' order in model.onnx).
STAGE_DIR = "stages"
STAGE = "stage"                     # the runtime's extra output: which stage answered, 1-based
COMBINE_INPUTS = (FEATURES, BACKBONE_LOGITS)
COMBINE_OUTPUTS = (LOGITS, PROBS, TEMPERATURES)


def tower_features(k: int) -> str:
    """Output name of stage graph tower_<k>: that backbone's unit-norm features."""
    return f"features_{int(k)}"


def tower_logits(k: int) -> str:
    """Output name of stage graph tower_<k>: that backbone's class logits (its head applied)."""
    return f"logits_{int(k)}"


def tower_file(k: int, precision: str = "fp32") -> str:
    """stages/tower_<k>.onnx, or for int8 stages/tower_<k>.int8.onnx: the tower cut out of model.int8.onnx
    (export/precision/int8_stages.py; the combine graphs stay fp32 and are shared)."""
    return f"{STAGE_DIR}/tower_{int(k)}.onnx" if precision == "fp32" else f"{STAGE_DIR}/tower_{int(k)}.{precision}.onnx"


def combine_file(s: int) -> str:
    return f"{STAGE_DIR}/combine_{int(s)}.onnx"


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


# ----------------------------------------------------------------------------- tolerances
# The one tolerance table per precision, used by every check that compares two runs of the
# same ensemble (export validation, fp16 validation, `clipfuse compare`). A check passes when
# max |got - ref| <= atol + rtol * max |ref| per output (plus, for logits only, the error the
# heads propagate from the features; probs never get that term), every backbone's embedding
# cosine >= min_cosine, every backbone's feature error over the median distance between two
# images <= max_error_to_spread, and the share of changed top-1 answers <= max_top1_changed
# (clipfuse.runtime.agreement applies them).
#   fp32: runs differ by ~1e-6 relative, so its bounds are bug detectors (a head 1% off fails).
#   fp16: 11 bits, errors grow over ~12-24 layers: per element 1e-2 plus the heads' term.
#   int8: the deciding figures are cosine >= 0.99 per backbone, top-1 changed <= 1% and, with
#         --data, accuracy within max_accuracy_drop points of fp32 (paired, same images).
#   max_probs_shift caps the probs bound so it stays a check on values in [0, 1];
#   max_error_to_spread sees an error the absolute cosine bound cannot (runtime/agreement.py).
# Each value, and the measurement behind it: docs/decisions.md, "The tolerance table".
TOLERANCES = {
    "fp32": {"rtol": 1e-4, "atol": 1e-6, "min_cosine": 0.99999, "max_top1_changed": 0.0, "max_probs_shift": 1e-2,
             "max_error_to_spread": 0.01},
    "fp16": {"rtol": 1e-2, "atol": 1e-3, "min_cosine": 0.999, "max_top1_changed": 0.05, "max_probs_shift": 0.05,
             "max_error_to_spread": 0.25},
    "int8": {"rtol": 5e-2, "atol": 1e-2, "min_cosine": 0.99, "max_top1_changed": 0.01, "max_probs_shift": 0.05,
             "max_accuracy_drop": 0.5, "max_error_to_spread": 0.25},
}
PRECISIONS = tuple(TOLERANCES)


def tolerance(precision: str) -> dict:
    """A copy of the tolerance row for `precision` ('fp32', 'fp16', 'int8')."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(TOLERANCES)}")
    return dict(TOLERANCES[precision])
