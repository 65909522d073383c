"""An engine folder's FusedEnsemble rebuilt in PyTorch from its manifest: what the torch backends run.

The towers come from export.graph.backbones.load_backbone (exact for random:SEED and checkpoint-file weights;
a pretrained tag needs open_clip's download or cache) and must hash to the manifest's weights_sha256, or this is
not the network the graph was exported from; the heads and controller are the folder's own safetensors.
Heavy (torch, open_clip): the backends import it in open() (export/graph/torch_backend.py, export/gpu/runner.py).
"""
from __future__ import annotations

from clipfuse.core.errors import ClipfuseError
from clipfuse.runtime.manifest import Manifest, rebuild_hint

from .backbones import load_backbone
from .fused import FusedEnsemble, load_controller
from .heads import load_heads


def rebuild_fused(m: Manifest):
    """The FusedEnsemble of engine `m`, on the CPU: towers rebuilt with export.graph.backbones.load_backbone
    (exact for random:SEED and checkpoint-file weights; a pretrained tag needs open_clip's download or cache),
    each checked against the manifest's weights_sha256, then its heads and controller."""
    visuals = []
    for i, b in enumerate(m.backbones):
        spec = f"{b['arch']}:{b['weights']}"
        built = load_backbone(spec)
        if built.weights_sha256 != b["weights_sha256"]:
            raise ClipfuseError(
                f"engine {str(m.folder)!r}: backbone {i} ({spec}) rebuilt here has image-tower weights "
                f"{built.weights_sha256[:12]}..., the manifest records {b['weights_sha256'][:12]}...: these are not the "
                "weights the graph was exported from (another open_clip version, or a changed checkpoint file), "
                f"so the torch backend cannot reproduce it. Use --backend onnxruntime, or rebuild: {rebuild_hint(m)}")
        if built.image_size != b["image_size"] or built.embed_dim != b["embed_dim"]:
            raise ClipfuseError(f"engine {str(m.folder)!r}: backbone {i} ({spec}) rebuilds at {built.image_size} px, "
                                f"D={built.embed_dim}; the manifest says {b['image_size']} px, D={b['embed_dim']}")
        visuals.append(built.model.visual)
        del built
    heads = load_heads(m.folder / m.data.get("heads_file", "heads.safetensors"), num_backbones=len(visuals))
    for i, (h, b) in enumerate(zip(heads, m.backbones)):
        if tuple(h.weight.shape) != (len(m.classes), b["embed_dim"]):
            raise ClipfuseError(
                f"engine {str(m.folder)!r}: head {i} in {m.data.get('heads_file', 'heads.safetensors')} has shape "
                f"{tuple(h.weight.shape)}, the manifest needs ({len(m.classes)} classes, D={b['embed_dim']}): the "
                f"heads file comes from another engine; {rebuild_hint(m)}")
    controller = load_controller(m.folder / m.data.get("controller", {}).get("file", "controller.safetensors"))
    return FusedEnsemble(visuals, heads, [b["image_size"] for b in m.backbones],
                         [b["mean"] for b in m.backbones], [b["std"] for b in m.backbones], controller).eval()
