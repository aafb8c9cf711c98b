"""``pmbench eval``: top-1 / top-5 of a model + reducer on proxy or real validation data.

Weights: ``--checkpoint`` (a pmbench checkpoint; its stored reducer is used unless
``--reducer`` is given), ``--weights FILE`` / ``--pretrained`` (timm/DeiT weights), or,
for ``pmbench_proxy_vit``, the cached proxy backbone (trained on first use).
Reports GMACs of the evaluated configuration (bench.flops.analytic), device,
data source and a provenance stamp.  Works under torchrun (each sample counted once).
"""
from __future__ import annotations

import sys

from .. import data as data_mod
from .. import distributed as dist
from .. import env, flops, patch, registry
from ..cli import emit
from ..reducer import ConfigError, ModelInfo


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
    p.add_argument("--crop-pct", type=float, default=0.875, help="eval crop ratio (papers 0.875, timm cfgs 0.9)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="evaluate a seeded subset")
    p.add_argument("--cache", action="store_true", help="memory-mapped decoded validation cache")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def load_for_eval(args):
    """(model patched with the reducer, reducer, weights description)."""
    from ..checkpoint import load_model

    ckpt = args.checkpoint
    if ckpt is None and not (args.weights or args.pretrained):
        if args.model.split(".")[0] == "pmbench_proxy_vit":
            from .. import proxy

            size = data_mod.parse_data(args.data).get("size") or "default"
            if data_mod.parse_data(args.data)["source"] != "proxy":
                raise ConfigError("pmbench_proxy_vit is trained on the proxy task; evaluate it with --data proxy")
            ckpt = str(proxy.ensure_backbone(size=size))
        else:
            raise ConfigError(f"no weights for {args.model}: give --checkpoint, --weights PATH or --pretrained")
    if ckpt:
        model, red = load_model(ckpt, None if args.model == "pmbench_proxy_vit" and args.checkpoint else args.model,
                                reducer=args.reducer)
        return model, red, {"checkpoint": str(ckpt)}
    from ..weights import load_pretrained, pinned_name

    model = load_pretrained(args.model, weights=args.weights, img_size=args.img_size)
    red = registry.build(args.reducer or "none")
    if red.name != "none":
        patch.apply(model, red)
    return model, red, {"weights": args.weights or pinned_name(args.model)}


def run(args):
    dist.init(args.device)
    device = dist.device_for_rank(args.device)
    model, red, wdesc = load_for_eval(args)
    img = args.img_size or model.patch_embed.img_size[0]
    info = ModelInfo.from_model(model, (img, img))
    dinfo = data_mod.describe_data(args.data, count_train=False)
    if info.num_classes and info.num_classes != dinfo["num_classes"]:
        raise ConfigError(f"the model has {info.num_classes} classes but {args.data} has {dinfo['num_classes']}")
    loader = data_mod.build_loader(args.data, args.split, args.batch_size, img_size=img, crop_pct=args.crop_pct,
                                   workers=args.workers, distributed=dist.is_distributed(),
                                   max_images=args.max_images, cache=args.cache)
    from ..evaluate import evaluate

    res = evaluate(model, loader, device=device, amp=args.amp, progress=not args.json)
    rep = flops.analytic(info, red, args.model)
    out = {
        "model": args.model, "reducer": red.spec(), "top1": round(res["top1"], 3), "top5": round(res["top5"], 3),
        "n_images": res["n_images"], "loss": res["loss"], "gmacs": round(rep.gmacs, 4),
        "data": dinfo, "data_source": dinfo["source"], "device": env.device_name(device), "img_size": img,
        "crop_pct": args.crop_pct, "amp": args.amp, "wall_s": round(res["wall_s"], 2),
        "world_size": dist.world_size(), **wdesc, "stamp": env.stamp(device),
    }
    if dinfo["source"] == "proxy":
        out["note"] = "proxy task: these are not ImageNet numbers"
    if dist.is_main():
        txt = (f"{args.model} [{red.spec()}] on {dinfo['source']} {args.split} ({res['n_images']} images): "
               f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  GMACs {rep.gmacs:.4f}  ({out['device']})"
               + ("\n(proxy task: not ImageNet numbers)" if dinfo["source"] == "proxy" else ""))
        emit(out, args.json, txt)
    dist.cleanup()
    return 0
