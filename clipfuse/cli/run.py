"""`clipfuse` commands that run an engine: predict, compare, bench, demo, and serving it (triton, serve).

Each parses its arguments, calls the library (the functions `clipfuse.<name>` names), and shows the
result (clipfuse.cli.present); they are registered on the group of clipfuse/cli/group.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from clipfuse.bench.run import run_bench
from clipfuse.core.errors import ClipfuseError
from clipfuse.demo import run_demo
from clipfuse.runtime.compare import compare_backends
from clipfuse.runtime.images import collect_images, set_pixel_limit
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.predict import load_predictor
from clipfuse.runtime.serving.client import connect
from clipfuse.runtime.serving.repository import default_model_name, write_repository
from clipfuse.runtime.serving.server import start_server

from . import present
from .group import cli, int_list, quiet_option, threads_option


@cli.command()
@click.argument("engine", type=click.Path())
@click.argument("images", nargs=-1)
@click.option("--url", default=None, metavar="URL",
              help="Classify through a Triton server (http://HOST:PORT or grpc://HOST:PORT, e.g. from `clipfuse serve`) "
                   "instead of a local backend; ENGINE is then optional (an engine folder names the model).")
@click.option("--model", "model_name", default=None, help="With --url: the model's name on the server.")
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Labels shown per image.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "jsonl", "csv"]),
              help="table for people; jsonl or csv for programs (failed images are rows with an error field).")
@click.option("--batch", "-b", default=8, show_default=True, type=click.IntRange(min=1), help="Images per engine call.")
@click.option("--backend", default="auto", show_default=True,
              help="auto, onnxruntime, onnxruntime-cuda, onnxruntime-tensorrt, openvino, torch, torch-cuda, "
                   "torch-cuda-eager or tensorrt.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Run the engine's fp16 or int8 graph (made by `clipfuse export ENGINE --precision ...`); "
                   "default fp32.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Image-decoding threads (default min(4, CPUs)).")
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=threads_option,
              help="The backend's intra-op threads (default: measured best).")
@click.option("--allow-failures", is_flag=True, help="Exit 0 even when some images could not be read.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine's files (faster on large engines).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None, metavar="N",
              help="Refuse an image whose decoded or resized copy exceeds N pixels (default PIL's 89,478,485; "
                   "also CLIPFUSE_MAX_IMAGE_PIXELS for any command).")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, run the full graph (model.onnx) for every image.")
@click.option("--compile", "compile_", is_flag=True,
              help="With --backend torch-cuda: pass the towers through torch.compile (inductor) before capture.")
def predict(engine, images, url, model_name, top_k, fmt, batch, backend, precision, workers, threads, allow_failures,
            no_verify, max_image_pixels, no_cascade, compile_):
    """Classify IMAGES (files, folders, globs, or - for a list of paths on stdin) with an ENGINE folder.

    Prints the top-k labels with probabilities and each backbone's temperature per image.
    Images that cannot be read are named on stderr with the reason; the exit code is then 1
    unless --allow-failures.
    """

    if url is not None:     # ENGINE is optional with --url: unless it is an engine folder, it is an image source
        if precision is not None:
            raise ClipfuseError("--precision picks a local graph; with --url the server runs what it was started "
                                "with (`clipfuse serve ENGINE --precision ...`)")
        engine, images, model_name = _remote_predict_args(engine, images, model_name)
    if not images:     # `predict IMG`: the one argument given was taken for the engine folder
        hint = f"; {engine!r} was taken for ENGINE" if engine is not None else ""
        raise click.UsageError("Missing argument 'IMAGES...': the engine folder comes first "
                               f"(clipfuse predict ENGINE IMAGES...){hint}")

    if max_image_pixels is not None:
        set_pixel_limit(max_image_pixels)
    # a missing path is one failed row (named, exit 1), not the end of the run
    paths = collect_images(images, stdin=click.get_text_stream("stdin"), missing_ok=True)
    if not paths:
        raise ClipfuseError("no images to classify: the list on stdin was empty")
    total = failed = 0
    opened = (connect(url, model=model_name, batch_size=batch, workers=workers) if url is not None else
              load_predictor(engine, backend=backend, batch_size=batch, workers=workers, threads=threads,
                             verify=not no_verify, precision=precision, cascade=False if no_cascade else None,
                             compile=compile_))
    with opened as predictor:
        k = min(top_k, len(predictor.classes))
        for preds in predictor.predict_batches(paths, top_k=top_k):
            shown = preds if fmt != "table" else [p for p in preds if p.ok]   # the table leaves failures to stderr
            click.echo(present.format_predictions(shown, fmt, k, predictor.backbone_names, header=total == 0), nl=False)
            for p in preds:
                if not p.ok:
                    click.echo(f"failed: {present.printable(p.name)}: {present.printable(p.error)}", err=True)
            total += len(preds)
            failed += sum(not p.ok for p in preds)
    if failed and not allow_failures:
        raise ClipfuseError(f"{failed} of {total} images could not be classified (named above); "
                            "fix or remove them, or pass --allow-failures to exit 0 anyway")
    if failed:
        click.echo(f"{failed} of {total} images could not be classified (allowed by --allow-failures)", err=True)


def _remote_predict_args(engine, images, model):
    """`clipfuse predict --url`: ENGINE is optional. An engine folder names the model (unless --model);
    anything else is the first image source. -> (engine or None, images, model)."""
    if (Path(engine) / "manifest.json").is_file():
        if model is None:
            model = default_model_name(read_manifest(engine, verify=False))
        return engine, tuple(images), model
    return None, (engine, *images), model

@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--backends", default="onnxruntime,torch", show_default=True,
              help="Comma-separated; the first is the reference. A -fp16 or -int8 suffix (onnxruntime-fp16, "
                   "openvino-int8, tensorrt-int8) runs that backend's form of that precision.")
@click.option("--images", multiple=True, help="Image files, folders or globs (default: the shipped photographs, "
                                              "whole and centre-cropped).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="fp16/int8: every backend with that form runs it (torch always runs fp32); the first backend "
                   "stays the reference (--backends torch,onnxruntime: fp32 torch as reference); that precision's "
                   "tolerances.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, leave out the stage graphs vs model.onnx check.")
def compare(engine, backends, images, precision, batch, as_json, no_cascade):
    """Run identical inputs through each backend: max abs/rel error per output and top-1 agreement
    against the first backend. Exit 1 when any is out of tolerance."""

    report = compare_backends(engine, backends, images=list(images) or None, precision=precision, batch=batch,
                              cascade=not no_cascade)
    click.echo(json.dumps(report, indent=2) if as_json else present.format_compare(report))
    if not report["ok"]:
        raise ClipfuseError("backends disagree beyond tolerance (see the FAIL lines above)")

@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--data", "-d", type=click.Path(), default=None,
              help="Labelled images (DATA/<class folder>/<images>): accuracy per backbone, static ensembles, NLC.")
@click.option("--classes", "-c", default=None, type=click.Path(dir_okay=False), help="Folder -> class name map file.")
@click.option("--batch", "batches", default="1,8,32", show_default=True, callback=int_list, help="Batch sizes.")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="onnxruntime: the fused graph on ONNX Runtime CPU; torch-cuda: on a CUDA GPU, serial vs concurrent "
                   "towers vs each single tower, fp32 and fp16 (the GPU levers).")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds; each runs every configuration once per batch size, interleaved.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed rounds first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=threads_option,
              help="ORT intra-op threads (default: measured best).")
@click.option("--no-torch", is_flag=True, help="Leave PyTorch eager out (it rebuilds every backbone).")
@click.option("--settle-ms", default=50, show_default=True, type=click.IntRange(0, 10000),
              help="Rest before each timed call, so the last runtime's spinning threads go idle.")
@click.option("--no-memory", is_flag=True, help="Skip the per-configuration peak-memory processes.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Results folder (default ENGINE/bench).")
@click.option("--name", default="bench", show_default=True, help="File stem of the results: NAME.md/.json/.png.")
@click.option("--precisions", default="fp32", show_default=True,
              help="The fused graph's precisions side by side, e.g. fp32,fp16,int8 (the graphs of `clipfuse export "
                   "ENGINE --precision ...`).")
@click.option("--openvino", is_flag=True, help="Also run each precision on OpenVINO's CPU plugin.")
@click.option("--include-fit-images", is_flag=True,
              help="--data: also score the images the engine was fitted on (left out by default: they flatter it).")
@quiet_option("No progress on stderr.")
def bench(engine, data, classes, batches, backend, runs, warmup, threads, no_torch, settle_ms, no_memory, out, name,
          precisions, openvino, include_fit_images):
    """What fusing costs and buys: the fused graph vs each backbone alone (exported the same way,
    cached in ENGINE/singles), their sum, the naive ensemble and PyTorch eager, side by side.

    Writes NAME.md, NAME.json and, with --data, NAME.png (accuracy vs latency, Pareto front).
    """

    # the exact command, rebuilt from the parsed values (every results file states how it was made)
    command = " ".join(["clipfuse bench", engine, *(["--data", data] if data else []),
                        "--batch", ",".join(map(str, batches)), "--runs", str(runs), "--warmup", str(warmup),
                        *(["--threads", str(threads)] if threads else []), *(["--no-torch"] if no_torch else []),
                        *(["--settle-ms", str(settle_ms)] if settle_ms != 50 else []),
                        *(["--no-memory"] if no_memory else []), *(["--out", out] if out else []),
                        *(["--name", name] if name != "bench" else []),
                        *(["--precisions", precisions] if precisions != "fp32" else []),
                        *(["--openvino"] if openvino else []),
                        *(["--backend", backend] if backend != "onnxruntime" else []),
                        *(["--include-fit-images"] if include_fit_images else [])])
    result = run_bench(engine, data=data, classes=classes, batches=batches, backend=backend, runs=runs,
                       warmup=warmup, threads=threads, torch=not no_torch, memory=not no_memory, out=out,
                       settle=settle_ms / 1e3, precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                       openvino=openvino, stem=name, command=command, include_fit_images=include_fit_images)
    if backend == "torch-cuda":         # the GPU levers (clipfuse/bench/gpu.py) write their own table
        click.echo(result["markdown"])
        return
    click.echo(present.format_bench(result))
    if result.get("plot"):
        click.echo(f"plot: {result['plot']}")

@cli.command()
@click.option("--out", "-o", default="engines/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--per-class", default=30, show_default=True, type=click.IntRange(min=4),
              help="Training digits per class (10 classes); 10 more per class are held out for accuracy.")
@click.option("--batch", "batches", default="1,8", show_default=True, callback=int_list, help="Bench batch sizes.")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1), help="Timed bench rounds.")
def demo(out, per_class, batches, runs):
    """The whole flow, offline: fit -> export -> predict -> bench, on the default RN50 + ViT-B-32.

    Fits linear-probe heads and the NLC on a subset of scikit-learn's digits (real images shipped
    inside the package), exports and validates the fused graph, classifies four held-out digits,
    then benches it against each backbone alone, the naive ensemble and PyTorch eager; ends with
    the table and the plot's path. Weights are seeded random (no download is possible here):
    latency and memory do not depend on weight values; with network access use
    RN50:openai and ViT-B-32:openai through `clipfuse fit` and `clipfuse bench`.
    """

    click.echo(present.format_demo(run_demo(out, train_per_class=per_class, batches=batches, runs=runs)))

@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Model repository folder to write into.")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="onnxruntime: the fused ONNX graph; tensorrt: the plan of `clipfuse build`.")
@click.option("--precision", default=None,
              help="onnxruntime: fp16 or int8 serves model.fp16.onnx / model.int8.onnx (default model.onnx); "
                   "tensorrt: which model.<precision>.plan (when there are several).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Triton's max_batch_size.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1), help="Model instances (instance_group count).")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default=None, help="Instance kind (default: cpu for onnxruntime, gpu for tensorrt).")
@click.option("--queue-delay-us", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Dynamic batching: how long a request may wait for others.")
@click.option("--model", "model_name", default=None, help="Model name in the repository (default: the engine folder's name).")
@click.option("--force", is_flag=True, help="Replace the model's folder in the repository if it exists.")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, serve the full graph (model.onnx) instead of "
              "the routed stages (a Python-backend model running clipfuse's router).")
def triton(engine, out, backend, precision, max_batch, instances, kind, queue_delay_us, model_name, force, no_cascade):
    """Write a Triton Inference Server model repository for ENGINE: OUT/<model>/config.pbtxt + 1/model.onnx|plan.

    The config (uint8 image inputs, the five outputs, dynamic batching, instance group) is checked
    against Triton's ModelConfig schema before it is written. Clients preprocess on their side
    (`clipfuse predict --url`); see docs/triton.md for running it on a fleet.
    """

    model = write_repository(engine, out, backend=backend, max_batch=max_batch, instances=instances,
                             kind=kind, queue_delay_us=queue_delay_us, model_name=model_name,
                             precision=precision, force=force, cascade=False if no_cascade else None)
    click.echo(present.format_triton(model))

@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535), help="Prometheus /metrics port.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Largest batch the dynamic batcher forms.")
@click.option("--queue-delay-us", default=2000, show_default=True, type=click.IntRange(min=0),
              help="How long a request may wait for others to join its batch.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1), help="Model instances (one ONNX Runtime session each).")
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=threads_option,
              help="Each session's intra-op threads.")
@click.option("--model", "model_name", default=None, help="Model name (default: the engine folder's name).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Serve the engine's fp16 or int8 graph (made by `clipfuse export ENGINE --precision ...`).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine's files.")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, serve the full graph for every image.")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "torch-cuda"]),
              help="onnxruntime (CPU) or torch-cuda (CUDA graphs per batch up to --max-batch; fp32 or fp16).")
def serve(engine, host, port, grpc_port, metrics_port, max_batch, queue_delay_us, instances, threads, model_name,
          precision, no_verify, no_cascade, backend):
    """Serve ENGINE with a Triton Inference Server (nvidia-pytriton): HTTP, gRPC, health, metrics.

    Runs until Ctrl-C. Classify with `clipfuse predict --url http://HOST:PORT IMAGES...`.
    """

    server = start_server(engine, host=host, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                          max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances, threads=threads,
                          model_name=model_name, verify=not no_verify, precision=precision,
                          cascade=False if no_cascade else None, backend=backend)
    click.echo(present.format_serving(server), err=True)
    server.serve_forever()
