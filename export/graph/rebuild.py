"""An engine folder's parts rebuilt in PyTorch from its manifest: the FusedEnsemble the torch backends run, and
one backbone alone as an engine of its own (the bench's singles).

The towers come from export.graph.backbones.load_backbone (exact for random:SEED and checkpoint-file weights;
a pretrained tag needs open_clip's download or cache) and must hash to the manifest's weights_sha256, or this is
not the network the graph was exported from; the heads and controller are the folder's own safetensors.
Heavy (torch, open_clip): the backends import it in open() (export/graph/torch_backend.py, export/gpu/runner.py),
the bench when it exports a single (clipfuse/bench/configs.py).
"""
from __future__ import annotations

from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.manifest import Manifest, rebuild_hint

from .backbones import load_backbone
from .engine import export_engine
from .fused import FusedEnsemble, load_controller
from .heads import load_heads


def rebuild_backbone(m: Manifest, i: int, consequence: str):
    """Backbone i of engine `m` rebuilt (export.graph.backbones.BuiltBackbone), refused in one line when its image
    tower does not hash to the manifest's weights_sha256 or has another size; `consequence` ends that line: what
    this means for the caller, and what to do."""
    b = m.backbones[i]
    spec = f"{b['arch']}:{b['weights']}"
    built = load_backbone(spec)
    if built.weights_sha256 != b["weights_sha256"]:
        raise ClipfuseError(
            f"engine {str(m.folder)!r}: backbone {i} ({spec}) rebuilt here has image-tower weights "
            f"{built.weights_sha256[:12]}..., the manifest records {b['weights_sha256'][:12]}...: these are not the "
            "weights the graph was exported from (another open_clip version, or a changed checkpoint file), so "
            + consequence)
    if built.image_size != b["image_size"] or built.embed_dim != b["embed_dim"]:
        raise ClipfuseError(f"engine {str(m.folder)!r}: backbone {i} ({spec}) rebuilds at {built.image_size} px, "
                            f"D={built.embed_dim}; the manifest says {b['image_size']} px, D={b['embed_dim']}")
    return built


def rebuild_heads(m: Manifest) -> list:
    """The engine's class heads (export.graph.heads.Head), one per backbone, each checked against its classes and D."""
    name = m.data.get("heads_file", "heads.safetensors")
    heads = load_heads(m.folder / name, num_backbones=len(m.backbones))
    for i, (h, b) in enumerate(zip(heads, m.backbones)):
        if tuple(h.weight.shape) != (len(m.classes), b["embed_dim"]):
            raise ClipfuseError(
                f"engine {str(m.folder)!r}: head {i} in {name} has shape {tuple(h.weight.shape)}, the manifest needs "
                f"({len(m.classes)} classes, D={b['embed_dim']}): the heads file comes from another engine; "
                f"{rebuild_hint(m)}")
    return heads


def rebuild_fused(m: Manifest):
    """The FusedEnsemble of engine `m`, on the CPU: towers rebuilt (rebuild_backbone), then its heads and controller."""
    visuals = []
    for i in range(len(m.backbones)):
        built = rebuild_backbone(m, i, "the torch backend cannot reproduce it. Use --backend onnxruntime, or rebuild: "
                                       + rebuild_hint(m))
        visuals.append(built.model.visual)
        del built
    controller = load_controller(m.folder / m.data.get("controller", {}).get("file", "controller.safetensors"))
    return FusedEnsemble(visuals, rebuild_heads(m), [b["image_size"] for b in m.backbones],
                         [b["mean"] for b in m.backbones], [b["std"] for b in m.backbones], controller).eval()


def export_single(m: Manifest, k: int, folder) -> None:
    """Backbone k of engine `m` alone with its head, exported as an engine folder of its own into `folder`
    (replaced): what `clipfuse bench` times the ensemble against."""
    built = rebuild_backbone(m, k, "the single-backbone comparison would not measure the same network; re-export "
                                   "the engine with this open_clip")
    export_engine([built], m.classes, folder, templates=m.data.get("templates"), force=True,
                  heads=[rebuild_heads(m)[k]], opset=m.data["onnx"].get("opset"))
