"""The parts of `benchmarks/cascade_int8.py --set five` (issue #26's moonshot) that are not orchestration.

- timing_subset: the eval digits latency is measured on (every k-th of each class, deterministic): the five's
  full graph takes ~0.7 s per image at batch 1 here, so timing every eval digit at two batch sizes, two
  precisions and two max-drops would take hours. Accuracy is never taken from the subset (fp32_answers).
- fp32_answers: the fp32 engine's own answers (routed cascade and model.onnx, untimed, batch 8) on EVERY eval
  digit, for the accuracy and its paired difference. The int8 figures on every eval digit come from the
  int8 export's own record (export_int8(data=...): int8 stages and model.onnx on the same images).
- target_checks: the issue's targets as pass/fail lines, each printing its bound.
- merge_runs: one results file from runs that measured different max-drops on the same setup (a run takes
  hours on 2 cores, so the max-drops may come from different sessions); each row's latencies stay side by side
  within the run that measured them.
- markdown: the results file.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import train_towers
from clipfuse.bench.cascade_exits import load_labelled
from clipfuse.core import iospec
from clipfuse.export.data import scan_labelled_folder
from clipfuse.export.paired import accuracy_interval, paired_difference
from clipfuse.runtime.backends.registry import make_backend
from clipfuse.runtime.cascade import CascadeBackend

TARGET_DROP = 0.5          # the targets are stated for the cascade certified at 0.5 points
LATENCY_RATIO = 1.5        # fp32 cascade mean latency <= 1.5x the most accurate single's (batch 1)
ACCURACY_DROP = 0.5        # fp32 cascade - full ensemble >= -0.5 points (paired; the point estimate)


# ----------------------------------------------------------------------------- what is timed, what is scored

def timing_subset(evald: Path, out: Path, n: int) -> list[str]:
    """Copy about n eval images into out/<class>/: of each class, its share of n (at least 1), evenly spaced over
    its files sorted by name. -> the copied images as '<class>/<file>' (all of them when n >= the eval set)."""
    paths, labels, classes = scan_labelled_folder(evald)
    chosen = []
    for c in range(len(classes)):
        rows = np.flatnonzero(labels == c)
        k = min(rows.size, max(1, round(n * rows.size / len(paths))))
        chosen += [paths[i] for i in rows[np.linspace(0, rows.size - 1, k).round().astype(int)]]
    names = []
    for p in chosen:
        p = Path(p)
        (out / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, out / p.parent.name / p.name)
        names.append(f"{p.parent.name}/{p.name}")
    return names


def fp32_answers(m, evald: Path, full_cache: dict, batch: int = 8) -> dict:
    """The fp32 routed cascade and model.onnx on every labelled image of evald (untimed) -> accuracies (Wilson 95%),
    the cascade's paired difference against the full graph (bootstrap 95%) and its exit rates. full_cache: the full
    graph's answers, kept across engines by model.onnx's sha256 (the max-drops' engines share the graph)."""
    arrays, y, _ = load_labelled(m, evald)
    S, N = len(m.backbones), len(y)
    key = m.data["artefacts"][m.onnx_path.name]["sha256"]
    cas = CascadeBackend(m).open()
    full = None if key in full_cache else make_backend(m, "onnxruntime").open()
    pred, stage, ref = [], [], []
    try:
        for lo in range(0, N, batch):
            feed = {n: a[lo:lo + batch] for n, a in arrays.items()}
            o = cas.infer(feed)
            pred.append(o[iospec.LOGITS].argmax(1))
            stage.append(o[iospec.STAGE])
            if full is not None:
                ref.append(full.infer(feed)[iospec.LOGITS].argmax(1))
    finally:
        cas.close()
        if full is not None:
            full.close()
    if full is not None:
        full_cache[key] = np.concatenate(ref)
    pred, stage, ref = np.concatenate(pred), np.concatenate(stage), full_cache[key]
    return {"n": int(N), "exit_rates": (np.bincount(stage - 1, minlength=S) / N).tolist(),
            "accuracy_cascade": accuracy_interval(pred, y).to_dict(),
            "accuracy_full": accuracy_interval(ref, y).to_dict(),
            "paired_difference": paired_difference(pred, ref, y).to_dict(),
            "how": "the engine's answers (routed cascade and model.onnx on ONNX Runtime CPU, batch 8, untimed)"}


# ----------------------------------------------------------------------------- the targets

@dataclass
class Check:
    """One pass/fail line: value `op` bound."""

    name: str
    value: float | None           # None: not measured (fails, `why` says why)
    op: str                       # "<=", "<" or ">="
    bound: float
    unit: str = ""
    why: str = ""

    @property
    def ok(self) -> bool:
        if self.value is None or not np.isfinite(self.value):
            return False
        return {"<=": self.value <= self.bound, "<": self.value < self.bound, ">=": self.value >= self.bound}[self.op]

    def line(self) -> str:
        got = f"not measured ({self.why})" if self.value is None else \
            f"{self.value:.3f}{self.unit} {self.op} {self.bound:.4g}{self.unit}"
        return f"{'PASS' if self.ok else 'FAIL'}: {self.name}: {got}" + (f" ({self.why})" if self.why and
                                                                           self.value is not None else "")

    def to_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok, line=self.line())


