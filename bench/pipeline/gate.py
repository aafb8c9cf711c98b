"""CI regression gate: the smoke profile's results against committed expectations.

Checks (expectations in ``tests/expectations/smoke.json``):
* GMACs of every configuration: exact (to 1e-6 G; PM, whose structure is calibrated on the smoke
  backbone, within 1%);
* proxy accuracy of every method/row: not below the committed value minus ``accuracy_tolerance``;
* speed-up ratios (measured interleaved in the same run): not below the committed floor
  (the measured value at acceptance times ``speedup_margin``), with a tolerance taken from the
  run's own spread (:func:`judge_speedup`): a median below the floor passes when the run's
  interval for it (the bootstrap interval of the median when the speed results carry one, else
  the min..max of the per-repeat ratios) still reaches the floor; when that interval is wider
  than ``speedup_noise_limit`` x the median the gate says "machine too noisy to judge speed"
  and does not count the row (neither passed nor failed).  GMACs and accuracy stay exact.

A failure prints what regressed and by how much, and how to accept an intended change:
``./run_all.sh accept`` re-runs the smoke profile and rewrites the expectations file,
whose diff a reviewer reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.core import registry
from bench.core.errors import ConfigError
from bench.runtime import env, startup
from bench.runtime.results import atomic_write_json

EXPECT = env.ROOT / "tests" / "expectations" / "smoke.json"
# Points of proxy top-1 / mIoU.  The smoke models are trained for seconds on 240 images and sit
# near chance on an 80-image val split, so a small numeric change (a reordered reduction, another
# init) moves them by several points.  The smoke run is deterministic on a given machine (seeded
# init, seeded reducer modules, workers=0; two fresh runs gave identical numbers), so the tolerance
# only absorbs floating-point differences between CPUs/BLAS builds; a reducer that breaks falls to
# chance (10 %) and fails.  An intended numeric change is accepted with `./run_all.sh accept`.
ACCURACY_TOLERANCE = 5.0
SPEEDUP_MARGIN = 0.6  # floor = measured speed-up at acceptance x margin
# A run whose speed-up interval is wider than this fraction of its median cannot tell a regression
# from load on the machine.  On an idle 2-core CPU the per-repeat speed-ups of the default profile
# spread by 8-36% of the median (min..max of 3 repeats); under heavy load by more than 100%.
SPEEDUP_NOISE_LIMIT = 0.5

# interval fields a throughput row may carry, most precise first (lower, upper)
_INTERVAL_FIELDS = (("speedup_ci_low", "speedup_ci_high"), ("speedup_ci_lo", "speedup_ci_hi"),
                    ("speedup_lo", "speedup_hi"), ("speedup_low", "speedup_high"),
                    ("speedup_min", "speedup_max"))


def _load_table(report_dir: Path, name: str) -> list:
    p = report_dir / f"{name}.json"
    return json.loads(p.read_text())["rows"] if p.exists() else []


def _number(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def speedup_interval(row: dict):
    """(low, high, kind) of a throughput row's speed-up from the run itself, or None.

    A bootstrap/confidence interval of the median when the row has one (``speedup_ci_low`` /
    ``speedup_ci_high``, or a two-element ``speedup_ci``), else the min..max over repeats
    (``speedup_min`` / ``speedup_max``, or a list of per-repeat ``speedup_ratios``)."""
    ci = row.get("speedup_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in map(_number, ci):
        lo, hi = sorted(map(_number, ci))
        return lo, hi, "interval"
    for lo_k, hi_k in _INTERVAL_FIELDS:
        lo, hi = _number(row.get(lo_k)), _number(row.get(hi_k))
        if lo is not None and hi is not None:
            return min(lo, hi), max(lo, hi), ("min..max over repeats" if lo_k == "speedup_min" else "interval")
    ratios = [_number(v) for v in (row.get("speedup_ratios") or [])]
    ratios = [v for v in ratios if v is not None]
    if len(ratios) >= 2:
        return min(ratios), max(ratios), "min..max over repeats"
    return None


def _ft(row: dict) -> str:
    """Key suffix of the fine-tuned rows of Calibrated methods (their own GMACs and speed-up, next to the
    calibrated rows, whose keys stay as they were)."""
    return "|fine-tuned" if row.get("structure") == "fine-tuned" else ""


def collect(report_dir: Path) -> dict:
    """The gated quantities of one smoke run, keyed by stable names."""
    out = {"gmacs": {}, "accuracy": {}, "speedup": {}, "speedup_interval": {}}
    for r in _load_table(report_dir, "flops"):
        out["gmacs"][f"{r['model']}|{r['config']}{_ft(r)}"] = r["gmacs"]
    for r in _load_table(report_dir, "accuracy"):
        if r.get("top1") is not None:
            out["accuracy"][f"{r['model']}|{r['config']}|{r['kind']}"] = r["top1"]
    for r in _load_table(report_dir, "segmentation"):
        if r.get("miou") is not None:
            out["accuracy"][f"seg|{r['config']}|{r.get('kind', '')}"] = r["miou"]
    for r in _load_table(report_dir, "throughput"):
        if r["config"] != "none":
            key = f"{r['model']}|{r['config']}{_ft(r)}|{r['precision']}|bs{r['batch_size']}"
            out["speedup"][key] = r["speedup"]
            iv = speedup_interval(r)
            if iv is not None:
                out["speedup_interval"][key] = iv
    return out


def _gmacs_tol(key: str, value: float) -> float:
    """Exact for methods with a fixed token schedule.  A Calibrated method's per-layer counts come
    from its calibration on the smoke backbone: a different CPU's rounding may move a threshold tie
    by a token or two (0.001 G), and 1% still catches a changed formula."""
    try:
        calibrated = registry.is_calibrated(key.split("|")[1])
    except ConfigError:  # a method no longer installed: judged exactly
        calibrated = False
    return 0.01 * value if calibrated else 1e-6


def judge_speedup(cur: float, floor: float, interval=None, noise_limit: float = SPEEDUP_NOISE_LIMIT):
    """``("pass" | "fail" | "noisy", reason)`` for one speed-up against its floor.

    * median >= floor: pass;
    * no interval from the run: fail (the floor alone decides, as before);
    * interval width > ``noise_limit`` x median: noisy ("machine too noisy to judge speed"),
      not a failure: the run cannot tell a regression from load on the machine;
    * the interval's upper end reaches the floor: pass (the shortfall is within the run's spread);
    * otherwise the whole interval lies below the floor: fail."""
    if cur >= floor:
        return "pass", ""
    if interval is None:
        return "fail", f"{cur:.3f}x below the floor {floor:.3f}x"
    lo, hi, kind = interval
    spread = (hi - lo) / cur if cur > 0 else float("inf")
    where = f"median {cur:.3f}x, {kind} {lo:.3f}-{hi:.3f}x"
    if spread > noise_limit:
        return "noisy", (f"machine too noisy to judge speed ({where}: spread {spread:.0%} of the median "
                         f"> {noise_limit:.0%}; floor {floor:.3f}x)")
    if hi >= floor:
        return "pass", f"{where}: below the floor {floor:.3f}x only within the run's spread"
    return "fail", f"{where} entirely below the floor {floor:.3f}x (spread {spread:.0%}, not noise)"


def judge(current: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(problems, notes): regressions, and rows the gate could not judge (noisy speed)."""
    problems, notes = [], []
    tol = expected.get("accuracy_tolerance", ACCURACY_TOLERANCE)
    for k, v in expected.get("gmacs", {}).items():
        cur = current["gmacs"].get(k)
        if cur is None:
            problems.append(f"GMACs {k}: missing from this run (expected {v})")
        elif abs(cur - v) > _gmacs_tol(k, v):
            problems.append(f"GMACs {k}: {cur} != expected {v} (diff {cur - v:+.4f})")
    for k, v in expected.get("accuracy", {}).items():
        cur = current["accuracy"].get(k)
        if cur is None:
            problems.append(f"accuracy {k}: missing from this run (expected >= {v - tol:.2f})")
        elif cur < v - tol:
            problems.append(f"accuracy {k}: {cur:.2f} < {v:.2f} - {tol} (dropped {v - cur:.2f} points)")
    limit = expected.get("speedup_noise_limit", SPEEDUP_NOISE_LIMIT)
    for k, floor in expected.get("speedup_floor", {}).items():
        cur = current["speedup"].get(k)
        if cur is None:
            problems.append(f"speed-up {k}: missing from this run (floor {floor:.3f})")
            continue
        verdict, why = judge_speedup(cur, floor, current.get("speedup_interval", {}).get(k), limit)
        if verdict == "fail":
            problems.append(f"speed-up {k}: {why}")
        elif verdict == "noisy":
            notes.append(f"speed-up {k}: {why}")
    return problems, notes


