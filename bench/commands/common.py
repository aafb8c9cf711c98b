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
