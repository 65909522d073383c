"""The `clipfuse` command line: parses arguments, calls clipfuse.api, shows the result (clipfuse.present).

Errors a user can cause (ClipfuseError) print one line, `error: ...`, and exit 1.
"""
from __future__ import annotations

import json
import sys

import click

from clipfuse import present
from clipfuse.errors import ClipfuseError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClipfuseError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clipfuse")
def cli():
    """Fuse several CLIP backbones into one ONNX graph / TensorRT engine, and measure what it costs."""


@cli.command()
@click.option("--measure", is_flag=True, help="Rebuild each backbone (random weights) and count parameters and FLOPs now.")
@click.option("--all", "show_all", is_flag=True, help="Also list every architecture name open_clip knows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(measure, show_all, as_json):
    """List the nine OpenAI CLIP backbones: input size, parameters, GFLOPs."""
    from clipfuse import api

    rows = api.list_backbones(measure=measure)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{'backbone':<14} {'input':>6} {'embed':>6} {'image params':>13} {'GFLOPs':>8}")
        for r in rows:
            click.echo(f"{r['arch']:<14} {r['image_size']:>6} {r['embed_dim']:>6} {r['visual_params'] / 1e6:>12.1f}M {r['gflops']:>8.2f}")
        click.echo("\nWrite a backbone as ARCH[:WEIGHTS]; WEIGHTS = openai (default), a checkpoint path, or random:SEED.")
        click.echo("GFLOPs: image tower, batch 1, multiply-add = 2 (torch.utils.flop_counter).")
    if show_all:
        from clipfuse.export.backbones import known_architectures

        click.echo("\nall open_clip architectures:\n" + " ".join(sorted(known_architectures())))


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


@cli.command()
@click.argument("engine", required=False, type=click.Path(file_okay=False))
@click.option("--backbone", "-b", "backbone_list", multiple=True, metavar="ARCH[:WEIGHTS]",
              help="A backbone; repeat for each (order is kept). WEIGHTS: openai (default), a checkpoint file, random:SEED.")
@click.option("--classes", "-c", help="Class names: a file with one per line, or a comma-separated list.")
@click.option("--templates", type=click.Path(dir_okay=False), default=None,
              help="Prompt templates file, one per line with {} for the class name (default: open_clip's 80 OpenAI templates).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Engine folder to write, e.g. engines/NAME.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--opset", type=click.IntRange(17, 23), default=None, help="ONNX opset (default 18).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="With ENGINE: fp16 adds model.fp16.onnx, converted from the validated model.onnx (no re-export) "
                   "with LayerNorm, softmax, feature norm, heads, controller and combination kept fp32, and "
                   "validated against it; int8 adds model.int8.onnx (ONNX Runtime CPU / OpenVINO) and "
                   "model.int8-trt.onnx (TensorRT), calibrated on --calibration and validated against fp32.")
@click.option("--calibration", type=click.Path(), default=None,
              help="int8: a folder of your own images (at least 32) to calibrate the activation ranges on.")
@click.option("--calibration-count", type=click.IntRange(min=1), default=256, show_default=True,
              help="int8: calibration images used at most (evenly spaced over the folder).")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="int8: how activation ranges are set (entropy/percentile hold every batch's "
                                      "activations: GBs on full-size towers).")
@click.option("--int8-target", type=click.Choice(["both", "cpu", "tensorrt"]), default="both", show_default=True,
              help="int8: which graphs to write (cpu: model.int8.onnx; tensorrt: model.int8-trt.onnx).")
