"""`clipfuse` commands that make and examine engine folders: backbones, export, fit, eval, inspect, build.

Each parses its arguments, calls the library (the functions `clipfuse.<name>` names; export/ modules that
load torch are imported by the command that needs them), and shows the result (clipfuse.cli.present);
they are registered on the group of clipfuse/cli/group.py.
"""
from __future__ import annotations

import json

import click

from clipfuse import api
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.precision.fp16 import export_fp16
from clipfuse.export.precision.int8_export import export_int8
from clipfuse.export.precision.trt_plan import build_engine

from . import present
from .group import cli, int_list, quiet_option


@cli.command()
@click.option("--measure", is_flag=True, help="Rebuild each backbone (random weights) and count parameters and FLOPs now.")
@click.option("--all", "show_all", is_flag=True, help="Also list every architecture name open_clip knows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(measure, show_all, as_json):
    """List the nine OpenAI CLIP backbones: input size, parameters, GFLOPs."""

    from clipfuse.export.graph.backbones import known_architectures

    rows = api.list_backbones(measure=measure)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(present.format_backbones(rows))
    if show_all:

        click.echo("\nall open_clip architectures:\n" + " ".join(sorted(known_architectures())))

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
@click.option("--int8-target", type=click.Choice(["both", "cpu", "tensorrt"]), default=None,
              help="int8: which graphs to write (cpu: model.int8.onnx; tensorrt: model.int8-trt.onnx); default both "
                   "where TensorRT is installed, else cpu.")
@click.option("--data", "-d", type=click.Path(), default=None,
              help="int8: labelled images (DATA/<class folder>/<images>): fp32 vs int8 accuracy, paired, refused "
                   "below the bound.")
@click.option("--int8-keep-fp32", "keep_fp32", multiple=True, metavar="BACKBONE|auto",
              help="int8: keep this backbone's tower fp32 (repeatable); auto: those whose own checks fail in int8 "
                   "are re-quantized fp32 and the graph validated again.")
@click.option("--cascade-images", type=click.Path(), default=None,
              help="int8 on a cascade engine: unlabelled images to certify the int8 stages' exit thresholds on "
                   "(default: --calibration). Not the images the heads or controller were fitted on: those answer "
                   "over-confidently.")
@quiet_option("No progress on stderr.")
def export(engine, backbone_list, classes, templates, out, force, opset, precision, calibration, calibration_count,
           calibration_method, int8_target, data, keep_fp32, cascade_images):
    """Build ONE validated ONNX graph of all backbones, heads, controller and combination.

    \b
    New engine:      clipfuse export -b RN50:openai -b ViT-B-32:openai -c classes.txt -o engines/NAME
    Existing engine: clipfuse export engines/NAME   (rebuilds its graph, e.g. after `clipfuse fit`,
                     keeping its heads, fitted controller and reports)
    fp16 graph:      clipfuse export engines/NAME --precision fp16   (adds model.fp16.onnx)
    int8 graphs:     clipfuse export engines/NAME --precision int8 --calibration my_photos/
    """

    if precision != "int8" and (calibration or data or calibration_count != 256 or calibration_method != "minmax"
                                or int8_target is not None or keep_fp32 or cascade_images):
        raise ClipfuseError("--calibration, --calibration-count, --calibration-method, --int8-target, --int8-keep-fp32, "
                            "--cascade-images and --data apply to --precision int8 only")
    if engine is not None and precision in ("fp16", "int8"):
        if backbone_list or classes or templates or out or opset:
            raise ClipfuseError(f"`clipfuse export {engine} --precision {precision}` converts the engine's model.onnx; "
                                "drop --backbone/--classes/--templates/--out/--opset")
        if precision == "fp16":
            click.echo(present.format_fp16(export_fp16(engine)))
            return
        if calibration is None:
            raise ClipfuseError(f"--precision int8 needs --calibration DIR: a folder of your own images (at least 32) "
                                f"to calibrate on, e.g. `clipfuse export {engine} --precision int8 --calibration photos/`")
        targets = None if int8_target is None else ("cpu", "tensorrt") if int8_target == "both" else (int8_target,)
        info = export_int8(engine, calibration, count=calibration_count, method=calibration_method,
                           targets=targets, data=data, keep_fp32=keep_fp32,
                           cascade_images=cascade_images)
        click.echo(present.format_int8(info))
        return
    if engine is None and precision in ("fp16", "int8"):
        raise ClipfuseError(f"--precision {precision} applies to an existing engine: export it first, then run "
                            f"`clipfuse export engines/NAME --precision {precision}`")
    from clipfuse.export.graph.engine import export_engine, reexport_engine

    if engine is not None:
        if backbone_list or classes or templates or out:
            raise ClipfuseError(f"`clipfuse export {engine}` rebuilds an existing engine from its manifest; "
                                "drop --backbone/--classes/--templates/--out, or drop ENGINE to make a new one")
        result = reexport_engine(engine, opset=opset)
    else:
        missing = [f"--{n}" for n, v in (("backbone", backbone_list), ("classes", classes), ("out", out)) if not v]
        if missing:
            raise ClipfuseError(f"a new engine needs {', '.join(missing)} "
                                "(e.g. -b RN50:openai -b ViT-B-32:openai -c classes.txt -o engines/NAME)")
        result = export_engine(list(backbone_list), classes, out, templates=templates, force=force, opset=opset)
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
@click.option("--study-shots", default="1,2,4,8,16", show_default=True, callback=int_list, help="k values of the report.")
@click.option("--study-seeds", default="0,1,2", show_default=True, callback=int_list, help="Seeds of the report.")
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
                   "agreement with it, on pool images outside the shots and --certify-on images).")
