"""``pmbench eval``: top-1 / top-5 of a model + reducer on proxy or real validation data.

Weights: ``--checkpoint`` (a pmbench checkpoint; its stored reducer is used unless
``--reducer`` is given), ``--weights FILE`` / ``--pretrained`` (timm/DeiT weights), or,
for ``pmbench_proxy_vit``, the cached proxy backbone (trained on first use).
Input preprocessing comes from the model (:mod:`bench.runtime.preprocess`); labels from the
folders (:func:`bench.runtime.data.resolve_labels`: ImageNet synsets in canonical order).
Reports GMACs of the evaluated configuration (bench.core.flops.analytic), the resolved
preprocessing and reducer spec, device, data source and a provenance stamp.
Works under torchrun (each sample counted once).
"""
from __future__ import annotations

import csv
import os

from bench.cli import emit
from bench.core import flops, patch, registry
from bench.core.reducer import ConfigError, ModelInfo
from bench.runtime import data as data_mod, distributed as dist, env, models, preprocess as pp, proxy_backbone
from bench.runtime.evaluate import evaluate
from bench.runtime.outputs import check_out_file, positive, temp_file


def add_parser(sub):
    p = sub.add_parser("eval", help="accuracy (top-1/top-5) of a model + reducer")
    p.add_argument("--model", default="pmbench_proxy_vit", help="timm model name (default: %(default)s)")
    p.add_argument("--reducer", default=None, help="reducer spec (default: the checkpoint's, else none)")
    p.add_argument("--data", default="proxy", help="proxy | proxy:smoke | imagenet:PATH (default: proxy)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="pmbench checkpoint (model + reducer structure)")
    src.add_argument("--weights", default=None, help="local timm/DeiT .pth/.safetensors file (or folder)")
    src.add_argument("--pretrained", action="store_true", help="hub weights with the pinned tag")
    p.add_argument("--img-size", type=int, default=None)
    pp.add_arguments(p)
    p.add_argument("--labels", default="auto", choices=data_mod.LABEL_MODES,
                   help="label indices: auto (ImageNet synset folders in canonical order for a 1000-class "
                        "model, else sorted folders), imagenet-1k or folders")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="evaluate a seeded class-stratified subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-images sample")
    p.add_argument("--cache", action="store_true", help="memory-mapped decoded validation cache")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--save-preds", default=None, metavar="FILE",
                   help="write every image's prediction (index, path, label, pred, correct) as CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    """Counts and the output path, before any data, model or compute."""
    for flag in ("batch_size", "max_images", "img_size"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, not {args.workers}")
    check_out_file(args.save_preds, "--save-preds")


def load_for_eval(args):
    """(model patched with the reducer, reducer, weights description, reducer trained?)."""
    from bench.runtime.checkpoint import load_model, read_checkpoint

    ckpt = args.checkpoint
    if ckpt is None and not (args.weights or args.pretrained):
        if args.model.split(".")[0] == "pmbench_proxy_vit":
            d = data_mod.parse_data(args.data)
            if d["source"] != "proxy":
                raise ConfigError("pmbench_proxy_vit is trained on the proxy task; evaluate it with --data proxy")
            ckpt = str(proxy_backbone.ensure_backbone(size=d.get("size") or "default"))
        else:
            raise ConfigError(f"no weights for {args.model}: give --checkpoint, --weights PATH or --pretrained")
    if ckpt:
        model, red = load_model(ckpt, None if args.model == "pmbench_proxy_vit" and args.checkpoint else args.model,
                                reducer=args.reducer)
        models.require_vit(model, args.model)
        stored = registry.build(read_checkpoint(ckpt).get("reducer") or "none") if red.needs_training else None
        trained = not red.needs_training or (stored is not None and stored.full_spec() == red.full_spec())
        return model, red, {"checkpoint": str(ckpt)}, trained
    from bench.runtime.weights import load_pretrained, pinned_name

    model = load_pretrained(args.model, weights=args.weights, img_size=args.img_size)
    models.require_vit(model, args.model)
    red = registry.build(args.reducer or "none")
    if red.name != "none":
        patch.apply(model, red)
    return model, red, {"weights": args.weights or pinned_name(args.model)}, not red.needs_training


def save_preds(path: str, preds: list[dict], samples, root) -> None:
    """Per-image predictions as CSV (written atomically)."""
    with temp_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "path", "label", "pred", "correct"])
        for r in preds:
            w.writerow([r["index"], os.path.relpath(samples[r["index"]][0], root), r["label"], r["pred"],
                        r["correct"]])


def run(args):
    _check_args(args)
    pp.merge_size_flags(args)
    dist.init(args.device)
    device = dist.device_for_rank(args.device)
    registry.build(args.reducer) if args.reducer else None  # a bad spec fails before any loading
    model, red, wdesc, trained = load_for_eval(args)
    prep = pp.from_args(args, args.model, model)
    info = ModelInfo.from_model(model, (prep.img_size, prep.img_size))
    root = data_mod.data_root(args.data)
    labels = data_mod.resolve_labels(root, info.num_classes or None, args.labels)
    dinfo = data_mod.describe_data(args.data, count_train=False, labels=labels)
    loader = data_mod.build_loader(args.data, args.split, args.batch_size, workers=args.workers,
                                   distributed=dist.is_distributed(), max_images=args.max_images, seed=args.seed,
                                   cache=args.cache, prep=prep, labels=labels)
    res = evaluate(model, loader, device=device, amp=args.amp, progress=not args.no_progress,
                   keep_preds=bool(args.save_preds))
    rep = flops.analytic(info, red, args.model)
    out = {
        "model": args.model, "reducer": red.spec(), "reducer_full": red.full_spec(),
        "top1": round(res["top1"], 3), "top5": round(res["top5"], 3),
        "n_images": res["n_images"], "correct_top1": res["correct_top1"], "correct_top5": res["correct_top5"],
        "loss": res["loss"], "gmacs": round(rep.gmacs, 4),
        "preprocess": prep.as_dict(), "labels": labels.kind,
        "n_classes_present": len({lab for _, lab in loader.dataset.samples}),
        "data": dinfo, "data_source": dinfo["source"], "device": env.device_name(device), "img_size": prep.img_size,
        "crop_pct": prep.crop_pct, "amp": args.amp, "wall_s": round(res["wall_s"], 2),
        "max_images": args.max_images, "world_size": dist.world_size(), **wdesc, "stamp": env.stamp(device),
    }
    notes = []
    if dinfo["source"] == "proxy":
        notes.append("proxy task: these are not ImageNet numbers")
    if not trained:
        notes.append(f"{red.name}: its own modules are untrained (off-the-shelf, no fine-tuning): this number does "
                     "not measure the method; fine-tune it first (pmbench train)")
        out["untrained_reducer_modules"] = True
    if notes:
        out["note"] = "; ".join(notes)
    if args.save_preds and dist.is_main():
        save_preds(args.save_preds, res["preds"], loader.dataset.samples, root)
        out["preds_file"] = str(args.save_preds)
    if dist.is_main():
        txt = (f"{args.model} [{red.spec()}] on {dinfo['source']} {args.split} ({res['n_images']} images, "
               f"{out['n_classes_present']} classes): top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
               f"GMACs {rep.gmacs:.4f}  ({out['device']})\ninput: {prep.describe()}"
               + "".join(f"\nnote: {n}" for n in notes))
        emit(out, args.json, txt)
    dist.cleanup()
    return 0
