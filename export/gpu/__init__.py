"""The GPU path that runs: the fused ensemble as CUDA graphs, one per batch bucket, towers on their own
streams, fp32 or fp16 with model.fp16.onnx's fp32 islands (the `torch-cuda` backend).

plan.py is the pure planning (buckets, padding, the stream plan, option checks: runs on CPU, tested there);
graphs.py captures and replays (torch, CUDA); backend.py is the registered Backend (light at import).
"""
