"""``pmbench speed``: throughput like timm's benchmark, optionally interleaved vs the baseline."""
from __future__ import annotations

import copy
import sys

import torch

from .. import env, models, patch, registry, speed
from ..cli import emit
from ..reducer import ConfigError
from .common import add_model_args, img_size_of


def add_parser(sub):
    p = sub.add_parser("speed", help="measured throughput (img/s) and speed-up vs the unreduced model")
    add_model_args(p)
    p.add_argument("--batch-size", default="16", help="batch size, or a comma list for a sweep (e.g. 1,16,64)")
    p.add_argument("--precision", choices=["fp32", "amp", "bf16"], default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--vs", choices=["baseline"], default=None,
                   help="also time the unreduced model interleaved and report the speed-up")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2 on CPU, 20 on CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per repeat (default 3 CPU, 50 CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="reducer checkpoint (methods whose structure is learned)")
    p.set_defaults(func=run)


def _batch_sizes(text) -> list[int]:
    try:
        batches = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch-size must be a positive integer or a comma list of them (e.g. 1,16,64), got {text!r}")
    return batches


def run(args):
    batches = _batch_sizes(args.batch_size)  # user errors before any model is built
    red = registry.build(args.reducer)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or env.default_device()
    kw = {"img_size": args.img_size} if args.img_size else {}
    base = models.create(args.model, num_classes=args.num_classes, **kw)
    img = img_size_of(args, base)
    if args.checkpoint and hasattr(red, "load_structure"):
        red.load_structure(args.checkpoint)
    reduced = copy.deepcopy(base) if args.vs else base
    patch.apply(reduced, red, img_size=img)
    label = red.spec()
    runs = []
    for bs in batches:
        cfg = speed.SpeedConfig(batch_size=bs, precision=args.precision, device=device, warmup=args.warmup,
                                iters=args.iters, repeats=args.repeats, channels_last=args.channels_last,
                                compile=args.compile, img_size=img)
        ms = {label: reduced}
        if args.vs:
            ms = {"baseline": base, label: reduced}
        if not args.json:
            print(f"timing {args.model} [{', '.join(ms)}] batch {bs} {args.precision} on {env.device_name(device)} ...",
                  file=sys.stderr)
        res = speed.measure(ms, cfg, baseline="baseline" if args.vs else None)
        res["batch_size"] = bs
        runs.append(res)
    out = {"model": args.model, "reducer": label, "runs": runs, "stamp": runs[0]["stamp"]}
    st = out["stamp"]
    lines = [f"device {st['device']}  torch {st['torch']}  timm {st['timm']}  precision {args.precision} "
             f"({runs[0]['config']['precision_desc']})",
             f"protocol: {runs[0]['config']['protocol']}"]
    for r in runs:
        for k, m in r["models"].items():
            s = f"  bs {r['batch_size']:4d}  {k:28s} {m['img_s']:9.2f} img/s  (min {m['img_s_min']:.2f}, max {m['img_s_max']:.2f})"
            if "speedup" in m:
                s += f"  speed-up {m['speedup']:.3f}x (min {m['speedup_min']:.3f}, max {m['speedup_max']:.3f})"
            lines.append(s)
    emit(out, args.json, "\n".join(lines))
    return 0