@click.option("--data", "-d", type=click.Path(), default=None,
              help="int8: labelled images (DATA/<class folder>/<images>): fp32 vs int8 accuracy, paired, refused "
                   "below the bound.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def export(engine, backbone_list, classes, templates, out, force, opset, precision, calibration, calibration_count,
           calibration_method, int8_target, data, quiet):
    """Build ONE validated ONNX graph of all backbones, heads, controller and combination.

    \b
    New engine:      clipfuse export -b RN50:openai -b ViT-B-32:openai -c classes.txt -o engines/NAME
    Existing engine: clipfuse export engines/NAME   (rebuilds its graph, e.g. after `clipfuse fit`,
                     keeping its heads, fitted controller and reports)
    fp16 graph:      clipfuse export engines/NAME --precision fp16   (adds model.fp16.onnx)
    int8 graphs:     clipfuse export engines/NAME --precision int8 --calibration my_photos/
    """
    from clipfuse import api

    if precision != "int8" and (calibration or data or calibration_count != 256 or calibration_method != "minmax"
                                or int8_target != "both"):
        raise ClipfuseError("--calibration, --calibration-count, --calibration-method, --int8-target and --data "
                            "apply to --precision int8 only")
    if engine is not None and precision in ("fp16", "int8"):
        if backbone_list or classes or templates or out or opset:
            raise ClipfuseError(f"`clipfuse export {engine} --precision {precision}` converts the engine's model.onnx; "
                                "drop --backbone/--classes/--templates/--out/--opset")
        if precision == "fp16":
            click.echo(present.format_fp16(api.export_fp16(engine, quiet=quiet)))
            return
        if calibration is None:
            raise ClipfuseError(f"--precision int8 needs --calibration DIR: a folder of your own images (at least 32) "
                                f"to calibrate on, e.g. `clipfuse export {engine} --precision int8 --calibration photos/`")
        targets = ("cpu", "tensorrt") if int8_target == "both" else (int8_target,)
        info = api.export_int8(engine, calibration, count=calibration_count, method=calibration_method,
                               targets=targets, data=data, quiet=quiet)
        click.echo(present.format_int8(info))
        return
    if engine is None and precision in ("fp16", "int8"):
        raise ClipfuseError(f"--precision {precision} applies to an existing engine: export it first, then run "
                            f"`clipfuse export engines/NAME --precision {precision}`")
    if engine is not None:
        if backbone_list or classes or templates or out:
            raise ClipfuseError(f"`clipfuse export {engine}` rebuilds an existing engine from its manifest; "
                                "drop --backbone/--classes/--templates/--out, or drop ENGINE to make a new one")
        result = api.reexport_engine(engine, opset=opset, quiet=quiet)
    else:
        missing = [f"--{n}" for n, v in (("backbone", backbone_list), ("classes", classes), ("out", out)) if not v]
        if missing:
            raise ClipfuseError(f"a new engine needs {', '.join(missing)} "
                                "(e.g. -b RN50:openai -b ViT-B-32:openai -c classes.txt -o engines/NAME)")
        result = api.export_engine(list(backbone_list), classes, out, templates=templates, force=force, opset=opset, quiet=quiet)
    click.echo(present.format_inspect(api.inspect_engine(result.folder, verify=False)))


@cli.command()
@click.option("--backbone", "-b", "backbone_list", multiple=True, required=True, metavar="ARCH[:WEIGHTS]",
              help="A backbone; repeat for each.")
@click.option("--data", "-d", required=True, type=click.Path(), help="Labelled images: DATA/<class folder>/<images>.")
@click.option("--eval", "eval_data", type=click.Path(), default=None,
              help="Labelled eval folder (default: a stratified split of --data, see --eval-fraction).")
@click.option("--classes", "-c", default=None, type=click.Path(dir_okay=False),
              help="Map file 'folder<TAB>class name' per line (default: folder names are the class names).")
@click.option("--shots", "-k", default=1, show_default=True, type=click.IntRange(min=1),
              help="Labelled images per class the shipped controller is fitted on.")
