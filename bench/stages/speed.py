"""Stage ``speed``: throughput of every configuration, interleaved with the unreduced model."""
from __future__ import annotations

from .. import env, speed
from .common import base_model, method_of, patched_copy, pm_structure_note, short_model


def run(ctx) -> None:
    prof = ctx.profile
    sp = prof["speed"]
    rows = []
    for model_name in sp["models"]:
        over = sp.get("per_model", {}).get(model_name, {})
        configs = over.get("configs", sp.get("configs", prof["cost_configs"]))
        precisions = [sp["precision"]] + list(sp.get("also_precisions", []))
        for prec in precisions:
            cfg = speed.SpeedConfig(batch_size=over.get("batch_size", sp["batch_size"]), precision=prec,
                                    device=ctx.device, warmup=over.get("warmup", sp["warmup"]),
                                    iters=over.get("iters", sp["iters"]), repeats=over.get("repeats", sp["repeats"]),
                                    img_size=tuple(base_model(model_name).patch_embed.img_size))
            desc = {"kind": "speed", "model": model_name, "configs": configs, "cfg": cfg.__dict__,
                    "device": env.device_name(ctx.device),
                    "structure": [getattr(ctx, "structure_key", lambda s: None)(s) for s in configs]}
            est = 2.0 * len(configs) * cfg.repeats * (cfg.iters or 2)

            def measure(model_name=model_name, configs=configs, cfg=cfg):
                ms, specs = {}, {}
                for s in configs:
                    if s == "none":
                        ms["none"] = base_model(model_name)
                        specs["none"] = "none"
                        continue
                    try:
                        m, red = patched_copy(ctx, model_name, s)
                    except Exception as e:
                        ctx.failures.append(f"speed {model_name} {s}: {e}")
                        continue
                    ms[s] = m
                    specs[s] = red.spec()
                res = speed.measure(ms, cfg, baseline="none")
                res["specs"] = specs
                return res

            ctx.progress.plan(1, est)
            r = ctx.job(desc, measure, f"speed {short_model(model_name)} x{len(configs)} configs {prec}", est)
            for s, m in r["models"].items():
                rows.append({
                    "model": short_model(model_name), "method": method_of(s), "config": s,
                    "precision": prec, "batch_size": r["config"]["batch_size"],
                    "img_s": round(m["img_s"], 2), "img_s_min": round(m["img_s_min"], 2),
                    "img_s_max": round(m["img_s_max"], 2),
                    "speedup": round(m.get("speedup", 1.0), 3),
                    "speedup_min": round(m.get("speedup_min", 1.0), 3),
                    "speedup_max": round(m.get("speedup_max", 1.0), 3),
                    "device": r["stamp"]["device"],
                })
            ctx.speed_protocol = r["config"]["protocol"]
    meta = ctx.meta(data_source="synthetic input (random weights; cost and speed need no trained weights)",
                    precision=", ".join(sorted({r["precision"] for r in rows})) or sp["precision"],
                    batch_size=", ".join(sorted({str(r["batch_size"]) for r in rows})) or sp["batch_size"],
                    notes=[f"protocol: {getattr(ctx, 'speed_protocol', '')}",
                           "speed-up = median over repeats of t_baseline / t_reduced, measured interleaved in one process",
                           *pm_structure_note(ctx, sorted({r["config"] for r in rows}))])
    ctx.add_table("throughput", "Throughput (images/s) and speed-up vs the unreduced model", rows, meta,
                  ["model", "method", "config", "precision", "batch_size", "img_s", "img_s_min", "img_s_max",
                   "speedup", "speedup_min", "speedup_max"])
