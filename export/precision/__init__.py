"""clipfuse.export.precision: reduced precision written into the graph, and TensorRT plans.

fp16 (fp32 islands by explicit casts), int8 (QDQ, calibrated tower by tower), the int8
cascade stages, their validation against fp32, and the TensorRT plan builder.
Independent of export.fit; builds on export.graph.
"""
