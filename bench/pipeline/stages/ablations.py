"""Stage ``ablations``: the profile's ``ablations`` list of (label, spec) variants, and the learned
structures of the run's calibrated methods.

Each variant (in the built-in profiles: Prune and Merge's table 3, i.e. score type, merge vs
prune-only, trainable vs frozen matrices, shortcut, global vs per-layer structure, raster vs 2-D
assignment) is calibrated on the same data as the main rows when its method is Calibrated, evaluated
as it starts, then fine-tuned with its method's recipe for the profile's ablation budget and evaluated.
"""
from __future__ import annotations

from bench.core import flops, registry
from bench.core.reducer import ModelInfo
from bench.pipeline.stages.common import method_notes
from bench.pipeline.stages.sources import Source
from bench.runtime.results import file_hash


def run(ctx) -> None:
    prof = ctx.profile
    src = Source.for_profile(ctx)[0]
    bb = src.ensure_backbone()
    epochs = prof.get("ablation_epochs", prof["finetune_epochs"])
    max_steps = prof.get("ablation_max_steps", prof.get("finetune_max_steps"))
    abl = prof["ablations"]
    n_cal = sum(registry.is_calibrated(spec) for _, spec in abl)  # calibration (Calibrated methods only)
    ctx.progress.plan(n_cal + len(abl), 15.0 * n_cal + 50.0 * len(abl))  # + fine-tune/eval per variant
    rows = []
    for label, spec in abl:
        ck = None
        if registry.is_calibrated(spec):
            try:
                ck = src.calibrate(spec, ctx)
            except Exception as e:
                ctx.failures.append(f"ablation {label} ({spec}) calibration: {e}")
                continue
        desc = {"kind": "ablation", "spec": spec, "backbone": file_hash(bb), "ckpt": ck and file_hash(ck),
                "epochs": epochs, "max_steps": max_steps, "data": src.input_key(),
                "recipe_overrides": src.finetune_overrides(spec), **src.launch_key()}

        def measure(spec=spec, ck=ck, label=label):
            # with --nproc the evaluations and the fine-tuning run through torchrun (bench.runtime.launch)
            # the start: the calibrated checkpoint, or the method applied to the backbone as it is
            model, red = src.load_checkpoint(ck) if ck is not None else src.patched_backbone(spec)
            before = src.evaluate_checkpoint(ck or bb, model, f"eval ablation {label} (off-the-shelf)",
                                             reducer=None if ck is not None else spec)["top1"]
            info = ModelInfo.from_model(model, src.img_size)
            ft, hist = src.finetune(spec, ck, epochs, ctx, max_steps=max_steps)
            model, red = src.load_checkpoint(ft)
            after = src.evaluate_checkpoint(ft, model, f"eval ablation {label} (fine-tuned)")["top1"]
            row = {"ablation": label, "config": spec, "top1_off_the_shelf": round(before, 2),
                   "top1_finetuned": round(after, 2), "gmacs": round(flops.analytic(info, red).gmacs, 4),
                   "steps": hist.get("total_steps", max_steps), "finetune_s": round(hist.get("wall_s", 0.0), 1)}
            if src.launcher is not None:
                row["world_size"] = src.world
            return row

        try:
            rows.append(ctx.job(desc, measure, f"ablation {label}", 50.0))
        except Exception as e:
            ctx.failures.append(f"ablation {label} ({spec}): {e}")
    specs = [spec for _, spec in abl]
    methods = ", ".join(dict.fromkeys(registry.build(s).name for s in specs))
    ctx.add_table("ablations", f"Ablations ({methods}) on {src.data_label}", rows,
                  ctx.meta(data_source=prof["data_source"], precision="fp32", batch_size=src.eval_batch,
                           notes=[f"model: {src.model_name}; every variant starts from the same backbone "
                                  "(calibrated methods: calibrated on the same images; top1_off_the_shelf is "
                                  f"that start), then is fine-tuned {max_steps or str(epochs) + ' epoch(s) of'} "
                                  "steps with its method's own recipe", *method_notes(specs, "ablations")]),
                  ["ablation", "config", "top1_off_the_shelf", "top1_finetuned", "gmacs", "steps", "finetune_s"])
    srows = []
    for spec, per in ctx.structure_summaries.items():
        if not per:
            continue
        srows.append({"config": spec, **{f"L{r['layer']}": r["tokens"] for r in per},
                      "sum": sum(r["tokens"] for r in per)})
    if srows:
        ctx.add_table("learned_structure", "Learned structures: tokens per block (calibrated in this run)", srows,
                      ctx.meta(data_source=prof["data_source"],
                               notes=method_notes([r["config"] for r in srows], "learned_structure")))
