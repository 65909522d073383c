"""The cascade with int8 stages beside the fp32 cascade and both full graphs: the committed results.

    python benchmarks/cascade_int8.py --set pair --keep-fp32 RN50:random:0
    python benchmarks/cascade_int8.py --set pair                 # every tower int8
    python benchmarks/cascade_int8.py --set trained              # the three towers trained here (train_towers.py)
    python benchmarks/cascade_int8.py --set five --max-drop 0.5,1 --bench-images 200 \
        --keep-fp32 RN50:random:0 RN101:random:1 RN50x4:random:2             # issue #26's moonshot
    python benchmarks/cascade_int8.py --set five --merge A.json B.json      # max-drops measured in separate runs

The same digits, splits and cascade engine as `benchmarks/cascade_digits.py --set pair --latency`
(RN50:random:0 + ViT-B-32:random:1, linear-probe heads, `fit --cascade` with the max-drop the
calibration split certifies: 1 point on 590 images), then:

1. `export --precision int8 --int8-target cpu` calibrated on the 1258 non-eval digits (the user's
   own unlabelled images: ranges from 256 of them), validated and scored on the 539 eval digits
   (`--data`). The int8 exit thresholds are certified (`--cascade-images`) on the fit's own cascade
   calibration images (590: the pool outside the shots, which the probes never saw), or with
   `--certify-on non-eval` on 1024 of the non-eval digits, about half of them the probes' training
   images: the biased case the export's docs warn about, measured. Strict validation refuses the pair's int8 graph
   (RN50's random features collapse: benchmarks/results/precision_default.md), so the export here
   is non-strict (what the benchmarks do to measure a refused graph) and the refusal is reported,
   never hidden. `--keep-fp32 RN50:random:0` keeps the collapsed tower fp32, as
   `--int8-keep-fp32` would.
2. clipfuse.bench.cascade_exits.bench_cascade for fp32 and for int8, each the routed cascade against its
   own full graph on the 539 eval digits, call by call interleaved, batch 1 and 8: latency (mean
   per call, p99), exit rates, accuracy (Wilson 95%) and the paired difference against the full graph.
   The int8 export's record adds the int8 cascade against fp32's full ensemble (paired).

`--set five` (the moonshot of issue #26): the five cheapest towers on all 1797 digits (cascade_digits.py's
splits). One engine per --max-drop, fitted with `--certify-on` a folder of the pool digits outside the
shots plus --unlabelled-copies renders of each (benchmarks/digit_renders.py states the augmentation; never
an eval digit); its int8 stages certified again on the same folder (`--cascade-images`: the pool digits
stay, as fit_images.json names them the cascade's calibration images; at most 1024 images, evenly
spaced). Accuracy on every eval digit (benchmarks/moonshot.py), latency on
--bench-images of them; the issue's targets as pass/fail lines. The random ResNets stay fp32 in int8
(their features collapse there, error-to-spread > 1: benchmarks/results/precision_nine.md), as the
pair's RN50 does. Writes benchmarks/results/cascade_moonshot.md and .json.

Writes benchmarks/results/cascade_int8_<set>[_keep].md and .json, the exact command at the top.
Random weights: see precision_bench.py; the validation bounds are what real weights must meet.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipfuse.bench.cascade_exits import bench_cascade
from clipfuse.core.errors import ClipfuseError
from clipfuse.export.fit.levers.recipe import Levers
from clipfuse.export.fit.pipeline import fit_engine
from clipfuse.export.precision.int8_export import export_int8
from clipfuse.export.precision.int8_stages import CERTIFY_MAX
from clipfuse.runtime.manifest import read_manifest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import moonshot  # noqa: E402
import tower_digits  # noqa: E402
import train_towers  # noqa: E402
from cascade_digits import (  # noqa: E402
    EVAL_FRACTION, PROBE_FRACTION, SETS, SHOTS, TRAINED_IMAGES, arrays, auto_drop, keep_first)
from digit_renders import certify_folder  # noqa: E402
from nlc_digits import write_digits  # noqa: E402


UNLABELLED = 1200            # --set trained: unlabelled images (tower_digits' unlabelled split) that certify the exits
COPIES = 4                   # --set five: renders per pool digit outside the shots (~590 -> 2360 renders; with the
                             # 590 digits, ~2950 images allow 6 disagreements at max-drop 0.5 over 4 configurations)
BENCH_IMAGES = 200           # --set five: eval digits the latency is measured on (accuracy: every eval digit)


def prepare(backbones, tmp: Path, cache, trained: bool = False, per_class: int | None = None):
    """The digits (trained: tower_digits' figures split; per_class: the first N of each class), their features
    and splits -> (calibration (non-eval) folder, eval folder, fit-calibration folder, setup).
    fit-calibration: the controller's pool outside its shots (the probes never saw them). setup["best_single"]:
    the most accurate single on those images (chosen before any eval image is looked at)."""
    if trained:
        tower_digits.write_folder(tmp / "digits", "figures", TRAINED_IMAGES)
    else:
        write_digits(tmp / "digits")
    if per_class:
        keep_first(tmp / "digits", per_class)
    a = arrays(backbones, tmp / "digits", cache)
    held = np.setdiff1d(np.arange(len(a["y_pool"])), a["shots"])
    best = a["names"][int(np.argmax([(a["Z_pool"][held, k].argmax(1) == a["y_pool"][held]).mean()
                                     for k in range(len(a["names"]))]))]
    ev = set(map(str, a["ev_paths"]))
    calib, evald = tmp / "calib", tmp / "eval"
    for p in sorted((tmp / "digits").rglob("*.png")):
        dst = (evald if str(p) in ev else calib) / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)
    fitcal = tmp / "fit-calibration"
    for i in held.tolist():
        p = Path(a["pool_paths"][i])
        (fitcal / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, fitcal / p.parent.name / p.name)
    non_eval = sum(1 for _ in calib.rglob("*.png"))
    return calib, evald, fitcal, {"best_single": best, "pool_outside_shots": int(held.size), "eval_images": len(ev),
                                  "non_eval_images": non_eval, "digits": len(ev) + non_eval}


def fit_cascade_engine(backbones, digits: Path, engine: Path, cache, max_drop: float, certify_on=None) -> bool:
    """`fit --cascade` at max_drop into `engine`, unless it holds a cascade of these backbones at that max-drop
    already (a kept --engine). -> whether it was fitted now."""
    try:
        m = read_manifest(engine)            # a cascade engine holds its backbones in stage order
        if sorted(m.backbone_names) == sorted(backbones) and (m.data.get("cascade") or {}).get("max_drop") == max_drop:
            return False
    except Exception:
        pass
    shutil.rmtree(engine, ignore_errors=True)
    fit_engine(backbones, digits, engine, head="linear-probe", eval_fraction=EVAL_FRACTION,
               probe_fraction=PROBE_FRACTION, shots=SHOTS, study_shots=(SHOTS,), study_seeds=(0,), cache_dir=cache,
               levers=Levers(cascade=True, max_drop=max_drop, certify_on=str(certify_on) if certify_on else None))
    return True


def build(backbones, tmp: Path, cache, engine: Path, trained: bool = False) -> tuple[Path, Path, Path, dict]:
    """--set pair / trained: prepare(), then the cascade engine (fit unless `engine` holds it). trained: fitted at
    --max-drop 0.5 with `--certify-on` UNLABELLED images of tower_digits' unlabelled split (new renderings of the
    figures half's source digits, never labelled, never fitted on), written to tmp/unlabelled; pair: at the
    smallest max-drop its pool certifies."""
    calib, evald, fitcal, prep = prepare(backbones, tmp, cache, trained=trained)
    n_cal = prep["pool_outside_shots"]
    unlabelled = None
    if trained:
        unlabelled = tmp / "unlabelled"
        tower_digits.write_folder(unlabelled, "unlabelled", UNLABELLED, labelled=False)
        max_drop = 0.5
    else:
        max_drop = auto_drop(n_cal, 2 * 2)            # 2 scores x up to 2 orders, as cascade_digits
    fresh = fit_cascade_engine(backbones, tmp / "digits", engine, cache, max_drop, unlabelled)
    n_unl = UNLABELLED if unlabelled else 0
    return calib, evald, fitcal, {"max_drop": max_drop, "calibration_images": n_cal + n_unl, "fitted_now": fresh,
                                  "best_single": prep["best_single"], "unlabelled_images": n_unl,
                                  "eval_images": prep["eval_images"], "non_eval_images": prep["non_eval_images"]}


def _iv(d: dict) -> str:
    return f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"


def _diff(d: dict) -> str:
    return f"{d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] ({d['a_only']} vs {d['b_only']} discordant)"


def markdown(res: dict) -> str:
    v, c8 = res["int8"]["validation"], res["int8"]["cascade"]
    L = [f"<!-- made by: {res['command']} ({res['seconds']:.0f} s on this machine) -->", "",
         f"# Cascade with int8 stages: digits, set `{res['set']}`", "",
         *([f"Towers trained here (benchmarks/train_towers.py); images: 2000 of tower_digits' figures split, and "
            f"{res['setup']['unlabelled_images']} of its unlabelled split to certify the exits.", ""]
           if res["set"] == "trained" else []),
         f"Engine: `fit --cascade` on {' + '.join(res['backbones'])} (max-drop {res['setup']['max_drop']:g} points, "
         f"certified on {res['setup']['calibration_images']} images), order {' -> '.join(res['order'])}. "
         f"int8: `export --precision int8 --int8-target cpu`, ranges from {res['int8']['calibration']['images']} of "
         f"the {res['setup']['non_eval_images']} non-eval digits, towers kept fp32: "
         f"{', '.join(res['int8']['float_backbones']) or 'none'}; eval: {res['setup']['eval_images']} digits.", "",
         f"int8 validation (strict export would {'ship' if v['ok'] else 'REFUSE'} this graph): "
         + ("; ".join(v["failures"]) if v["failures"] else "every bound met") + ".", ""]
    if c8.get("written"):
        c = c8["calibration"]
        where = {"fit": f"the fit's {c['n']} cascade calibration digits (the pool outside the shots; the probes never "
                        "saw them)",
                 "non-eval": f"{c['n']} non-eval digits (the calibration folder; about half of them the probes' own "
                             "training images)",
                 "unlabelled": f"{c['n']} unlabelled images (tower_digits' unlabelled split, the ones the fp32 "
                               "cascade was certified on with --certify-on)"}[res["setup"]["certified_on"]]
        L += [f"int8 thresholds {c8['thresholds']} ({c8['score']}; fp32's {c8['fp32_thresholds']}), certified on "
              f"{where}: {c['disagreements']} disagreements with the int8 full ensemble, "
              f"Clopper-Pearson bound {c['disagreement_bound']:.2f}% <= {c8['max_drop']:g}; exit rates "
              + ", ".join(f"{r:.1%}" for r in c["exit_rates"]) + ".", ""]
        t = c8.get("test")
        if t:
            L += [f"On the {t['n']} eval digits: int8 cascade {_iv(t['accuracy_cascade_int8'])}, int8 full "
                  f"{_iv(t['accuracy_full_int8'])}, fp32 full {_iv(t['accuracy_full_fp32'])} (Wilson 95%); int8 cascade "
                  f"- fp32 full {_diff(t['vs_full_fp32'])}; int8 cascade - int8 full {_diff(t['vs_full_int8'])} "
                  f"(paired bootstrap 95%).", ""]
    else:
        L += [f"int8 stages NOT written: {c8['reason']}", ""]
    L += ["| stages | batch | cascade ms/call (mean) | p99 | full graph ms/call (mean) | p99 | cascade / full | exit rates |"
          " cascade accuracy % | full accuracy % | cascade - full (points) | most accurate single, fp32 ms/call (mean) "
          "| cascade / single |",
          "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for prec, c in res["bench"].items():
        for bs, x in c["latency"].items():
            L.append(f"| {prec} | {bs} | {x['cascade']['mean_ms']:.1f} | {x['cascade']['p99_ms']:.1f} | "
                     f"{x['full']['mean_ms']:.1f} | {x['full']['p99_ms']:.1f} | {x['cascade_over_full_mean']:.3f} | "
                     + ", ".join(f"{100 * r:.1f}%" for r in x["exit_rates"])
                     + f" | {_iv(c['accuracy_cascade'])} | {_iv(c['accuracy_full'])} | {_diff(c['paired_difference'])} | "
                     + (f"{x['single']['backbone']}: {x['single']['mean_ms']:.1f} | {x['cascade_over_single_mean']:.3f} |"
                        if "single" in x else "- | - |"))
    if any("single" not in x for c in res["bench"].values() for x in c["latency"].values()):
        L += ["", "-: the most accurate single was not timed in this run (the results file predates that column)."]
    b = res["bench"]
    if "int8" in b and "fp32" in b:
        L += ["", "Side by side (mean ms per call, same run): "
              + "; ".join(f"batch {bs}: int8 cascade / fp32 cascade "
                          f"{b['int8']['latency'][bs]['cascade']['mean_ms'] / b['fp32']['latency'][bs]['cascade']['mean_ms']:.3f}, "
                          f"int8 cascade / fp32 full "
                          f"{b['int8']['latency'][bs]['cascade']['mean_ms'] / b['fp32']['latency'][bs]['full']['mean_ms']:.3f}"
                          for bs in b["int8"]["latency"]) + "."]
    L += ["", "Load while timing (other processes, cores): "
          + ", ".join(f"{p} {c['load']['other_processes_cores']:.2f}" for p, c in b.items()) + ".",
          "", "Each precision's cascade and full graph were timed call by call interleaved in one process "
          "(clipfuse.bench.cascade_exits); fp32 and int8 ran one after the other in the same run.", ""]
    return train_towers.shorten("\n".join(L), res["backbones"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["pair", "trained", "five"], default="pair")
    ap.add_argument("--backbones", nargs="+", default=None, help="override the set's backbones (tests)")
    ap.add_argument("--keep-fp32", nargs="*", default=[], help="backbones whose towers stay fp32")
    ap.add_argument("--certify-on", choices=("fit", "non-eval", "unlabelled"), default=None,
                    help="images the int8 thresholds are certified on: the fit's cascade calibration images (the "
                         "pool outside the shots, which the probes never saw), or every non-eval digit (the "
                         "calibration folder, half of it the probes' own training images: the biased case), or "
                         "(--set trained, its default) the unlabelled images the fp32 cascade was certified on; "
                         "--set five: always the fp32 cascade's --certify-on folder")
    ap.add_argument("--max-drop", default=None, help="--set five: comma-separated, one engine each (default 0.5,1)")
    ap.add_argument("--unlabelled-copies", type=int, default=COPIES,
                    help="--set five: renders of each pool digit outside the shots (benchmarks/digit_renders.py)")
    ap.add_argument("--bench-images", type=int, default=BENCH_IMAGES,
                    help="--set five: eval digits the latency is measured on (accuracy: every eval digit)")
    ap.add_argument("--images", type=int, default=None, help="--set five: the first N digits of each class (tests)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--engine", default=None, help="keep the cascade engine here (reused when it holds the set; "
                                                   "--set five: one engine per max-drop under it)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", default=None, metavar="JSON", help="only write the .md again from a results .json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="--set five: write one results file (--out, default the moonshot's) from runs of the same "
                         "setup that measured different max-drops")
    args = ap.parse_args(argv)
    given = [o for o, v in (("--max-drop", args.max_drop), ("--images", args.images)) if v is not None]
    given += [o for o, v, d in (("--unlabelled-copies", args.unlabelled_copies, COPIES),
                                ("--bench-images", args.bench_images, BENCH_IMAGES)) if v != d]
    if args.set != "five" and given:
        ap.error(f"{', '.join(given)}: only with --set five")
    if args.set == "five" and args.certify_on:
        ap.error("--certify-on: --set five certifies the int8 stages on the fp32 cascade's --certify-on folder")
    import logging
    from contextlib import nullcontext

    from clipfuse.core.log import at_level

    with at_level(logging.WARNING) if args.quiet else nullcontext():     # --quiet: warnings only
        return _run(args, argv)


def _run(args, argv):
    if args.merge:
        results = []
        for f in args.merge:
            try:
                results.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                raise SystemExit(f"--merge: {f} cannot be read as JSON ({e})") from None
            if not isinstance(results[-1], dict) or "drops" not in results[-1]:
                raise SystemExit(f"--merge: {f} is not a --set five results file (it has no 'drops')")
        try:
            res = moonshot.merge_runs(results)
        except ValueError as e:
            raise SystemExit(f"--merge: {e}") from None
        return _write(res, Path(args.out or ROOT / "results" / "cascade_moonshot"))
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text((moonshot.markdown if "drops" in res else markdown)(res))
        return res

    backbones = args.backbones or SETS[args.set][0] or train_towers.specs()
    batches = tuple(int(b) for b in args.batch.split(","))
    command = "python benchmarks/cascade_int8.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--quiet",))
    if args.set == "five":
        out = Path(args.out or ROOT / "results" / "cascade_moonshot")
        return _write(_run_five(args, backbones, batches, command, out), out)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-cascade-int8-"))
    try:
        engine = Path(args.engine) if args.engine else tmp / "engine"
        calib, evald, fitcal, setup = build(backbones, tmp, args.cache, engine, trained=args.set == "trained")
        certify = args.certify_on or ("unlabelled" if args.set == "trained" else "fit")
        setup["certified_on"] = certify
        if certify == "unlabelled" and args.set != "trained":
            raise SystemExit("--certify-on unlabelled needs --set trained (its unlabelled images)")
        info = export_int8(engine, calib, count=256, targets=("cpu",), data=evald, strict=False,
                           keep_fp32=args.keep_fp32,
                           cascade_images={"fit": fitcal, "non-eval": calib,
                                           "unlabelled": tmp / "unlabelled"}[certify])
        m = read_manifest(engine)
        bench = {"fp32": bench_cascade(m, evald, batches=batches, single=setup["best_single"])}
        if info["cascade"].get("written"):
            bench["int8"] = bench_cascade(m, evald, batches=batches, precision="int8", single=setup["best_single"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"set": args.set, "command": command, "backbones": backbones, "order": m.backbone_names, "setup": setup,
           "int8": {k: info[k] for k in ("validation", "cascade", "calibration", "float_backbones", "quantized")},
           "bench": bench, "seconds": round(time.perf_counter() - t0, 1)}
    name = f"cascade_int8_{args.set}{'_keep' if args.keep_fp32 else ''}{'_noneval' if certify == 'non-eval' else ''}"
    return _write(res, Path(args.out or ROOT / "results" / name))


def _write(res: dict, out: Path) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    md = (moonshot.markdown if "drops" in res else markdown)(res)
    out.with_suffix(".md").write_text(md)
    plain = lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)      # noqa: E731
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=plain) + "\n")
    print(md)
    return res


def _run_five(args, backbones, batches, command, out: Path | None = None) -> dict:
    """--set five: prepare, render, then per max-drop fit, int8 export, accuracy on every eval digit, benches. A run
    takes hours on 2 cores: each max-drop's figures are written to out as soon as they exist, the later max-drops
    named as pending, so a run stopped part-way keeps what it measured."""
    drops = tuple(float(d) for d in (args.max_drop or "0.5,1").split(","))
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-moonshot-"))
    try:
        calib, evald, fitcal, setup = prepare(backbones, tmp, args.cache, per_class=args.images)
        # one flat folder certifies both precisions: the pool digits outside the shots (the fit counts them once, as
        # its labelled pool) and the renders of them; never an eval digit, a probe's image or a shot
        certify = tmp / "certify"
        written = certify_folder(fitcal, evald, certify, args.unlabelled_copies)
        timed = moonshot.timing_subset(evald, tmp / "timed", args.bench_images)
        setup.update(copies=args.unlabelled_copies, renders=written["renders"],
                     render_sources=written["render_sources"], timed_images=len(timed), timed=timed,
                     int8_certify_max=CERTIFY_MAX,
                     timing_rule="of each class its share, evenly spaced over its files sorted by name")
        full_cache, drops_res = {}, {}
        for i, d in enumerate(drops):
            engine = (Path(args.engine) if args.engine else tmp / "engines") / f"max-drop-{d:g}"
            try:           # one max-drop refused (too few images, say) costs the run neither the other's figures
                drops_res[f"{d:g}"] = _five_at(d, engine, backbones, tmp, calib, evald, certify, setup, batches,
                                               full_cache, args)
            except ClipfuseError as e:
                drops_res[f"{d:g}"] = {"max_drop": d, "error": str(e)}
            if out is not None and i + 1 < len(drops):
                _write(_five_result(command, backbones, setup, drops_res, t0, pending=drops[i + 1:]), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _five_result(command, backbones, setup, drops_res, t0)


def _five_result(command, backbones, setup, drops_res, t0, pending=()) -> dict:
    target = drops_res.get(f"{moonshot.TARGET_DROP:g}")
    res = {"set": "five", "command": command, "backbones": backbones, "setup": setup, "drops": drops_res,
           "targets": [c.to_dict() for c in moonshot.target_checks(target)] if target else None,
           "seconds": round(time.perf_counter() - t0, 1)}
    if pending:
        res["pending"] = [float(d) for d in pending]
    return res


def _five_at(d: float, engine: Path, backbones, tmp: Path, calib: Path, evald: Path, certify: Path, setup: dict,
             batches, full_cache: dict, args) -> dict:
    """One max-drop of --set five: fit, int8 export, fp32 answers on every eval digit, both benches."""
    fresh = fit_cascade_engine(backbones, tmp / "digits", engine, args.cache, d, certify)
    info = export_int8(engine, calib, count=256, targets=("cpu",), data=evald, strict=False,
                       keep_fp32=args.keep_fp32, cascade_images=certify)
    m = read_manifest(engine)
    block = m.data["cascade"]
    r = {"max_drop": d, "fitted_now": fresh,
         "engine": {"order": m.backbone_names, **{k: block.get(k) for k in (
             "score", "thresholds", "certified_on", "calibration", "calibration_images", "test")}},
         "int8": {k: info[k] for k in ("validation", "cascade", "calibration", "float_backbones", "quantized")},
         "fp32_accuracy": moonshot.fp32_answers(m, evald, full_cache),
         "bench": {"fp32": bench_cascade(m, tmp / "timed", batches=batches, single=setup["best_single"])}}
    if info["cascade"].get("written"):
        r["bench"]["int8"] = bench_cascade(m, tmp / "timed", batches=batches, precision="int8",
                                           single=setup["best_single"])
    return r


if __name__ == "__main__":
    main()
