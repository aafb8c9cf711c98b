"""Stage ``accuracy``: top-1 of every configuration, off-the-shelf and fine-tuned.

Proxy profiles: the proxy backbone (trained by the suite, cached) is the
starting point of every row.  Off-the-shelf rows patch it as is (methods with the Calibrated
capability, e.g. PM: after calibration, before fine-tuning; methods that declare ``needs_training``, i.e.
DynamicViT's untrained predictors, get no off-the-shelf row: the number would
not measure the method).  Fine-tuned rows run the method's own recipe
(``Reducer.recipe``) through the shared trainer with the unreduced backbone as
teacher, for the profile's number of epochs.

Every row keeps each image's outcome, so every reduced row's drop against the
unreduced model is given on the same images with a paired 95% interval and the
exact McNemar p-value (:mod:`bench.runtime.stats`); the per-image outcomes are written
to ``accuracy_per_image.csv``.

The fine-tuned checkpoints of Calibrated methods are handed to the cost and speed stages
(``ctx.finetuned``): fine-tuning may change their learned modules (PM: free fine-tuning makes M and R
dense, so the fine-tuned model costs more than the calibrated one), and their rows there
(``structure`` = fine-tuned) are costed on the fine-tuned modules.

Paper profile: the same with pretrained DeiT weights on ImageNet.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.core import flops, registry
from bench.core.reducer import ModelInfo
from bench.pipeline.stages.common import calibrated_specs, method_notes, method_of, short_model
from bench.pipeline.stages.sources import Source
from bench.runtime import proxy_ranking, stats
from bench.runtime.results import JobTaken, atomic_write_text, file_hash

COLUMNS = ["model", "method", "config", "kind", "structure", "top1", "drop", "drop_ci95", "mcnemar_p", "top5", "gmacs", "speedup",
           "n_images", "steps", "finetune_s", "note"]


def _eval_row(ctx, src: Source, model, spec: str, kind: str, red, extra=None) -> dict:
    info = ModelInfo.from_model(model, src.img_size)
    gm = flops.analytic(info, red, src.model_name).gmacs
    res = src.evaluate(model)
    row = {"model": short_model(src.model_name), "timm_model": src.model_name, "method": method_of(spec),
           "config": spec, "config_full": red.full_spec(), "kind": kind, "top1": round(res["top1"], 2),
           "top5": round(res["top5"], 2), "n_images": res["n_images"], "gmacs": round(gm, 4),
           "correct": res["correct"]}
    if extra:
        row.update(extra)
    return row


def _launched_row(src: Source, spec: str, kind: str, path, reducer=None, extra=None) -> dict:
    """The row of :func:`_eval_row`, measured by ``pmbench eval`` under torchrun (``--nproc``): every image
    once, on one rank; the counts summed and the per-image outcomes gathered in dataset order."""
    res = src.launch_eval(path, reducer, label=f"eval {spec} ({kind})")
    row = {"model": short_model(src.model_name), "timm_model": src.model_name, "method": method_of(spec),
           "config": spec, "config_full": res["reducer_full"], "kind": kind, "top1": round(res["top1"], 2),
           "top5": round(res["top5"], 2), "n_images": res["n_images"], "gmacs": round(res["gmacs"], 4),
           "correct": res["correct"], "eval_world_size": res["world_size"]}
    if extra:
        row.update(extra)
    return row


def add_paired_drops(rows: list[dict]) -> None:
    """Each reduced row's drop vs the unreduced row of the same model, on the same images, with a
    paired-bootstrap 95% interval and the exact McNemar p-value (in place)."""
    base = {r["timm_model"]: r for r in rows if r["config"] == "none" and r["kind"] == "off-the-shelf"}
    for r in rows:
        ref = base.get(r["timm_model"])
        if ref is None or r is ref or not r.get("correct") or len(r["correct"]) != len(ref.get("correct", "")):
            continue
        s = stats.paired_drop(ref["correct"], r["correct"])
        r["drop"] = round(s["drop"], 2)
        r["drop_ci95"] = stats.format_interval(s["ci_low"], s["ci_high"])
        r["drop_ci_low"], r["drop_ci_high"] = round(s["ci_low"], 2), round(s["ci_high"], 2)
        r["mcnemar_p"] = float(f"{s['mcnemar_p']:.3g}")


def write_per_image(ctx, src: Source, rows: list[dict]) -> None:
    """``accuracy_per_image.csv``: one line per validation image, one 0/1 column per row."""
    cols = {f"{r['model']}|{r['config']}|{r['kind']}": list(r["correct"]) for r in rows if r.get("correct")}
    if not cols:
        return
    n = len(next(iter(cols.values())))
    samples = src.val_loader().dataset.samples
    if any(len(v) != n for v in cols.values()) or len(samples) != n:
        return
    df = pd.DataFrame({"image": [p.split("/val/", 1)[-1] for p, _ in samples], "label": [lab for _, lab in samples],
                       **{k: [int(c) for c in v] for k, v in cols.items()}})
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.out_dir / "accuracy_per_image.csv", df.to_csv(index=False))


def run(ctx) -> None:
    rows = []
    sources = Source.for_profile(ctx)
    for src in sources:
        rows += run_source(ctx, src)
    add_paired_drops(rows)
    src = sources[0]
    write_per_image(ctx, src, rows)
    skipped = sorted({method_of(s) for s in ctx.profile["accuracy_configs"] if registry.build(s).needs_training})
    notes = [f"model: {src.model_name} ({src.describe()})",
             f"input: {src.prep.describe()}; labels: {src.labels.describe()}",
             "kind: off-the-shelf = reducer applied to the trained backbone as is (methods that learn a "
             "structure from data: calibrated, not fine-tuned); fine-tuned = the method's recipe through the "
             "shared trainer",
             "drop = top-1 of the row minus the unreduced model's, on the same images (points); drop_ci95 = paired "
             "bootstrap 95% interval (10,000 resamples of the images); mcnemar_p = exact McNemar test of the "
             "per-image outcomes (a drop whose interval excludes 0 is real on these images)",
             "config_full (CSV/JSON) = the reducer spec with every option resolved"]
    launcher = getattr(ctx, "launcher", None)
    if launcher is not None:
        notes.append(f"launched: calibration, fine-tuning and evaluation ran through {launcher.cfg.describe()}; "
                     "evaluation gives the one-process numbers (every image once, per-image outcomes gathered in "
                     "dataset order; only floating-point rounding of other batch compositions could differ); calibration sums the ranks' scores of each global batch and fine-tuning is DDP "
                     "with the global batch split over the ranks, so those rows can differ slightly from a "
                     "one-process run (their cache keys hold the world size); eval_world_size / "
                     "finetune_world_size (CSV/JSON) = the processes each row ran on")
    if skipped:
        notes.append(f"no off-the-shelf rows for {', '.join(skipped)}: its own modules are untrained before "
                     "fine-tuning, so such a number would not measure the method")
    cal_specs = calibrated_specs(sorted({r["config"] for r in rows}))
    notes += [n.format(model=short_model(src.model_name)) for n in method_notes(cal_specs, "accuracy")]
    if ctx.profile["data_source"] == "proxy":
        ranking = proxy_ranking.ranking_note(rows)
        if ranking:
            notes.insert(0, ranking)
    columns = list(COLUMNS)
    n_classes = src.labels.num_classes
    if n_classes <= 10:
        columns.remove("top5")
        notes.append(f"top-5 omitted: the data has {n_classes} classes, so top-5 is (nearly) 100% for every row "
                     "and measures nothing")
    for r in rows:
        note = registry.build(r["config"]).off_the_shelf_note if r["kind"] == "off-the-shelf" else None
        if note:  # what the method says its off-the-shelf rows are (not part of the cached measurement)
            r["note"] = note
        r["structure"] = (("fine-tuned" if r["kind"] == "fine-tuned" else "calibrated")
                          if r["config"] in cal_specs else None)
    meta = ctx.meta(data_source=ctx.profile["data_source"], batch_size=src.eval_batch, precision="fp32",
                    preprocess=src.prep.as_dict(), n_classes=n_classes, notes=notes)
    drop = {"correct", "checkpoint"} | ({"top5"} if n_classes <= 10 else set())
    table_rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    ctx.add_table("accuracy", f"Top-1 on {src.data_label}", table_rows, meta, columns)


def _checkpoint_ok(row: dict) -> bool:
    p = row.get("checkpoint")
    return bool(p) and Path(p).exists() and file_hash(p) == row.get("checkpoint_hash")


def _calibrate_all(ctx, src, specs: list) -> dict:
    """Calibrate every Calibrated spec among ``specs`` on ``src``: {spec: structure file}; a failure is
    recorded in ``ctx.failures`` and leaves the spec out."""
    calibrated, failed = {}, set()
    # a job worker first calibrates what no other worker has taken, so the calibrations run side by side,
    # then waits for the others' (bench/pipeline/workers.py)
    passes = (False, True) if getattr(ctx, "worker", None) is not None else (True,)
    for wait in passes:
        for spec in sorted(set(calibrated_specs(specs))):
            if spec in calibrated or spec in failed:
                continue
            try:
                calibrated[spec] = src.calibrate(spec, ctx, wait=wait)
            except Exception as e:
                if isinstance(e, JobTaken) and not wait:
                    continue  # another worker calibrates it: waited for in the second pass
                failed.add(spec)
                ctx.failures.append(f"{method_of(spec)}-calibrate {spec}: {e}")
    return calibrated


def run_source(ctx, src) -> list:
    prof = ctx.profile
    backbone_path = src.ensure_backbone()
    bb_hash = file_hash(backbone_path)
    configs = list(prof["accuracy_configs"])
    ft_configs = list(prof["finetune_configs"])
    n_cal = len(set(calibrated_specs(configs + ft_configs)))
    n_eval = sum(not registry.build(s).needs_training for s in configs)
    ctx.progress.plan(n_cal + n_eval + len(ft_configs), 15.0 * n_cal + 4.0 * n_eval + 40.0 * len(ft_configs))
    rows = []
    base_desc = {"kind": "accuracy", "model": src.model_name, "data": src.input_key(), "backbone": bb_hash,
                 "per_image": 1}

    # Calibrated methods need their structure before anything else (off-the-shelf = calibrated, not
    # fine-tuned)
    calibrated = _calibrate_all(ctx, src, configs + ft_configs)
    ctx.calibrated = calibrated

    for spec in configs:
        if registry.build(spec).needs_training:
            continue

        def measure(spec=spec):
            if src.launcher is not None:
                if spec in calibrated:
                    return _launched_row(src, spec, "off-the-shelf", calibrated[spec])
                return _launched_row(src, spec, "off-the-shelf", backbone_path, reducer=spec)
            if spec in calibrated:
                model, red = src.load_checkpoint(calibrated[spec])
            else:
                model, red = src.patched_backbone(spec)
            return _eval_row(ctx, src, model, spec, "off-the-shelf", red)

        if registry.is_calibrated(spec) and spec not in calibrated:
            continue
        desc = {**base_desc, "spec": spec, "row": "off-the-shelf",
                "ckpt": file_hash(calibrated[spec]) if spec in calibrated else None}
        try:
            rows.append(ctx.job(desc, measure, f"eval {spec} (off-the-shelf)", 4.0))
        except Exception as e:
            ctx.failures.append(f"eval {spec}: {e}")

    for spec in ft_configs:
        init = calibrated.get(spec)
        is_cal = registry.is_calibrated(spec)
        if is_cal and init is None:
            continue
        desc = {**base_desc, "spec": spec, "row": "fine-tuned", "epochs": prof["finetune_epochs"],
                "max_steps": prof.get("finetune_max_steps"),
                "init": file_hash(init) if init else None, "recipe_overrides": src.finetune_overrides(spec),
                **src.launch_key()}

        def measure(spec=spec, init=init):
            ckpt, hist = src.finetune(spec, init, prof["finetune_epochs"], ctx)
            extra = {"finetune_s": round(hist.get("wall_s", 0.0), 1),
                     "steps": hist.get("total_steps"), "epochs": prof["finetune_epochs"],
                     "checkpoint": str(ckpt), "checkpoint_hash": file_hash(ckpt)}
            if src.launcher is not None:
                extra["finetune_world_size"] = hist.get("world_size")
                return _launched_row(src, spec, "fine-tuned", ckpt, extra=extra)
            model, red = src.load_checkpoint(ckpt)
            return _eval_row(ctx, src, model, spec, "fine-tuned", red, extra)

        try:
            row = ctx.job(desc, measure, f"fine-tune + eval {spec}", 40.0)
            if is_cal and not _checkpoint_ok(row):
                # the cost and speed stages cost the fine-tuned learned modules: its checkpoint must exist
                with ctx.cache.remeasure():
                    row = ctx.job(desc, measure, f"fine-tune + eval {spec} (re-run: checkpoint missing)", 40.0)
            if is_cal:
                ctx.finetuned[(src.model_name, registry.build(spec).spec())] = Path(row["checkpoint"])
            rows.append(row)
        except Exception as e:
            ctx.failures.append(f"fine-tune {spec}: {e}")

    return rows
