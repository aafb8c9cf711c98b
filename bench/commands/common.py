"""Arguments and set-up shared by several sub-commands."""
from __future__ import annotations

from dataclasses import dataclass

from bench.core import patch
from bench.core.errors import ConfigError
from bench.runtime import distributed as bd, models, preprocess as pp, proxy, proxy_backbone
from bench.runtime.checkpoint import load_model, model_name_of
from bench.runtime.data import build_loader, data_root, describe_data, parse_data, resolve_labels
from bench.runtime.weights import load_pretrained


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
    ``--weights`` / ``--pretrained`` (:func:`bench.runtime.weights.load_pretrained`, the one loader of weight
    files), or, for the proxy model, the proxy backbone of ``--data``."""
    if args.init:
        model, _red = load_model(args.init, args.model)
        if patch.is_patched(model):
            patch.remove(model)
        return model, args.model or model_name_of(model)
    if not args.model:
        raise ConfigError(f"{command} needs --model (or --init CKPT naming its model)")
    if args.model == proxy.PROXY_MODEL and not (args.weights or args.pretrained):
        return proxy_backbone.load_proxy_backbone(size=parse_data(args.data).get("size") or "default"), args.model
    if not (args.weights or args.pretrained):
        raise ConfigError(f"{command} needs trained weights: --init CKPT, --weights FILE or --pretrained")
    nc = args.num_classes or n_classes
    return load_pretrained(args.model, weights=args.weights, num_classes=nc, img_size=args.img_size), args.model


def prepare_proxy(args) -> None:
    """Generate the proxy data and backbone a command will read (rank 0, before the other ranks start)."""
    describe_data(args.data)
    if args.model == proxy.PROXY_MODEL and not (args.init or args.weights or args.pretrained):
        proxy_backbone.ensure_backbone(size=parse_data(args.data).get("size") or "default")


@dataclass
class CalibrationInputs:
    """What a calibration command works on: the unreduced model on this rank's device (eval mode), its
    name, the rank and world size, the labels, the model's own preprocessing and the shuffled loader of
    ``args.split`` (this rank's shard)."""
    model: object
    model_name: str
    device: str
    rank: int
    world: int
    labels: object
    prep: object
    loader: object


def calibration_inputs(args, command: str, train_aug: bool = False) -> CalibrationInputs:
    """Distributed set-up (torchrun's environment, rank 0 prepares the proxy first), the model with its
    weights (:func:`unreduced_model`), labels checked against its head and its preprocessing, before any
    compute; then the seeded, shuffled loader: the first batches cover the classes, as the official PM
    code's shuffled loader does, instead of the first classes in folder order."""
    bd.init(args.device)
    rank, world = bd.rank(), bd.world_size()
    device = bd.device_for_rank(args.device)
    if world > 1:  # rank 0 prepares (generates data, loads or trains the proxy backbone) before the others read
        if rank == 0:
            prepare_proxy(args)
        bd.barrier()
    model, model_name = unreduced_model(args, describe_data(args.data)["num_classes"], command)
    models.require_vit(model, model_name or "model")
    model = model.to(device).eval()
    labels = resolve_labels(data_root(args.data), model.num_classes, args.labels)
    prep = pp.from_args(args, model_name, model)
    loader = build_loader(args.data, args.split, args.batch_size, train=train_aug, prep=prep, labels=labels,
                          distributed=world > 1, shuffle=True, seed=args.seed)
    return CalibrationInputs(model, model_name, device, rank, world, labels, prep, loader)
