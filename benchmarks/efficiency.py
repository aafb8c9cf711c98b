"""Speed-up / MAC-ratio of every configuration at one model size (issue 14's DeiT-T target).

Not a unit test: it times real models for minutes.  Every configuration of ``bench.pipeline.profiles.PAPER_CONFIGS``
is timed interleaved with the unreduced model by the suite's protocol (``bench.runtime.speed.measure``:
iterations calibrated to ``--min-time`` s per timing, ``--repeats`` rounds, each row timed right between
two baseline timings (``--pair-every 1``), bootstrap interval) and compared with its analytic MAC ratio::

    python benchmarks/efficiency.py                        # DeiT-T, batch 8, target 0.85
    python benchmarks/efficiency.py --model deit_small_patch16_224 --json out.json
    python benchmarks/efficiency.py --configs tome:r=16 --with-tracking   # with vs without the bookkeeping

Prints one table; exits 1 if a configuration's efficiency (speed-up / MAC ratio) is below
``--target``.  To measure another checkout of the reducers with the same protocol, put it first on
``PYTHONPATH`` (``docs/speed.md``: before/after).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from bench.core import flops, patch, registry
from bench.core.reducer import ModelInfo
from bench.pipeline import profiles
from bench.runtime import models, speed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--configs", default=None, help="comma list of specs (default: the paper configurations)")
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--extra-repeats", type=int, default=6,
                   help="more paired rounds for rows still noisy (as the default profile)")
    p.add_argument("--refill-repeats", type=int, default=3,
                   help="then more paired rounds for rows left with fewer clean pairs than --repeats")
    p.add_argument("--pair-every", type=int, default=1, help="baseline timed around every this many rows (0: per round)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--with-tracking", action="store_true",
                   help="also time every configuration with grid tracking on (the bookkeeping that dense "
                        "prediction asks for, which inference skips: docs/speed.md, section 6), interleaved "
                        "in the same process: a before/after of skipping it")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = a.configs.split(";") if a.configs and ";" in a.configs else \
        (a.configs.split(",") if a.configs else [c for c in profiles.PAPER_CONFIGS if c != "none"])
    torch.manual_seed(0)
    base = models.create(a.model).eval()
    info = ModelInfo.from_model(base)
    g0 = flops.analytic(info, registry.build("none")).gmacs
    ms, mac = {"none": base}, {}
    for s in configs:
        red = registry.build(s)
        m = copy.deepcopy(base)
        patch.apply(m, red)
        ms[s] = m
        mac[s] = g0 / flops.analytic(info, red).gmacs
    if a.with_tracking:
        for s in configs:
            m = copy.deepcopy(ms[s])
            patch.set_tracking(m, True)
            ms[f"{s} [tracking]"], mac[f"{s} [tracking]"] = m, mac[s]
    cfg = speed.SpeedConfig(batch_size=a.batch_size, min_time=a.min_time, repeats=a.repeats,
                            extra_repeats=a.extra_repeats, refill_repeats=a.refill_repeats,
                            pair_every=a.pair_every or None,
                            img_size=tuple(base.patch_embed.img_size))
    res = speed.measure(ms, cfg, baseline="none",
                        progress=lambda i, n: print(f"  repeat {i}/{n}", file=sys.stderr, flush=True))
    rows = []
    for s in [k for k in ms if k != "none"]:
        m = res["models"][s]
        rows.append({"config": s, "speedup": m["speedup"], "ci_low": m["speedup_ci_low"], "ci_high": m["speedup_ci_high"],
                     "noisy": m["noisy"], "mac_ratio": mac[s], "efficiency": m["speedup"] / mac[s],
                     "iters": m["iters"], "contended": m.get("contended_pairs", 0),
                     "unsteady": m.get("unsteady_pairs", 0)})
    st = res["stamp"]
    print(f"{a.model} batch {a.batch_size} on {st['device']} (torch {st['torch']}, commit {st['commit']}); "
          f"baseline {res['models']['none']['img_s']:.2f} img/s")
    print(f"protocol: {res['config']['protocol']}")
    h = res["host_load"]
    line = speed.host_load_line(h)
    if line:
        print(line)
    print(f"| {'config':31s} | speed-up | 95% CI        | MAC ratio | speed-up / MAC | noisy | contended pairs | unsteady pairs |")
    print(f"|{'-' * 33}|---------:|:--------------|----------:|---------------:|:------|----------------:|---------------:|")
    for r in rows:
        print(f"| {r['config']:31s} | {r['speedup']:8.3f} | {r['ci_low']:.3f}-{r['ci_high']:.3f} | "
              f"{r['mac_ratio']:9.3f} | {r['efficiency']:14.3f} | {'yes' if r['noisy'] else 'no':5s} | "
              f"{r['contended']:15d} | {r['unsteady']:14d} |")
    bad = [r["config"] for r in rows if r["config"] in configs and r["efficiency"] < a.target]  # inference rows
    if a.json:
        Path(a.json).write_text(json.dumps({"stamp": st, "config": res["config"], "rows": rows, "host_load": h,
                                            "baseline_img_s": res["models"]["none"]["img_s"]}, indent=2))
    print(f"efficiency >= {a.target}: " + ("all configurations" if not bad else f"NOT MET by {', '.join(bad)}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
