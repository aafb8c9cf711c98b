"""Stage ``accuracy``: top-1 of every configuration, off-the-shelf and fine-tuned.

Proxy profiles: the proxy backbone (trained by the suite, cached) is the
starting point of every row.  Off-the-shelf rows patch it as is (PM: after
calibration, before fine-tuning; DynamicViT is skipped: untrained predictors
mean nothing).  Fine-tuned rows run the method's own recipe
(``Reducer.recipe``) through the shared trainer with the unreduced backbone
as teacher, for the profile's number of epochs.

Paper profile: the same with pretrained DeiT weights on ImageNet.
"""
from __future__ import annotations

from .. import flops
from ..reducer import ModelInfo
from ..results import file_hash
from .common import method_of, short_model
from .sources import Source


def _eval_row(ctx, src: Source, model, spec: str, kind: str, red, extra=None) -> dict:
    info = ModelInfo.from_model(model, src.img_size)
    gm = flops.analytic(info, red, src.model_name).gmacs
    res = src.evaluate(model)
    row = {"model": short_model(src.model_name), "timm_model": src.model_name, "method": method_of(spec),
           "config": spec, "kind": kind, "top1": round(res["top1"], 2), "top5": round(res["top5"], 2),
           "n_images": res["n_images"], "gmacs": round(gm, 4)}
    if extra:
        row.update(extra)
    return row


def run(ctx) -> None:
    rows = []
    for src in Source.for_profile(ctx):
        rows += run_source(ctx, src)
    src = Source.for_profile(ctx)[0]
    meta = ctx.meta(data_source=ctx.profile["data_source"], batch_size=src.eval_batch, precision="fp32",
                    notes=[f"model: {src.model_name} ({src.describe()})",
                           "kind: off-the-shelf = reducer applied to the trained backbone as is (PM: calibrated, "
                           "not fine-tuned); fine-tuned = the method's recipe through the shared trainer",
                           ])
    ctx.add_table("accuracy", f"Top-1 on {src.data_label}", rows, meta,
                  ["model", "method", "config", "kind", "top1", "top5", "gmacs", "speedup", "n_images",
                   "steps", "finetune_s"])


def run_source(ctx, src) -> list:
    prof = ctx.profile
    backbone_path = src.ensure_backbone()
    bb_hash = file_hash(backbone_path)
    configs = list(prof["accuracy_configs"])
    ft_configs = list(prof["finetune_configs"])
    ctx.progress.plan(len(configs) + len(ft_configs), 4.0 * len(configs) + 40.0 * len(ft_configs))
    rows = []
    base_desc = {"kind": "accuracy", "model": src.model_name, "data": src.data_desc, "backbone": bb_hash}

    # PM needs a calibrated structure before anything else (off-the-shelf = calibrated, not fine-tuned).
    pm_ckpts = {}
    for spec in sorted({s for s in configs + ft_configs if method_of(s) == "pm"}):
        try:
            pm_ckpts[spec] = src.pm_calibrate(spec, ctx)
        except Exception as e:
            ctx.failures.append(f"pm-calibrate {spec}: {e}")
    ctx.pm_structures = pm_ckpts

    for spec in configs:
        if method_of(spec) in ("dynamicvit",):
            continue

        def measure(spec=spec):
            if method_of(spec) == "pm":
                model, red = src.load_checkpoint(pm_ckpts[spec])
            else:
                model, red = src.patched_backbone(spec)
            return _eval_row(ctx, src, model, spec, "off-the-shelf", red)

        if method_of(spec) == "pm" and spec not in pm_ckpts:
            continue
        desc = {**base_desc, "spec": spec, "row": "off-the-shelf",
                "ckpt": file_hash(pm_ckpts[spec]) if spec in pm_ckpts else None}
        try:
            rows.append(ctx.job(desc, measure, f"eval {spec} (off-the-shelf)", 4.0))
        except Exception as e:
            ctx.failures.append(f"eval {spec}: {e}")

    for spec in ft_configs:
        init = pm_ckpts.get(spec)
        if method_of(spec) == "pm" and init is None:
            continue
        desc = {**base_desc, "spec": spec, "row": "fine-tuned", "epochs": prof["finetune_epochs"],
                "max_steps": prof.get("finetune_max_steps"),
                "init": file_hash(init) if init else None}

        def measure(spec=spec, init=init):
            ckpt, hist = src.finetune(spec, init, prof["finetune_epochs"], ctx)
            model, red = src.load_checkpoint(ckpt)
            return _eval_row(ctx, src, model, spec, "fine-tuned", red,
                             {"finetune_s": round(hist.get("wall_s", 0.0), 1),
                              "steps": hist.get("total_steps"), "epochs": prof["finetune_epochs"]})

        try:
            rows.append(ctx.job(desc, measure, f"fine-tune + eval {spec}", 40.0))
        except Exception as e:
            ctx.failures.append(f"fine-tune {spec}: {e}")

    return rows