def check(current: dict, expected: dict) -> list[str]:
    """The regressions of ``current`` against ``expected`` (empty: the gate passes)."""
    return judge(current, expected)[0]


def accept(report_dir: Path, path: Path = EXPECT) -> dict:
    cur = collect(report_dir)
    exp = {
        "about": "CI gate expectations for the smoke profile; rewrite with ./run_all.sh accept and review the diff",
        "accuracy_tolerance": ACCURACY_TOLERANCE,
        "speedup_margin": SPEEDUP_MARGIN,
        "speedup_noise_limit": SPEEDUP_NOISE_LIMIT,
        "gmacs": cur["gmacs"],
        "accuracy": cur["accuracy"],
        "speedup_floor": {k: round(v * SPEEDUP_MARGIN, 3) for k, v in cur["speedup"].items()},
        "accepted_at": env.stamp("cpu"),
    }
    atomic_write_json(path, exp)
    return exp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline.gate")
    p.add_argument("report_dir")
    p.add_argument("--accept", action="store_true", help="rewrite the expectations from this run")
    p.add_argument("--expect", default=str(EXPECT))
    a = p.parse_args(argv)
    rd = Path(a.report_dir)
    if a.accept:
        accept(rd, Path(a.expect))
        print(f"gate: expectations rewritten in {a.expect}; review the diff and commit it")
        return 0
    if not Path(a.expect).exists():
        print(f"gate: no expectations file {a.expect}; create it with ./run_all.sh accept", file=sys.stderr)
        return 1
    expected = json.loads(Path(a.expect).read_text())
    problems, notes = judge(collect(rd), expected)
    n = len(expected.get("gmacs", {})) + len(expected.get("accuracy", {})) + len(expected.get("speedup_floor", {}))
    for nt in notes:
        print("gate: not judged: " + nt)
    if problems:
        print("gate: REGRESSIONS against tests/expectations/smoke.json:")
        for pr in problems:
            print("  - " + pr)
        print("gate: if the change is intended, run `./run_all.sh accept` and commit the rewritten "
              "tests/expectations/smoke.json (a reviewer reads its diff)")
    tail = f", {len(notes)} not judged (machine too noisy to judge speed)" if notes else ""
    print(f"gate: {n - len(problems) - len(notes)} passed, {len(problems)} failed{tail}")
    return 1 if problems else 0


if __name__ == "__main__":
    _rc = main()
    startup.settle()
    sys.exit(_rc)
