"""Stage ``seg``: Segmenter (mmsegmentation) with every reducer: mIoU, GMACs, FPS.

Proxy profiles: the proxy Segmenter trained by the suite on the proxy
segmentation set (cached); paper profile: ``--ade20k PATH`` with mmseg's
Segmenter checkpoints (``--weights DIR``).
"""
from __future__ import annotations

from pathlib import Path

from bench.pipeline.stages.common import method_notes, method_of
from bench.runtime.results import file_hash


def _targets(ctx):
    prof = ctx.profile
    if prof["data_source"] == "proxy":
        from bench.seg.train import ensure_proxy_segmenter

        size = prof.get("proxy_size", "default")
        # --retrain-proxy re-creates the shipped proxy weights: the backbone (accuracy stage) and this Segmenter
        ck = ensure_proxy_segmenter(size=size, force=bool(getattr(ctx.args, "retrain_proxy", False)))
        return [("proxy", "proxy" if size == "default" else f"proxy:{size}", Path(ck))]
    a = ctx.args
    if getattr(a, "fixture", False):
        # the ADE20K-layout path is exercised by tests/test_seg*.py (pmbench seg-eval on a fixture)
        return []
    if not a.ade20k:
        return []
    out = []
    for cfg in ("vit-t", "vit-s", "vit-b"):
        ck = Path(a.weights) / f"segmenter_{cfg}_mask_ade20k.pth" if a.weights else None
        out.append((cfg, f"ade20k:{a.ade20k}", ck if ck and ck.exists() else None))
    return out


def run(ctx) -> None:
    import logging

    from bench.seg import logs
    from bench.seg.evaluate import seg_eval

    # mmengine logs every parameter's init and per-class IoU tables at INFO, and OpenMMLab's packages raise
    # the same deprecation warnings for every row: the table has the numbers (as `pmbench seg-*` without
    # --verbose)
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    logs.set_verbose(False)

    prof = ctx.profile
    rows = []
    targets = _targets(ctx)
    if not targets:
        if getattr(ctx.args, "fixture", False):
            ctx.skip_stage("seg", "the fixture run has no ADE20K fixture; the Segmenter path on ADE20K-layout "
                                  "fixtures is tested by tests/test_seg*.py")
        else:
            ctx.skip_stage("seg", "no --ade20k given")
        return
    from bench.seg.table import KEEPS, TABLE_NOTES, config_info, table_specs

    keeps = tuple(prof.get("seg_keeps", KEEPS))
    extra = [{"method": method_of(s), "keep": None, "spec": s} for s in prof.get("seg_configs", [])]
    plan = {config: table_specs(config_info(config), keeps=keeps) + extra for config, _, _ in targets}
    ctx.progress.plan(sum(len(v) for v in plan.values()), 20.0 * sum(len(v) for v in plan.values()))
    for config, data, ck in targets:
        for row_spec in plan[config]:
            spec, keep = row_spec["spec"], row_spec["keep"]
            desc = {"kind": "seg", "config": config, "spec": spec, "data": data,
                    "ckpt": file_hash(ck) if ck else None, "device": ctx.device}

            def measure(config=config, spec=spec, data=data, ck=ck):
                from bench.seg.evaluate import SegEvalConfig

                opts = SegEvalConfig(device=ctx.device)
                if prof.get("proxy_size") == "smoke" or prof.get("fixture"):
                    opts = SegEvalConfig(device=ctx.device, fps_batches=(2, 1), speed_repeats=2, max_images=4,
                                         calib_iters=2)
                r = seg_eval(config, spec, data, str(ck) if ck else None, opts)
                return {k: v for k, v in r.items() if k in (
                    "miou", "aAcc", "gmacs_per_window", "gmacs_per_image", "fps_bs32", "fps_bs1", "stamp",
                    "n_images", "reducer", "window", "fps_batches", "needs_training")}

            try:
                r = ctx.job(desc, measure, f"seg {config} {spec}", 20.0)
            except Exception as e:
                ctx.failures.append(f"seg {config} {spec}: {e}")
                continue
            method = row_spec.get("label", method_of(spec))
            rows.append({"config_model": config, "method": method, "keep": keep, "config": spec,
                         "miou": r.get("miou"), "aAcc": r.get("aAcc"),
                         "gmacs_per_window": r.get("gmacs_per_window"), "gmacs_per_image": r.get("gmacs_per_image"),
                         "fps_bs32": r.get("fps_bs32"), "fps_bs1": r.get("fps_bs1"), "kind": "off-the-shelf"})
    if prof["data_source"] == "proxy":
        from bench.seg.train import origin_line

        weights = [f"proxy Segmenter: {origin_line(ck)}" for _, _, ck in targets]
    else:
        weights = [f"Segmenter {config}: weights {ck}" for config, _, ck in targets if ck]
    ctx.add_table("segmentation", "Segmenter: mIoU, GMACs and FPS", rows,
                  ctx.meta(data_source=prof["data_source"], precision="fp32", batch_size="32 and 1 (FPS)",
                           notes=[*weights, "mIoU: mmseg IoUMetric with the config's sliding-window test",
                                  "GMACs: encoder (analytic, per-block token counts) + decode head, per 512x512 "
                                  "window (proxy: the proxy crop) and per image",
                                  "reducers applied off-the-shelf to the trained Segmenter (methods that learn a "
                                  "structure from data are calibrated on the training crops, not fine-tuned)",
                                  *TABLE_NOTES, *method_notes([r["spec"] for v in plan.values() for r in v],
                                                              "segmentation")]),
                  ["config_model", "method", "keep", "config", "miou", "aAcc", "gmacs_per_window", "gmacs_per_image",
                   "fps_bs32", "fps_bs1"])