@click.option("--seed", "-s", default=0, show_default=True, type=int, help="Seed of the shipped controller's shots and fit.")
@click.option("--head", type=click.Choice(["zero-shot", "linear-probe"]), default="zero-shot", show_default=True)
@click.option("--templates", type=click.Path(dir_okay=False), default=None, help="Prompt templates file (zero-shot heads).")
@click.option("--eval-fraction", default=0.3, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--probe-fraction", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Linear probes: share of the training pool the probes are fitted on (NLC gets the rest).")
@click.option("--study-shots", default="1,2,4,8,16", show_default=True, callback=_int_list, help="k values of the report.")
@click.option("--study-seeds", default="0,1,2", show_default=True, callback=_int_list, help="Seeds of the report.")
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="Feature cache (default ~/.cache/clipfuse).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Engine folder to write.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--controller", type=click.Choice(["auto", "nlc", "static", "mean", "single"]), default="auto",
              show_default=True, help="What the graph ships: auto = the best on held-out pool images; nlc; "
              "static (C-LOG-AVG); mean (LOG-AVG); single (the best single backbone).")
@click.option("--budget-ms", type=float, default=None, metavar="MS",
              help="Ship the best subset of the backbones whose summed batch-1 latency (measured here, ONNX Runtime "
                   "CPU) fits MS; the report shows the whole accuracy-cost frontier.")
@click.option("--budget-gflops", type=float, default=None, metavar="G",
              help="As --budget-ms, priced in GFLOPs as `clipfuse backbones` counts them.")
@click.option("--cascade", is_flag=True,
              help="Also write a confidence cascade (stages/): an image leaves at the first stage confident enough.")
@click.option("--max-drop", type=float, default=0.5, show_default=True, metavar="POINTS",
              help="--cascade: accuracy points the cascade may lose against the full ensemble (bounded on "
                   "agreement with it, on pool images outside the shots).")
@click.option("--cascade-score", type=click.Choice(["auto", "max-prob", "margin"]), default="auto", show_default=True,
              help="--cascade: confidence score; auto = both, keep the cheaper on calibration images.")
@click.option("--cascade-cost", type=click.Choice(["gflops", "ms"]), default="gflops", show_default=True,
              help="--cascade: how stages are priced when choosing their order.")
@click.option("--quiet", "-q", is_flag=True)
def fit(backbone_list, data, eval_data, classes, shots, seed, head, templates, eval_fraction, probe_fraction,
        study_shots, study_seeds, cache, batch, out, force, controller, budget_ms, budget_gflops, cascade, max_drop,
        cascade_score, cascade_cost, quiet):
    """Fit the Neural Logit Controller on k labelled images per class; report it against every baseline.

    Writes the engine folder with the controller that ships inside the graph (--controller; auto: the best
    on held-out labelled images, said in report.md's "What ships"), report.md and report.json.
    """
    from clipfuse import api

    if budget_ms is not None and budget_gflops is not None:
        raise ClipfuseError("give one budget: --budget-ms or --budget-gflops, not both")
    levers = api.fit_levers(budget=budget_ms if budget_ms is not None else budget_gflops,
                            budget_unit="GFLOPs" if budget_gflops is not None else "ms", cascade=cascade,
                            max_drop=max_drop, score=cascade_score, cascade_cost="ms" if cascade_cost == "ms" else "GFLOPs")
    result, report = api.fit_engine(list(backbone_list), data, out, classes=classes, eval_data=eval_data, shots=shots,
                                    seed=seed, head=head, templates=templates, eval_fraction=eval_fraction,
                                    probe_fraction=probe_fraction, study_shots=study_shots, study_seeds=study_seeds,
                                    cache_dir=cache, batch_size=batch, force=force, quiet=quiet, controller=controller,
                                    levers=levers)
    click.echo((result.folder / "report.md").read_text())


