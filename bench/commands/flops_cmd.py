"""``pmbench flops``: GMACs (the field's "GFLOPs") from per-block token counts."""
from __future__ import annotations

from bench.cli import emit
from bench.commands.common import add_model_args, img_size_of
from bench.core import flops, patch, registry
from bench.core.reducer import Calibrated, ModelInfo, split_conventions
from bench.runtime import models
from bench.runtime.checkpoint import load_structure


def add_parser(sub):
    p = sub.add_parser("flops", help="analytic GMACs of a model + reducer, with a per-block breakdown")
    add_model_args(p)
    p.add_argument("--measure", action="store_true",
                   help="also count with torch FlopCounterMode on a real forward (cross-check)")
    p.add_argument("--checkpoint", default=None, help="reducer checkpoint (methods whose structure is learned)")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """0 and negative sizes are errors, never read as "the model's default"."""
    from bench.runtime.outputs import positive

    positive(args.img_size, "--img-size")
    positive(args.num_classes, "--num-classes")


def build(args):
    check_args(args)
    kw = {}
    if args.img_size is not None:
        kw["img_size"] = args.img_size
    red = registry.build(args.reducer)  # spec errors before any model is built
    model = models.create(args.model, num_classes=args.num_classes, **kw)
    if args.checkpoint and isinstance(red, Calibrated):
        load_structure(red, args.checkpoint)
    img = img_size_of(args, model)
    ps = tuple(model.patch_embed.patch_size)
    if img[0] < ps[0] or img[1] < ps[1]:
        from bench.core.reducer import ConfigError

        raise ConfigError(f"--img-size {img[0]} is smaller than {args.model}'s {ps[0]}x{ps[1]} patch: "
                          "no patch token would remain")
    patch.apply(model, red, img_size=img)
    return model, red, img


def run(args):
    model, red, img = build(args)
    info = ModelInfo.from_model(model, img)
    rep = flops.analytic(info, red, args.model)
    out = rep.to_dict()
    paper, conv = split_conventions(red, info)
    if paper is not None:
        out["paper_count_gmacs"] = round(paper / 1e9, 4)
    if conv:
        out["method_conventions"] = conv
    if args.measure:
        out["measured_macs"] = flops.measured_macs(model, img)
        out["measured_gmacs"] = round(out["measured_macs"] / 1e9, 4)
    lines = [
        f"model {args.model}  reducer {red.spec()}  input {img[0]}x{img[1]}",
        f"GMACs: {rep.gmacs:.3f}   (multiply-accumulates; papers call these GFLOPs)",
        f"  patch embed {rep.patch_embed / 1e9:.4f}  head {rep.head / 1e9:.4f}  reducer modules {rep.reducer_extra / 1e9:.4f}",
        "  block  attn_tokens  mlp_tokens  attn_GMACs  mlp_GMACs",
    ]
    for b in rep.blocks:
        lines.append(f"  {b['block']:5d}  {b['attn_tokens']:11d}  {b['mlp_tokens']:10d}  "
                     f"{b['attn_macs'] / 1e9:10.4f}  {b['mlp_macs'] / 1e9:9.4f}")
    if args.measure:
        lines.append(f"measured (FlopCounterMode): {out['measured_gmacs']:.3f} GMACs")
    if paper is not None:
        lines.append(f"the method paper's own count (for comparison with its published figures): "
                     f"{out['paper_count_gmacs']:.3f}")
    if "method_conventions" in out:
        for k, v in out["method_conventions"].items():
            lines.append(f"{k}: {v}")
    emit(out, args.json, "\n".join(lines))
    return 0
