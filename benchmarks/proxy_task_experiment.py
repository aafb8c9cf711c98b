"""Does the proxy's off-the-shelf ranking of methods depend on its task?  (issue 13, docs/proxy.md)

Not a unit test: it generates a proxy set, trains a backbone and evaluates for about 10-12 minutes on 2
CPU cores.  For one proxy task (``bench.runtime.proxy.TASKS``) it runs, in a cache of its own:

1. the task's data set (``PMBENCH_PROXY_TASK``; the default profile's sizes: 8000 train / 1000 val);
2. the proxy backbone, trained by the suite's trainer with the default recipe (deep supervision at blocks
   3/6/9 included; ``--deep-supervision ''`` trains without, as the experiments before 2026-12-01 did) but
   ``--epochs`` epochs (2 by default, which is quick but not converged: on ``largest-hue`` the 2- and 6-epoch
   backbones ranked the methods the same way, on ``medium-object`` they did not, docs/proxy.md);
3. the accuracy stage for the unreduced model and the four configurations the real-model check covers
   (ToMe r=13, MSTM 0.7, EViT 0.7, PM 0.6 calibrated), off-the-shelf, and with ``--finetune`` also PM 0.6
   fine-tuned for ``--finetune-steps`` steps (the default profile's 40);

and prints each drop with its paired 95% interval next to the real ViT-Ti/16's, and the accuracy table's
verdict on the orders (``proxy_ranking.ranking_note``).  The report folder (``--out``) holds the usual
accuracy tables, whose headers name the task::

    python benchmarks/proxy_task_experiment.py --task object-hue --epochs 6 --finetune  # the shipped backbone's recipe, ~20 min
    python benchmarks/proxy_task_experiment.py --task small-object            # ~10 min
    python benchmarks/proxy_task_experiment.py --task small-object --finetune
    python benchmarks/proxy_task_experiment.py --task medium-object --finetune  # width 96, 3 heads, ~13 min
    python benchmarks/proxy_task_experiment.py --task medium-object --epochs 6 --finetune  # converged, ~36 min
    python benchmarks/proxy_task_experiment.py --task largest-hue --epochs 6 --deep-supervision ''  # the old default, ~25 min
    python benchmarks/proxy_task_experiment.py --task object-shape --epochs 6 --finetune  # the outline decides, ~22 min
    python benchmarks/proxy_task_experiment.py --task small-clutter --epochs 6 --finetune  # busy background, ~15 min
    python benchmarks/proxy_task_experiment.py --task wide-clutter --epochs 6 --finetune   # the same, width 96, ~24 min
    python benchmarks/proxy_task_experiment.py --task wide-tiny-clutter --epochs 6 --finetune  # 10-18 px, width 96
    python benchmarks/proxy_task_experiment.py --task wide-mid-clutter --epochs 6 --finetune  # 12-20 px, width 96
    python benchmarks/proxy_task_experiment.py --task centred-object --epochs 6 --finetune  # centred object, ~14 min
    python benchmarks/proxy_task_experiment.py --task centred-clutter --epochs 6 --finetune  # on the busy background
    python benchmarks/proxy_task_experiment.py --task loosely-centred-object --epochs 6 --finetune  # a wider spread
    python benchmarks/proxy_task_experiment.py --task grey-object --epochs 6 --finetune  # a grey scene, ~16 min
    python benchmarks/proxy_task_experiment.py --task object-texture --epochs 6 --finetune  # texture decides, ~15 min
    python benchmarks/proxy_task_experiment.py --task large-texture --epochs 6 --finetune  # 40-60 px, ~20 min
    python benchmarks/proxy_task_experiment.py --task object-hue --epochs 6 --finetune --deep-supervision 6,9 --cache .cache/experiments/object-hue-ds69
    python benchmarks/proxy_task_experiment.py --task object-hue --epochs 3 --finetune --cache .cache/experiments/object-hue-3ep
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ["tome:r=13", "mstm:keep=0.7", "evit:keep=0.7", "pm:keep=0.6"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="object-hue", help="proxy task (bench.runtime.proxy.TASKS)")
    p.add_argument("--epochs", type=float, default=2.0, help="backbone training epochs (default: %(default)s)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune PM keep 0.6")
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--deep-supervision", default=None,
                   help="blocks for deep supervision, e.g. 3,6,9 ('' for none; default: the recipe's)")
    p.add_argument("--cache", default=None, help="cache folder (default: .cache/experiments/<task>)")
    p.add_argument("--out", default=None, help="report folder (default: <cache>/report)")
    a = p.parse_args(argv)
    cache = Path(a.cache or ROOT / ".cache" / "experiments" / a.task)
    out = Path(a.out or cache / "report")
    # before bench.runtime.proxy is imported: the task is read once, at import, by this process and its children
    os.environ["PMBENCH_PROXY_TASK"] = a.task
    os.environ["PMBENCH_CACHE"] = str(cache)
    sys.path.insert(0, str(ROOT))
    from bench import orchestrate
    from bench.runtime import proxy
    from bench.runtime.proxy_ranking import REAL_REFERENCE, ranking_note

    proxy.check_task()
    # the default recipe with this run's epoch count: train_command and backbone_path follow SIZES
    ds = proxy.SIZES["default"].deep_supervision if a.deep_supervision is None else \
        tuple(int(b) for b in a.deep_supervision.split(",") if b.strip())
    proxy.SIZES["default"] = dataclasses.replace(proxy.SIZES["default"], epochs=a.epochs, deep_supervision=ds)
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "experiment.json"
        prof.write_text(json.dumps({"accuracy_configs": ["none", *REFERENCE],
                                    "finetune_configs": ["pm:keep=0.6"] if a.finetune else [],
                                    "finetune_max_steps": a.finetune_steps}))
        # one process: the recipe above is patched into this process's SIZES, which job workers (fresh
        # processes) would not see, so they would train and measure the default recipe's backbone instead
        rc = orchestrate.main(["--profile", "default", "--only", "accuracy", "--profile-file", str(prof),
                               "--out", str(out), "--job-workers", "1"])
    if rc != 0:
        return rc
    rows = json.loads((out / "accuracy.json").read_text())["rows"]
    base = next(r for r in rows if r["config"] == "none")
    print(f"\ntask {a.task}, backbone {a.epochs:g} epochs: unreduced top-1 {base['top1']:.1f}% "
          f"on {base['n_images']} proxy val images")
    print("| configuration | kind | drop [95% CI] | real ViT-Ti/16, off-the-shelf |\n|---|---|---|---|")
    for r in rows:
        if r["config"] != "none":
            real = REAL_REFERENCE.get(r["config"]) if r["kind"] == "off-the-shelf" else None
            print(f"| {r['config']} | {r['kind']} | {r['drop']:+.1f} {r['drop_ci95']} | "
                  f"{'n/a' if real is None else f'{real:+.1f}'} |")
    print(ranking_note(rows))
    print(f"tables: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