@cli.command(name="eval")
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--data", "-d", required=True, type=click.Path(), help="Labelled images: DATA/<class folder>/<images>.")
@click.option("--classes", "-c", default=None, type=click.Path(dir_okay=False), help="Folder -> class name map file.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-image predictions).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Also write eval.md, eval.json and the diversity heat map diversity.png into this folder.")
@click.option("--quiet", "-q", is_flag=True)
def eval_(engine, data, classes, batch, as_json, report_dir, quiet):
    """Accuracy of the exported graph (ONNX Runtime) and of every baseline on a labelled folder, the row the
    engine ships marked, and the backbones' diversity with the controller's failure signatures."""
    from clipfuse import api
    from clipfuse.export.fit_report import format_eval

    res = api.eval_engine(engine, data, classes=classes, batch_size=batch, quiet=quiet, report_dir=report_dir)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(format_eval(res, res.get("report", {}).get("heatmap_line")))
    for f in res["unreadable_images"]:
        click.echo(f"skipped: {f['path']}: {f['reason']}", err=True)


@cli.command()
@click.argument("engine", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artefacts (faster on large engines).")
def inspect(engine, as_json, no_verify):
    """Show what an engine folder holds: backbones, classes, IO, files, parameters, GFLOPs."""
    from clipfuse import api

    info = api.inspect_engine(engine, verify=not no_verify)
    click.echo(json.dumps(info, indent=2) if as_json else present.format_inspect(info))


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
              help="auto, onnxruntime, onnxruntime-cuda, onnxruntime-tensorrt, openvino, torch, torch-cuda or tensorrt.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Run the engine's fp16 or int8 graph (made by `clipfuse export ENGINE --precision ...`); "
                   "default fp32.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Image-decoding threads (default min(4, CPUs)).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="The backend's intra-op threads (default: measured best).")
@click.option("--allow-failures", is_flag=True, help="Exit 0 even when some images could not be read.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine's files (faster on large engines).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None, metavar="N",
              help="Refuse an image whose decoded or resized copy exceeds N pixels (default PIL's 89,478,485; "
                   "also CLIPFUSE_MAX_IMAGE_PIXELS for any command).")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, run the full graph (model.onnx) for every image.")
def predict(engine, images, url, model_name, top_k, fmt, batch, backend, precision, workers, threads, allow_failures,
            no_verify, max_image_pixels, no_cascade):
    """Classify IMAGES (files, folders, globs, or - for a list of paths on stdin) with an ENGINE folder.

    Prints the top-k labels with probabilities and each backbone's temperature per image.
    Images that cannot be read are named on stderr with the reason; the exit code is then 1
    unless --allow-failures.
    """
    from clipfuse import api

    if url is not None:     # ENGINE is optional with --url: unless it is an engine folder, it is an image source
        if precision is not None:
            raise ClipfuseError("--precision picks a local graph; with --url the server runs what it was started "
                                "with (`clipfuse serve ENGINE --precision ...`)")
        engine, images, model_name = api.remote_predict_args(engine, images, model_name)
    if not images:
        raise click.UsageError("Missing argument 'IMAGES...'.")
    from clipfuse.runtime.images import collect_images, set_pixel_limit
    from clipfuse.runtime.predict import printable

    if max_image_pixels is not None:
        set_pixel_limit(max_image_pixels)
    # a missing path is one failed row (named, exit 1), not the end of the run
    paths = collect_images(images, stdin=click.get_text_stream("stdin"), missing_ok=True)
    if not paths:
        raise ClipfuseError("no images to classify: the list on stdin was empty")
    total = failed = 0
    opened = (api.connect(url, model=model_name, batch_size=batch, workers=workers) if url is not None else
              api.load(engine, backend=backend, batch_size=batch, workers=workers, threads=threads,
                       verify=not no_verify, precision=precision, cascade=False if no_cascade else None))
    with opened as predictor:
        k = min(top_k, len(predictor.classes))
        for preds in predictor.predict_batches(paths, top_k=top_k):
            shown = preds if fmt != "table" else [p for p in preds if p.ok]   # the table leaves failures to stderr
            click.echo(present.format_predictions(shown, fmt, k, predictor.backbone_names, header=total == 0), nl=False)
            for p in preds:
                if not p.ok:
                    click.echo(f"failed: {printable(p.name)}: {printable(p.error)}", err=True)
            total += len(preds)
            failed += sum(not p.ok for p in preds)
    if failed and not allow_failures:
        raise ClipfuseError(f"{failed} of {total} images could not be classified (named above); "
                            "fix or remove them, or pass --allow-failures to exit 0 anyway")
    if failed:
        click.echo(f"{failed} of {total} images could not be classified (allowed by --allow-failures)", err=True)


@cli.command()
@click.option("--out", "-o", default="engines/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--per-class", default=30, show_default=True, type=click.IntRange(min=4),
              help="Training digits per class (10 classes); 10 more per class are held out for accuracy.")
@click.option("--batch", "batches", default="1,8", show_default=True, callback=_int_list, help="Bench batch sizes.")
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
    from clipfuse import api

    click.echo(present.format_demo(api.run_demo(out, train_per_class=per_class, batches=batches, runs=runs)))


@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--data", "-d", type=click.Path(), default=None,
              help="Labelled images (DATA/<class folder>/<images>): accuracy per backbone, static ensembles, NLC.")
