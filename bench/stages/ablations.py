"""Stage ``ablations``: Prune and Merge ablations (table 3).

Each variant is a PM spec (score type, merge vs prune-only, trainable vs frozen
matrices, shortcut, global vs per-layer structure, raster vs 2-D assignment):
calibrated on the same data as the main rows, evaluated as calibrated, then
fine-tuned with PM's recipe for the profile's ablation epochs and evaluated.
"""
from __future__ import annotations

from .. import flops
from ..reducer import ModelInfo
from ..results import file_hash
from .sources import Source


def run(ctx) -> None:
    prof = ctx.profile
    src = Source.for_profile(ctx)[0]
    bb = src.ensure_backbone()
    epochs = prof.get("ablation_epochs", prof["finetune_epochs"])
    max_steps = prof.get("ablation_max_steps", prof.get("finetune_max_steps"))
    abl = prof["ablations"]
    ctx.progress.plan(2 * len(abl), 65.0 * len(abl))  # calibration + fine-tune/eval per variant
    rows = []
    for label, spec in abl:
        try:
            ck = src.calibrate(spec, ctx)
        except Exception as e:
            ctx.failures.append(f"ablation {label} ({spec}) calibration: {e}")
            continue
        desc = {"kind": "pm-ablation", "spec": spec, "backbone": file_hash(bb), "ckpt": file_hash(ck),
                "epochs": epochs, "max_steps": max_steps, "data": src.input_key(),
                "recipe_overrides": src.finetune_overrides(spec), **src.launch_key()}

        def measure(spec=spec, ck=ck, label=label):
            # with --nproc the evaluations and the fine-tuning run through torchrun (bench.launch)
            model, red = src.load_checkpoint(ck)
            info = ModelInfo.from_model(model, src.img_size)
            before = src.evaluate_checkpoint(ck, model, f"eval ablation {label} (calibrated)")["top1"]
            ft, hist = src.finetune(spec, ck, epochs, ctx, max_steps=max_steps)
            model, red = src.load_checkpoint(ft)
            after = src.evaluate_checkpoint(ft, model, f"eval ablation {label} (fine-tuned)")["top1"]
            row = {"ablation": label, "config": spec, "top1_calibrated": round(before, 2),
                   "top1_finetuned": round(after, 2), "gmacs": round(flops.analytic(info, red).gmacs, 4),
                   "steps": hist.get("total_steps", max_steps), "finetune_s": round(hist.get("wall_s", 0.0), 1)}
            if src.launcher is not None:
                row["world_size"] = src.world
            return row

        try:
            rows.append(ctx.job(desc, measure, f"ablation {label}", 50.0))
        except Exception as e:
            ctx.failures.append(f"ablation {label} ({spec}): {e}")
    ctx.add_table("pm_ablations", f"Prune and Merge ablations on {src.data_label}", rows,
                  ctx.meta(data_source=prof["data_source"], precision="fp32", batch_size=src.eval_batch,
                           notes=[f"model: {src.model_name}; every variant calibrated on the same images, "
                                  f"fine-tuned {max_steps or str(epochs) + ' epoch(s) of'} steps with PM's "
                                  "self-distillation recipe"]),
                  ["ablation", "config", "top1_calibrated", "top1_finetuned", "gmacs", "steps", "finetune_s"])
    layers = ctx.structure_summaries
    srows = []
    for spec, per in layers.items():
        if not per:
            continue
        srows.append({"config": spec, **{f"L{r['layer']}": r["tokens"] for r in per},
                      "sum": sum(r["tokens"] for r in per)})
    if srows:
        ctx.add_table("pm_structure", "Prune and Merge: searched tokens per block (calibrated in this run)", srows,
                      ctx.meta(data_source=prof["data_source"],
                               notes=["tokens = centres + CLS processed by each block; "
                                      "global rule: sum = L*int(196*keep) + L (up to ties)"]))
