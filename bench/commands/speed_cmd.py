"""``pmbench speed``: throughput like timm's benchmark, optionally interleaved vs the baseline."""
from __future__ import annotations

import copy
import sys

import torch

from bench.cli import emit
from bench.commands.common import add_model_args, img_size_of
from bench.core import patch, registry
from bench.core.reducer import Calibrated, ConfigError
from bench.runtime import env, models, speed
from bench.runtime.checkpoint import load_structure


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
    p.add_argument("--timm-baselines", default=None, metavar="LIST",
                   help="with --vs baseline, also time the unreduced model as plain timm baselines: "
                        "compile, channels_last or both (comma list); eager baseline stays the reference")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--iters", type=int, default=None,
                   help="fixed timed iterations per timing (default: calibrated to --min-time)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timing the iteration count is calibrated to (default 1.0 CPU, 0.2 CUDA)")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved repeats; the median and a bootstrap interval are reported (default 5)")
    p.add_argument("--extra-repeats", type=int, default=0,
                   help="with --vs: up to this many more paired rounds while the speed-up's interval is "
                        "wider than +-5%% (default 0)")
    p.add_argument("--refill-repeats", type=int, default=0,
                   help="with --vs: then up to this many more paired rounds while fewer than --repeats pairs are "
                        "clean (contended or unsteady pairs left out; default 0)")
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


def _timm_baselines(text) -> list[str]:
    if not text:
        return []
    out = [t.strip().replace("-", "_") for t in str(text).split(",") if t.strip()]
    bad = [t for t in out if t not in ("compile", "channels_last")]
    if bad:
        raise ConfigError(f"--timm-baselines takes compile and/or channels_last, got {', '.join(bad)}")
    return out


def run(args):
    batches = _batch_sizes(args.batch_size)  # user errors before any model is built
    extra = _timm_baselines(args.timm_baselines)
    if extra and not args.vs:
        raise ConfigError("--timm-baselines needs --vs baseline (they are compared with the eager unreduced model)")
    if args.min_time is not None and args.min_time <= 0:
        raise ConfigError(f"--min-time must be > 0 seconds, got {args.min_time}")
    if args.extra_repeats < 0:
        raise ConfigError(f"--extra-repeats must be >= 0, got {args.extra_repeats}")
    if args.refill_repeats < 0:
        raise ConfigError(f"--refill-repeats must be >= 0, got {args.refill_repeats}")
    red = registry.build(args.reducer)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or env.default_device()
    kw = {"img_size": args.img_size} if args.img_size else {}
    base = models.create(args.model, num_classes=args.num_classes, **kw)
    img = img_size_of(args, base)
    if args.checkpoint and isinstance(red, Calibrated):
        load_structure(red, args.checkpoint)
    reduced = copy.deepcopy(base) if args.vs else base
    patch.apply(reduced, red, img_size=img)
    label = red.spec()
    runs = []
    for bs in batches:
        cfg = speed.SpeedConfig(batch_size=bs, precision=args.precision, device=device, warmup=args.warmup,
                                iters=args.iters, min_time=args.min_time, repeats=args.repeats,
                                extra_repeats=args.extra_repeats, refill_repeats=args.refill_repeats,
                                channels_last=args.channels_last,
                                compile=args.compile, img_size=img)
        ms, variants = {label: reduced}, {}
        if args.vs:
            ms = {"baseline": base, label: reduced}
            for v in extra:  # the unreduced model as a plain timm baseline, on its own copy
                name = f"baseline [{v.replace('_', '-')}]"
                ms[name] = copy.deepcopy(base)
                variants[name] = {v: True}
        if not args.json:
            print(f"timing {args.model} [{', '.join(ms)}] batch {bs} {args.precision} on {env.device_name(device)} ...",
                  file=sys.stderr)
        res = speed.measure(ms, cfg, baseline="baseline" if args.vs else None, variants=variants)
        res["batch_size"] = bs
        runs.append(res)
    out = {"model": args.model, "reducer": label, "runs": runs, "stamp": runs[0]["stamp"]}
    st = out["stamp"]
    lines = [f"device {st['device']}  torch {st['torch']}  timm {st['timm']}  precision {args.precision} "
             f"({runs[0]['config']['precision_desc']})",
             f"protocol: {runs[0]['config']['protocol']}"]
    for r in runs:
        line = speed.host_load_line(r.get("host_load") or {})
        if line:
            lines.append(f"bs {r['batch_size']}: {line}")
    for r in runs:
        for k, m in r["models"].items():
            s = (f"  bs {r['batch_size']:4d}  {k:28s} {m['img_s']:9.2f} img/s  (min {m['img_s_min']:.2f}, "
                 f"max {m['img_s_max']:.2f}; {m['iters']} it/timing; attention {m.get('attn_kernel', '?')})")
            if "speedup" in m:
                s += (f"  speed-up {m['speedup']:.3f}x [95% CI {m['speedup_ci_low']:.3f}-{m['speedup_ci_high']:.3f}]"
                      + ("  NOISY" if m["noisy"] else "")
                      + _left_out(m))
            lines.append(s)
        for k, why in r.get("failed", {}).items():
            lines.append(f"  bs {r['batch_size']:4d}  {k:28s} not measured: {why}")
    emit(out, args.json, "\n".join(lines))
    return 0


def _left_out(m: dict) -> str:
    """The pairs the protocol left out of a row (contended, unsteady), or kept for want of clean ones."""
    why = [f"{m[k]} {label}" for k, label in (("contended_pairs", "contended"), ("unsteady_pairs", "unsteady"))
           if m.get(k)]
    if not why:
        return ""
    return f"  (pairs {'kept although' if m.get('kept_unclean') else 'left out:'} {', '.join(why)})"