@click.option("--classes", "-c", default=None, type=click.Path(dir_okay=False), help="Folder -> class name map file.")
@click.option("--batch", "batches", default="1,8,32", show_default=True, callback=_int_list, help="Batch sizes.")
@click.option("--backend", default="onnxruntime", show_default=True, help="The fused graph's backend (ONNX Runtime CPU).")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds; each runs every configuration once per batch size, interleaved.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed rounds first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ORT intra-op threads (default: measured best).")
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
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def bench(engine, data, classes, batches, backend, runs, warmup, threads, no_torch, settle_ms, no_memory, out, name,
          precisions, openvino, quiet):
    """What fusing costs and buys: the fused graph vs each backbone alone (exported the same way,
    cached in ENGINE/singles), their sum, the naive ensemble and PyTorch eager, side by side.

    Writes NAME.md, NAME.json and, with --data, NAME.png (accuracy vs latency, Pareto front).
    """
    from clipfuse import api

    # the exact command, rebuilt from the parsed values (every results file states how it was made)
    command = " ".join(["clipfuse bench", engine, *(["--data", data] if data else []),
                        "--batch", ",".join(map(str, batches)), "--runs", str(runs), "--warmup", str(warmup),
                        *(["--threads", str(threads)] if threads else []), *(["--no-torch"] if no_torch else []),
                        *(["--settle-ms", str(settle_ms)] if settle_ms != 50 else []),
                        *(["--no-memory"] if no_memory else []), *(["--out", out] if out else []),
                        *(["--name", name] if name != "bench" else []),
                        *(["--precisions", precisions] if precisions != "fp32" else []),
                        *(["--openvino"] if openvino else [])])
    result = api.bench_engine(engine, data=data, classes=classes, batches=batches, backend=backend, runs=runs,
                              warmup=warmup, threads=threads, torch=not no_torch, memory=not no_memory, out=out,
                              settle=settle_ms / 1e3, precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
                              openvino=openvino, stem=name, quiet=quiet, command=command)
    click.echo(present.format_bench(result))
    if result.get("plot"):
        click.echo(f"plot: {result['plot']}")


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
    from clipfuse import api

    model = api.write_triton_repository(engine, out, backend=backend, max_batch=max_batch, instances=instances,
                                        kind=kind, queue_delay_us=queue_delay_us, model_name=model_name,
                                        precision=precision, force=force, cascade=False if no_cascade else None)
    click.echo(f"wrote {model} (config.pbtxt checked against Triton's ModelConfig schema)")
    if (model / "1" / "model.py").is_file():
        click.echo("cascade: a Python-backend model (1/model.py routes each image through the stages it needs); "
                   "the server's Python needs clipfuse installed")
    click.echo(f"run:  tritonserver --model-repository {model.parent}")


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
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Each session's intra-op threads.")
@click.option("--model", "model_name", default=None, help="Model name (default: the engine folder's name).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Serve the engine's fp16 or int8 graph (made by `clipfuse export ENGINE --precision ...`).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine's files.")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, serve the full graph for every image.")
def serve(engine, host, port, grpc_port, metrics_port, max_batch, queue_delay_us, instances, threads, model_name,
          precision, no_verify, no_cascade):
    """Serve ENGINE with a Triton Inference Server (nvidia-pytriton): HTTP, gRPC, health, metrics.

    Runs until Ctrl-C. Classify with `clipfuse predict --url http://HOST:PORT IMAGES...`.
    """
    from clipfuse import api

    server = api.serve(engine, host=host, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                       max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances, threads=threads,
                       model_name=model_name, verify=not no_verify, precision=precision,
                       cascade=False if no_cascade else None)
    click.echo(f"model {server.model_name}: {server.http_url}  {server.grpc_url}  metrics {server.metrics_url}", err=True)
    # the admin token is never printed: statistics/repository endpoints are for the API (Server.headers)
    click.echo("inference is unauthenticated: keep the default loopback host, or put an authenticating proxy in "
               "front; statistics, repository and shared-memory endpoints are token-protected", err=True)
    server.serve_forever()


