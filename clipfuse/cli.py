"""The `clipfuse` command line: parses arguments and calls clipfuse.api, nothing more.

Errors a user can cause (ClipfuseError) print one line, `error: ...`, and exit 1.
"""
from __future__ import annotations

import json
import sys

import click

from clipfuse.errors import ClipfuseError

DEMO_BACKBONES = ("RN50:random:0", "ViT-B-32:random:1")
DEMO_CLASSES = "astronaut,cat,cup of coffee,rocket,dog,car,bird,airplane,flower,building"


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
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def export(engine, backbone_list, classes, templates, out, force, opset, quiet):
    """Build ONE validated ONNX graph of all backbones, heads, controller and combination.

    \b
    New engine:      clipfuse export -b RN50:openai -b ViT-B-32:openai -c classes.txt -o engines/NAME
    Existing engine: clipfuse export engines/NAME   (rebuilds its graph, e.g. after `clipfuse fit`,
                     keeping its heads, fitted controller and reports)
    """
    from clipfuse import api

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
    click.echo(api.format_inspect(api.inspect_engine(result.folder, verify=False)))


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
@click.option("--quiet", "-q", is_flag=True)
def fit(backbone_list, data, eval_data, classes, shots, seed, head, templates, eval_fraction, probe_fraction,
        study_shots, study_seeds, cache, batch, out, force, quiet):
    """Fit the Neural Logit Controller on k labelled images per class; report it against every baseline.

    Writes the engine folder with the fitted controller inside the graph, report.md and report.json.
    """
    from clipfuse import api

    result, report = api.fit_engine(list(backbone_list), data, out, classes=classes, eval_data=eval_data, shots=shots,
                                    seed=seed, head=head, templates=templates, eval_fraction=eval_fraction,
                                    probe_fraction=probe_fraction, study_shots=study_shots, study_seeds=study_seeds,
                                    cache_dir=cache, batch_size=batch, force=force, quiet=quiet)
    click.echo((result.folder / "report.md").read_text())


@cli.command(name="eval")
@click.argument("engine", type=click.Path(file_okay=False))
@click.option("--data", "-d", required=True, type=click.Path(), help="Labelled images: DATA/<class folder>/<images>.")
@click.option("--classes", "-c", default=None, type=click.Path(dir_okay=False), help="Folder -> class name map file.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-image predictions).")
@click.option("--quiet", "-q", is_flag=True)
def eval_(engine, data, classes, batch, as_json, quiet):
    """Accuracy of the exported graph (ONNX Runtime) and of every baseline on a labelled folder."""
    from clipfuse import api

    res = api.eval_engine(engine, data, classes=classes, batch_size=batch, quiet=quiet)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{res['engine']} on {res['data']}: {res['num_images']} images"
               + (f", {len(res['unreadable_images'])} unreadable (skipped)" if res["unreadable_images"] else ""))
    click.echo("\n| method | accuracy % |\n| --- | ---: |")
    for m, a in res["accuracy"].items():
        click.echo(f"| {m} | {a:.1f} |")
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
    click.echo(json.dumps(info, indent=2) if as_json else api.format_inspect(info))


@cli.command()
@click.argument("engine", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Labels shown per image.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "jsonl", "csv"]),
              help="table for people; jsonl or csv for programs (failed images are rows with an error field).")
@click.option("--batch", "-b", default=8, show_default=True, type=click.IntRange(min=1), help="Images per engine call.")
@click.option("--backend", default="auto", show_default=True,
              help="auto, onnxruntime, onnxruntime-cuda, onnxruntime-tensorrt, torch, torch-cuda or tensorrt.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Image-decoding threads (default min(4, CPUs)).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="The backend's intra-op threads (default: measured best).")
@click.option("--allow-failures", is_flag=True, help="Exit 0 even when some images could not be read.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine's files (faster on large engines).")
def predict(engine, images, top_k, fmt, batch, backend, workers, threads, allow_failures, no_verify):
    """Classify IMAGES (files, folders, globs, or - for a list of paths on stdin) with an ENGINE folder.

    Prints the top-k labels with probabilities and each backbone's temperature per image.
    Images that cannot be read are named on stderr with the reason; the exit code is then 1
    unless --allow-failures.
    """
    from clipfuse import api

    paths = api.collect_images(images, stdin=click.get_text_stream("stdin"))
    if not paths:
        raise ClipfuseError("no images to classify: the list on stdin was empty")
    total = failed = 0
    with api.load(engine, backend=backend, batch_size=batch, workers=workers, threads=threads,
                  verify=not no_verify) as predictor:
        k = min(top_k, len(predictor.classes))
        for preds in predictor.predict_batches(paths, top_k=top_k):
            shown = preds if fmt != "table" else [p for p in preds if p.ok]   # the table leaves failures to stderr
            click.echo(api.format_predictions(shown, fmt, k, predictor.backbone_names, header=total == 0), nl=False)
            for p in preds:
                if not p.ok:
                    click.echo(f"failed: {p.name}: {p.error}", err=True)
            total += len(preds)
            failed += sum(not p.ok for p in preds)
    if failed and not allow_failures:
        raise ClipfuseError(f"{failed} of {total} images could not be classified (named above); "
                            "fix or remove them, or pass --allow-failures to exit 0 anyway")
    if failed:
        click.echo(f"{failed} of {total} images could not be classified (allowed by --allow-failures)", err=True)


@cli.command()
@click.option("--out", "-o", default="engines/demo", show_default=True, type=click.Path(file_okay=False))
def demo(out):
    """Export and validate the default two-backbone ensemble (RN50 + ViT-B-32), offline.

    Weights are seeded random (no download is possible here): latency and memory
    do not depend on weight values; predictions are meaningless until real weights
    (RN50:openai, ViT-B-32:openai) are used.
    """
    from clipfuse import api
    from clipfuse.export.heads import simple_templates

    click.echo(f"clipfuse demo: {' + '.join(DEMO_BACKBONES)} (seeded random weights: offline), "
               f"{len(DEMO_CLASSES.split(','))} classes, open_clip's {len(simple_templates())} simple templates", err=True)
    result = api.export_engine(list(DEMO_BACKBONES), DEMO_CLASSES, out, templates=simple_templates(), force=True)
    click.echo(api.format_inspect(api.inspect_engine(result.folder, verify=False)))


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="clipfuse")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