@click.option("--cascade-score", type=click.Choice(["auto", "max-prob", "margin"]), default="auto", show_default=True,
              help="--cascade: confidence score; auto = both, keep the cheaper on calibration images.")
@click.option("--cascade-cost", type=click.Choice(["gflops", "ms"]), default="gflops", show_default=True,
              help="--cascade: how stages are priced when choosing their order.")
@click.option("--certify-on", type=click.Path(), default=None, metavar="DIR",
              help="--cascade: unlabelled images of your task (any layout) that certify the exit thresholds beside "
                   "the pool images outside the shots; the images fit was fitted on, the pool's and eval's are "
                   "found by content and left out.")
@quiet_option()
def fit(backbone_list, data, eval_data, classes, shots, seed, head, templates, eval_fraction, probe_fraction,
        study_shots, study_seeds, cache, batch, out, force, controller, budget_ms, budget_gflops, cascade, max_drop,
        cascade_score, cascade_cost, certify_on):
    """Fit the Neural Logit Controller on k labelled images per class; report it against every baseline.

    Writes the engine folder with the controller that ships inside the graph (--controller; auto: the best
    on held-out labelled images, said in report.md's "What ships"), report.md and report.json.
    """

    if budget_ms is not None and budget_gflops is not None:
        raise ClipfuseError("give one budget: --budget-ms or --budget-gflops, not both")
    from clipfuse.export.fit.pipeline import fit_engine

    levers = api.fit_levers(budget=budget_ms if budget_ms is not None else budget_gflops,
                            budget_unit="GFLOPs" if budget_gflops is not None else "ms", cascade=cascade,
                            max_drop=max_drop, score=cascade_score, cascade_cost="ms" if cascade_cost == "ms" else "GFLOPs",
                            certify_on=certify_on)
    result, report = fit_engine(list(backbone_list), data, out, classes=classes, eval_data=eval_data, shots=shots,
                                seed=seed, head=head, templates=templates, eval_fraction=eval_fraction,
                                probe_fraction=probe_fraction, study_shots=study_shots, study_seeds=study_seeds,
                                cache_dir=cache, batch_size=batch, force=force, controller=controller,
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
@click.option("--include-fit-images", is_flag=True,
              help="Also score the images the engine was fitted on (left out by default: they flatter it).")
@quiet_option()
def eval_(engine, data, classes, batch, as_json, report_dir, include_fit_images):
    """Accuracy of the exported graph (ONNX Runtime) and of every baseline on a labelled folder, the row the
    engine ships marked (on a cascade engine: the cascade, as predict answers, beside the full graph), and the
    backbones' diversity with the controller's failure signatures. Images the engine was fitted on are left
    out, and counted."""

    from clipfuse.export.fit.evaluate import eval_engine
    from clipfuse.export.fit.report import format_eval

    res = eval_engine(engine, data, classes=classes, batch_size=batch, report_dir=report_dir,
                      include_fit_images=include_fit_images)
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

    info = api.inspect_engine(engine, verify=not no_verify)
    click.echo(json.dumps(info, indent=2) if as_json else present.format_inspect(info))

@cli.command()
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16 builds a strongly typed network from model.fp16.onnx, int8 from the QDQ graph "
                   "model.int8-trt.onnx (make them with `clipfuse export ENGINE --precision fp16|int8`).")
@click.option("--batch", default="1,8,32", show_default=True, callback=int_list, metavar="MIN,OPT,MAX",
              help="The optimisation profile's batch sizes, for every image input.")
@click.option("--aux-streams", type=click.IntRange(min=0), default=None,
              help="Builder max_aux_streams: branches (backbones) may run concurrently (default: TensorRT's heuristic).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file, read before and written after the build (rebuilds skip kernel timing).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimisation level.")
@click.option("--workspace", type=click.IntRange(min=1), default=None, help="Workspace memory limit, MiB.")
@quiet_option("No progress on stderr.")
def build(engine, precision, batch, aux_streams, timing_cache, opt_level, workspace):
    """Build a TensorRT plan (model.<precision>.plan + layer info JSON) from ENGINE's ONNX graph."""

    if len(batch) != 3:
        raise ClipfuseError(f"--batch must be MIN,OPT,MAX (three integers), got {','.join(map(str, batch))}")
    entry = build_engine(engine, precision, batch=batch, aux_streams=aux_streams, timing_cache=timing_cache,
                         opt_level=opt_level, workspace=workspace * 2**20 if workspace else None)
    click.echo(json.dumps(entry, indent=2))
