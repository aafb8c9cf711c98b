"""Arguments shared by several sub-commands."""
from __future__ import annotations


def add_model_args(p, reducer_default="none"):
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
    p.add_argument("--reducer", default=reducer_default,
                   help="reducer spec, e.g. none, tome:r=13, evit:keep=0.7,fuse=true (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier width (default: the model's)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def img_size_of(args, model):
    if args.img_size:
        return (args.img_size, args.img_size)
    return tuple(model.patch_embed.img_size)


def unreduced_model(args, n_classes=None, command: str = "this command"):
    """The unpatched model a calibration starts from, and its name: ``--init`` (a pmbench checkpoint),
    ``--weights`` / ``--pretrained`` (:func:`bench.weights.load_pretrained`, the one loader of weight
    files), or, for the proxy model, the proxy backbone of ``--data``."""
    from .. import patch, proxy
    from ..errors import ConfigError

    if args.init:
        from ..checkpoint import load_model, model_name_of

        model, _red = load_model(args.init, args.model)
        if patch.is_patched(model):
            patch.remove(model)
        return model, args.model or model_name_of(model)
    if not args.model:
        raise ConfigError(f"{command} needs --model (or --init CKPT naming its model)")
    if args.model == proxy.PROXY_MODEL and not (args.weights or args.pretrained):
        from ..checkpoint import load_proxy_backbone
        from ..data import parse_data

        return load_proxy_backbone(size=parse_data(args.data).get("size") or "default"), args.model
    if not (args.weights or args.pretrained):
        raise ConfigError(f"{command} needs trained weights: --init CKPT, --weights FILE or --pretrained")
    from ..weights import load_pretrained

    nc = args.num_classes or n_classes
    return load_pretrained(args.model, weights=args.weights, num_classes=nc, img_size=args.img_size), args.model


def prepare_proxy(args) -> None:
    """Generate the proxy data and backbone a command will read (rank 0, before the other ranks start)."""
    from .. import proxy
    from ..data import describe_data, parse_data

    describe_data(args.data)
    if args.model == proxy.PROXY_MODEL and not (args.init or args.weights or args.pretrained):
        proxy.ensure_backbone(size=parse_data(args.data).get("size") or "default")
