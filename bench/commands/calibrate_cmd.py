"""``pmbench calibrate``: learn a calibrated method's structure on training batches and save a checkpoint.

Any reducer with the :class:`bench.core.reducer.Calibrated` capability, built-in or a plug-in, by its spec.
It runs alone or as every rank of a torchrun job (the pipeline's ``--launcher torchrun``): each rank
scores its shard of the shuffled batches and the method combines its statistics over the ranks
(``Calibrated.calibrate``'s contract); rank 0 writes the checkpoint.  A method may also ship its own,
richer command (Prune and Merge: ``pmbench pm-calibrate`` with the official options).
"""
from __future__ import annotations

import sys

import torch

from bench.cli import emit
from bench.commands.common import calibration_inputs
from bench.core import patch, registry
from bench.core.errors import ConfigError
from bench.runtime import distributed as bd, preprocess as pp
from bench.runtime.calibration import calibrate_and_save
from bench.runtime.data import LABEL_MODES
from bench.runtime.outputs import check_out_file, positive


def add_parser(sub):
    p = sub.add_parser("calibrate", help="learn a calibrated method's structure (e.g. PM) on training batches "
                                         "-> checkpoint (runs under torchrun)")
    p.add_argument("--reducer", required=True, help="spec of a method with a learned structure, e.g. pm:keep=0.6")
    p.add_argument("--model", default=None, help="timm model name (default: the --init checkpoint's)")
    p.add_argument("--init", default=None, help="pmbench checkpoint with the weights to calibrate")
    p.add_argument("--weights", default=None, help="a state_dict file (.pth/.pt/.safetensors) with the weights")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs the hub or its cache)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--data", default="proxy", help="data spec: proxy, proxy:smoke, imagenet:PATH (default: %(default)s)")
    pp.add_arguments(p)
    p.add_argument("--labels", default="auto", choices=LABEL_MODES, help="label indices (see `pmbench eval --help`)")
    p.add_argument("--split", default="train", help="split scored (default: %(default)s)")
    p.add_argument("--iters", type=int, default=None, help="calibration batches (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of each rank (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled calibration order")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _calibrated_reducer(spec: str):
    red = registry.build(spec)
    if not registry.is_calibrated(red):
        have = [n for n in registry.available() if registry.is_calibrated(n)]
        raise ConfigError(f"'{red.name}' has no learned structure to calibrate (it is not a Calibrated method); "
                          f"calibrated methods here: {', '.join(have) or 'none'}")
    return red


def run(args):
    for flag, dest in (("--iters", "iters"), ("--batch-size", "batch_size"), ("--num-classes", "num_classes"),
                       ("--img-size", "img_size")):
        positive(getattr(args, dest), flag)
    check_out_file(args.out, "--out")
    pp.merge_size_flags(args)
    red = _calibrated_reducer(args.reducer)
    c = calibration_inputs(args, "calibrate")
    model, rank, world = c.model, c.rank, c.world
    torch.manual_seed(0)  # reducer modules start from a seeded init, as in the pipeline
    patch.apply(model, red, img_size=(c.prep.img_size, c.prep.img_size))
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.iters or len(c.loader), desc=f"calibrate {red.spec()}", unit="batch", file=sys.stderr,
                   mininterval=2.0, dynamic_ncols=True)

    def progress(it, *_):
        if bar is not None:
            bar.update(it - bar.n)

    try:
        summ = calibrate_and_save(model, red, c.loader, iters=args.iters, device=c.device, out=args.out,
                                  model_name=c.model_name, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        res = {"model": c.model_name, "data": args.data, "spec": red.spec(), "reducer_full": red.full_spec(),
               "world_size": world, "per_layer": summ.get("per_layer"), "sum_tokens": summ.get("sum_tokens"),
               "out": str(args.out)}
        lines = [f"calibrated {red.spec()} on {c.model_name} ({world} rank(s)); wrote {args.out}"]
        if summ.get("per_layer"):
            lines.insert(1, "  tokens per block: " + " ".join(str(r["tokens"]) for r in summ["per_layer"]))
        emit(res, args.json, "\n".join(lines))
    bd.cleanup()
    return 0
