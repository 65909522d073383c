"""clipfuse.runtime.serving: an engine folder behind Triton Inference Server.

repository (write a Triton model repository), server (serve it through pytriton),
client (a Predictor whose engine runs on a server).
"""
