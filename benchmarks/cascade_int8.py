"""The cascade with int8 stages beside the fp32 cascade and both full graphs: the committed results.

    python benchmarks/cascade_int8.py --set pair --keep-fp32 RN50:random:0
    python benchmarks/cascade_int8.py --set pair                 # every tower int8
    python benchmarks/cascade_int8.py --set trained              # the three towers trained here (train_towers.py)

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

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import tower_digits  # noqa: E402
import train_towers  # noqa: E402
from cascade_digits import EVAL_FRACTION, PROBE_FRACTION, SETS, SHOTS, TRAINED_IMAGES, arrays, auto_drop  # noqa: E402
from nlc_digits import write_digits  # noqa: E402


UNLABELLED = 1200            # --set trained: unlabelled images (tower_digits' unlabelled split) that certify the exits


def build(backbones, tmp: Path, cache, engine: Path, trained: bool = False) -> tuple[Path, Path, Path, dict]:
    """The digits (trained: tower_digits' figures split); the calibration (non-eval), eval and fit-calibration
    folders; the cascade engine (fit unless `engine` holds it). setup["best_single"]: the most accurate single
    on the pool's images outside the shots (chosen before any eval image is looked at). trained: the cascade is
    fitted at --max-drop 0.5 with `--certify-on` UNLABELLED images of tower_digits' unlabelled split (new
    renderings of the figures half's source digits, never labelled, never fitted on), written to tmp/unlabelled."""
    from clipfuse.export.fit.levers import Levers
    from clipfuse.export.fit.pipeline import fit_engine
    from clipfuse.runtime.manifest import read_manifest

    if trained:
        tower_digits.write_folder(tmp / "digits", "figures", TRAINED_IMAGES)
    else:
        write_digits(tmp / "digits")
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
    # the fit's cascade calibration images: the controller's pool outside its shots (the probes never saw them)
    fitcal = tmp / "fit-calibration"
    for i in sorted(set(range(len(a["pool_paths"]))) - set(np.asarray(a["shots"]).tolist())):
        p = Path(a["pool_paths"][i])
        (fitcal / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, fitcal / p.parent.name / p.name)
    n_cal = len(a["y_pool"]) - len(a["shots"])
    unlabelled = None
    if trained:
        unlabelled = tmp / "unlabelled"
        tower_digits.write_folder(unlabelled, "unlabelled", UNLABELLED, labelled=False)
        max_drop = 0.5
    else:
        max_drop = auto_drop(n_cal, 2 * 2)            # 2 scores x up to 2 orders, as cascade_digits
    fresh = True
    try:
        m = read_manifest(engine)            # a cascade engine holds its backbones in stage order
        fresh = sorted(m.backbone_names) != sorted(backbones) or "cascade" not in m.data
    except Exception:
        pass
    if fresh:
        shutil.rmtree(engine, ignore_errors=True)
        fit_engine(backbones, tmp / "digits", engine, head="linear-probe", eval_fraction=EVAL_FRACTION,
                   probe_fraction=PROBE_FRACTION, shots=SHOTS, study_shots=(SHOTS,), study_seeds=(0,), cache_dir=cache,
                   levers=Levers(cascade=True, max_drop=max_drop,
                                 certify_on=str(unlabelled) if unlabelled else None))
    n_unl = UNLABELLED if unlabelled else 0
    return calib, evald, fitcal, {"max_drop": max_drop, "calibration_images": n_cal + n_unl, "fitted_now": fresh,
                                  "best_single": best, "unlabelled_images": n_unl, "eval_images": len(ev),
                                  "non_eval_images": sum(1 for _ in calib.rglob("*.png"))}


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
    ap.add_argument("--set", choices=["pair", "trained"], default="pair")
    ap.add_argument("--keep-fp32", nargs="*", default=[], help="backbones whose towers stay fp32")
    ap.add_argument("--certify-on", choices=("fit", "non-eval", "unlabelled"), default=None,
                    help="images the int8 thresholds are certified on: the fit's cascade calibration images (the "
                         "pool outside the shots, which the probes never saw), or every non-eval digit (the "
                         "calibration folder, half of it the probes' own training images: the biased case), or "
                         "(--set trained, its default) the unlabelled images the fp32 cascade was certified on")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--engine", default=None, help="keep the cascade engine here (reused when it holds the set)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", default=None, metavar="JSON", help="only write the .md again from a results .json")
    args = ap.parse_args(argv)
    import logging
    from contextlib import nullcontext

    from clipfuse.core.log import at_level

    with at_level(logging.WARNING) if args.quiet else nullcontext():     # --quiet: warnings only
        return _run(args, argv)


def _run(args, argv):
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(res))
        return res
    from clipfuse.bench.cascade_exits import bench_cascade
    from clipfuse.export.precision.int8_export import export_int8
    from clipfuse.runtime.manifest import read_manifest

    backbones = SETS[args.set][0] or train_towers.specs()
    batches = tuple(int(b) for b in args.batch.split(","))
    command = "python benchmarks/cascade_int8.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--quiet",))
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
    out = Path(args.out or ROOT / "results" / (f"cascade_int8_{args.set}{'_keep' if args.keep_fp32 else ''}"
                                                f"{'_noneval' if certify == 'non-eval' else ''}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)) + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
