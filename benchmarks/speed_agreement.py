"""Do two back-to-back runs of the default profile's speed stage agree?  (issue 14)

Not a unit test: it runs ``./run_all.sh --profile default --only speed --force`` twice, each in a
fresh process with its own result cache and report folder, then compares every row of the chosen
models (default DeiT-S and DeiT-B) between the two runs: speed-ups must agree within ``--tolerance``
(5%, relative to their mean).  Prints one table (and each run's wall time); exits 1 on any
disagreement, 2 if a run failed.

    python benchmarks/speed_agreement.py                         # ~2 x the speed stage's time
    python benchmarks/speed_agreement.py --reuse DIR1 DIR2       # compare two existing report folders
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(out: Path, profile: str) -> float:
    env = {**os.environ, "PMBENCH_CACHE": str(out / "cache")}
    t0 = time.time()
    cmd = [sys.executable, "-m", "bench.orchestrate", "--profile", profile, "--only", "speed", "--force",
           "--out", str(out / "reports")]
    print(f"[agreement] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"speed stage failed (exit {rc})")
    return time.time() - t0


def load_rows(report_dir: Path) -> dict:
    rows = json.loads((report_dir / "throughput.json").read_text())["rows"]
    # structure separates a calibrated method's rows (its calibrated and its fine-tuned learned modules)
    return {(r["model"], r["config"], r.get("structure") or "-", r.get("variant", "eager"), r["precision"],
             r["batch_size"]): r for r in rows}


def compare(a: dict, b: dict, models: list[str], tol: float) -> tuple[list[dict], list[str]]:
    out, bad = [], []
    for key in sorted(set(a) | set(b)):
        if key[0] not in models:
            continue
        ra, rb = a.get(key), b.get(key)
        name = "|".join(str(k) for k in key)
        if ra is None or rb is None or ra.get("speedup") is None or rb.get("speedup") is None:
            bad.append(f"{name}: measured in one run only")
            continue
        s1, s2 = ra["speedup"], rb["speedup"]
        diff = abs(s1 - s2) / ((s1 + s2) / 2)
        row = {"row": name, "run1": s1, "run2": s2, "diff_pct": 100 * diff, "noisy": bool(ra.get("noisy") or rb.get("noisy")),
               "contended": [ra.get("contended"), rb.get("contended")],
               "unsteady": [ra.get("unsteady"), rb.get("unsteady")],
               "host_load_max_pct": [ra.get("host_load_max_pct"), rb.get("host_load_max_pct")], "ok": diff <= tol}
        out.append(row)
        if not row["ok"]:
            bad.append(f"{name}: {s1:.3f} vs {s2:.3f} ({100 * diff:.1f}% apart)")
    return out, bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--models", default="DeiT-S,DeiT-B", help="rows of these models are compared")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--work", default=None, help="folder for the two runs (default: a temporary folder)")
    p.add_argument("--reuse", nargs=2, default=None, metavar="REPORT_DIR", help="compare two existing report folders")
    p.add_argument("--json", default=None, help="write the comparison here")
    a = p.parse_args(argv)
    walls = []
    if a.reuse:
        dirs = [Path(d) for d in a.reuse]
    else:
        work = Path(a.work or tempfile.mkdtemp(prefix="pmb-agreement-"))
        dirs = []
        for i in (1, 2):
            d = work / f"run{i}"
            try:
                walls.append(run_stage(d, a.profile))
            except SystemExit as e:
                print(f"[agreement] {e}", file=sys.stderr)
                return 2
            dirs.append(d / "reports")
    rows, bad = compare(load_rows(dirs[0]), load_rows(dirs[1]), a.models.split(","), a.tolerance)
    if walls:
        print(f"speed stage wall time: run 1 {walls[0]:.0f} s, run 2 {walls[1]:.0f} s")
    print(f"| {'row (model|config|structure|variant|precision|batch)':58s} | run 1 | run 2 | diff % | noisy "
          f"| left out: contended | unsteady | agree |")
    print(f"|{'-' * 60}|------:|------:|-------:|:------|:---------|:---------|:------|")
    for r in rows:
        left, shaky = ("/".join("-" if c is None else str(c) for c in r[k]) for k in ("contended", "unsteady"))
        print(f"| {r['row']:58s} | {r['run1']:.3f} | {r['run2']:.3f} | {r['diff_pct']:6.1f} | "
              f"{'yes' if r['noisy'] else 'no':5s} | {left:9s} | {shaky:9s} | {'yes' if r['ok'] else 'NO':5s} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "disagree": bad, "wall_s": walls, "dirs": [str(d) for d in dirs]},
                                           indent=2))
    if bad:
        print(f"{len(bad)} of {len(rows)} rows disagree by more than {100 * a.tolerance:g}%:")
        for b in bad:
            print("  - " + b)
        return 1
    print(f"all {len(rows)} rows agree within {100 * a.tolerance:g}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