def target_checks(drop: dict, batch: str = "1") -> list[Check]:
    """The issue's three targets on one max-drop's results (fp32 and int8 benches, fp32 answers on every eval image);
    a max-drop that was refused fails all three, saying why."""
    if "error" in drop:
        return [Check(name, None, op, bound, why=drop["error"]) for name, op, bound in (
            ("fp32 cascade / the most accurate single, mean ms per call at batch 1", "<=", LATENCY_RATIO),
            ("fp32 cascade - full ensemble on the eval images, points", ">=", -ACCURACY_DROP),
            ("int8 cascade mean ms per call at batch 1, below the most accurate single's fp32", "<", 0.0))]
    b = drop["bench"]
    x = b["fp32"]["latency"].get(batch)
    single = x["single"]["backbone"] if x and "single" in x else "the most accurate single"
    latency = Check(f"fp32 cascade / {single}, mean ms per call at batch {batch}", None, "<=", LATENCY_RATIO, "x")
    if x is None or "single" not in x:
        latency.why = f"batch {batch} with the single was not timed"
    else:
        latency.value = x["cascade_over_single_mean"]
        latency.why = f"{x['cascade']['mean_ms']:.1f} ms vs {x['single']['mean_ms']:.1f} ms"
    d = drop["fp32_accuracy"]["paired_difference"]
    accuracy = Check(f"fp32 cascade - full ensemble on {d['n']} eval images, points (paired point estimate)",
                     d["difference"], ">=", -ACCURACY_DROP,
                     why=f"95% interval [{d['lo']:+.2f}, {d['hi']:+.2f}], {d['a_only']} vs {d['b_only']} discordant")
    x8 = (b.get("int8") or {}).get("latency", {}).get(batch)
    int8 = Check(f"int8 cascade mean ms per call at batch {batch}, below {single}'s fp32 (same run)", None, "<", 0.0,
                 " ms")
    if x8 is None or "single" not in x8:
        int8.why = drop["int8"]["cascade"].get("reason") or f"the int8 cascade was not timed at batch {batch}"
    else:
        int8.value, int8.bound = x8["cascade"]["mean_ms"], x8["single"]["mean_ms"]
    return [latency, accuracy, int8]


# ----------------------------------------------------------------------------- the results file

def _iv(d: dict) -> str:
    return f"{d['value']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"


def _diff(d: dict) -> str:
    return f"{d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] ({d['a_only']} vs {d['b_only']} discordant)"


def _rates(rates) -> str:
    return ", ".join(f"{100 * r:.1f}%" for r in rates)


