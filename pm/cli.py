"""``pmbench pm-calibrate``: score, search the structure, write a PM checkpoint.

    pmbench pm-calibrate --model M --data D --keep 0.6 --prune 0.1 [--iters N] [--batch-size B]
                         [--init CKPT | --weights PATH] --out X [--json]

The checkpoint holds the weights, the freshly initialised M/R matrices, the
structure (per-layer centres, pruned masks, scores) and the spec, so
``pmbench train --reducer pm --init X`` and ``pmbench eval --reducer pm
--checkpoint X`` rebuild the model without re-calibrating.  Works under
``torchrun`` (scores are all-reduced; rank 0 writes).
"""
from __future__ import annotations

import sys

from bench.runtime import preprocess as pp
from bench.runtime.data import LABEL_MODES


def add_parser(sub):
    p = sub.add_parser("pm-calibrate", help="Prune and Merge: gradient-weighted scores -> per-layer structure -> checkpoint")
    p.add_argument("--model", default=None, help="timm model name (default: the --init checkpoint's)")
    p.add_argument("--data", default="proxy", help="data spec: proxy, proxy:smoke, imagenet:PATH (default: %(default)s)")
    p.add_argument("--reducer", default="pm", help="PM spec with ablation options, e.g. pm:score=cls_attn (default: pm)")
    p.add_argument("--keep", type=float, default=None, help="centre fraction (overrides the spec; default 0.6)")
    p.add_argument("--prune", type=float, default=None, help="pruned fraction (overrides the spec; default 0.1)")
    p.add_argument("--iters", type=int, default=None,
                   help="calibration iterations (official: 250 x 256 images; default: the whole split or --max-images)")
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split", default="train", help="split scored (official: train)")
    p.add_argument("--train-aug", action="store_true",
                   help="score augmented training images as the official code does (default: eval transform, deterministic)")
    p.add_argument("--opt-step", action="store_true",
                   help="take the official AdamW lr 1e-6 steps while scoring (default: weights untouched)")
    p.add_argument("--init", default=None, help="pmbench checkpoint with the weights to compress")
    p.add_argument("--weights", default=None, help="a state_dict file (.pth/.pt/.safetensors) with the weights")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs the hub or its cache)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    pp.add_arguments(p)
    p.add_argument("--labels", default="auto", choices=LABEL_MODES,
                   help="label indices: auto (ImageNet synset folders in canonical order for a 1000-class "
                        "model, else sorted folders), imagenet-1k or folders")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled calibration order")
    p.add_argument("--eval", action="store_true", help="also report val top-1 before and after compression")
    p.add_argument("--eval-images", type=int, default=None, help="limit the evaluation to this many val images")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- helpers
def top1(model, loader, device) -> float:
    from bench.runtime.evaluate import evaluate

    return round(float(evaluate(model, loader, device)["top1"]), 3)


def save(path, model, reducer, model_name: str, meta: dict) -> None:
    """A bench.runtime.checkpoint checkpoint (weights, model name, spec, reducer_state) + the calibration summary."""
    from bench.runtime.checkpoint import save_checkpoint

    if model_name and not getattr(model, "pmbench_name", None):
        model.pmbench_name = model_name
    save_checkpoint(path, model, extra={"pm_calibration": meta})


# --------------------------------------------------------------------------- command
def check_args(args) -> None:
    """Counts >= 1 and a writable --out file, before any data, model or compute."""
    from bench.runtime.outputs import check_out_file, positive

    for flag, dest in (("--iters", "iters"), ("--max-images", "max_images"), ("--batch-size", "batch_size"),
                       ("--num-classes", "num_classes"), ("--img-size", "img_size"),
                       ("--eval-images", "eval_images")):
        positive(getattr(args, dest), flag)
    check_out_file(args.out, "--out")