@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16 builds a strongly typed network from model.fp16.onnx, int8 from the QDQ graph "
                   "model.int8-trt.onnx (make them with `clipfuse export ENGINE --precision fp16|int8`).")
@click.option("--batch", default="1,8,32", show_default=True, callback=_int_list, metavar="MIN,OPT,MAX",
              help="The optimisation profile's batch sizes, for every image input.")
@click.option("--aux-streams", type=click.IntRange(min=0), default=None,
              help="Builder max_aux_streams: branches (backbones) may run concurrently (default: TensorRT's heuristic).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file, read before and written after the build (rebuilds skip kernel timing).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimisation level.")
@click.option("--workspace", type=click.IntRange(min=1), default=None, help="Workspace memory limit, MiB.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def build(engine, precision, batch, aux_streams, timing_cache, opt_level, workspace, quiet):
    """Build a TensorRT plan (model.<precision>.plan + layer info JSON) from ENGINE's ONNX graph."""
    from clipfuse import api

    if len(batch) != 3:
        raise ClipfuseError(f"--batch must be MIN,OPT,MAX (three integers), got {','.join(map(str, batch))}")
    entry = api.build_engine(engine, precision, batch=batch, aux_streams=aux_streams, timing_cache=timing_cache,
                             opt_level=opt_level, workspace=workspace * 2**20 if workspace else None, quiet=quiet)
    click.echo(json.dumps(entry, indent=2))


@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--backends", default="onnxruntime,torch", show_default=True,
              help="Comma-separated; the first is the reference. A -fp16 or -int8 suffix (onnxruntime-fp16, "
                   "openvino-int8, tensorrt-int8) runs that backend's form of that precision.")
@click.option("--images", multiple=True, help="Image files, folders or globs (default: the shipped photographs, "
                                              "whole and centre-cropped).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="fp16/int8: every backend with that form runs it (torch stays the fp32 reference); that "
                   "precision's tolerances.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-cascade", is_flag=True, help="On a cascade engine, leave out the stage graphs vs model.onnx check.")
def compare(engine, backends, images, precision, batch, as_json, no_cascade):
    """Run identical inputs through each backend: max abs/rel error per output and top-1 agreement
    against the first backend. Exit 1 when any is out of tolerance."""
    from clipfuse import api

    report = api.compare_backends(engine, backends, images=list(images) or None, precision=precision, batch=batch,
                                  cascade=not no_cascade)
    click.echo(json.dumps(report, indent=2) if as_json else present.format_compare(report))
    if not report["ok"]:
        raise ClipfuseError("backends disagree beyond tolerance (see the FAIL lines above)")


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="clipfuse")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
