"""clipfuse.export.fit: `clipfuse fit` and `clipfuse eval` on labelled images.

features (cached per backbone), the NLC and its baselines, the few-shot study, which
controller ships, budget subsets, the cascade fit, the diversity figures, and the report.
Independent of export.precision; builds on export.graph.
"""