def _reducer_from_args(args):
    """The PM reducer of ``--reducer`` with ``--keep`` / ``--prune`` applied."""
    from bench.core import registry
    from bench.core.reducer import ConfigError

    name, opts = registry.parse_spec(args.reducer)
    if name != "pm":
        raise ConfigError(f"pm-calibrate calibrates Prune and Merge; got reducer '{name}'")
    if args.keep is not None:
        opts["keep"] = str(args.keep)
    if args.prune is not None:
        opts["prune"] = str(args.prune)
    return registry.get("pm")(**opts)


def _summary_text(res: dict, summ: dict, model_name, reducer, world: int, out) -> str:
    """The human-readable report of one calibration (the structure per layer, GMACs, accuracies)."""
    lines = [f"PM structure for {model_name} ({reducer.spec()}), {summ['calibration']['images']} images x "
             f"{world} rank(s), score {summ['calibration']['score']}",
             "  layer  tokens  centres  merged  pruned"]
    for r in summ["per_layer"]:
        lines.append(f"  {r['layer']:5d}  {r['tokens']:6d}  {r['centers']:7d}  {r['merged']:6d}  {r['pruned']:6d}")
    lines.append(f"  sum of tokens over compressed layers: {summ['sum_tokens']}")
    lines.append(f"  PM-code GMACs {res['flops']['pm_code_formula_gmacs']} (baseline "
                 f"{res['flops']['pm_code_formula_baseline_gmacs']})")
    for k in ("top1_unreduced", "top1_pm_before_finetune"):
        if k in res:
            lines.append(f"  {k}: {res[k]}")
    lines.append(f"wrote {out}")
    return "\n".join(lines)


def run(args):
    check_args(args)
    pp.merge_size_flags(args)
    from bench.runtime import distributed as bd
    from bench.core import patch
    from bench.cli import emit
    from bench.commands.common import calibration_inputs
    from bench.runtime.data import build_loader

    from .calibrate import ScoringOptions, calibrate

    reducer = _reducer_from_args(args)
    c = calibration_inputs(args, "pm-calibrate", train_aug=args.train_aug)
    model, model_name, device, rank, world = c.model, c.model_name, c.device, c.rank, c.world
    prep, labels, loader = c.prep, c.labels, c.loader
    res: dict = {"model": model_name, "data": args.data, "spec": reducer.spec(), "reducer_full": reducer.full_spec(),
                 "preprocess": prep.as_dict(), "labels": labels.kind, "world_size": world}
    val = None
    if args.eval:
        val = build_loader(args.data, "val", args.batch_size, prep=prep, labels=labels, max_images=args.eval_images,
                           distributed=world > 1)
        res["top1_unreduced"] = top1(model, val, device)

    bar = None
    if rank == 0 and not args.no_progress:  # on stderr, also with --json
        from tqdm import tqdm

        bar = tqdm(total=args.iters or (args.max_images and -(-args.max_images // args.batch_size)) or len(loader),
                   desc="pm-calibrate", unit="batch", file=sys.stderr, mininterval=2.0, dynamic_ncols=True)

    def progress(it, n, secs):
        if bar is not None:
            bar.update(it - bar.n)
            bar.set_postfix(images=n, refresh=False)

    max_images = max(1, args.max_images // world) if args.max_images is not None else None
    try:
        summ = calibrate(model, reducer, loader, ScoringOptions(iters=args.iters, max_images=max_images,
                                                                opt_step=args.opt_step, device=device,
                                                                progress=progress))
    finally:
        if bar is not None:
            bar.close()
    res.update(summ)
    info = patch.get_context(model).info
    res["flops"] = reducer.flops_report(info)
    if args.eval:
        res["top1_pm_before_finetune"] = top1(model, val, device)
    if rank == 0:
        save(args.out, model, reducer, model_name, {k: v for k, v in res.items() if k != "flops"})
        res["out"] = str(args.out)
        emit(res, args.json, _summary_text(res, summ, model_name, reducer, world, args.out))
    bd.cleanup()
    return 0
