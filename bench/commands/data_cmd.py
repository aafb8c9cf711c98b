"""``pmbench data``: generate the proxy set, describe a data spec, build the validation cache."""
from __future__ import annotations

from pathlib import Path

from bench.cli import emit
from bench.runtime import data as data_mod


def add_parser(sub):
    p = sub.add_parser("data", help="proxy data generation and data-set checks")
    s = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    g = s.add_parser("proxy", help="generate the synthetic proxy classification set (ImageNet layout)")
    g.add_argument("--out", default=None, help="output folder (default: the cache, <repo>/.cache/proxy/...)")
    g.add_argument("--size", default="default", help="default | smoke")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=run_proxy)
    d = s.add_parser("info", help="check a data spec's layout and count its images")
    d.add_argument("data", help="proxy | proxy:smoke | imagenet:PATH")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=run_info)
    c = s.add_parser("cache", help="build the memory-mapped decoded validation cache")
    c.add_argument("data")
    c.add_argument("--img-size", type=int, default=None)
    c.add_argument("--crop-pct", type=float, default=0.875)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_cache)


def run_proxy(args):
    from bench.runtime import proxy
    from bench.runtime.outputs import check_out_dir
    from bench.core.reducer import ConfigError

    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.size not in proxy.SIZES:
        raise ConfigError(f"unknown proxy size '{args.size}'; available: {', '.join(proxy.SIZES)}")
    # before any work: a file, or a folder holding anything but an earlier proxy set, is refused
    check_out_dir(Path(args.out) if args.out else None, "--out", manifest=proxy.MANIFEST)
    root = proxy.ensure_proxy_data(Path(args.out) if args.out else None, size=args.size, seed=args.seed)
    spec = "proxy" if args.size == "default" else f"proxy:{args.size}"
    cls, train = data_mod.scan_split(root, "train")
    _, val = data_mod.scan_split(root, "val")
    out = {"path": str(root), "spec": spec, "num_classes": len(cls), "n_train": len(train), "n_val": len(val),
           "classes": cls, "seed": args.seed}
    emit(out, args.json, f"proxy data in {root}: {len(cls)} classes, {len(train)} train / {len(val)} val images")
    return 0


def run_info(args):
    out = data_mod.describe_data(args.data)
    emit(out, args.json, "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def run_cache(args):
    from bench.runtime.outputs import finite, positive

    positive(args.img_size, "--img-size")
    finite(args.crop_pct, "--crop-pct", low=0.0, low_open=True)
    ds = data_mod.build_dataset(args.data, "val", img_size=args.img_size, crop_pct=args.crop_pct, cache=True)
    path = getattr(ds, "path", None)
    emit({"data": args.data, "n_images": len(ds), "cache": str(path)}, args.json,
         f"validation cache of {len(ds)} images: {path}")
    return 0