def _drop_section(r: dict, setup: dict) -> list[str]:
    if "error" in r:
        return [f"## max-drop {r['max_drop']:g}", "", f"Refused: {r['error']}", ""]
    e, a, i8 = r["engine"], r["fp32_accuracy"], r["int8"]
    cal, found = e["calibration"], (e["certified_on"] or {}).get("unlabelled") or {}
    left = ", ".join(f"{n} {k}" for k, n in (found.get("left_out") or {}).items() if n) or "none"
    L = [f"## max-drop {r['max_drop']:g}", "",
         f"fp32 cascade: order {' -> '.join(e['order'])}, score {e['score']}, thresholds {e['thresholds']}; "
         f"certified on {cal['n']} images = {e['certified_on']['labelled_pool']} pool digits outside the shots + "
         f"{found.get('used', 0)} renders of them (left out of the --certify-on folder: {left}; the pool digits "
         "count once, as the pool): "
         f"{cal['disagreements']} disagreements with the full ensemble, Clopper-Pearson bound "
         f"{cal['disagreement_bound']:.2f}% <= {r['max_drop']:g}; exit rates there {_rates(cal['exit_rates'])}.", "",
         f"fp32 on all {a['n']} eval digits, {a['how']}: cascade {_iv(a['accuracy_cascade'])}, full "
         f"{_iv(a['accuracy_full'])} (Wilson 95%); cascade - full {_diff(a['paired_difference'])} (paired bootstrap "
         f"95%); exit rates {_rates(a['exit_rates'])}.", ""]
    v, c8 = i8["validation"], i8["cascade"]
    L += [f"int8 (`export --precision int8 --int8-target cpu`, ranges from {i8['calibration']['images']} of the "
          f"{setup['non_eval_images']} non-eval digits, towers kept fp32: "
          f"{', '.join(i8['float_backbones']) or 'none'}): "
          f"strict export would {'ship' if v['ok'] else 'REFUSE'} this graph ("
          + ("; ".join(v["failures"]) if v["failures"] else "every bound met") + ").", ""]
    if c8.get("written"):
        c, t = c8["calibration"], c8.get("test") or {}
        f8 = c8["certified_on"].get("found") or {}
        left8 = ", ".join(f"{n} {k}" for k, n in (f8.get("left_out") or {}).items() if n) or "none"
        L += [f"int8 thresholds {c8['thresholds']} ({c8['score']}), certified again on {c['n']} of the same folder's "
              f"{f8.get('found', '?')} images (left out by the export as fitted on: {left8}; "
              f"at most {setup['int8_certify_max']}, evenly spaced): "
              f"{c['disagreements']} disagreements with the int8 full "
              f"ensemble, bound {c['disagreement_bound']:.2f}% <= {c8['max_drop']:g}; exit rates there "
              f"{_rates(c['exit_rates'])}.",
              ""]
        if t:
            L += [f"int8 on all {t['n']} eval digits (the export's record): int8 cascade "
                  f"{_iv(t['accuracy_cascade_int8'])}, int8 full {_iv(t['accuracy_full_int8'])}, fp32 full "
                  f"{_iv(t['accuracy_full_fp32'])}; int8 cascade - fp32 full {_diff(t['vs_full_fp32'])}; "
                  f"int8 cascade - int8 full {_diff(t['vs_full_int8'])}; exit rates {_rates(t['exit_rates'])}.", ""]
    else:
        L += [f"int8 stages NOT written: {c8.get('reason')}", ""]
    L += [f"Latency on {setup['timed_images']} eval digits (ONNX Runtime CPU; the cascade, the full graph and the "
          "most accurate single (fp32) timed call by call interleaved, per precision):", "",
          "| stages | batch | calls | cascade mean ms | p99 | full mean ms | p99 | single (fp32) mean ms | p99 | "
          "cascade / single | cascade / full | exit rates (timed digits) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for prec, bc in r["bench"].items():
        for bs, x in bc["latency"].items():
            s = x.get("single")
            L.append(f"| {prec} | {bs} | {x['cascade']['calls']} | {x['cascade']['mean_ms']:.1f} | "
                     f"{x['cascade']['p99_ms']:.1f} | {x['full']['mean_ms']:.1f} | {x['full']['p99_ms']:.1f} | "
                     + (f"{s['backbone']}: {s['mean_ms']:.1f} | {s['p99_ms']:.1f} | {x['cascade_over_single_mean']:.3f}"
                        if s else "- | - | -")
                     + f" | {x['cascade_over_full_mean']:.3f} | {_rates(x['exit_rates'])} |")
    L += ["", "Load while timing (other processes, cores): "
          + ", ".join(f"{p} {bc['load']['other_processes_cores']:.2f}" for p, bc in r["bench"].items()) + ".", ""]
    return L


# what must be equal for two runs' max-drops to sit in one file: the same towers on the same images
SAME_SETUP = ("set", "backbones", "setup")


def _runs(res: dict) -> list[dict]:
    """The runs a result holds: [{command, seconds, drops}], one unless merged."""
    return res.get("runs") or [{"command": res["command"], "seconds": res["seconds"], "drops": list(res["drops"])}]


def merge_runs(results: list[dict]) -> dict:
    """One result from runs of the same setup that measured different max-drops (each a `_five_result`):
    drops in the order given, the targets taken again from max-drop TARGET_DROP, every run's command and
    seconds kept under "runs". Refuses (ValueError, naming the key) runs of another setup, or a max-drop
    measured twice."""
    if len(results) < 2:
        raise ValueError("give at least two results files to merge")
    first = results[0]
    for k, r in enumerate(results[1:], 2):
        for key in SAME_SETUP:
            if r.get(key) != first.get(key):
                raise ValueError(f"result {k} has another {key!r} than result 1: only runs on the same towers and "
                                 "images can share one file")
    drops, runs = {}, []
    for r in results:
        runs += _runs(r)
        for d, v in r["drops"].items():
            if d in drops:
                raise ValueError(f"max-drop {d} is in more than one result: keep one of them")
            drops[d] = v
    pending = [d for r in results for d in r.get("pending", []) if f"{d:g}" not in drops]
    target = drops.get(f"{TARGET_DROP:g}")
    res = {key: first[key] for key in SAME_SETUP} | {
        "command": first["command"], "seconds": round(sum(r["seconds"] for r in runs), 1), "drops": drops,
        "targets": [c.to_dict() for c in target_checks(target)] if target else None, "runs": runs}
    return res | ({"pending": pending} if pending else {})


def markdown(res: dict) -> str:
    s = res["setup"]
    done = ", ".join(f"{float(d):g}" for d in res["drops"])
    runs = _runs(res)
    L = [f"<!-- made by: {r['command']} ({r['seconds']:.0f} s on this machine) -->" for r in runs]
    L += ["", f"# The moonshot: the cascade of `{res['set']}` at max-drop {done}, fp32 and int8 stages (issue #26)", ""]
    if len(runs) > 1:
        L += [f"Measured in {len(runs)} runs of the same setup, merged with `--merge`: " + "; ".join(
            f"max-drop {', '.join(r['drops'])} by `{r['command']}` ({r['seconds']:.0f} s)" for r in runs)
            + ". A row's latencies were measured side by side within its run.", ""]
    if res.get("pending"):
        L += [f"**Part-way:** written when max-drop {done} finished; max-drop "
              f"{', '.join(f'{d:g}' for d in res['pending'])} was still to run (a run that finishes rewrites this "
              "file without this line).", ""]
    L += [
         f"{s['digits']} scikit-learn digits, seeded random towers {' + '.join(res['backbones'])}, linear-probe heads, "
         f"the splits of cascade_digits.py: {s['eval_images']} eval digits (never certify, never rendered), "
         f"{s['pool_outside_shots']} pool digits outside the shots (labels unused by the bound), "
         f"{s['renders']} unlabelled renders of those ({s['copies']} per digit: benchmarks/digit_renders.py states "
         f"the augmentation). Most accurate single: {s['best_single']} (on the pool outside the shots).", "",
         f"Accuracy: all {s['eval_images']} eval digits. Latency: {s['timed_images']} of them ({s['timing_rule']}; "
         "listed in the .json).", "", f"## Targets (max-drop {TARGET_DROP:g}, ONNX Runtime CPU, batch 1)", ""]
    t = res.get("targets")
    L += [f"- {c['line']}" for c in t] if t else [f"- not measured: this run has no max-drop {TARGET_DROP:g}"]
    L += ["", "## Summary (batch 1, mean ms per call; accuracy on every eval digit, paired against the fp32 full "
              "ensemble)", "",
          "| max-drop | stages | cascade | p99 | most accurate single (fp32) | full graph | cascade / single | "
          "cascade / full | cascade - full fp32 (points) |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["drops"].values():
        for prec, bc in r.get("bench", {}).items():
            x = bc["latency"].get("1")
            if x is None:
                continue
            d = (r["fp32_accuracy"]["paired_difference"] if prec == "fp32"
                 else (r["int8"]["cascade"].get("test") or {}).get("vs_full_fp32"))
            s1 = x.get("single")
            L.append(f"| {r['max_drop']:g} | {prec} | {x['cascade']['mean_ms']:.1f} | {x['cascade']['p99_ms']:.1f} | "
                     + (f"{s1['backbone']}: {s1['mean_ms']:.1f} | " if s1 else "- | ")
                     + f"{x['full']['mean_ms']:.1f} | "
                     + (f"{x['cascade_over_single_mean']:.3f}" if s1 else "-")
                     + f" | {x['cascade_over_full_mean']:.3f} | {_diff(d) if d else '-'} |")
    L.append("")
    for r in res["drops"].values():
        L += _drop_section(r, s)
    return train_towers.shorten("\n".join(L), res["backbones"])
